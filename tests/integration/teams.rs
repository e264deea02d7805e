//! Teams end to end against a local fake Bot Framework: cards posted and updated through
//! the connector, card actions answered with the card, every refusal, token verification
//! (signature, issuer, audience, validity, endorsements, serviceurl, key rotation, tenant),
//! connector outages, a quorum across Slack and Teams, expiry, message commands and the
//! service URLs recorded per conversation, and grants ("Approve for …" on cards,
//! `grants` and `grants revoke` typed to the bot).

use std::time::Duration;

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::domain::Status;
use signoff::engine::Clock as _;

use crate::support::fake_teams::{
    self, conversation_update, encode, invoke_activity, ConnectorFailure, ForgedToken,
    PublishedKey, TestKey, TokenSpec, CHANNEL,
};
use crate::support::{backends, Backend, TestAgent, TestApp};

const ALICE: &str = "00000000-0000-0000-0000-0000000a11ce";
const BOB: &str = "00000000-0000-0000-0000-000000000b0b";
const REQUESTER: &str = "00000000-0000-0000-0000-00000000feed";
const OWNER: &str = "00000000-0000-0000-0000-0000000000ee";
const MALLORY: &str = "00000000-0000-0000-0000-0000000bad00";
const CAROL: &str = "00000000-0000-0000-0000-00000000ca01";

const TEAMS_POLICY: &str = r#"version: 1
default: deny
people:
  alice: ["teams:00000000-0000-0000-0000-0000000a11ce", "slack:U01ALICE"]
groups:
  ops:
    - "person:alice"
    - "teams:00000000-0000-0000-0000-000000000b0b"
    - "teams:00000000-0000-0000-0000-00000000feed"
    - "teams:00000000-0000-0000-0000-0000000000ee"
    - "slack:U02DAVE"
