//! `signoff request`: a client for shell-driven agents — submit, wait, print, exit by outcome.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::domain::ApprovalRequest;

/// One long-poll asks for at most this long; the server caps at 55 s.
const POLL_SECONDS: u64 = 50;

pub struct ClientRequest {
    pub url: String,
    pub key: String,
    pub action: String,
    pub args: Value,
    pub context: Value,
    pub on_behalf_of: Option<String>,
    pub idempotency_key: Option<String>,
    pub wait: Duration,
}

/// Submits, then long-polls until the request is final or `wait` is over.
pub async fn submit_and_wait(request: ClientRequest) -> anyhow::Result<ApprovalRequest> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(POLL_SECONDS + 15))
        .build()?;
    let base = request.url.trim_end_matches('/');
    let mut body =
        json!({"action": request.action, "args": request.args, "context": request.context});
    if let Some(principal) = &request.on_behalf_of {
        body["on_behalf_of"] = json!(principal);
    }
    let mut submit = http
        .post(format!("{base}/v1/requests"))
        .bearer_auth(&request.key)
        .json(&body);
    if let Some(key) = &request.idempotency_key {
        submit = submit.header("Idempotency-Key", key);
    }
    let mut current: ApprovalRequest = read_answer(submit.send().await).await?;
    let deadline = tokio::time::Instant::now() + request.wait;
    while !current.status.is_final() {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            break;
        }
        let seconds = remaining.as_secs_f64().min(POLL_SECONDS as f64);
        let poll = http
            .get(format!(
                "{base}/v1/requests/{}?wait={seconds:.3}",
                current.id
            ))
            .bearer_auth(&request.key)
            .send()
            .await;
        current = read_answer(poll).await?;
    }
    Ok(current)
}

async fn read_answer(
    response: reqwest::Result<reqwest::Response>,
) -> anyhow::Result<ApprovalRequest> {
    let response = response.context("cannot reach the signoff server")?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("the server answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        let code = body["error"]["code"].as_str().unwrap_or("error");
        bail!("server refused ({status}, {code}): {message}");
    }
    serde_json::from_value(body).context("the server's answer is not a request object")
}
