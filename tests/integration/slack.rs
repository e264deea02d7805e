//! Slack end to end: cards routed by tier, signed clicks, modals, identity, refusals,
//! Slack outages, and the slash command — against a local fake Slack Web API.

use std::time::Duration;

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::domain::Status;
use signoff::workers::Swept;

use crate::support::fake_slack::{
    button_value, click_payload, slack_signature, Failure, SlackDriver,
};
use crate::support::{backends, Backend, TestApp};

const SLACK_POLICY: &str = r#"version: 1
default: deny
groups:
  sre: ["slack:U01ALICE", "slack:U02BOB", "email:carol@example.com", "slack-group:S0ONCALL"]
tiers:
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["group:sre"]
    approvals: 1
    ttl: 30m
  high:
    route: ["slack:C0HIGH", "slack:C0AUDIT"]
    approvers: ["group:sre"]
    approvals: 2
    ttl: 1h
rules:
  - name: reads
    match: ["*.get"]
    effect: allow
  - name: email
    match: ["email.send"]
    effect: require_approval
    tier: medium
  - name: refunds
    match: ["payments.refund"]
    effect: require_approval
    tier: high
"#;

const WAIT: Duration = Duration::from_secs(10);
/// The longest backoff before a card's next attempt (jittered below it): four of these
/// stay inside the medium tier's 30-minute ttl.
const CARD_RETRY: Duration = Duration::from_secs(5 * 60);

async fn slack_app(backend: Backend) -> Option<TestApp> {
    let app = TestApp::spawn_with_policy(backend, SLACK_POLICY).await?;
    app.slack.add_user("U03CAROL", "Carol@Example.com");
    app.slack.add_user("U01ALICE", "alice@example.com");
    // The policy names Carol by email, so every voter's email must be readable (a user
    // whose email Slack hides is refused: see tests/integration/trust.rs).
    for user in ["U02BOB", "U04DAVE", "U09MALLORY"] {
        app.slack
            .add_user(user, &format!("{}@example.com", user.to_lowercase()));
    }
    app.slack.set_group("S0ONCALL", &["U04DAVE"]);
    Some(app)
}

macro_rules! slack_app {
    ($backend:expr) => {
        match slack_app($backend).await {
            Some(app) => app,
            None => return,
        }
    };
}

fn text_of(call: &Value) -> String {
    call["blocks"].to_string()
}

/// Delivers what is due, then asserts that the latest card for `id` in each of `channels`
/// contains every one of `words`.
async fn cards_show(app: &TestApp, channels: &[&str], id: &str, words: &[&str]) {
    app.deliver_all().await;
    for channel in channels {
        let card = app
            .slack
            .latest_card(channel, id)
            .unwrap_or_else(|| panic!("no card for {id} in {channel}"));
        let text = text_of(&card);
        for word in words {
            assert!(text.contains(word), "{channel}: no {word:?} in {text}");
        }
    }
}

