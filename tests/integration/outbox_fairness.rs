//! No agent starves another in the outbox: a dead webhook receiver holds
//! only its own host's slots, a flooded channel serves agents round-robin, leases of running
//! deliveries are renewed so two replicas never both deliver, a delivery whose bookkeeping
//! fails is not repeated, and a replica without Slack leaves Slack cards to one with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::routing::post;
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::channels::ChatChannels;
use signoff::config::Secret;
use signoff::server::RunningServer;
use signoff::workers::Delivery;

use crate::spawn_app;
use crate::support::webhook_receiver::{Behaviour, WebhookReceiver};
use crate::support::{backends, eventually, Backend, TestApp};

/// A receiver that accepts connections and never answers; counts the connections.
async fn dead_receiver() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (format!("http://{address}/hook"), accepted)
}

/// A receiver that records each webhook-id the moment it arrives and answers 200 after
/// `delay`.
async fn slow_receiver(delay: Duration) -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let arrivals: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let recorded = arrivals.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap| {
            let recorded = recorded.clone();
            async move {
                let id = headers
                    .get("webhook-id")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                *recorded.lock().unwrap().entry(id).or_default() += 1;
                tokio::time::sleep(delay).await;
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{address}/hook"), arrivals)
}

fn posted_request_ids(app: &TestApp, ids: &[String]) -> Vec<Option<String>> {
    app.slack
        .calls("chat.postMessage")
        .iter()
        .map(|call| {
            let blocks = call["blocks"].to_string();
            ids.iter().find(|id| blocks.contains(id.as_str())).cloned()
        })
        .collect()
}

#[apply(backends)]
#[tokio::test]
async fn a_dead_receiver_holds_only_its_own_hosts_slots(#[case] backend: Backend) {
    let app = spawn_app!(live backend);
    let (dead_url, accepted) = dead_receiver().await;
    let alive = WebhookReceiver::start().await;
    let flooder = app.create_agent("flooder", &[]).await;
    let other = app.create_agent("other", &[]).await;
    for n in 0..40 {
        app.submit_ok(
            &flooder,
            json!({"action": "users.get", "args": {"n": n}, "callback_url": dead_url}),
        )
        .await;
    }

    let started = Instant::now();
    app.submit_ok(
        &other,
        json!({"action": "users.get", "callback_url": alive.url("alive", Behaviour::Accept)}),
    )
    .await;
    let pending = app.submit_id(&other, json!({"action": "email.send"})).await;
    alive.wait_for("alive", 1, Duration::from_secs(5)).await;
    eventually(Duration::from_secs(5), || async {
        app.slack.latest_card("C0MEDIUM", &pending).map(|_| ())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the other agent's webhook and card took {:?}",
        started.elapsed()
    );
    // The dead host never had more than its share of connections.
    let connections = accepted.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&connections),
        "{connections} connections to the dead receiver"
    );
}

#[apply(backends)]
#[tokio::test]
async fn a_flooded_channel_serves_agents_round_robin(#[case] backend: Backend) {
    let app = spawn_app!(live backend);
    let flooder = app.create_agent("flooder", &[]).await;
    let late = app.create_agent("late", &[]).await;
    let mut flood = Vec::new();
    for n in 0..15 {
        flood.push(
            app.submit_id(&flooder, json!({"action": "email.send", "args": {"n": n}}))
                .await,
        );
    }
    let latecomer = app.submit_id(&late, json!({"action": "email.send"})).await;

    // At about one post a second, the late agent's card comes at its first turn, not after
    // the flood (which would take 12 s more).
    let position = eventually(Duration::from_secs(8), || async {
        posted_request_ids(&app, std::slice::from_ref(&latecomer))
            .iter()
            .position(Option::is_some)
    })
    .await;
    assert!(
        position <= 5,
        "the late agent's card was post number {}",
        position + 1
    );
    // Its card went to the same channel, in between the flood.
    let posted = app.slack.calls("chat.postMessage");
    assert_eq!(posted[position]["channel"], "C0MEDIUM");
}

