//! The chat-channel boundary: a channel registered with one line receives cards, updates
//! and reminders through the same outbox and delivery path as Slack, driven by the test
//! clock and the workers' step functions.

use std::time::Duration;

use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use signoff::domain::Status;

use crate::support::recording_channel::{Recorded, RecordingChannel};
use crate::support::{backends, Backend, TestApp};

const POLICY: &str = r#"version: 1
default: deny
groups:
  ops: ["cli:alice", "cli:bob"]
tiers:
  medium:
    route: ["teams:19:ops@thread.tacv2", "slack:C0MEDIUM"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 1h
    remind_after: 10m
rules:
  - name: email
    match: ["email.send"]
    effect: require_approval
    tier: medium
"#;

#[apply(backends)]
#[tokio::test]
async fn a_registered_channel_gets_cards_updates_and_reminders(#[case] backend: Backend) {
    let recorder = RecordingChannel::new("teams");
    let Some(app) = TestApp::spawn_with_channels(backend, POLICY, vec![recorder.clone()]).await
    else {
        return;
    };
    let agent = app.create_agent("mailer", &[]).await;
    let id = app
        .submit_id(
            &agent,
            json!({"action": "email.send", "args": {"to": "a@example.com"}}),
        )
        .await;
    let destination = "teams:19:ops@thread.tacv2".to_string();
    let posted = Recorded::Posted {
        destination: destination.clone(),
        request_id: id.clone(),
        revision: 1,
        status: Status::Pending,
    };
    // Nothing moves until the test delivers: no worker runs behind its back.
    assert!(recorder.recorded().is_empty());
    app.deliver().await;
    assert_eq!(recorder.recorded(), std::slice::from_ref(&posted));
    // Slack, the other route, got its card through the same step.
    assert_eq!(app.slack.calls("chat.postMessage").len(), 1);

    // Not yet due: a sweep before `remind_after` reminds nobody.
    app.advance(Duration::from_secs(9 * 60));
    assert_eq!(app.sweep().await.reminded, 0);
    app.advance(Duration::from_secs(2 * 60));
    assert_eq!(app.sweep().await.reminded, 1);
    app.deliver().await;
    let reminded = Recorded::Reminded {
        destination: destination.clone(),
        approvals: 0,
        required: 1,
    };
    assert_eq!(recorder.recorded(), [posted.clone(), reminded.clone()]);

    app.approve(&id, "cli:alice").await.expect("approve");
    app.deliver().await;
    let updated = Recorded::Updated {
        destination,
        request_id: id.clone(),
        revision: 1,
        status: Status::Approved,
    };
    assert_eq!(recorder.recorded(), [posted, reminded, updated]);
}

#[apply(backends)]
#[tokio::test]
async fn expiry_follows_the_test_clock(#[case] backend: Backend) {
    let recorder = RecordingChannel::new("teams");
    let Some(app) = TestApp::spawn_with_channels(backend, POLICY, vec![recorder.clone()]).await
    else {
        return;
    };
    let agent = app.create_agent("mailer", &[]).await;
    let id = app
        .submit_id(&agent, json!({"action": "email.send", "args": {}}))
        .await;
    app.advance(Duration::from_secs(59 * 60));
    assert_eq!(app.sweep().await.expired, 0);
    assert_eq!(app.stored(&id).await.status, Status::Pending);
    app.advance(Duration::from_secs(61));
    assert_eq!(app.sweep().await.expired, 1);
    assert_eq!(app.stored(&id).await.status, Status::Expired);
    // The card shows it: posted, then updated to expired, in one delivery step.
    app.deliver().await;
    let statuses: Vec<Status> = recorder
        .recorded()
        .into_iter()
        .filter_map(|recorded| match recorded {
            Recorded::Posted { status, .. } | Recorded::Updated { status, .. } => Some(status),
            Recorded::Reminded { .. } => None,
        })
        .collect();
    assert_eq!(statuses.last(), Some(&Status::Expired));
}

/// Cards for a platform this server runs no channel for wait for one that does; however
/// many there are, and however old, they never hold back a card this server can send.
const CROWDED_POLICY: &str = r#"version: 1
default: deny
groups:
  ops: ["cli:alice"]
tiers:
  elsewhere:
    route: ["teams:19:ops@thread.tacv2"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 1h
  here:
    route: ["slack:C0HERE"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 1h
rules:
  - name: elsewhere
    match: ["bulk.*"]
    effect: require_approval
    tier: elsewhere
  - name: here
    match: ["email.send"]
    effect: require_approval
    tier: here
"#;

#[apply(backends)]
#[tokio::test]
async fn another_platforms_backlog_never_crowds_out_a_sendable_card(#[case] backend: Backend) {
    let Some(app) = TestApp::spawn_with_policy(backend, CROWDED_POLICY).await else {
        return;
    };
    // More (destination, agent) queues than the worker reads at a time (256), all older.
    for n in 0..300 {
        let agent = app.create_agent(&format!("bulk-{n}"), &[]).await;
        app.submit_ok(&agent, json!({"action": "bulk.update", "args": {"n": n}}))
            .await;
    }
    let mailer = app.create_agent("mailer", &[]).await;
    let id = app
        .submit_id(&mailer, json!({"action": "email.send", "args": {}}))
        .await;
    app.deliver().await;
    assert!(app.slack.latest_card("C0HERE", &id).is_some());
    // The other platform's cards are still queued for a server that runs it.
    let waiting = app.store().await.pending_outbox(1000).await.unwrap();
    assert_eq!(waiting.len(), 300, "{:?}", waiting.first());
    assert!(waiting
        .iter()
        .all(|message| message.destination == "teams:19:ops@thread.tacv2"));
}