tiers:
  teams:
    route: ["teams:19:ops@thread.tacv2"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 30m
  both:
    route: ["slack:C0BOTH", "teams:19:ops@thread.tacv2"]
    approvers: ["group:ops"]
    approvals: 2
    ttl: 1h
  emea:
    route: ["teams:19:emea@thread.tacv2"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 1h
  elsewhere:
    route: ["teams:19:elsewhere@thread.tacv2"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 1h
  slow:
    route: ["teams:19:ops@thread.tacv2"]
    approvers: ["group:ops", "email:carol@example.com"]
    approvals: 1
    ttl: 1h
    remind_after: 10m
    escalate_after: 20m
    escalate_to: ["teams:19:oncall@thread.tacv2"]
  granting:
    route: ["teams:19:ops@thread.tacv2"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 1h
    grants: {max_ttl: 6h, max_uses: 4}
  pair:
    route: ["slack:C0PAIR", "teams:19:ops@thread.tacv2"]
    approvers: ["group:ops"]
    approvals: 2
    ttl: 1h
    grants: {max_ttl: 6h, max_uses: 4}
rules:
  - name: restarts
    match: ["ops.*"]
    effect: require_approval
    tier: granting
  - name: payouts
    match: ["payouts.*"]
    effect: require_approval
    tier: pair
  - name: slow
    match: ["slow.*"]
    effect: require_approval
    tier: slow
  - name: deploy
    match: ["deploy.*"]
    effect: require_approval
    tier: teams
  - name: refund
    match: ["payments.refund"]
    effect: require_approval
    tier: both
  - name: emea
    match: ["emea.*"]
    effect: require_approval
    tier: emea
  - name: elsewhere
    match: ["elsewhere.*"]
    effect: require_approval
    tier: elsewhere
"#;

async fn spawn(backend: Backend) -> Option<(TestApp, TestAgent)> {
    let app = TestApp::spawn_with_teams(backend, TEAMS_POLICY).await?;
    let owner = format!("teams:{OWNER}");
    let agent = app.create_agent("deployer", &[owner.as_str()]).await;
    Some((app, agent))
}

async fn submit(app: &TestApp, agent: &TestAgent, action: &str) -> String {
    app.submit_id(
        agent,
        json!({"action": action, "args": {"service": "api", "version": 7},
               "on_behalf_of": format!("teams:{REQUESTER}")}),
    )
    .await
}

fn data(id: &str, revision: u32) -> Value {
    json!({"request_id": id, "revision": revision})
}

/// The card's text, for asserting on what it says.
fn text(card: &Value) -> String {
    card.to_string()
}

/// The vote audit events' channels for `id`.
async fn vote_channels(app: &TestApp, id: &str) -> Vec<String> {
    let mut channels = Vec::new();
    app.engine()
        .export_audit(|event| {
            if event.request_id.as_deref() == Some(id)
                && (event.kind == "vote" || event.kind == "modified")
            {
                channels.push(event.payload["channel"].as_str().unwrap_or("").to_string());
            }
            Ok(())
        })
        .await
        .unwrap();
    channels
}

#[apply(backends)]
#[tokio::test]
async fn a_card_is_posted_with_the_bot_token_and_updated_after_a_click(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "deploy.api").await;
    app.deliver().await;
    let teams = app.fake_teams();
    let posted = teams.posted(CHANNEL);
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert_eq!(
        posted[0].authorization.as_deref(),
        Some("Bearer bot-token-1")
    );
    assert!(
        posted[0].path.starts_with("/teams/v3/conversations/"),
        "{}",
        posted[0].path
    );
    let attachment = &posted[0].body["attachments"][0];
    assert_eq!(
        attachment["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert_eq!(attachment["content"]["version"], "1.5");
    assert!(text(&attachment["content"]).contains(&id));
    let tokens = teams.token_requests();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["grant_type"], "client_credentials");
    assert_eq!(tokens[0]["client_id"], fake_teams::APP_ID);
    assert_eq!(tokens[0]["client_secret"], fake_teams::APP_PASSWORD);
    assert_eq!(tokens[0]["scope"], "https://api.botframework.com/.default");

    let card = app.teams_invoke(ALICE, "approve", data(&id, 1)).await;
    assert!(text(&card).contains("Approved"), "{card}");
    assert!(
        card.get("actions").is_none(),
        "no buttons after the decision: {card}"
    );
    assert_eq!(app.stored(&id).await.status, Status::Approved);
    assert_eq!(vote_channels(&app, &id).await, ["teams"]);

    app.deliver().await;
    let updated = teams.updated(CHANNEL);
    assert_eq!(updated.len(), 1, "{updated:#?}");
    assert!(
        updated[0].path.ends_with("/activities/activity-1"),
        "{}",
        updated[0].path
    );
    assert!(text(&updated[0].body).contains("Approved"));
    // The token is cached: one token request for both calls.
    assert_eq!(teams.token_requests().len(), 1);
}

#[apply(backends)]
#[tokio::test]
async fn deny_needs_a_reason_and_modify_validates_the_args(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "payments.refund").await;
    let card = app
        .teams_invoke(
            ALICE,
            "deny",
            json!({"request_id": id, "revision": 1, "reason": "  "}),
        )
        .await;
    assert!(text(&card).contains("A deny needs a reason"), "{card}");
    let card = app
        .teams_invoke(
            BOB,
            "modify",
            json!({"request_id": id, "revision": 1, "args": "{version: 8}"}),
        )
        .await;
    assert!(text(&card).contains("not valid JSON"), "{card}");
    assert!(
        text(&card).contains("{version: 8}"),
        "what was typed is kept: {card}"
    );
    let card = app
        .teams_invoke(
            BOB,
            "modify",
            json!({"request_id": id, "revision": 1, "args": "[1]"}),
        )
        .await;
    assert!(text(&card).contains("JSON object"), "{card}");
    let stored = app.stored(&id).await;
    assert_eq!(
        (stored.status, stored.revision, stored.votes.len()),
        (Status::Pending, 1, 0)
    );

    let card = app
        .teams_invoke(
            BOB,
            "modify",
            json!({"request_id": id, "revision": 1, "args": "{\"service\": \"api\", \"version\": 8}"}),
        )
        .await;
    let stored = app.stored(&id).await;
    assert_eq!(stored.revision, 2);
    assert_eq!(stored.args["version"], 8);
    assert!(text(&card).contains("Modified"), "{card}");
    assert!(
        text(&card).contains("1 of 2 approvals so far"),
        "progress: {card}"
    );

    let card = app
        .teams_invoke(
            ALICE,
            "deny",
            json!({"request_id": id, "revision": 2, "reason": "not today"}),
        )
        .await;
    assert!(
        text(&card).contains("Denied") && text(&card).contains("not today"),
        "{card}"
    );
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Denied);
    assert_eq!(
        stored.decision.unwrap().reason.as_deref(),
        Some("not today")
    );
    assert_eq!(vote_channels(&app, &id).await, ["teams", "teams"]);
}

#[apply(backends)]
#[tokio::test]
async fn refusals_are_explained_in_the_card_and_change_nothing(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "payments.refund").await;
    app.deliver().await;
    for (user, expected) in [
        (REQUESTER, "requested this action"),
        (OWNER, "requested this action"),
        (MALLORY, "not an approver"),
    ] {
        let card = app.teams_invoke(user, "approve", data(&id, 1)).await;
        let said = text(&card).to_lowercase();
        assert!(said.contains("nothing was recorded"), "{user}: {card}");
        assert!(
            said.contains(expected),
            "{user} expected {expected:?}: {card}"
        );
    }
    // Who may not deny learns that first, not that a reason is missing.
    let card = app
        .teams_invoke(MALLORY, "deny", json!({"request_id": id, "revision": 1}))
        .await;
    assert!(text(&card).contains("not an approver"), "{card}");
    // Alice approves on Slack; the same person on Teams is refused.
    let status = app
        .slack_driver()
        .click("U01ALICE", "C0BOTH", "approve", &id)
        .await;
    assert_eq!(status, StatusCode::OK);
    let card = app.teams_invoke(ALICE, "approve", data(&id, 1)).await;
    assert!(text(&card).contains("Nothing was recorded"), "{card}");
    assert_eq!(app.stored(&id).await.current_approvers().len(), 1);

    // A stale revision shows the current card with the explanation.
    let modified = json!({"request_id": id, "revision": 1, "args": "{\"amount\": 5}"});
    app.teams_invoke(BOB, "modify", modified).await;
    let card = app.teams_invoke(BOB, "approve", data(&id, 1)).await;
    assert!(text(&card).contains("as it is now"), "{card}");
    assert!(
        text(&card).contains("\"revision\":2"),
        "current revision's actions: {card}"
    );
    assert_eq!(app.stored(&id).await.revision, 2);

    // Decided: refused.
    app.teams_invoke(
        ALICE,
        "deny",
        json!({"request_id": id, "revision": 2, "reason": "no"}),
    )
    .await;
    let card = app.teams_invoke(BOB, "approve", data(&id, 2)).await;
    assert!(text(&card).contains("Nothing was recorded"), "{card}");
    assert_eq!(app.stored(&id).await.status, Status::Denied);

    // Expired: refused.
    let late = submit(&app, &agent, "deploy.api").await;
    app.advance(Duration::from_secs(31 * 60));
    app.sweep().await;
    let card = app.teams_invoke(BOB, "approve", data(&late, 1)).await;
    assert!(text(&card).contains("Nothing was recorded"), "{card}");
    assert_eq!(app.stored(&late).await.status, Status::Expired);
    // The expiry updates the Teams card.
    app.deliver().await;
    let card = app.fake_teams().latest_card(CHANNEL, &late).expect("card");
    assert!(text(&card).contains("Expired"), "{card}");
}

#[apply(backends)]
#[tokio::test]
async fn refresh_answers_the_current_card(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "deploy.api").await;
    app.deliver().await;
    let card = app.teams_invoke(MALLORY, "refresh", data(&id, 1)).await;
    assert!(
        text(&card).contains(&id) && card.get("actions").is_some(),
        "{card}"
    );
    // Someone who may not see the request, asking from a conversation its card was never
    // posted to (their 1:1 chat with the bot), learns nothing about it.
    let personal = invoke_activity(
        &app.fake_teams().service_url(),
        "a:1mallory-personal",
        MALLORY,
        "refresh",
        data(&id, 1),
    );
    let (status, body) = app.teams_send(&personal).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        text(&body).contains("you may not see it")
            && !text(&body).contains("deploy.api")
            && !text(&body).contains(&id),
        "{body}"
    );
    app.approve(&id, &format!("teams:{ALICE}")).await.unwrap();
    let card = app.teams_invoke(BOB, "refresh", data(&id, 1)).await;
    assert!(text(&card).contains("Approved"), "{card}");
}

