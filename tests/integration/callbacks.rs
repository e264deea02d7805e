//! Agents' callback URLs cannot reach inside: loopback, private, link-local and other
//! non-public addresses are refused at submission, literally or after DNS resolution, and
//! again at delivery, unless `callback_allowed_networks` covers them.
//!
//! Only loopback is ever connected to: other addresses are shown refused before any
//! connection, and requests that name them stay pending (no webhook is ever queued).

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;

use crate::spawn_app;
use crate::support::webhook_receiver::{Behaviour, WebhookReceiver};
use crate::support::{backends, error_code, stderr, Backend, TestApp, LOOPBACK_NETWORKS};

/// Restarts the app's server on the same database with other allowed networks.
async fn allow_networks(app: &mut TestApp, networks: &[&str]) {
    app.stop().await;
    app.config.callback_allowed_networks = networks.iter().map(|n| n.to_string()).collect();
    app.start_again().await;
}

/// The same hook as `http://localhost:PORT/...`: a name that resolves to loopback.
fn by_name(url: &str) -> String {
    url.replacen("127.0.0.1", "localhost", 1)
}

#[apply(backends)]
#[tokio::test]
async fn callback_urls_that_reach_inside_are_refused(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    allow_networks(&mut app, &[]).await;
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;
    let loopback = receiver.url("inside", Behaviour::Accept);
    for url in [
        loopback.clone(),
        by_name(&loopback),
        "https://localhost/hook".to_string(),
        "https://10.0.0.1/hook".into(),
        "https://192.168.1.1/hook".into(),
        "https://169.254.169.254/latest/meta-data/".into(),
        "https://[::1]/hook".into(),
        "https://[::ffff:127.0.0.1]/hook".into(),
        "https://[fd00::1]/hook".into(),
        "https://[fe80::1]/hook".into(),
        "https://100.64.0.1/hook".into(),
        "https://224.0.0.1/hook".into(),
        "https://0.0.0.0/hook".into(),
        "https://255.255.255.255/hook".into(),
        // Plain http to anything but loopback, whatever the address.
        "http://example.com/hook".into(),
    ] {
        // A pending action: even if it were accepted, no webhook would be queued for it.
        let (status, body) = app
            .submit(&agent, json!({"action": "email.send", "callback_url": url}))
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{url}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("callback_url: "), "{url}: {message}");
    }
    assert_eq!(
        app.request_count().await,
        0,
        "refused submissions store nothing"
    );
    assert!(receiver.deliveries("inside").is_empty());
}

#[apply(backends)]
#[tokio::test]
async fn callback_allowed_networks_let_callbacks_reach_inside(#[case] backend: Backend) {
    // The test config allows loopback (its receivers listen there), and nothing else.
    let mut app = spawn_app!(backend);
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;
    let loopback = receiver.url("inside", Behaviour::Accept);
    let inside = [
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data/",
    ];
    // Pending actions throughout: requests that name non-loopback addresses stay pending,
    // so no webhook is ever sent to them.
    for url in [
        loopback.clone(),
        by_name(&loopback),
        "https://[::1]/hook".into(),
    ] {
        app.submit_ok(&agent, json!({"action": "email.send", "callback_url": url}))
            .await;
    }
    for url in inside {
        let (status, body) = app
            .submit(&agent, json!({"action": "email.send", "callback_url": url}))
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{url}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not in callback_allowed_networks"),
            "{body}"
        );
    }
    let mut networks = LOOPBACK_NETWORKS.to_vec();
    networks.extend(["10.0.0.0/8", "169.254.169.254/32"]);
    allow_networks(&mut app, &networks).await;
    for url in inside {
        app.submit_ok(&agent, json!({"action": "email.send", "callback_url": url}))
            .await;
    }
    assert_eq!(app.request_count().await, 5);
}

#[apply(backends)]
#[tokio::test]
async fn a_callback_no_longer_allowed_at_delivery_is_never_sent(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    let receiver = WebhookReceiver::start().await;
    let agent = app.create_agent("bot", &[]).await;
    // Allowed at submission: by address (checked before sending) and by a name that
    // resolves to loopback (checked by the webhook client's resolver at connect time).
    let by_address = app
        .submit_id(
            &agent,
            json!({"action": "email.send", "callback_url": receiver.url("address", Behaviour::Accept)}),
        )
        .await;
    let by_host_name = app
        .submit_id(
            &agent,
            json!({"action": "email.send", "callback_url": by_name(&receiver.url("name", Behaviour::Accept))}),
        )
        .await;
    // The operator no longer lets callbacks reach loopback; then the requests are decided.
    allow_networks(&mut app, &[]).await;
    app.approve(&by_address, "cli:alice").await.unwrap();
    app.approve(&by_host_name, "cli:alice").await.unwrap();

    // Each delivery is a failed attempt, given up for good, with the reason kept.
    app.deliver().await;
    let refused = app
        .query_i64(
            "SELECT COUNT(*) FROM outbox WHERE kind = 'webhook' AND state = 'abandoned' \
             AND attempts = 1 AND last_error LIKE 'callback address refused: %loopback%'",
        )
        .await;
    assert_eq!(refused, 2);
    assert!(receiver.deliveries("address").is_empty());
    assert!(receiver.deliveries("name").is_empty());
    for id in [&by_address, &by_host_name] {
        let webhooks_delivered = app
            .deliveries(id)
            .await
            .iter()
            .filter(|delivery| delivery["kind"] == "webhook")
            .count();
        assert_eq!(webhooks_delivered, 0, "no webhook is audited as delivered");
    }
}

#[apply(backends)]
#[tokio::test]
async fn callback_allowed_networks_come_from_the_environment_and_are_validated(
    #[case] backend: Backend,
) {
    let app = spawn_app!(backend);
    let run = |networks: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
            .arg("--config")
            .arg(&app.config_path)
            .args(["audit", "verify"])
            .env_remove("SIGNOFF_CONFIG")
            .env("SIGNOFF_CALLBACK_ALLOWED_NETWORKS", networks)
            .output()
            .unwrap()
    };
    let output = run("10.0.0.0/8, fd00::/8");
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run("10.0.0.0/33");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("callback_allowed_networks: \"10.0.0.0/33\" is not a CIDR"),
        "{}",
        stderr(&output)
    );
}
