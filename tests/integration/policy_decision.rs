//! The decision side of the policy features, end to end on both backends: per-group quorum
//! (cards, `signoff pending`, votes from Slack and the CLI), escalation ladders (each step
//! once, even with sweeps racing) and redaction (every outward view, the audit trail; the
//! agent still sees its own values).

use std::time::Duration;

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use signoff::domain::{action_hash, Status};
use signoff::workers::{sweep_once, Swept};

use crate::support::webhook_receiver::{Behaviour, WebhookReceiver};
use crate::support::{backends, stderr, stdout, Backend, TestApp};

const WAIT: Duration = Duration::from_secs(10);

const DECISION_POLICY: &str = r#"version: 1
default: deny
groups:
  finance: ["slack:U01DANA", "cli:frank", "cli:grace"]
  ops: ["slack:U01DANA", "cli:olga"]
tiers:
  split:
    route: ["slack:C0SPLIT"]
    approvers: ["group:finance", "group:ops", "cli:auditor"]
    approvals: {finance: 1, ops: 1}
    ttl: 2h
  ladder:
    route: ["slack:C0LADDER"]
    approvers: ["group:ops"]
    ttl: 2h
    remind_after: 5m
    escalate:
      - {after: 15m, to: ["slack:C0ONCALL"]}
      - {after: 45m, to: ["slack:C0MANAGERS"]}
  secret:
    route: ["slack:C0SECRET"]
    approvers: ["group:ops", "group:finance"]
    ttl: 2h
redact: ["args.card_number", "context.customer.email"]
rules:
  - name: split
    match: ["payments.transfer"]
    effect: require_approval
    tier: split
  - name: ladder
    match: ["deploy.*"]
    effect: require_approval
    tier: ladder
  - name: secret
    match: ["cards.charge"]
    effect: require_approval
    tier: secret
"#;

async fn decision_app(backend: Backend) -> Option<TestApp> {
    let app = TestApp::spawn_with_policy(backend, DECISION_POLICY).await?;
    app.slack.add_user("U01DANA", "dana@example.com");
    app.slack.add_user("U09MALLORY", "mallory@example.com");
    Some(app)
}

/// The latest card for `id` in `channel`, as Slack received it, once delivered.
async fn card_text(app: &TestApp, channel: &str, id: &str) -> String {
    app.deliver_all().await;
    app.slack
        .latest_card(channel, id)
        .unwrap_or_else(|| panic!("no card for {id} in {channel}"))["blocks"]
        .to_string()
}

