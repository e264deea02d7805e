//! The agent side of the HTTP API: `SignoffClient` (submit, long-poll, report execution),
//! used by `signoff request` (a client for shell-driven agents) and `signoff mcp-proxy`.

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

/// An agent's connection to a signoff server: its base URL and API key.
#[derive(Clone)]
pub struct SignoffClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl std::fmt::Debug for SignoffClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SignoffClient")
            .field("base", &self.base)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SignoffClient {
    /// Refuses a URL that would send the key in the clear off this machine: https, or
    /// plain http only to a loopback address.
    pub fn new(url: &str, key: &str) -> anyhow::Result<Self> {
        check_url(url)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(POLL_SECONDS + 15))
            .build()?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_string(),
            key: key.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// `POST /v1/requests` with `body` (`action`, `args`, `context`, ...).
    pub async fn submit(
        &self,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<ApprovalRequest> {
        let mut submit = self
            .http
            .post(format!("{}/v1/requests", self.base))
            .bearer_auth(&self.key)
            .json(body);
        if let Some(key) = idempotency_key {
            submit = submit.header("Idempotency-Key", key);
        }
        read_answer(submit.send().await).await
    }

    /// `GET /v1/requests/{id}?wait=...`: one long-poll of at most 50 s.
    pub async fn poll(&self, id: &str, wait: Duration) -> anyhow::Result<ApprovalRequest> {
        let seconds = wait.as_secs_f64().min(POLL_SECONDS as f64);
        let poll = self
            .http
            .get(format!("{}/v1/requests/{id}?wait={seconds:.3}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await;
        read_answer(poll).await
    }

    /// Long-polls until the request is final or `wait` is over.
    pub async fn wait_for_decision(
        &self,
        mut current: ApprovalRequest,
        wait: Duration,
    ) -> anyhow::Result<ApprovalRequest> {
        let deadline = tokio::time::Instant::now() + wait;
        while !current.status.is_final() {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                break;
            }
            current = self.poll(&current.id, remaining).await?;
        }
        Ok(current)
    }

    /// `POST /v1/requests/{id}/execution`: the receipt that uses the approval up.
    pub async fn report_execution(
        &self,
        id: &str,
        outcome: &str,
        detail: Value,
    ) -> anyhow::Result<ApprovalRequest> {
        let report = self
            .http
            .post(format!("{}/v1/requests/{id}/execution", self.base))
            .bearer_auth(&self.key)
            .json(&json!({"outcome": outcome, "detail": detail}))
            .send()
            .await;
        read_answer(report).await
    }
}

fn check_url(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(address)) => address.is_loopback(),
        Some(url::Host::Ipv6(address)) => address.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => bail!("--url {url:?} must be https (plain http only to a loopback address)"),
    }
}

/// Submits, then long-polls until the request is final or `wait` is over.
pub async fn submit_and_wait(request: ClientRequest) -> anyhow::Result<ApprovalRequest> {
    let client = SignoffClient::new(&request.url, &request.key)?;
    let mut body =
        json!({"action": request.action, "args": request.args, "context": request.context});
    if let Some(principal) = &request.on_behalf_of {
        body["on_behalf_of"] = json!(principal);
    }
    let current = client
        .submit(&body, request.idempotency_key.as_deref())
        .await?;
    client.wait_for_decision(current, request.wait).await
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

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn the_key_travels_in_the_clear_only_to_loopback() {
        for allowed in [
            "https://signoff.example.com",
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:9",
        ] {
            assert!(check_url(allowed).is_ok(), "{allowed}");
        }
        for refused in [
            "http://signoff.example.com",
            "http://10.0.0.1",
            "ftp://localhost",
            "nonsense",
        ] {
            assert!(check_url(refused).is_err(), "{refused}");
        }
    }
}