/// The ephemeral explanations sent so far (through response_url), once there are `count`.
async fn explanations(app: &TestApp, count: usize) -> Vec<String> {
    app.slack
        .wait_for("response_url", count, WAIT)
        .await
        .into_iter()
        .map(|call| {
            assert_eq!(call["response_type"], "ephemeral", "{call}");
            assert_eq!(call["replace_original"], false, "{call}");
            call["text"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[apply(backends)]
#[tokio::test]
async fn cards_go_to_every_destination_of_the_tier(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    app.submit_ok(&agent, json!({"action": "users.get"})).await;
    let medium = app
        .submit_id(&agent, json!({"action": "email.send", "args": {"to": "x@y.z"}, "context": {"summary": "Send the invoice"}}))
        .await;
    let high = app
        .submit_id(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 900}}),
        )
        .await;

    let posts = app.delivered("chat.postMessage", 3).await;
    let mut channels: Vec<(String, bool)> = posts
        .iter()
        .map(|post| {
            (
                post["channel"].as_str().unwrap().to_string(),
                text_of(post).contains(&high),
            )
        })
        .collect();
    channels.sort();
    assert_eq!(
        channels,
        vec![
            ("C0AUDIT".into(), true),
            ("C0HIGH".into(), true),
            ("C0MEDIUM".into(), false)
        ]
    );
    let medium_card = app.slack.latest_card("C0MEDIUM", &medium).unwrap();
    let blocks = text_of(&medium_card);
    assert!(blocks.contains("Send the invoice"));
    for action in ["\"approve\"", "\"deny\"", "\"modify\""] {
        assert!(blocks.contains(action), "{action} button missing");
    }
    assert!(medium_card["text"].as_str().unwrap().contains("email.send"));
}

#[apply(backends)]
#[tokio::test]
async fn an_approve_click_decides_and_updates_the_card(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;
    app.delivered("chat.postMessage", 1).await;

    let status = app
        .slack_driver()
        .click("U01ALICE", "C0MEDIUM", "approve", &id)
        .await;
    assert_eq!(status, StatusCode::OK);
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Approved);
    assert_eq!(stored.decision.unwrap().by[0].as_str(), "slack:U01ALICE");

    let updates = app.delivered("chat.update", 1).await;
    let update = updates.last().unwrap();
    assert_eq!(update["channel"], "C0MEDIUM");
    assert_eq!(
        update["ts"], "1700000000.000001",
        "the posted message is the one updated"
    );
    let blocks = text_of(update);
    assert!(
        blocks.contains("Approved") && blocks.contains("<@U01ALICE>"),
        "{blocks}"
    );
    assert!(
        !blocks.contains("\"actions\""),
        "buttons must be gone after the decision"
    );
    // The update needed the saved reference, which was committed with the post's audit
    // event; updates are not audited as deliveries.
    assert_eq!(
        app.deliveries(&id).await,
        [json!({"kind": "card", "destination": "slack:C0MEDIUM"})]
    );
}

#[apply(backends)]
#[tokio::test]
async fn deny_asks_for_a_reason_in_a_modal(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;
    let driver = app.slack_driver();
    // Only a posted card can be clicked.
    app.delivered("chat.postMessage", 1).await;

    assert_eq!(
        driver.click("U02BOB", "C0MEDIUM", "deny", &id).await,
        StatusCode::OK
    );
    let opened = app.slack.wait_for("views.open", 1, WAIT).await;
    assert_eq!(
        opened[0]["trigger_id"],
        "13345224609.738474920.8088930838d88f008e0"
    );
    assert_eq!(opened[0]["view"]["callback_id"], "signoff_deny");
    // The modal names the request and the revision it was opened on.
    assert_eq!(opened[0]["view"]["private_metadata"], button_value(&id, 1));
    assert_eq!(
        app.stored(&id).await.status,
        Status::Pending,
        "opening the modal decides nothing"
    );

    let (status, answer) = driver
        .submit_modal("U02BOB", "signoff_deny", &id, "reason", "  ")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["response_action"], "errors");
    assert!(answer["errors"]["reason"].is_string());
    assert_eq!(app.stored(&id).await.status, Status::Pending);

    let (status, _) = driver
        .submit_modal("U02BOB", "signoff_deny", &id, "reason", "Wrong customer")
        .await;
    assert_eq!(status, StatusCode::OK);
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Denied);
    assert_eq!(
        stored.decision.unwrap().reason.as_deref(),
        Some("Wrong customer")
    );
    let update = app.delivered("chat.update", 1).await;
    assert!(text_of(update.last().unwrap()).contains("Wrong customer"));
}

