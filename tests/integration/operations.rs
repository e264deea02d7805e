//! Operating the server: Prometheus metrics, policy reload on SIGHUP, JSON logs, and a
//! graceful stop on SIGTERM — the last three against the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};

use crate::spawn_app;
use crate::support::{backends, eventually, Backend, TEST_POLICY};

#[apply(backends)]
#[tokio::test]
async fn metrics_describe_requests_decisions_backlog_and_latency(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    app.submit_ok(&agent, json!({"action": "users.get"})).await;
    let id = app
        .submit_id(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 500}}),
        )
        .await;
    app.submit_id(&agent, json!({"action": "email.send"})).await;
    app.approve(&id, "cli:alice").await.unwrap();
    app.approve(&id, "cli:frank").await.unwrap();

    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    for expected in [
        r#"signoff_requests_total{effect="allow",tier="none",rule="read-only"}"#,
        r#"signoff_requests_total{effect="require_approval",tier="high",rule="large-refund"}"#,
        r#"signoff_decisions_total{outcome="approved",tier="high"}"#,
        r#"signoff_time_to_decision_seconds_bucket{tier="high""#,
        "signoff_pending_requests 1",
        r#"signoff_outbox_backlog{kind="webhook"} 0"#,
        r#"signoff_http_request_duration_seconds_bucket{method="POST",route="/v1/requests",status="201""#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
}