#[apply(backends)]
#[tokio::test]
async fn tokens_that_do_not_verify_are_refused_and_change_nothing(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "deploy.api").await;
    let service_url = app.fake_teams().service_url();
    let activity = invoke_activity(&service_url, CHANNEL, ALICE, "approve", data(&id, 1));
    let valid = TokenSpec::valid(&service_url);
    let now = app.clock.now();
    let cases: Vec<(&str, Option<String>, Value)> = vec![
        ("no token", None, activity.clone()),
        (
            "forged signature",
            Some(
                TokenSpec {
                    key: TestKey::Second,
                    ..valid.clone()
                }
                .sign(now),
            ),
            activity.clone(),
        ),
        (
            "wrong issuer",
            Some(
                TokenSpec {
                    issuer: "https://evil.example".into(),
                    ..valid.clone()
                }
                .sign(now),
            ),
            activity.clone(),
        ),
        (
            "wrong audience",
            Some(
                TokenSpec {
                    audience: "another-bot".into(),
                    ..valid.clone()
                }
                .sign(now),
            ),
            activity.clone(),
        ),
        (
            "expired beyond the skew",
            Some(
                TokenSpec {
                    expires_in: -301,
                    not_before_in: -3600,
                    ..valid.clone()
                }
                .sign(now),
            ),
            activity.clone(),
        ),
        (
            "not yet valid beyond the skew",
            Some(
                TokenSpec {
                    not_before_in: 301,
                    ..valid.clone()
                }
                .sign(now),
            ),
            activity.clone(),
        ),
        (
            "serviceurl mismatch",
            Some(
                TokenSpec {
                    service_url: Some("https://smba.trafficmanager.net/emea/".into()),
                    ..valid.clone()
                }
                .sign(now),
            ),
            activity.clone(),
        ),
        (
            "no serviceurl",
            Some(
                TokenSpec {
                    service_url: None,
                    ..valid.clone()
                }
                .sign(now),
            ),
            activity.clone(),
        ),
        ("another tenant", Some(valid.sign(now)), {
            let mut other = activity.clone();
            other["channelData"]["tenant"]["id"] = json!("tenant-evil");
            other["conversation"]["tenantId"] = json!("tenant-evil");
            other
        }),
        (
            "a channel the key is not endorsed for",
            Some(valid.sign(now)),
            {
                let mut other = activity.clone();
                other["channelId"] = json!("webchat");
                other
            },
        ),
    ];
    for (what, token, activity) in cases {
        let (status, body) = app.teams_post(&activity, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        let stored = app.stored(&id).await;
        assert_eq!(
            (stored.status, stored.votes.len()),
            (Status::Pending, 0),
            "{what}"
        );
    }
    // Within the skew, and correct: accepted.
    let token = TokenSpec {
        expires_in: -200,
        not_before_in: -3600,
        ..valid
    }
    .sign(now);
    let (status, body) = app.teams_post(&activity, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}

/// What attackers try against Bot Framework bots: algorithm confusion, unsigned tokens, no
/// key id, a published key endorsed for no channel, a valid token over an unreadable body,
/// and card data naming someone else as the voter.
#[apply(backends)]
#[tokio::test]
async fn forged_tokens_unendorsed_keys_and_card_data_naming_the_voter_change_nothing(
    #[case] backend: Backend,
) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let teams = app.fake_teams();
    teams.publish(vec![
        PublishedKey {
            kid: "key-1".into(),
            key: TestKey::First,
            endorsements: vec![fake_teams::CHANNEL_ID.into()],
        },
        PublishedKey {
            kid: "key-unendorsed".into(),
            key: TestKey::Second,
            endorsements: Vec::new(),
        },
    ]);
    let id = submit(&app, &agent, "deploy.api").await;
    let service_url = teams.service_url();
    let activity = invoke_activity(&service_url, CHANNEL, ALICE, "approve", data(&id, 1));
    let valid = TokenSpec::valid(&service_url);
    let now = app.clock.now();
    let unendorsed = TokenSpec {
        kid: "key-unendorsed".into(),
        key: TestKey::Second,
        ..valid.clone()
    };
    let tokens = [
        ("alg none", valid.forge(ForgedToken::Unsigned, now)),
        (
            "HS256 keyed with the public key",
            valid.forge(ForgedToken::SymmetricWithThePublicKey, now),
        ),
        ("no key id", valid.forge(ForgedToken::WithoutKeyId, now)),
        ("a key endorsed for nothing", unendorsed.sign(now)),
    ];
    for (what, token) in tokens {
        let (status, body) = app.teams_post(&activity, Some(token)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        let stored = app.stored(&id).await;
        assert_eq!(
            (stored.status, stored.votes.len()),
            (Status::Pending, 0),
            "{what}"
        );
    }
    // A valid token over a body that is not JSON.
    let response = app
        .http
        .post(app.url("/teams/messages"))
        .bearer_auth(valid.sign(now))
        .header("content-type", "application/json")
        .body(r#"{"type": "invoke", "name": "adaptiveCard/action", "#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Card data naming an approver does not make the sender one.
    let mut claimed = data(&id, 1);
    claimed["user"] = json!(ALICE);
    claimed["aadObjectId"] = json!(ALICE);
    claimed["from"] = json!({"aadObjectId": ALICE});
    let card = app.teams_invoke(MALLORY, "approve", claimed).await;
    assert!(!text(&card).contains("Recorded"), "{}", text(&card));
    let stored = app.stored(&id).await;
    assert_eq!((stored.status, stored.votes.len()), (Status::Pending, 0));
    // The same click, correctly signed, by the approver it names.
    let (status, body) = app.teams_send(&activity).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test]
async fn unknown_keys_refetch_at_most_once_a_minute_and_a_rotation_replaces_the_set(
    #[case] backend: Backend,
) {
    let Some((app, _agent)) = spawn(backend).await else {
        return;
    };
    let service_url = app.fake_teams().service_url();
    let update = conversation_update(&service_url, CHANNEL);
    let send = |spec: TokenSpec| {
        let token = spec.sign(app.clock.now());
        let update = update.clone();
        let app = &app;
        async move { app.teams_post(&update, Some(token)).await.0 }
    };
    let first = TokenSpec::valid(&service_url);
    let second = TokenSpec {
        kid: "key-2".into(),
        key: TestKey::Second,
        ..first.clone()
    };
    assert_eq!(send(first.clone()).await, StatusCode::OK);
    assert_eq!(app.fake_teams().jwks_fetches(), 1);
    // Rotation: the fake now publishes only key-2.
    app.fake_teams().publish(vec![PublishedKey {
        kid: "key-2".into(),
        key: TestKey::Second,
        endorsements: vec!["msteams".into()],
    }]);
    // Fetched less than 60 s ago: an unknown kid is refused without a refetch.
    assert_eq!(send(second.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.fake_teams().jwks_fetches(), 1);
    app.advance(Duration::from_secs(61));
    assert_eq!(send(second.clone()).await, StatusCode::OK);
    assert_eq!(app.fake_teams().jwks_fetches(), 2);
    // The new set replaced the old: key-1 is unknown now, and refetching waits a minute.
    assert_eq!(send(first.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(second).await, StatusCode::OK);
    assert_eq!(app.fake_teams().jwks_fetches(), 2);
    // A key that is not endorsed for the activity's channel is refused.
    app.fake_teams().publish(vec![PublishedKey {
        kid: "key-3".into(),
        key: TestKey::First,
        endorsements: vec!["skype".into()],
    }]);
    app.advance(Duration::from_secs(61));
    let third = TokenSpec {
        kid: "key-3".into(),
        ..first
    };
    assert_eq!(send(third).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.fake_teams().jwks_fetches(), 3);
}

#[apply(backends)]
#[tokio::test]
async fn a_connector_outage_delays_cards_and_never_loses_or_doubles_them(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let teams = app.fake_teams();
    teams.fail_next(vec![
        ConnectorFailure::ServerError,
        ConnectorFailure::RateLimited {
            retry_after_seconds: 30,
        },
    ]);
    let id = submit(&app, &agent, "deploy.api").await;
    app.deliver().await;
    assert_eq!((teams.failed_calls(), teams.posted(CHANNEL).len()), (1, 0));
    app.advance(Duration::from_secs(10));
    app.deliver().await;
    assert_eq!((teams.failed_calls(), teams.posted(CHANNEL).len()), (2, 0));
    // Retry-After is honoured: not before 30 s.
    app.advance(Duration::from_secs(20));
    app.deliver().await;
    assert_eq!(teams.posted(CHANNEL).len(), 0);
    app.advance(Duration::from_secs(15));
    app.deliver().await;
    assert_eq!(teams.posted(CHANNEL).len(), 1);
    app.advance(Duration::from_secs(600));
    app.deliver().await;
    assert_eq!(teams.posted(CHANNEL).len(), 1, "never doubled");
    assert!(teams.latest_card(CHANNEL, &id).is_some());
    app.assert_none_pending("card").await;
}

#[apply(backends)]
#[tokio::test]
async fn a_two_person_tier_takes_one_approval_from_each_platform(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "payments.refund").await;
    app.deliver().await;
    assert!(app.slack.latest_card("C0BOTH", &id).is_some());
    assert!(app.fake_teams().latest_card(CHANNEL, &id).is_some());
    let status = app
        .slack_driver()
        .click("U02DAVE", "C0BOTH", "approve", &id)
        .await;
    assert_eq!(status, StatusCode::OK);
    app.deliver().await;
    let teams_card = app.fake_teams().latest_card(CHANNEL, &id).unwrap();
    assert!(
        text(&teams_card).contains("1 of 2 approvals"),
        "{teams_card}"
    );
    let card = app.teams_invoke(ALICE, "approve", data(&id, 1)).await;
    assert!(text(&card).contains("Approved"), "{card}");
    assert_eq!(app.stored(&id).await.status, Status::Approved);
    assert_eq!(vote_channels(&app, &id).await, ["slack", "teams"]);
    app.deliver().await;
    let slack_card = app.slack.latest_card("C0BOTH", &id).unwrap();
    assert!(slack_card.to_string().contains("Approved"), "{slack_card}");
    let teams_card = app.fake_teams().latest_card(CHANNEL, &id).unwrap();
    assert!(text(&teams_card).contains("Approved"), "{teams_card}");
}

#[apply(backends)]
#[tokio::test]
async fn message_commands_are_answered_with_a_reply(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "deploy.api").await;
    let other = submit(&app, &agent, "deploy.web").await;
    let reply = app.teams_message(ALICE, "help").await;
    assert!(
        reply["text"].as_str().unwrap().contains("deny ID reason"),
        "{reply}"
    );
    assert_eq!(reply["replyToId"], "message-1");

    let reply = app.teams_message(ALICE, "pending").await;
    assert!(
        reply["text"].as_str().unwrap().starts_with("2 requests"),
        "{reply}"
    );
    assert_eq!(reply["attachments"].as_array().unwrap().len(), 2);
    let reply = app.teams_message(MALLORY, "pending").await;
    assert_eq!(reply["text"], "Nothing is waiting for you.");

    let reply = app.teams_message(MALLORY, &format!("show {id}")).await;
    assert!(
        reply["text"].as_str().unwrap().contains("may not see it"),
        "{reply}"
    );
    let reply = app.teams_message(BOB, &format!("show {id}")).await;
    assert!(text(&reply["attachments"][0]).contains(&id), "{reply}");

    let reply = app.teams_message(ALICE, &format!("deny {id}")).await;
    assert!(
        reply["text"].as_str().unwrap().contains("needs a reason"),
        "{reply}"
    );
    let reply = app
        .teams_message(ALICE, &format!("approve {id} ship it"))
        .await;
    assert!(
        reply["text"]
            .as_str()
            .unwrap()
            .contains("approved (revision 1)"),
        "{reply}"
    );
    assert_eq!(app.stored(&id).await.status, Status::Approved);
    let reply = app
        .teams_message(BOB, &format!("deny {other} wrong window"))
        .await;
    assert!(
        reply["text"].as_str().unwrap().contains("denied"),
        "{reply}"
    );
    assert_eq!(app.stored(&other).await.status, Status::Denied);
    assert_eq!(vote_channels(&app, &id).await, ["teams"]);
}

#[apply(backends)]
#[tokio::test]
async fn service_urls_are_recorded_per_conversation_and_only_allowed_ones_are_called(
    #[case] backend: Backend,
) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let teams = app.fake_teams();
    // The bot is added in a thread of the EMEA channel, reached at another service URL.
    let emea_url = format!("{}emea/", teams.service_url());
    let update = conversation_update(&emea_url, "19:emea@thread.tacv2;messageid=42");
    assert_eq!(app.teams_send(&update).await.0, StatusCode::OK);
    let endpoint = app
        .engine()
        .conversation_endpoint("teams:19:emea@thread.tacv2")
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(endpoint.service_url, emea_url);
    assert_eq!(endpoint.tenant.as_deref(), Some(fake_teams::TENANT));
    // A service URL outside teams.allowed_service_urls.
    let elsewhere_url = format!("{}/elsewhere/", teams.base);
    let update = conversation_update(&elsewhere_url, "19:elsewhere@thread.tacv2");
    assert_eq!(app.teams_send(&update).await.0, StatusCode::OK);

    let emea = submit(&app, &agent, "emea.deploy").await;
    let elsewhere = submit(&app, &agent, "elsewhere.deploy").await;
    app.deliver().await;
    let posted = teams.calls_to("POST", &encode("19:emea@thread.tacv2"));
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert!(
        posted[0].path.starts_with("/teams/emea/v3/"),
        "{}",
        posted[0].path
    );
    assert!(text(&posted[0].body).contains(&emea));
    // Never called, nor recorded: the conversation is reached at the default service URL.
    assert_eq!(
        app.engine()
            .conversation_endpoint("teams:19:elsewhere@thread.tacv2")
            .await
            .unwrap(),
        None
    );
    let message = crate::support::fake_teams::message_activity(
        &elsewhere_url,
        "19:elsewhere@thread.tacv2",
        ALICE,
        "help",
    );
    assert_eq!(app.teams_send(&message).await.0, StatusCode::OK);
    assert!(
        teams
            .calls()
            .iter()
            .all(|call| !call.path.starts_with("/elsewhere/")),
        "{:#?}",
        teams.calls()
    );
    let posted = teams.posted("19:elsewhere@thread.tacv2");
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert!(
        posted[0].path.starts_with("/teams/v3/"),
        "{}",
        posted[0].path
    );
    assert!(text(&posted[0].body).contains(&elsewhere));
    app.assert_none_pending("card").await;
}

/// A verified activity from a service URL signoff may not call (outside the allowed
/// prefixes, or only inside them before `..` is resolved) neither replaces the URL a
/// conversation is reached at nor is ever called.
#[apply(backends)]
#[tokio::test]
async fn service_urls_that_may_not_be_called_are_never_recorded(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let teams = app.fake_teams();
    let emea_url = format!("{}emea/", teams.service_url());
    let update = conversation_update(&emea_url, CHANNEL);
    assert_eq!(app.teams_send(&update).await.0, StatusCode::OK);
    let outside = format!("{}/elsewhere/", teams.base);
    let climbing_out = format!("{}../elsewhere/", teams.service_url());
    for service_url in [&outside, &climbing_out] {
        let update = conversation_update(service_url, CHANNEL);
        assert_eq!(
            app.teams_send(&update).await.0,
            StatusCode::OK,
            "{service_url}"
        );
        let message =
            crate::support::fake_teams::message_activity(service_url, CHANNEL, ALICE, "help");
        assert_eq!(
            app.teams_send(&message).await.0,
            StatusCode::OK,
            "{service_url}"
        );
    }
    let endpoint = app
        .engine()
        .conversation_endpoint(&format!("teams:{CHANNEL}"))
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(endpoint.service_url, emea_url);

    let id = submit(&app, &agent, "deploy.api").await;
    app.deliver().await;
    let posted = teams.posted(CHANNEL);
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert!(
        posted[0].path.starts_with("/teams/emea/v3/"),
        "{}",
        posted[0].path
    );
    assert!(text(&posted[0].body).contains(&id));
    assert!(
        teams
            .calls()
            .iter()
            .all(|call| !call.path.starts_with("/elsewhere/")),
        "{:#?}",
        teams.calls()
    );
}

/// Without a configured tenant, activities come from tenants whose administrators set
/// their users' email addresses as they like: an email from such a member list must not
/// make anyone an `email:` approver, and is not even asked for.
#[apply(backends)]
#[tokio::test]
async fn emails_are_not_trusted_from_tenants_signoff_is_not_pinned_to(#[case] backend: Backend) {
    let Some(app) = TestApp::spawn_with_teams_in_any_tenant(backend, TEAMS_POLICY).await else {
        return;
    };
    let owner = format!("teams:{OWNER}");
    let agent = app.create_agent("deployer", &[owner.as_str()]).await;
    // Mallory's tenant says she is Carol, an approver named by email.
    app.fake_teams()
        .add_member_email(&format!("29:{MALLORY}"), "carol@example.com");
    let id = submit(&app, &agent, "slow.job").await;
    let mut activity = invoke_activity(
        &app.fake_teams().service_url(),
        CHANNEL,
        MALLORY,
        "approve",
        data(&id, 1),
    );
    activity["channelData"]["tenant"]["id"] = json!("tenant-evil");
    activity["conversation"]["tenantId"] = json!("tenant-evil");
    let (status, body) = app.teams_send(&activity).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!text(&body).contains("Recorded"), "{}", text(&body));
    let stored = app.stored(&id).await;
    assert_eq!((stored.status, stored.votes.len()), (Status::Pending, 0));
    // Where the policy names people by email, no one's email is known, so no one's vote
    // can be checked against it (as for anyone whose email cannot be read).
    let card = app.teams_invoke(ALICE, "approve", data(&id, 1)).await;
    assert!(
        text(&card).contains("cannot read the email address"),
        "{}",
        text(&card)
    );
    let stored = app.stored(&id).await;
    assert_eq!((stored.status, stored.votes.len()), (Status::Pending, 0));
    assert!(app.fake_teams().calls_to("GET", "/members/").is_empty());
}

