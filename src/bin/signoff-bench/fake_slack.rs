//! A minimal stand-in for the Slack Web API, so cards and clicks run their full path
//! without the network.

use axum::extract::Path;
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};

/// Starts the fake on a free loopback port; returns its API base URL.
pub async fn start() -> anyhow::Result<String> {
    let app = Router::new().route("/api/{method}", any(answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{address}/api/"))
}

async fn answer(Path(method): Path<String>) -> Json<Value> {
    Json(match method.as_str() {
        "chat.postMessage" => {
            json!({"ok": true, "channel": "C0BENCH", "ts": "1.1", "message": {"ts": "1.1"}})
        }
        "chat.update" => json!({"ok": true, "channel": "C0BENCH", "ts": "1.1", "message": {}}),
        "users.info" => {
            json!({"ok": true, "user": {"id": "U0BENCH", "profile": {"email": "bench@example.com"}}})
        }
        "usergroups.users.list" => json!({"ok": true, "users": []}),
        _ => json!({"ok": true}),
    })
}