/// `signoff pending --json`, parsed.
fn pending_json(app: &TestApp) -> Vec<Value> {
    let output = app.cli(&["pending", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).expect("pending --json is JSON")
}

fn cli_approve(app: &TestApp, id: &str, who: &str) -> String {
    let output = app.cli(&["approve", id, "--as", who]);
    assert!(output.status.success(), "{}", stderr(&output));
    app.catch_up_with_the_cli();
    stdout(&output)
}

#[apply(backends)]
#[tokio::test]
async fn a_per_group_quorum_counts_people_in_any_assignment_to_slots(#[case] backend: Backend) {
    let Some(app) = decision_app(backend).await else {
        return;
    };
    let agent = app.create_agent("treasury", &[]).await;
    let transfer = json!({"action": "payments.transfer", "args": {"amount": 5}});

    // Dana is in both groups: her click fills one slot only.
    let both = app.submit_id(&agent, transfer.clone()).await;
    assert_eq!(app.stored(&both).await.approvals_required, 2);
    card_text(&app, "C0SPLIT", &both).await;
    let driver = app.slack_driver();
    assert_eq!(
        driver.click("U01DANA", "C0SPLIT", "approve", &both).await,
        StatusCode::OK
    );
    assert_eq!(app.stored(&both).await.status, Status::Pending);
    let card = card_text(&app, "C0SPLIT", &both).await;
    assert!(card.contains("finance 1/1 · ops 0/1"), "{card}");
    let listed = pending_json(&app);
    assert_eq!(
        listed[0]["approvals_by_group"],
        json!({"finance": 1, "ops": 1})
    );
    assert_eq!(
        listed[0]["group_progress"],
        json!({"finance": {"approvals": 1, "required": 1}, "ops": {"approvals": 0, "required": 1}})
    );
    // Frank (finance only) completes it: Dana moves to the ops slot.
    let answer = cli_approve(&app, &both, "cli:frank");
    assert!(answer.contains("is now approved"), "{answer}");
    let stored = app.stored(&both).await;
    assert_eq!(stored.status, Status::Approved);
    assert_eq!(stored.votes[0].groups, vec!["finance", "ops"]);
    let card = card_text(&app, "C0SPLIT", &both).await;
    assert!(card.contains("Approved"), "{card}");

    // Two finance people leave the ops slot empty; an approver in no quorum group is
    // recorded but fills nothing; then someone from ops decides it.
    let split = app.submit_id(&agent, transfer).await;
    cli_approve(&app, &split, "cli:frank");
    cli_approve(&app, &split, "cli:grace");
    let answer = cli_approve(&app, &split, "cli:auditor");
    assert!(
        answer.contains("1 of 2 approvals; still pending"),
        "{answer}"
    );
    let card = card_text(&app, "C0SPLIT", &split).await;
    assert!(
        card.contains("1 of 2 approvals (finance 1/1 · ops 0/1)"),
        "three people approved, one slot is filled: {card}"
    );
    let output = app.cli(&["pending"]);
    assert!(
        stdout(&output).contains("1/2 (finance 1/1 · ops 0/1)"),
        "{}",
        stdout(&output)
    );
    assert_eq!(app.stored(&split).await.votes.len(), 3);
    cli_approve(&app, &split, "cli:olga");
    let stored = app.stored(&split).await;
    assert_eq!(stored.status, Status::Approved);
    assert_eq!(
        stored.decision.unwrap().by.len(),
        4,
        "every current approver is named"
    );
}

#[apply(backends)]
#[tokio::test]
async fn an_escalation_ladder_posts_each_step_once_at_its_time(#[case] backend: Backend) {
    let Some(app) = decision_app(backend).await else {
        return;
    };
    let agent = app.create_agent("deployer", &[]).await;
    let id = app
        .submit_id(&agent, json!({"action": "deploy.prod"}))
        .await;
    card_text(&app, "C0LADDER", &id).await;

    // Reminders as before, then step 1 at 15 minutes: sweeps racing on two replicas take
    // it once.
    app.advance(Duration::from_secs(6 * 60));
    assert_eq!(app.sweep().await.reminded, 1);
    app.advance(Duration::from_secs(10 * 60));
    let replica = app.start_replica().await;
    let (first, second, third) = tokio::join!(
        app.sweep(),
        sweep_once(replica.engine()),
        sweep_once(replica.engine())
    );
    assert_eq!(first.escalated + second.escalated + third.escalated, 1);
    assert_eq!(app.sweep().await, Swept::default());
    let oncall = card_text(&app, "C0ONCALL", &id).await;
    assert!(oncall.contains("Escalated: step 1 of 2"), "{oncall}");
    assert!(
        oncall.contains("\"approve\""),
        "the full card, with buttons: {oncall}"
    );
    assert!(app.slack.latest_card("C0MANAGERS", &id).is_none());
    let route = card_text(&app, "C0LADDER", &id).await;
    assert!(route.contains("Escalated: step 1 of 2"), "{route}");

    // Step 2 at 45 minutes, to its own destination; every card says which step.
    app.advance(Duration::from_secs(30 * 60));
    assert_eq!(app.sweep().await.escalated, 1);
    for channel in ["C0MANAGERS", "C0ONCALL", "C0LADDER"] {
        let card = card_text(&app, channel, &id).await;
        assert!(card.contains("Escalated: step 2 of 2"), "{channel}: {card}");
    }
    let posts = app.slack.calls("chat.postMessage");
    let cards_in = |channel: &str| {
        posts
            .iter()
            .filter(|post| post["channel"] == channel && post["thread_ts"].is_null())
            .count()
    };
    assert_eq!(
        (cards_in("C0ONCALL"), cards_in("C0MANAGERS")),
        (1, 1),
        "each step posted once"
    );
    app.advance(Duration::from_secs(60 * 60));
    assert_eq!(app.sweep().await.escalated, 0, "the ladder has two steps");
    assert_eq!(
        app.audit_kinds(Some(&id)).await,
        vec!["submitted", "verdict", "reminded", "escalated", "escalated"]
    );

    // A decided request escalates no further.
    let decided = app
        .submit_id(&agent, json!({"action": "deploy.staging"}))
        .await;
    cli_approve(&app, &decided, "cli:olga");
    app.advance(Duration::from_secs(20 * 60));
    assert_eq!(app.sweep().await.escalated, 0);
    assert!(app.stored(&decided).await.escalated_at.is_none());

    // A sweeper that comes late takes every step due at once, each audited.
    let late = app
        .submit_id(&agent, json!({"action": "deploy.canary"}))
        .await;
    app.advance(Duration::from_secs(50 * 60));
    assert_eq!(app.sweep().await.escalated, 1);
    let card = card_text(&app, "C0MANAGERS", &late).await;
    assert!(card.contains("Escalated: step 2 of 2"), "{card}");
    assert!(app.slack.latest_card("C0ONCALL", &late).is_some());
    let kinds = app.audit_kinds(Some(&late)).await;
    assert_eq!(kinds.iter().filter(|kind| *kind == "escalated").count(), 2);
}

const CARD_NUMBER: &str = "4111111111111111";
const EMAIL: &str = "ann@example.com";

fn hashed(value: &Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(
            serde_json_canonicalizer::to_vec(value).unwrap()
        ))
    )
}