#[apply(backends)]
#[tokio::test]
async fn bodies_over_the_limit_are_refused_before_anything_else(#[case] backend: Backend) {
    let Some((app, _agent)) = spawn(backend).await else {
        return;
    };
    let service_url = app.fake_teams().service_url();
    let mut update = conversation_update(&service_url, CHANNEL);
    update["padding"] = json!("x".repeat(300_000));
    let (status, _) = app.teams_send(&update).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.fake_teams().jwks_fetches(), 0);
}

#[apply(backends)]
#[tokio::test]
async fn reminders_reply_to_the_card_escalation_posts_and_emails_come_from_the_member_list(
    #[case] backend: Backend,
) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let teams = app.fake_teams();
    teams.add_member_email(&format!("29:{CAROL}"), "Carol@Example.com");
    let id = submit(&app, &agent, "slow.job").await;
    app.deliver().await;
    assert_eq!(teams.posted(CHANNEL).len(), 1);
    app.advance(Duration::from_secs(11 * 60));
    assert_eq!(app.sweep().await.reminded, 1);
    app.deliver_all().await;
    let posted = teams.posted(CHANNEL);
    assert_eq!(posted.len(), 2, "{posted:#?}");
    assert_eq!(
        posted[1].body["replyToId"], "activity-1",
        "a reply to the card"
    );
    assert!(posted[1].body["text"]
        .as_str()
        .unwrap()
        .contains("email:carol@example.com"));
    app.advance(Duration::from_secs(10 * 60));
    assert_eq!(app.sweep().await.escalated, 1);
    app.deliver_all().await;
    let oncall = "19:oncall@thread.tacv2";
    let escalated = teams
        .latest_card(oncall, &id)
        .expect("posted to escalate_to");
    assert!(text(&escalated).contains("Escalated"), "{escalated}");

    // Someone whose email the member list does not give cannot vote where people are
    // named by email; Carol, known by email only, can.
    let card = app.teams_invoke(MALLORY, "approve", data(&id, 1)).await;
    assert!(
        text(&card).contains("cannot read the email address"),
        "{card}"
    );
    let card = app.teams_invoke(CAROL, "approve", data(&id, 1)).await;
    assert!(text(&card).contains("Approved"), "{card}");
    assert_eq!(app.stored(&id).await.status, Status::Approved);
    app.deliver_all().await;
    for conversation in [CHANNEL, oncall] {
        let card = teams.latest_card(conversation, &id).unwrap();
        assert!(text(&card).contains("Approved"), "{conversation}: {card}");
    }
    assert!(!teams.updated(oncall).is_empty());
}

