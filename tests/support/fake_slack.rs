//! A local fake of the Slack Web API: records every call, answers with the fields the
//! response types need, and can be told to fail (500, 429 + Retry-After, ok:false).
//! Also the driver that signs requests to signoff exactly as Slack signs them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Notify;

/// How the next call to a method should fail.
#[derive(Clone, Debug)]
pub enum Failure {
    ServerError,
    RateLimited { retry_after_seconds: u64 },
    NotOk(&'static str),
}

#[derive(Default)]
struct Recorded {
    calls: Vec<(String, Value)>,
    failed: Vec<(String, Value)>,
    failures: HashMap<String, VecDeque<Failure>>,
    emails: HashMap<String, String>,
    groups: HashMap<String, Vec<String>>,
}

#[derive(Clone)]
struct FakeState {
    recorded: Arc<Mutex<Recorded>>,
    changed: Arc<Notify>,
    next_ts: Arc<AtomicU64>,
}

pub struct FakeSlack {
    /// The Web API base, e.g. `http://127.0.0.1:PORT/api/`.
    pub api_url: String,
    /// Where interactions' `response_url`s point; posts there are recorded as "response_url".
    pub response_url: String,
    state: FakeState,
}

impl FakeSlack {
    pub async fn start() -> Self {
        let state = FakeState {
            recorded: Arc::new(Mutex::new(Recorded::default())),
            changed: Arc::new(Notify::new()),
            next_ts: Arc::new(AtomicU64::new(1)),
        };
        let app = Router::new()
            .route("/api/{method}", any(handle))
            .route("/response/{hook}", axum::routing::post(respond))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Slack");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake Slack");
        });
        Self {
            api_url: format!("http://{address}/api/"),
            response_url: format!("http://{address}/response/T0FAKE-1-abc"),
            state,
        }
    }

    /// Successful calls to `method`, oldest first (JSON body, form or query merged).
    pub fn calls(&self, method: &str) -> Vec<Value> {
        let recorded = self.state.recorded.lock().unwrap();
        recorded
            .calls
            .iter()
            .filter(|(name, _)| name == method)
            .map(|(_, body)| body.clone())
            .collect()
    }

    /// Calls to `method` that were told to fail.
    pub fn failed_calls(&self, method: &str) -> usize {
        let recorded = self.state.recorded.lock().unwrap();
        recorded
            .failed
            .iter()
            .filter(|(name, _)| name == method)
            .count()
    }

    pub fn fail_next(&self, method: &str, failures: Vec<Failure>) {
        let mut recorded = self.state.recorded.lock().unwrap();
        recorded
            .failures
            .entry(method.to_string())
            .or_default()
            .extend(failures);
    }

    pub fn add_user(&self, user: &str, email: &str) {
        let mut recorded = self.state.recorded.lock().unwrap();
        recorded.emails.insert(user.to_string(), email.to_string());
    }

    pub fn set_group(&self, group: &str, members: &[&str]) {
        let mut recorded = self.state.recorded.lock().unwrap();
        recorded.groups.insert(
            group.to_string(),
            members.iter().map(|member| member.to_string()).collect(),
        );
    }

    /// Waits until `method` has succeeded `count` times; returns those calls.
    pub async fn wait_for(&self, method: &str, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.changed.notified();
            let calls = self.calls(method);
            if calls.len() >= count {
                return calls;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "fake Slack: expected {count} {method} call(s) within {timeout:?}, got {}: {calls:#?}",
                    calls.len()
                );
            }
        }
    }

    /// The latest chat.postMessage or chat.update for `channel` carrying `request_id`.
    pub fn latest_card(&self, channel: &str, request_id: &str) -> Option<Value> {
        let recorded = self.state.recorded.lock().unwrap();
        recorded
            .calls
            .iter()
            .rev()
            .filter(|(method, _)| method == "chat.postMessage" || method == "chat.update")
            .map(|(_, body)| body)
            .find(|body| {
                body["channel"] == channel && body["blocks"].to_string().contains(request_id)
            })
            .cloned()
    }
}

/// What signoff posts to an interaction's response_url.
async fn respond(State(state): State<FakeState>, Json(body): Json<Value>) -> StatusCode {
    state
        .recorded
        .lock()
        .unwrap()
        .calls
        .push(("response_url".into(), body));
    state.changed.notify_waiters();
    StatusCode::OK
}