#[apply(backends)]
#[tokio::test]
async fn modify_validates_json_in_the_modal_and_starts_a_revision(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app
        .submit_id(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 900, "order": "A-1"}}),
        )
        .await;
    let driver = app.slack_driver();
    assert_eq!(
        driver.click("U01ALICE", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );

    assert_eq!(
        driver.click("U02BOB", "C0HIGH", "modify", &id).await,
        StatusCode::OK
    );
    let opened = app.slack.wait_for("views.open", 1, WAIT).await;
    let initial = opened[0]["view"]["blocks"].to_string();
    assert!(
        initial.contains("900") && initial.contains("A-1"),
        "{initial}"
    );

    for bad in ["{not json", "[1, 2]"] {
        let (status, answer) = driver
            .submit_modal("U02BOB", "signoff_modify", &id, "args", bad)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["response_action"], "errors", "{bad}");
        assert!(answer["errors"]["args"].is_string());
    }
    assert_eq!(app.stored(&id).await.revision, 1);

    let (status, answer) = driver
        .submit_modal(
            "U02BOB",
            "signoff_modify",
            &id,
            "args",
            r#"{"amount": 100, "order": "A-1"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let stored = app.stored(&id).await;
    assert_eq!(stored.revision, 2);
    assert_eq!(
        stored.status,
        Status::Pending,
        "alice's approval was on the old args"
    );
    // Alice approves the card as it now shows revision 2.
    assert_eq!(
        driver
            .click_at("U01ALICE", "C0HIGH", "approve", &id, 2)
            .await
            .0,
        StatusCode::OK
    );
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Approved);
    let decision = stored.decision.unwrap();
    assert!(decision.modified);
    assert_eq!(decision.args, json!({"amount": 100, "order": "A-1"}));

    // The card shows what changed.
    cards_show(&app, &["C0HIGH"], &id, &["Modified", "Approved"]).await;
}