fn assert_hidden(place: &str, text: &str) {
    assert!(
        !text.contains(CARD_NUMBER) && !text.contains(EMAIL),
        "{place} shows a redacted value: {text}"
    );
}

#[apply(backends)]
#[tokio::test]
async fn redacted_values_reach_no_person_and_no_audit_payload(#[case] backend: Backend) {
    let Some(app) = decision_app(backend).await else {
        return;
    };
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("billing", &[]).await;
    let args = json!({"card_number": CARD_NUMBER, "amount": 70});
    let created = app
        .submit_ok(
            &agent,
            json!({
                "action": "cards.charge",
                "args": args,
                "context": {"summary": "charge a card", "customer": {"email": EMAIL, "tier": "gold"}},
                "callback_url": receiver.url("charged", Behaviour::Accept),
            }),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    // The agent sees its own values; the action hash covers them.
    assert_eq!(created["args"]["card_number"], CARD_NUMBER);
    assert_eq!(created["action_hash"], action_hash("cards.charge", &args));
    let (status, fetched) = app.get_request(&agent, &id, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched["context"]["customer"]["email"], EMAIL);

    // The card, the slash command's answers and the CLI's listings show `[redacted]`.
    let card = card_text(&app, "C0SECRET", &id).await;
    assert_hidden("the card", &card);
    assert!(card.contains("[redacted]") && card.contains("70"), "{card}");
    let driver = app.slack_driver();
    for command in [format!("show {id}"), "pending".to_string()] {
        let (status, answer) = driver.slash("U01DANA", &command).await;
        assert_eq!(status, StatusCode::OK);
        assert!(answer.to_string().contains(&id), "{command}: {answer}");
        assert_hidden(&command, &answer.to_string());
    }
    let listed = pending_json(&app);
    assert_eq!(listed[0]["args"]["card_number"], "[redacted]");
    assert_eq!(listed[0]["context"]["customer"]["email"], "[redacted]");
    let shown = app.cli(&["show", &id]);
    assert_hidden("signoff show", &stdout(&shown));

    // The modify modal shows `[redacted]`; submitting it keeps the real value.
    assert_eq!(
        driver.click("U01DANA", "C0SECRET", "modify", &id).await,
        StatusCode::OK
    );
    let opened = app.slack.wait_for("views.open", 1, WAIT).await;
    let modal = opened[0]["view"].to_string();
    assert_hidden("the modify modal", &modal);
    assert!(modal.contains("[redacted]"), "{modal}");
    // A value of one's own at a redacted path is refused the same way whether or not it
    // is the hidden one: the answer cannot confirm a guess.
    let mut refusals = Vec::new();
    for guess in [CARD_NUMBER.to_string(), "4000000000000002".to_string()] {
        let (status, answer) = driver
            .submit_modal(
                "U01DANA",
                "signoff_modify",
                &id,
                "args",
                &json!({"card_number": guess, "amount": 70}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(answer.to_string().contains("redacted value"), "{answer}");
        refusals.push(answer);
    }
    assert_eq!(refusals[0], refusals[1]);
    assert_eq!(app.stored(&id).await.revision, 1);
    let (status, answer) = driver
        .submit_modal(
            "U01DANA",
            "signoff_modify",
            &id,
            "args",
            r#"{"card_number": "[redacted]", "amount": 60}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Approved);
    let final_args = json!({"card_number": CARD_NUMBER, "amount": 60});
    assert_eq!(stored.args, final_args);
    assert_eq!(stored.action_hash, action_hash("cards.charge", &final_args));

    // The webhook carries the real values.
    app.deliver_all().await;
    let hooks = receiver.wait_for("charged", 1, WAIT).await;
    let hook: Value = serde_json::from_slice(&hooks[0].body).unwrap();
    assert_eq!(hook["data"]["decision"]["args"], final_args);
    let card = card_text(&app, "C0SECRET", &id).await;
    assert_hidden("the decided card", &card);

    // The audit trail holds hashes, and still verifies.
    let export = app.cli(&["audit", "export"]);
    assert!(export.status.success(), "{}", stderr(&export));
    let export = stdout(&export);
    assert_hidden("audit export", &export);
    assert!(export.contains(&hashed(&json!(CARD_NUMBER))), "{export}");
    assert!(export.contains(&hashed(&json!(EMAIL))), "{export}");
    assert!(app.cli(&["audit", "verify"]).status.success());

    // Votes typed in chat and on the command line answer with the args, redacted.
    for voted_by in ["slack", "cli"] {
        let id = app
            .submit_id(
                &agent,
                json!({"action": "cards.charge", "args": {"card_number": CARD_NUMBER, "amount": 5}}),
            )
            .await;
        let answer = match voted_by {
            "slack" => driver
                .slash("U01DANA", &format!("approve {id}"))
                .await
                .1
                .to_string(),
            _ => cli_approve(&app, &id, "cli:olga"),
        };
        assert!(answer.contains("approved"), "{voted_by}: {answer}");
        assert!(answer.contains("[redacted]"), "{voted_by}: {answer}");
        assert_hidden(voted_by, &answer);
    }
}

#[test]
fn policy_check_names_every_decision_feature_error_with_tier_and_line() {
    let directory = tempfile::tempdir().unwrap();
    let check = |source: &str| {
        let path = directory.path().join("policy.yaml");
        std::fs::write(&path, source).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
            .args(["policy", "check", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(check(DECISION_POLICY).status.success());
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.yaml"))
            .unwrap();
    assert!(
        example.contains("approvals: {")
            && example.contains("escalate:")
            && example.contains("redact:"),
        "the example shows every decision feature"
    );
    assert!(check(&example).status.success());
    let output = check(
        "version: 1\ngroups:\n  finance: [\"cli:f\"]\ntiers:\n  high:\n    approvers: [\"group:finance\"]\n    approvals: {finance: 1, sre: 1}\n    escalate_after: 5m\n    escalate_to: [\"slack:C1\"]\n    escalate:\n      - {after: 10m, to: [\"slack:C2\"]}\nredact: [\"body.x\"]\n",
    );
    assert_eq!(output.status.code(), Some(1));
    let errors = stderr(&output);
    for expected in [
        "line 6: tier \"high\": approvals names group \"sre\"",
        "line 6: tier \"high\": use either escalate (a ladder) or escalate_after/escalate_to",
        "line 12: redact path \"body.x\" must start with args. or context.",
    ] {
        assert!(errors.contains(expected), "{expected}: {errors}");
    }
}

/// One person named in two groups through two principals (a `people` entry) fills one
/// slot only: after her Slack click, her CLI approval is refused and changes nothing.
#[apply(backends)]
#[tokio::test]
async fn one_person_under_two_principals_fills_one_group_slot(#[case] backend: Backend) {
    let policy = DECISION_POLICY
        .replacen(
            "groups:",
            "people:\n  dana: [\"slack:U01DANA\", \"cli:dana\"]\ngroups:",
            1,
        )
        .replacen(
            "ops: [\"slack:U01DANA\", \"cli:olga\"]",
            "ops: [\"cli:dana\", \"cli:olga\"]",
            1,
        );
    let Some(app) = TestApp::spawn_with_policy(backend, &policy).await else {
        return;
    };
    app.slack.add_user("U01DANA", "dana@example.com");
    let agent = app.create_agent("treasury", &[]).await;
    let id = app
        .submit_id(
            &agent,
            json!({"action": "payments.transfer", "args": {"amount": 5}}),
        )
        .await;
    card_text(&app, "C0SPLIT", &id).await;
    assert_eq!(
        app.slack_driver()
            .click("U01DANA", "C0SPLIT", "approve", &id)
            .await,
        StatusCode::OK
    );
    let output = app.cli(&["approve", &id, "--as", "cli:dana"]);
    assert!(!output.status.success(), "{}", stdout(&output));
    app.catch_up_with_the_cli();
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.approvals_counted(), 1);
    cli_approve(&app, &id, "cli:olga");
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}