async fn handle(
    State(state): State<FakeState>,
    Path(method): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut arguments = serde_json::Map::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        arguments.insert(name.into_owned(), json!(value));
    }
    let is_json = headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) {
            arguments.extend(fields);
        }
    } else {
        for (name, value) in url::form_urlencoded::parse(&body) {
            arguments.insert(name.into_owned(), json!(value));
        }
    }
    let arguments = Value::Object(arguments);
    let authorized = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("Bearer xoxb-"));

    let mut recorded = state.recorded.lock().unwrap();
    if !authorized {
        return Json(json!({"ok": false, "error": "not_authed"})).into_response();
    }
    if let Some(failure) = recorded
        .failures
        .get_mut(&method)
        .and_then(VecDeque::pop_front)
    {
        recorded.failed.push((method.clone(), arguments));
        drop(recorded);
        state.changed.notify_waiters();
        return match failure {
            Failure::ServerError => {
                (StatusCode::INTERNAL_SERVER_ERROR, "upstream broke").into_response()
            }
            Failure::RateLimited {
                retry_after_seconds,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", retry_after_seconds.to_string())],
                Json(json!({"ok": false, "error": "ratelimited"})),
            )
                .into_response(),
            Failure::NotOk(code) => Json(json!({"ok": false, "error": code})).into_response(),
        };
    }
    let answer = match method.as_str() {
        "chat.postMessage" => {
            let ts = format!(
                "1700000000.{:06}",
                state.next_ts.fetch_add(1, Ordering::SeqCst)
            );
            json!({"ok": true, "channel": arguments["channel"], "ts": ts, "message": {"ts": ts}})
        }
        "chat.update" => {
            json!({"ok": true, "channel": arguments["channel"], "ts": arguments["ts"], "message": {}})
        }
        "auth.test" => json!({
            "ok": true, "url": "https://example.slack.com/", "team": "Example",
            "user": "signoff", "team_id": "T0FAKE", "user_id": "U0SIGNOFF", "bot_id": "B0SIGNOFF"
        }),
        "chat.postEphemeral" => json!({"ok": true, "message_ts": "1700000000.999999"}),
        "views.open" => json!({"ok": true, "view": {
            "id": "V0FAKE", "team_id": "T0FAKE", "hash": "fake", "type": "modal",
            "title": {"type": "plain_text", "text": "signoff"}, "blocks": []
        }}),
        "users.info" => {
            let user = arguments["user"].as_str().unwrap_or_default().to_string();
            match recorded.emails.get(&user) {
                Some(email) => {
                    json!({"ok": true, "user": {"id": user, "profile": {"email": email}}})
                }
                None => json!({"ok": true, "user": {"id": user, "profile": {}}}),
            }
        }
        "usergroups.users.list" => {
            let group = arguments["usergroup"].as_str().unwrap_or_default();
            json!({"ok": true, "users": recorded.groups.get(group).cloned().unwrap_or_default()})
        }
        _ => json!({"ok": false, "error": "unknown_method"}),
    };
    recorded.calls.push((method, arguments));
    drop(recorded);
    state.changed.notify_waiters();
    Json(answer).into_response()
}

/// Sends requests to signoff's Slack endpoints signed as Slack signs them:
/// `v0=` + hex(HMAC-SHA256(secret, "v0:" + timestamp + ":" + body)).
pub struct SlackDriver {
    pub signing_secret: String,
    pub base_url: String,
    pub http: reqwest::Client,
    /// The response_url clicks carry (the fake's).
    pub response_url: String,
}

pub fn slack_signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