#[apply(backends)]
#[tokio::test]
async fn two_person_rule_and_refusals_in_slack(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app
        .submit_id(&agent, json!({"action": "payments.refund", "args": {"amount": 5000}, "on_behalf_of": "slack:U02BOB"}))
        .await;
    let driver = app.slack_driver();

    assert_eq!(
        driver.click("U01ALICE", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    assert_eq!(app.stored(&id).await.current_approvers().len(), 1);

    // Alice again, the requester, and an outsider: each told why, nothing changes.
    let version = app.stored(&id).await.version;
    assert_eq!(
        driver.click("U01ALICE", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    assert_eq!(
        driver.click("U02BOB", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    assert_eq!(
        driver.click("U09MALLORY", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    let told = explanations(&app, 3).await;
    let text_for = |user: &str| {
        told.iter()
            .find(|text| text.contains(user))
            .cloned()
            .unwrap_or_else(|| panic!("no explanation for {user}: {told:#?}"))
    };
    assert!(text_for("U01ALICE").contains("already approved"));
    assert!(text_for("U02BOB").contains("cannot approve"));
    assert!(text_for("U09MALLORY").contains("not an approver"));
    assert_eq!(app.stored(&id).await.version, version);

    // Carol is an approver through her email address, resolved with users.info.
    assert_eq!(
        driver.click("U03CAROL", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Approved);
    let by: Vec<&str> = stored
        .decision
        .as_ref()
        .unwrap()
        .by
        .iter()
        .map(|p| p.as_str())
        .collect();
    assert_eq!(by, vec!["slack:U01ALICE", "slack:U03CAROL"]);
    assert!(app
        .slack
        .calls("users.info")
        .iter()
        .any(|call| call["user"] == "U03CAROL"));

    // A click on a decided request is explained too.
    assert_eq!(
        driver.click("U04DAVE", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    let told = explanations(&app, 4).await;
    assert!(told[3].contains("already approved"), "{told:?}");
}

#[apply(backends)]
#[tokio::test]
async fn slack_user_group_members_may_approve(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;
    assert_eq!(
        app.slack_driver()
            .click("U04DAVE", "C0MEDIUM", "approve", &id)
            .await,
        StatusCode::OK
    );
    assert_eq!(app.stored(&id).await.status, Status::Approved);
    assert!(app
        .slack
        .calls("usergroups.users.list")
        .iter()
        .any(|call| call["usergroup"] == "S0ONCALL"));
}

#[apply(backends)]
#[tokio::test]
async fn unsigned_forged_and_stale_requests_are_refused(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;
    let driver = app.slack_driver();
    let body = SlackDriver::interaction_body(&click_payload(
        "U01ALICE",
        "C0MEDIUM",
        "approve",
        &button_value(&id, 1),
    ));
    let form = "application/x-www-form-urlencoded";
    let now = chrono::Utc::now().timestamp();

    let (status, _) = driver
        .post_raw("/slack/interactions", body.clone(), form, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "missing signature");
    let forged = slack_signature("not-the-secret", now, &body);
    let (status, answer) = driver
        .post_raw(
            "/slack/interactions",
            body.clone(),
            form,
            Some((&forged, now)),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "forged signature");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap()["error"]["code"],
        "unauthorized"
    );
    let (status, _) = driver
        .post_signed("/slack/interactions", body.clone(), form, now - 400)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "stale timestamp");
    let tampered = body.replace("U01ALICE", "U02BOB");
    let signature = slack_signature(crate::support::SLACK_SIGNING_SECRET, now, &body);
    let (status, _) = driver
        .post_raw(
            "/slack/interactions",
            tampered,
            form,
            Some((&signature, now)),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "body changed after signing"
    );
    let (status, _) = driver
        .post_signed(
            "/slack/commands",
            "text=approve%20".to_string() + &id,
            form,
            now - 400,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let huge = format!("payload={}", "x".repeat(300_000));
    let (status, _) = driver
        .post_signed("/slack/interactions", huge, form, now)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Pending);
    assert!(stored.votes.is_empty());

    // The real signature goes through.
    let (status, _) = driver
        .post_signed("/slack/interactions", body, form, now)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test]
async fn a_slack_outage_delays_cards_but_never_loses_or_doubles_them(#[case] backend: Backend) {
    let app = slack_app!(backend);
    app.slack.fail_next(
        "chat.postMessage",
        vec![
            Failure::ServerError,
            Failure::RateLimited {
                retry_after_seconds: 1,
            },
            Failure::NotOk("internal_error"),
        ],
    );
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;

    // Each failed attempt is retried after its backoff (never sooner than Retry-After):
    // the card waits, it is not lost. Six attempts at one channel outrun its burst of
    // three, hence `deliver_all`.
    for failures in 1..=3 {
        app.deliver_all().await;
        assert_eq!(app.slack.failed_calls("chat.postMessage"), failures);
        assert!(app.slack.calls("chat.postMessage").is_empty());
        app.advance(CARD_RETRY);
    }
    app.deliver_all().await;
    assert_eq!(app.slack.failed_calls("chat.postMessage"), 3);
    assert_eq!(app.slack.calls("chat.postMessage").len(), 1);

    // The update after the decision rides out a failure the same way.
    app.slack
        .fail_next("chat.update", vec![Failure::ServerError]);
    app.approve(&id, "slack:U01ALICE").await.unwrap();
    app.deliver_all().await;
    assert_eq!(app.slack.failed_calls("chat.update"), 1);
    assert!(app.slack.calls("chat.update").is_empty());
    app.advance(CARD_RETRY);
    app.deliver_all().await;
    assert_eq!(app.slack.calls("chat.update").len(), 1);
    assert_eq!(
        app.slack.calls("chat.postMessage").len(),
        1,
        "the card is updated, not posted again"
    );
    assert_eq!(app.slack.failed_calls("chat.update"), 1);
    app.assert_none_pending("card").await;
}

#[apply(backends)]
#[tokio::test]
async fn every_copy_is_updated_after_the_decision(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app
        .submit_id(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 10}}),
        )
        .await;
    app.delivered("chat.postMessage", 2).await;
    app.approve(&id, "slack:U01ALICE").await.unwrap();
    app.approve(&id, "slack:U02BOB").await.unwrap();

    cards_show(&app, &["C0HIGH", "C0AUDIT"], &id, &["Approved"]).await;
}

#[apply(backends)]
#[tokio::test]
async fn the_slash_command_lists_and_decides(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let email = app.submit_id(&agent, json!({"action": "email.send"})).await;
    let refund = app
        .submit_id(&agent, json!({"action": "payments.refund", "args": {"amount": 3}, "on_behalf_of": "slack:U01ALICE"}))
        .await;
    let driver = app.slack_driver();

    let (status, answer) = driver.slash("U01ALICE", "pending").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["response_type"], "ephemeral");
    let listed = answer["blocks"].to_string();
    assert!(listed.contains(&email), "{listed}");
    assert!(
        !listed.contains(&refund),
        "alice requested the refund, so it is not hers to decide"
    );

    let (_, answer) = driver.slash("U09MALLORY", "pending").await;
    assert!(answer["text"]
        .as_str()
        .unwrap()
        .contains("Nothing is waiting"));

    let (_, answer) = driver.slash("U01ALICE", &format!("show {refund}")).await;
    assert!(answer["blocks"].to_string().contains("payments.refund"));

    let (_, answer) = driver.slash("U02BOB", &format!("deny {email}")).await;
    assert!(answer["text"].as_str().unwrap().contains("needs a reason"));
    assert_eq!(app.stored(&email).await.status, Status::Pending);

    let (_, answer) = driver
        .slash("U01ALICE", &format!("approve {refund} looks fine"))
        .await;
    assert!(
        answer["text"].as_str().unwrap().contains("cannot approve"),
        "{answer}"
    );

    let (_, answer) = driver
        .slash("U01ALICE", &format!("approve {email} sending now"))
        .await;
    assert!(
        answer["text"].as_str().unwrap().contains("approved"),
        "{answer}"
    );
    let stored = app.stored(&email).await;
    assert_eq!(stored.status, Status::Approved);
    assert_eq!(stored.votes[0].note.as_deref(), Some("sending now"));

    let (_, answer) = driver
        .slash("U02BOB", &format!("deny {refund} amount looks wrong"))
        .await;
    assert!(
        answer["text"].as_str().unwrap().contains("denied"),
        "{answer}"
    );
    assert_eq!(
        app.stored(&refund)
            .await
            .decision
            .unwrap()
            .reason
            .as_deref(),
        Some("amount looks wrong")
    );

    for text in ["help", "", "frobnicate"] {
        let (_, answer) = driver.slash("U01ALICE", text).await;
        assert!(
            answer["text"].as_str().unwrap().contains("pending"),
            "{text}: {answer}"
        );
    }
}

#[apply(backends)]
#[tokio::test]
async fn events_answer_url_verification(#[case] backend: Backend) {
    let app = slack_app!(backend);
    let body = json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}).to_string();
    let now = chrono::Utc::now().timestamp();
    let (status, answer) = app
        .slack_driver()
        .post_signed("/slack/events", body, "application/json", now)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap()["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );
}

const LIFECYCLE_POLICY: &str = r#"version: 1
default: deny
groups:
  sre: ["slack:U01ALICE", "slack-group:S0ONCALL"]
tiers:
  slow:
    route: ["slack:C0SLOW"]
    approvers: ["group:sre"]
    approvals: 1
    ttl: 1h
    remind_after: 300ms
    escalate_after: 700ms
    escalate_to: ["slack:C0ONCALL"]
  brief:
    route: ["slack:C0BRIEF"]
    approvers: ["group:sre"]
    ttl: 1s
rules:
  - name: slow
    match: ["slow.*"]
    effect: require_approval
    tier: slow
  - name: brief
    match: ["brief.*"]
    effect: require_approval
    tier: brief
"#;

#[apply(backends)]
#[tokio::test]
async fn reminders_and_escalation_follow_the_tier(#[case] backend: Backend) {
    let Some(app) = TestApp::spawn_with_policy(backend, LIFECYCLE_POLICY).await else {
        return;
    };
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "slow.job"})).await;

    // The card, a reminder in its thread naming the approvers once `remind_after` has
    // passed, then a card in the escalation channel once `escalate_after` has: three posts.
    let posts = app.delivered("chat.postMessage", 1).await;
    assert_eq!(posts.len(), 1);
    let card = &posts[0];
    assert_eq!(card["channel"], "C0SLOW");
    assert!(card["thread_ts"].is_null(), "{card}");
    app.advance(Duration::from_millis(400));
    assert_eq!(
        app.sweep().await,
        Swept {
            reminded: 1,
            ..Swept::default()
        }
    );
    let posts = app.delivered("chat.postMessage", 2).await;
    assert_eq!(posts.len(), 2);
    let reminder = &posts[1];
    assert_eq!(reminder["channel"], "C0SLOW");
    assert_eq!(
        reminder["thread_ts"], "1700000000.000001",
        "in the card's thread"
    );
    let text = reminder["text"].as_str().unwrap();
    assert!(
        text.contains("<@U01ALICE>") && text.contains("<!subteam^S0ONCALL>"),
        "{text}"
    );
    assert!(text_of(card).contains(&id));
    app.advance(Duration::from_millis(400));
    assert_eq!(
        app.sweep().await,
        Swept {
            escalated: 1,
            ..Swept::default()
        }
    );
    let posts = app.delivered("chat.postMessage", 3).await;
    assert_eq!(posts.len(), 3);
    let escalated = &posts[2];
    assert_eq!(escalated["channel"], "C0ONCALL", "posted to escalate_to");
    assert!(text_of(escalated).contains("Escalated"));

    // The original card is updated to say so, too.
    cards_show(&app, &["C0SLOW"], &id, &["Escalated"]).await;
    let stored = app.stored(&id).await;
    assert!(stored.reminded_at.is_some() && stored.escalated_at.is_some());
    assert_eq!(
        app.audit_kinds(Some(&id)).await,
        vec!["submitted", "verdict", "reminded", "escalated"]
    );

    // Deciding updates every copy, the escalation one included (the fourth message to
    // C0SLOW: `cards_show` waits for its pacing).
    app.approve(&id, "slack:U01ALICE").await.unwrap();
    cards_show(&app, &["C0ONCALL", "C0SLOW"], &id, &["Approved"]).await;
}

#[apply(backends)]
#[tokio::test]
async fn expiry_updates_the_card_and_is_final(#[case] backend: Backend) {
    let Some(app) = TestApp::spawn_with_policy(backend, LIFECYCLE_POLICY).await else {
        return;
    };
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "brief.job"})).await;
    app.delivered("chat.postMessage", 1).await;
    // Past the one-second ttl.
    app.advance(Duration::from_secs(2));
    assert_eq!(app.sweep().await.expired, 1);
    app.delivered("chat.update", 1).await;
    let card = app.slack.latest_card("C0BRIEF", &id).unwrap();
    assert!(
        text_of(&card).contains("Expired") && !text_of(&card).contains("\"actions\""),
        "{card}"
    );
    assert_eq!(
        app.slack_driver()
            .click("U01ALICE", "C0BRIEF", "approve", &id)
            .await,
        StatusCode::OK
    );
    assert_eq!(app.stored(&id).await.status, Status::Expired);
    let told = explanations(&app, 1).await;
    assert!(told[0].contains("expired"), "{told:?}");
}

