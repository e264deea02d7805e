//! A local webhook receiver that records what signoff sends and can answer 410, fail a few
//! times first, or hang like a dead receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use tokio::sync::Notify;

#[derive(Clone, Debug)]
pub enum Behaviour {
    Accept,
    Gone,
    /// Answer 500 this many times, then accept.
    FailFirst(usize),
    /// Never answer in time.
    Hang,
}

#[derive(Clone, Debug)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
}

#[derive(Clone, Default)]
struct Receiver {
    behaviours: Arc<Mutex<HashMap<String, Behaviour>>>,
    deliveries: Arc<Mutex<HashMap<String, Vec<Delivery>>>>,
    changed: Arc<Notify>,
}

pub struct WebhookReceiver {
    pub base_url: String,
    receiver: Receiver,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        let receiver = Receiver::default();
        let app = Router::new()
            .route("/hooks/{name}", post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver");
        });
        Self {
            base_url: format!("http://{address}"),
            receiver,
        }
    }

    /// The callback URL for hook `name`, answering as `behaviour`.
    pub fn url(&self, name: &str, behaviour: Behaviour) -> String {
        self.receiver
            .behaviours
            .lock()
            .unwrap()
            .insert(name.to_string(), behaviour);
        format!("{}/hooks/{name}", self.base_url)
    }

    pub fn deliveries(&self, name: &str) -> Vec<Delivery> {
        self.receiver
            .deliveries
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until hook `name` was called `count` times.
    pub async fn wait_for(&self, name: &str, count: usize, timeout: Duration) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.receiver.changed.notified();
            let deliveries = self.deliveries(name);
            if deliveries.len() >= count {
                return deliveries;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "hook {name}: expected {count} deliveries within {timeout:?}, got {}",
                    deliveries.len()
                );
            }
        }
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let behaviour = receiver
        .behaviours
        .lock()
        .unwrap()
        .get(&name)
        .cloned()
        .unwrap_or(Behaviour::Accept);
    let earlier = receiver
        .deliveries
        .lock()
        .unwrap()
        .get(&name)
        .map_or(0, Vec::len);
    let status = match behaviour {
        Behaviour::Accept => StatusCode::OK,
        Behaviour::Gone => StatusCode::GONE,
        Behaviour::FailFirst(failures) if earlier < failures => StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::FailFirst(_) => StatusCode::NO_CONTENT,
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::OK
        }
    };
    receiver
        .deliveries
        .lock()
        .unwrap()
        .entry(name)
        .or_default()
        .push(Delivery {
            headers,
            body,
            status: status.as_u16(),
        });
    receiver.changed.notify_waiters();
    status
}