/// The data of an "Approve for …" click choosing `seconds` (sent as the choice set sends it).
fn approve_for(id: &str, revision: u32, seconds: u64) -> Value {
    let mut data = data(id, revision);
    data["grant_seconds"] = json!(seconds.to_string());
    data
}

#[apply(backends)]
#[tokio::test]
async fn approve_for_creates_a_grant_that_approves_the_same_submission_at_once(
    #[case] backend: Backend,
) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "ops.restart").await;
    let plain = submit(&app, &agent, "deploy.api").await;
    app.deliver().await;
    let card = app.fake_teams().latest_card(CHANNEL, &id).unwrap();
    let offered = text(&card);
    assert!(offered.contains("\"verb\":\"approve_for\""), "{card}");
    for choice in ["Approve for 1h", "Approve for 4h", "Approve for 6h"] {
        assert!(offered.contains(choice), "{choice}: {card}");
    }
    let plain_card = app.fake_teams().latest_card(CHANNEL, &plain).unwrap();
    assert!(!text(&plain_card).contains("approve_for"), "{plain_card}");

    let card = app
        .teams_invoke(ALICE, "approve_for", approve_for(&id, 1, 4 * 3600))
        .await;
    assert!(text(&card).contains("now approved"), "{card}");
    assert!(!text(&card).contains("approve_for"), "{card}");
    let grants = app.engine().list_grants(None).await.unwrap();
    assert_eq!(grants.len(), 1);
    let grant = &grants[0];
    assert_eq!((grant.expires_at - grant.created_at).num_hours(), 4);
    assert_eq!(grant.uses_left, 4);
    assert_eq!(grant.created_by[0].as_str(), format!("teams:{ALICE}"));
    assert_eq!(grant.request_id, id);

    let again = app
        .submit_ok(
            &agent,
            json!({"action": "ops.restart", "args": {"service": "api", "version": 7},
                   "on_behalf_of": format!("teams:{REQUESTER}")}),
        )
        .await;
    assert_eq!(again["status"], "approved", "{again}");
    assert_eq!(
        again["decision"]["by"],
        json!([format!("grant:{}", grant.id)])
    );
    let other_args = app
        .submit_ok(
            &agent,
            json!({"action": "ops.restart", "args": {"service": "web"}}),
        )
        .await;
    assert_eq!(other_args["status"], "pending", "{other_args}");
}