#[apply(backends)]
#[tokio::test]
async fn agents_and_webhooks_never_see_the_voters_aliases(#[case] backend: Backend) {
    use crate::support::webhook_receiver::{Behaviour, WebhookReceiver};
    let app = slack_app!(backend);
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;
    let id = app
        .submit_id(&agent, json!({"action": "payments.refund", "args": {"amount": 5000}, "callback_url": receiver.url("decided", Behaviour::Accept)}))
        .await;
    let driver = app.slack_driver();

    // Carol votes in Slack; her email, resolved with users.info, is kept with her vote...
    assert_eq!(
        driver.click("U03CAROL", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    let carol: signoff::domain::Principal = "email:carol@example.com".parse().unwrap();
    assert_eq!(app.stored(&id).await.votes[0].aliases, vec![carol.clone()]);
    // ... so she cannot approve a second time under it.
    assert!(app.approve(&id, carol.as_str()).await.is_err());
    assert_eq!(
        driver.click("U01ALICE", "C0HIGH", "approve", &id).await,
        StatusCode::OK
    );
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Approved);
    assert_eq!(stored.votes[0].aliases, vec![carol]);
    assert_eq!(stored.votes[1].aliases.len(), 1);

    // Neither the agent's view nor the webhook shows them.
    let shows_aliases = |body: &Value| {
        let text = body.to_string().to_lowercase();
        text.contains("aliases") || text.contains("@example.com")
    };
    let (status, seen) = app.get_request(&agent, &id, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen["votes"].as_array().map(Vec::len), Some(2), "{seen}");
    assert!(!shows_aliases(&seen), "{seen}");
    app.deliver().await;
    let deliveries = receiver.wait_for("decided", 1, WAIT).await;
    let event: Value = serde_json::from_slice(&deliveries[0].body).unwrap();
    assert_eq!(
        event["data"]["votes"].as_array().map(Vec::len),
        Some(2),
        "{event}"
    );
    assert!(!shows_aliases(&event), "{event}");
}
