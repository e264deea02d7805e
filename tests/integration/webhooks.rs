//! Signed webhooks to agents: verified by an independent Standard Webhooks implementation,
//! retried through failures, stopped by 410, and never held up by a dead receiver.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};

use crate::spawn_app;
use crate::support::webhook_receiver::{Behaviour, WebhookReceiver};
use crate::support::{backends, Backend};

const WAIT: Duration = Duration::from_secs(15);
/// Past the longest backoff before a webhook's next attempt.
const WEBHOOK_RETRY: Duration = Duration::from_secs(2 * 60 * 60);

fn event(delivery: &crate::support::webhook_receiver::Delivery) -> Value {
    serde_json::from_slice(&delivery.body).expect("JSON body")
}

#[apply(backends)]
#[tokio::test]
async fn decisions_expiry_and_cancellation_are_signed_webhooks(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;
    let verifier = standardwebhooks::Webhook::new(&agent.webhook_secret).expect("whsec_ secret");

    let approved = app
        .submit_id(&agent, json!({"action": "email.send", "callback_url": receiver.url("approved", Behaviour::Accept)}))
        .await;
    app.approve(&approved, "cli:alice").await.unwrap();
    let expired = app
        .submit_id(&agent, json!({"action": "flash.go", "callback_url": receiver.url("expired", Behaviour::Accept)}))
        .await;
    let cancelled = app
        .submit_id(&agent, json!({"action": "email.send", "callback_url": receiver.url("cancelled", Behaviour::Accept)}))
        .await;
    app.post_json(
        &agent,
        &format!("/v1/requests/{cancelled}/cancel"),
        json!({}),
    )
    .await;
    let denied = app
        .submit_id(&agent, json!({"action": "db.drop_x", "callback_url": receiver.url("denied", Behaviour::Accept)}))
        .await;
    // Past the flash request's one-second ttl.
    app.advance(Duration::from_secs(2));
    assert_eq!(app.sweep().await.expired, 1);
    app.deliver().await;

    for (hook, id, kind, status) in [
        ("approved", &approved, "request.decided", "approved"),
        ("denied", &denied, "request.decided", "denied"),
        ("expired", &expired, "request.expired", "expired"),
        ("cancelled", &cancelled, "request.cancelled", "cancelled"),
    ] {
        let deliveries = receiver.wait_for(hook, 1, WAIT).await;
        let delivery = &deliveries[0];
        verifier
            .verify(&delivery.body, &delivery.headers)
            .unwrap_or_else(|error| panic!("{hook}: signature does not verify: {error:?}"));
        let body = event(delivery);
        assert_eq!(body["type"], kind);
        assert_eq!(body["data"]["id"], id.as_str());
        assert_eq!(body["data"]["status"], status);
        assert!(body["timestamp"].is_string());
    }
    // A forged signature must not verify with the same checker.
    let mut forged = receiver.deliveries("approved")[0].clone();
    let mut tampered = forged.body.to_vec();
    tampered.push(b' ');
    forged.body = Bytes::from(tampered);
    assert!(verifier.verify(&forged.body, &forged.headers).is_err());
}

#[apply(backends)]
#[tokio::test]
async fn failures_are_retried_with_the_same_id_and_410_stops(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;

    app.submit_ok(&agent, json!({"action": "users.get", "callback_url": receiver.url("flaky", Behaviour::FailFirst(2))}))
        .await;
    app.submit_ok(
        &agent,
        json!({"action": "users.get", "callback_url": receiver.url("gone", Behaviour::Gone)}),
    )
    .await;

    // Each failure is retried after its backoff, with the same id, until accepted; 410
    // Gone is not retried.
    for attempts in 1..=3 {
        app.deliver().await;
        assert_eq!(receiver.deliveries("flaky").len(), attempts);
        assert_eq!(receiver.deliveries("gone").len(), 1);
        app.advance(WEBHOOK_RETRY);
    }
    let deliveries = receiver.wait_for("flaky", 3, WAIT).await;
    let statuses: Vec<u16> = deliveries.iter().map(|delivery| delivery.status).collect();
    assert_eq!(statuses, vec![500, 500, 204]);
    let ids: Vec<&str> = deliveries
        .iter()
        .map(|delivery| delivery.headers["webhook-id"].to_str().unwrap())
        .collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one event, one id across retries: {ids:?}"
    );

    app.deliver().await;
    app.assert_none_pending("webhook").await;
    assert_eq!(
        receiver.deliveries("gone").len(),
        1,
        "410 Gone is not retried"
    );
    assert_eq!(receiver.deliveries("flaky").len(), 3);
}

#[apply(backends)]
#[tokio::test]
async fn a_dead_receiver_delays_nothing_else(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    // Another host: a dead host holds only its own few slots (same-host webhooks queue
    // behind it once those are taken).
    let dead = WebhookReceiver::start().await;
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;
    for n in 0..5 {
        app.submit_ok(&agent, json!({"action": "users.get", "args": {"n": n}, "callback_url": dead.url("dead", Behaviour::Hang)}))
            .await;
    }
    let started = Instant::now();
    app.submit_ok(
        &agent,
        json!({"action": "users.get", "callback_url": receiver.url("alive", Behaviour::Accept)}),
    )
    .await;
    let pending = app.submit_id(&agent, json!({"action": "email.send"})).await;
    // One look at the outbox starts every delivery there is room for, each in its own
    // task, and waits for none: the dead host holds only its own slots while the other
    // webhook and the card go out.
    app.delivery().step().await.unwrap();
    receiver.wait_for("alive", 1, WAIT).await;
    app.slack.wait_for("chat.postMessage", 1, WAIT).await;
    let (_, body) = app.get_request(&agent, &pending, None).await;
    assert_eq!(body["status"], "pending");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