#[apply(backends)]
#[tokio::test]
async fn a_grant_beyond_the_tiers_caps_is_refused_and_nothing_is_cast(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let id = submit(&app, &agent, "ops.restart").await;
    let no_grants = submit(&app, &agent, "deploy.api").await;
    app.deliver().await;
    let seq = app.audit_seq().await;
    for (request, seconds, why) in [
        (&id, 24 * 3600, "lasts at most 6h"),
        (&id, 0, "lasts at most 6h"),
        (&no_grants, 3600, "does not allow grants"),
    ] {
        let card = app
            .teams_invoke(ALICE, "approve_for", approve_for(request, 1, seconds))
            .await;
        assert!(text(&card).contains(why), "{seconds}: {card}");
        // The current card, with its actions, for another try.
        assert!(text(&card).contains("\"verb\":\"approve\""), "{card}");
        let stored = app.stored(request).await;
        assert_eq!(stored.status, Status::Pending);
        assert!(stored.votes.is_empty(), "{:?}", stored.votes);
    }
    let card = app.teams_invoke(ALICE, "approve_for", data(&id, 1)).await;
    assert!(text(&card).contains("names no grant"), "{card}");
    assert_eq!(app.stored(&id).await.status, Status::Pending);
    assert!(app.engine().list_grants(None).await.unwrap().is_empty());
    assert_eq!(app.audit_seq().await, seq, "nothing was audited");
}