impl SlackDriver {
    /// Posts `body` to `path` with a valid signature made at `timestamp`.
    pub async fn post_signed(
        &self,
        path: &str,
        body: String,
        content_type: &str,
        timestamp: i64,
    ) -> (StatusCode, String) {
        let signature = slack_signature(&self.signing_secret, timestamp, &body);
        self.post_raw(path, body, content_type, Some((&signature, timestamp)))
            .await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: String,
        content_type: &str,
        signed: Option<(&str, i64)>,
    ) -> (StatusCode, String) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("content-type", content_type)
            .body(body);
        if let Some((signature, timestamp)) = signed {
            request = request
                .header("x-slack-signature", signature)
                .header("x-slack-request-timestamp", timestamp.to_string());
        }
        let response = request.send().await.expect("signoff answers");
        let status = response.status();
        (status, response.text().await.unwrap_or_default())
    }

    pub fn interaction_body(payload: &Value) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &payload.to_string())
            .finish()
    }

    /// Posts an interaction payload, signed now.
    pub async fn interact(&self, payload: Value) -> (StatusCode, String) {
        let now = chrono::Utc::now().timestamp();
        self.post_signed(
            "/slack/interactions",
            Self::interaction_body(&payload),
            "application/x-www-form-urlencoded",
            now,
        )
        .await
    }

    /// A click on a card button showing revision 1 of `request_id`.
    pub async fn click(
        &self,
        user: &str,
        channel: &str,
        action_id: &str,
        request_id: &str,
    ) -> StatusCode {
        self.click_at(user, channel, action_id, request_id, 1)
            .await
            .0
    }

    /// A click on a card button showing `revision`, as Slack's block_actions payload;
    /// returns the status and body signoff answered with.
    pub async fn click_at(
        &self,
        user: &str,
        channel: &str,
        action_id: &str,
        request_id: &str,
        revision: u32,
    ) -> (StatusCode, String) {
        let value = button_value(request_id, revision);
        let mut payload = click_payload(user, channel, action_id, &value);
        payload["response_url"] = json!(self.response_url);
        self.interact(payload).await
    }

    /// A choice in a card's select menu (`action_id`), whose option carries `value`, as
    /// Slack's block_actions payload.
    pub async fn choose(
        &self,
        user: &str,
        channel: &str,
        action_id: &str,
        value: &str,
    ) -> (StatusCode, String) {
        let mut payload = click_payload(user, channel, action_id, "");
        payload["actions"][0] = json!({
            "type": "static_select",
            "action_id": action_id,
            "block_id": "signoff",
            "selected_option": {"text": {"type": "plain_text", "text": "choice"}, "value": value},
            "action_ts": "1700000001.000002"
        });
        payload["response_url"] = json!(self.response_url);
        self.interact(payload).await
    }

    /// A modal opened on revision 1, submitted with one input value.
    pub async fn submit_modal(
        &self,
        user: &str,
        callback_id: &str,
        request_id: &str,
        block: &str,
        value: &str,
    ) -> (StatusCode, Value) {
        self.submit_modal_at(
            user,
            callback_id,
            &button_value(request_id, 1),
            block,
            value,
        )
        .await
    }

    /// A modal whose `private_metadata` is `metadata` (what signoff put in it), submitted
    /// with one input value.
    pub async fn submit_modal_at(
        &self,
        user: &str,
        callback_id: &str,
        metadata: &str,
        block: &str,
        value: &str,
    ) -> (StatusCode, Value) {
        let payload = json!({
            "type": "view_submission",
            "team": {"id": "T0FAKE", "domain": "example"},
            "user": {"id": user, "username": user.to_lowercase(), "team_id": "T0FAKE"},
            "api_app_id": "A0SIGNOFF",
            "trigger_id": "13345224609.738474920.8088930838d88f008e0",
            "view": {
                "id": "V0FAKE", "team_id": "T0FAKE", "type": "modal", "hash": "156772938.1827394",
                "title": {"type": "plain_text", "text": "signoff"},
                "blocks": [],
                "callback_id": callback_id,
                "private_metadata": metadata,
                "state": {"values": {block: {block: {"type": "plain_text_input", "value": value}}}}
            }
        });
        let (status, body) = self.interact(payload).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// The slash command, as Slack posts it.
    pub async fn slash(&self, user: &str, text: &str) -> (StatusCode, Value) {
        let now = chrono::Utc::now().timestamp();
        let (status, body) = self
            .post_signed(
                "/slack/commands",
                slash_body(user, text),
                "application/x-www-form-urlencoded",
                now,
            )
            .await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(json!({"raw": body})),
        )
    }
}

/// The form Slack posts for `/signoff TEXT` typed by `user`.
pub fn slash_body(user: &str, text: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("token", "deprecated-verification-token")
        .append_pair("team_id", "T0FAKE")
        .append_pair("team_domain", "example")
        .append_pair("channel_id", "C0MEDIUM")
        .append_pair("channel_name", "approvals")
        .append_pair("user_id", user)
        .append_pair("user_name", &user.to_lowercase())
        .append_pair("command", "/signoff")
        .append_pair("text", text)
        .append_pair("api_app_id", "A0SIGNOFF")
        .append_pair(
            "response_url",
            "https://hooks.slack.com/commands/T0FAKE/1/abc",
        )
        .append_pair("trigger_id", "13345224609.738474920.8088930838d88f008e0")
        .finish()
}

/// What signoff's card buttons carry for `request_id` at `revision`.
pub fn button_value(request_id: &str, revision: u32) -> String {
    json!({"request_id": request_id, "revision": revision}).to_string()
}

/// Slack's block_actions payload for a click on a card button whose value is `value`.
pub fn click_payload(user: &str, channel: &str, action_id: &str, value: &str) -> Value {
    json!({
        "type": "block_actions",
        "team": {"id": "T0FAKE", "domain": "example"},
        "user": {"id": user, "username": user.to_lowercase(), "name": user.to_lowercase(), "team_id": "T0FAKE"},
        "api_app_id": "A0SIGNOFF",
        "token": "deprecated-verification-token",
        "container": {"type": "message", "message_ts": "1700000000.000001", "channel_id": channel, "is_ephemeral": false},
        "trigger_id": "13345224609.738474920.8088930838d88f008e0",
        "channel": {"id": channel, "name": "approvals"},
        "message": {"type": "message", "ts": "1700000000.000001", "text": "Approval needed"},
        "response_url": "https://hooks.slack.com/actions/T0FAKE/1/abc",
        "actions": [{
            "type": "button",
            "action_id": action_id,
            "block_id": "signoff",
            "text": {"type": "plain_text", "text": action_id},
            "value": value,
            "action_ts": "1700000001.000002"
        }]
    })
}
