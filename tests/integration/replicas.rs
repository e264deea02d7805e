//! Several servers on one database behave as one service.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::domain::Status;
use signoff::workers::sweep_once;

use crate::spawn_app;
use crate::support::webhook_receiver::{Behaviour, WebhookReceiver};
use crate::support::{backends, Backend};

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_on_one_replica_wakes_a_long_poll_on_another(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let replica = app.start_replica().await;
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;

    // The long-poll waits on the first server; the vote lands on the replica.
    let waiting = app.spawn_long_poll(&agent, &id, 30);
    // The vote must land while the long-poll waits, or it would answer without a wake.
    app.until_awaited(&id).await;
    let voter = signoff::domain::Voter::new("cli:alice".parse().unwrap());
    replica
        .engine()
        .record_vote(
            &id,
            &voter,
            signoff::domain::VoteRequest::Approve { note: None },
            None,
        )
        .await
        .unwrap();
    let decided_at = Instant::now();
    let (body, answered_at) = waiting.await.unwrap();
    assert_eq!(body["status"], "approved");
    let lag = answered_at.saturating_duration_since(decided_at);
    assert!(
        lag < Duration::from_secs(1),
        "woken {lag:?} after the decision"
    );
    replica.shutdown(Duration::from_secs(5)).await;
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_expiring_together_are_expired_and_announced_once(#[case] backend: Backend) {
    const REQUESTS: usize = 200;
    let app = spawn_app!(backend);
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;
    let callback = receiver.url("expiries", Behaviour::Accept);
    let mut ids = Vec::new();
    for n in 0..REQUESTS {
        ids.push(
            app.submit_id(
                &agent,
                json!({"action": "flash.go", "args": {"n": n}, "callback_url": callback}),
            )
            .await,
        );
    }
    // Two more replicas join; past the one-second ttl, all three sweep at once, then
    // deliver at once.
    let second = app.start_replica().await;
    let third = app.start_replica().await;
    app.advance(Duration::from_secs(2));
    let swept = tokio::join!(
        app.sweep(),
        sweep_once(second.engine()),
        sweep_once(third.engine())
    );
    assert_eq!(
        swept.0.expired + swept.1.expired + swept.2.expired,
        REQUESTS,
        "each request expired by one replica: {swept:?}"
    );
    let (_, second_delivered, third_delivered) = tokio::join!(
        app.deliver(),
        second.delivery().deliver_due(),
        third.delivery().deliver_due()
    );
    second_delivered.unwrap();
    third_delivered.unwrap();

    app.assert_none_pending("webhook").await;
    assert_eq!(
        receiver.deliveries("expiries").len(),
        REQUESTS,
        "each webhook exactly once"
    );

    let mut per_request: HashMap<String, usize> = HashMap::new();
    for delivery in receiver.deliveries("expiries") {
        let body: Value = serde_json::from_slice(&delivery.body).unwrap();
        assert_eq!(body["type"], "request.expired");
        *per_request
            .entry(body["data"]["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_request.len(), REQUESTS);
    assert!(per_request.values().all(|count| *count == 1));

    let mut expired_events: HashMap<String, usize> = HashMap::new();
    app.engine()
        .export_audit(|event| {
            if event.kind == "expired" {
                *expired_events
                    .entry(event.request_id.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(expired_events.len(), REQUESTS);
    assert!(
        expired_events.values().all(|count| *count == 1),
        "each request expired once"
    );
    for id in &ids {
        assert_eq!(app.stored(id).await.status, Status::Expired);
    }
    assert!(app.engine().verify_audit_chain().await.unwrap().is_ok());
    second.shutdown(Duration::from_secs(5)).await;
    third.shutdown(Duration::from_secs(5)).await;
}