#[apply(backends)]
#[tokio::test]
async fn two_replicas_deliver_each_slow_webhook_once(#[case] backend: Backend) {
    let mut app = spawn_app!(live backend);
    // Deliveries take longer than a lease: only renewal keeps them from being taken again.
    app.config.outbox_lease_ms = 900;
    app.restart().await;
    let replica = app.start_replica().await;
    let (url, arrivals) = slow_receiver(Duration::from_millis(2500)).await;
    let agent = app.create_agent("bot", &[]).await;
    for n in 0..4 {
        app.submit_ok(
            &agent,
            json!({"action": "users.get", "args": {"n": n}, "callback_url": url}),
        )
        .await;
    }
    // All delivered and recorded; a second attempt would have arrived well before.
    eventually(Duration::from_secs(15), || async {
        let store = app.store().await;
        (arrivals.lock().unwrap().len() == 4 && store.pending_outbox(10).await.unwrap().is_empty())
            .then_some(())
    })
    .await;
    let arrivals = arrivals.lock().unwrap().clone();
    assert!(
        arrivals.values().all(|&count| count == 1),
        "duplicate deliveries: {arrivals:?}"
    );
    replica.shutdown(Duration::from_secs(5)).await;
}

#[apply(backends)]
#[tokio::test]
async fn a_posted_card_whose_record_fails_is_not_posted_again(#[case] backend: Backend) {
    let mut app = spawn_app!(live backend);
    app.config.outbox_lease_ms = 600;
    app.restart().await;
    let agent = app.create_agent("bot", &[]).await;
    let (create, remove) = match backend {
        Backend::Sqlite => (
            vec![
                "CREATE TRIGGER refuse_chat_messages BEFORE INSERT ON chat_messages \
                  BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
            ],
            "DROP TRIGGER refuse_chat_messages",
        ),
        Backend::Postgres => (
            vec![
                "CREATE FUNCTION refuse_chat_messages() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                "CREATE TRIGGER refuse_chat_messages BEFORE INSERT ON chat_messages \
                 FOR EACH ROW EXECUTE FUNCTION refuse_chat_messages()",
            ],
            "DROP TRIGGER refuse_chat_messages ON chat_messages",
        ),
    };
    for statement in create {
        app.execute_sql(statement).await.unwrap();
    }
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;
    app.slack
        .wait_for("chat.postMessage", 1, Duration::from_secs(5))
        .await;
    // Several leases long: without reconciling, the lease lapses and the card is posted again.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    app.execute_sql(remove).await.unwrap();
    eventually(Duration::from_secs(10), || async {
        app.store()
            .await
            .chat_message(&id, "slack:C0MEDIUM")
            .await
            .unwrap()
    })
    .await;
    assert_eq!(app.slack.calls("chat.postMessage").len(), 1);
}

#[apply(backends)]
#[tokio::test]
async fn a_replica_without_slack_leaves_slack_cards_to_one_with_it(#[case] backend: Backend) {
    let mut app = spawn_app!(live backend);
    let agent = app.create_agent("bot", &[]).await;
    app.stop().await;
    let mut config = app.config.clone();
    config.slack.bot_token = Secret::new("");
    let without_slack = RunningServer::start(config).await.unwrap();

    let (status, body): (StatusCode, Value) = {
        let response = app
            .http
            .post(format!("http://{}/v1/requests", without_slack.address()))
            .bearer_auth(&agent.key)
            .json(&json!({"action": "email.send"}))
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    };
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    // A worker without Slack looks, and claims nothing.
    let worker = Arc::new(Delivery::new(
        without_slack.engine().clone(),
        ChatChannels::default(),
        reqwest::Client::new(),
    ));
    assert_eq!(worker.step().await.unwrap(), 0);
    let store = app.store().await;
    let pending = store.pending_outbox(10).await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].destination, "slack:C0MEDIUM");
    assert_eq!(pending[0].attempts, 0);

    // A replica with Slack posts it.
    app.start_again().await;
    eventually(Duration::from_secs(5), || async {
        app.slack.latest_card("C0MEDIUM", &id).map(|_| ())
    })
    .await;
    without_slack.shutdown(Duration::from_secs(5)).await;
}