/// The `signoff serve` binary on this app's database, its address, and its log lines.
struct ServerProcess {
    child: Child,
    base_url: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    fn start(config: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_signoff"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "--log-format",
                "json",
                "serve",
            ])
            .env("RUST_LOG", "info,signoff::engine=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start signoff serve");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let collected = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                collected.lock().unwrap().push(line);
            }
        });
        // The first line on stdout names the address: reading it waits for readiness.
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let base_url = first
            .trim()
            .strip_prefix("signoff listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        Self {
            child,
            base_url,
            logs,
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn logged(&self, needle: &str) -> bool {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(needle))
    }

    async fn policy_hash(&self, http: &reqwest::Client) -> String {
        let body: Value = http
            .get(format!("{}/readyz", self.base_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["policy_hash"].as_str().unwrap().to_string()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_and_sigterm_drains(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let config_path = app.config_path.clone();
    let mut server = tokio::task::spawn_blocking(move || ServerProcess::start(&config_path))
        .await
        .unwrap();
    // A fresh connection per request: a kept-alive one can meet the server closing it (a
    // reset that says nothing about the reload) when the machine is loaded.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // A valid new policy is swapped in; its hash shows on /readyz.
    let before = server.policy_hash(&http).await;
    std::fs::write(
        &app.config.policy,
        TEST_POLICY.replace("ttl: 30m", "ttl: 45m"),
    )
    .unwrap();
    server.signal("HUP");
    let reloaded = eventually(Duration::from_secs(10), || async {
        let now = server.policy_hash(&http).await;
        (now != before).then_some(now)
    })
    .await;

    // A broken one is refused and the current one kept.
    std::fs::write(
        &app.config.policy,
        "version: 1\nrules:\n  - name: broken\n    effect: nope\n",
    )
    .unwrap();
    server.signal("HUP");
    eventually(Duration::from_secs(10), || async {
        server.logged("policy reload refused").then_some(())
    })
    .await;
    assert_eq!(server.policy_hash(&http).await, reloaded);

    // Logs are JSON, one object per line.
    let logs = server.logs.lock().unwrap().clone();
    assert!(!logs.is_empty());
    for line in &logs {
        serde_json::from_str::<Value>(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
    }

    // SIGTERM: the waiting agent gets its answer at once, the process exits cleanly, and
    // what was acknowledged stays.
    let submitted: Value = http
        .post(format!("{}/v1/requests", server.base_url))
        .bearer_auth(&agent.key)
        .json(&json!({"action": "email.send"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["id"].as_str().unwrap().to_string();
    let poll = {
        let request = http
            .get(format!("{}/v1/requests/{id}?wait=30", server.base_url))
            .bearer_auth(&agent.key);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    eventually(Duration::from_secs(5), || async {
        server.logged("long-poll waiting").then_some(())
    })
    .await;
    let stopped_at = Instant::now();
    server.signal("TERM");
    let answer = poll.await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.json::<Value>().await.unwrap()["status"], "pending");
    let exit = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "took {:?}",
        stopped_at.elapsed()
    );
    assert_eq!(
        app.stored(&id).await.status,
        signoff::domain::Status::Pending
    );
}

#[apply(backends)]
#[tokio::test]
async fn admin_reload_swaps_a_valid_policy_and_refuses_a_broken_one(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let reload = |token: &str| {
        app.http
            .post(app.url("/admin/reload"))
            .bearer_auth(token)
            .send()
    };
    let before = app.engine().policy().hash().to_string();

    let response = reload("wrong-token").await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    std::fs::write(
        &app.config.policy,
        TEST_POLICY.replace("ttl: 30m", "ttl: 20m"),
    )
    .unwrap();
    let response = reload(crate::support::ADMIN_TOKEN).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let reloaded = app.engine().policy().hash().to_string();
    assert_ne!(reloaded, before);
    assert_eq!(body["policy_hash"], reloaded);

    std::fs::write(
        &app.config.policy,
        "version: 1\nrules:\n  - name: broken\n    match: [\"a\"]\n    effect: maybe\n",
    )
    .unwrap();
    let response = reload(crate::support::ADMIN_TOKEN).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_policy");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broken"),
        "{body}"
    );
    assert_eq!(
        app.engine().policy().hash(),
        reloaded,
        "the old policy stays"
    );
}

#[apply(backends)]
#[tokio::test]
async fn metrics_answer_only_with_the_metrics_token_once_one_is_set(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    app.config.metrics_token = signoff::config::Secret::new("scrape-secret");
    app.restart().await;
    let scrape = |token: Option<&'static str>| {
        let request = app.http.get(app.url("/metrics"));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
        .send()
    };
    for token in [None, Some("wrong-secret"), Some("scrape-secre")] {
        let response = scrape(token).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{token:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(crate::support::error_code(&body), "unauthorized");
    }
    let response = scrape(Some("scrape-secret")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("# TYPE"));
}

#[apply(backends)]
#[tokio::test]
async fn admin_reload_without_a_token_trusts_no_loopback_caller_a_proxy_forwarded(
    #[case] backend: Backend,
) {
    let mut app = spawn_app!(backend);
    app.config.admin_token = signoff::config::Secret::default();
    app.restart().await;
    for (header, value) in [
        ("Forwarded", "for=203.0.113.7"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Real-IP", "203.0.113.7"),
    ] {
        let response = app
            .http
            .post(app.url("/admin/reload"))
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{header}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(crate::support::error_code(&body), "admin_disabled");
    }
    // Called directly from this machine, it reloads.
    let response = app
        .http
        .post(app.url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[apply(backends)]
#[tokio::test]
async fn admin_reload_refusals_name_the_problems_but_no_path(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let reload = || {
        app.http
            .post(app.url("/admin/reload"))
            .bearer_auth(crate::support::ADMIN_TOKEN)
            .send()
    };
    let directory = app.directory.path().display().to_string();
    let refusal = |body: &Value| -> String {
        assert_eq!(body["error"]["code"], "invalid_policy", "{body}");
        let message = body["error"]["message"].as_str().unwrap().to_string();
        assert!(
            !message.contains(&directory) && !message.contains("policy.yaml"),
            "the answer shows a path: {message}"
        );
        message
    };

    std::fs::write(
        &app.config.policy,
        "version: 1\nrules:\n  - name: broken\n    match: [\"a\"]\n    effect: maybe\n",
    )
    .unwrap();
    let response = reload().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let message = refusal(&response.json().await.unwrap());
    assert!(
        message.contains("broken") && message.contains("line"),
        "{message}"
    );

    std::fs::remove_file(&app.config.policy).unwrap();
    let response = reload().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let message = refusal(&response.json().await.unwrap());
    assert!(message.contains("cannot be read"), "{message}");
}