#[apply(backends)]
#[tokio::test]
async fn a_two_platform_decision_where_only_one_asked_creates_no_grant(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let body = json!({"action": "payouts.send", "args": {"amount": 5}});
    let id = app.submit_id(&agent, body.clone()).await;
    app.deliver().await;
    assert!(app.slack.latest_card("C0PAIR", &id).is_some());
    let card = app
        .teams_invoke(ALICE, "approve_for", approve_for(&id, 1, 3600))
        .await;
    assert!(text(&card).contains("1 of 2 approvals"), "{card}");
    let status = app
        .slack_driver()
        .click("U02DAVE", "C0PAIR", "approve", &id)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.stored(&id).await.status, Status::Approved);
    assert!(app.engine().list_grants(None).await.unwrap().is_empty());
    assert_eq!(app.submit_ok(&agent, body).await["status"], "pending");
}

#[apply(backends)]
#[tokio::test]
async fn grants_are_listed_and_revoked_in_a_teams_message(#[case] backend: Backend) {
    let Some((app, agent)) = spawn(backend).await else {
        return;
    };
    let body = json!({"action": "ops.restart", "args": {"service": "api"}});
    let id = app.submit_id(&agent, body.clone()).await;
    app.teams_invoke(ALICE, "approve_for", approve_for(&id, 1, 3600))
        .await;
    let grant = app.engine().list_grants(None).await.unwrap()[0].clone();

    let listed = app.teams_message(BOB, "grants").await;
    let listed = listed["text"].as_str().unwrap().to_string();
    assert!(listed.contains(&grant.id), "{listed}");
    assert!(listed.contains("active · 4 uses left"), "{listed}");
    let stranger = app.teams_message(MALLORY, "grants").await;
    assert_eq!(stranger["text"], "No grants in tiers you approve for.");

    let refused = app
        .teams_message(MALLORY, &format!("grants revoke {}", grant.id))
        .await;
    assert!(
        refused["text"].as_str().unwrap().contains("only approvers"),
        "{refused}"
    );
    let unknown = app.teams_message(BOB, "grants revoke grt_nope").await;
    assert!(
        unknown["text"].as_str().unwrap().contains("does not exist"),
        "{unknown}"
    );
    assert_eq!(
        app.submit_ok(&agent, body.clone()).await["status"],
        "approved"
    );

    let revoked = app
        .teams_message(BOB, &format!("grants revoke {}", grant.id))
        .await;
    assert!(
        revoked["text"].as_str().unwrap().contains("revoked"),
        "{revoked}"
    );
    assert_eq!(app.submit_ok(&agent, body).await["status"], "pending");
    let listed = app.teams_message(ALICE, "grants").await;
    assert!(
        listed["text"]
            .as_str()
            .unwrap()
            .contains("revoked · 3 uses left"),
        "{listed}"
    );
    let again = app
        .teams_message(BOB, &format!("grants revoke {}", grant.id))
        .await;
    assert!(
        again["text"].as_str().unwrap().contains("already revoked"),
        "{again}"
    );
    assert!(app
        .audit_kinds(Some(&id))
        .await
        .iter()
        .any(|kind| kind == "grant_revoked"));
}
