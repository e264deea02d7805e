//! Per-agent quotas: pending cap, submission rate limit, long-poll cap, each a
//! 429 with its own code that leaves other agents alone; and the header-read timeout.

use std::time::Duration;

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::spawn_app;
use crate::support::{backends, error_code, Backend};

#[apply(backends)]
#[tokio::test]
async fn the_pending_cap_answers_too_many_pending_for_that_agent_only(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    app.config.max_pending_per_agent = 3;
    app.restart().await;
    let greedy = app.create_agent("greedy", &[]).await;
    let other = app.create_agent("other", &[]).await;

    let mut pending = Vec::new();
    for n in 0..3 {
        pending.push(
            app.submit_id(&greedy, json!({"action": "email.send", "args": {"n": n}}))
                .await,
        );
    }
    let (status, body) = app
        .submit(&greedy, json!({"action": "email.send", "args": {"n": 3}}))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(error_code(&body), "too_many_pending");
    // What would not stay pending is not held back by the cap.
    let allowed = app.submit_ok(&greedy, json!({"action": "users.get"})).await;
    assert_eq!(allowed["status"], "approved");
    // Nor is another agent.
    app.submit_ok(&other, json!({"action": "email.send"})).await;

    // Once one is decided there is room again.
    let (status, _) = app
        .post_json(
            &greedy,
            &format!("/v1/requests/{}/cancel", pending[0]),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    app.submit_ok(&greedy, json!({"action": "email.send", "args": {"n": 4}}))
        .await;
    let (status, body) = app
        .submit(&greedy, json!({"action": "email.send", "args": {"n": 5}}))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(
        app.store()
            .await
            .pending_count_of_agent("greedy")
            .await
            .unwrap(),
        3
    );
}

#[apply(backends)]
#[tokio::test]
async fn the_rate_limit_answers_rate_limited_with_retry_after(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    app.config.agent_rate_limit = 1;
    app.restart().await;
    let hasty = app.create_agent("hasty", &[]).await;
    let other = app.create_agent("other", &[]).await;

    // A burst of twice the rate passes; sent at once, a few more cannot all pass.
    let attempts = futures::future::join_all((0..6).map(|n| {
        app.http
            .post(app.url("/v1/requests"))
            .bearer_auth(&hasty.key)
            .json(&json!({"action": "users.get", "args": {"n": n}}))
            .send()
    }))
    .await;
    let mut created = 0;
    let mut limited = Vec::new();
    for attempt in attempts {
        let response = attempt.expect("HTTP request");
        match response.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => limited.push(response),
            other => panic!("unexpected {other}"),
        }
    }
    assert!(created >= 2, "the burst of 2 passes, got {created}");
    assert!(!limited.is_empty(), "6 submissions at 1/s cannot all pass");
    let refused = limited.remove(0);
    let retry_after: u64 = refused
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error_code(&body), "rate_limited");

    // Another agent has its own budget.
    app.submit_ok(&other, json!({"action": "users.get"})).await;
    app.submit_ok(&other, json!({"action": "users.get"})).await;
}

#[apply(backends)]
#[tokio::test]
async fn the_long_poll_cap_answers_too_many_waiting_for_that_agent_only(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    app.config.max_waiting_per_agent = 2;
    app.restart().await;
    let waiter = app.create_agent("waiter", &[]).await;
    let other = app.create_agent("other", &[]).await;

    let first = app
        .submit_id(&waiter, json!({"action": "email.send"}))
        .await;
    let second = app
        .submit_id(&waiter, json!({"action": "email.send"}))
        .await;
    let polls = [
        app.spawn_long_poll(&waiter, &first, 30),
        app.spawn_long_poll(&waiter, &second, 30),
    ];
    app.until_awaited(&first).await;
    app.until_awaited(&second).await;

    let (status, body) = app.get_request(&waiter, &first, Some(30.0)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(error_code(&body), "too_many_waiting");
    // A plain read is no long-poll.
    let (status, _) = app.get_request(&waiter, &first, None).await;
    assert_eq!(status, StatusCode::OK);
    // Another agent still long-polls.
    let theirs = app.submit_id(&other, json!({"action": "email.send"})).await;
    let (status, body) = app.get_request(&other, &theirs, Some(0.2)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Answered long-polls give their places back.
    app.approve(&first, "cli:alice").await.unwrap();
    app.approve(&second, "cli:alice").await.unwrap();
    for poll in polls {
        let (body, _) = poll.await.unwrap();
        assert_eq!(body["status"], "approved");
    }
    let (status, body) = app.get_request(&waiter, &first, Some(5.0)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[apply(backends)]
#[tokio::test]
async fn connections_that_send_no_headers_in_time_are_closed(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    app.config.header_read_timeout_ms = 300;
    app.restart().await;
    let address = app.base_url.trim_start_matches("http://").to_string();

    // Nothing at all, and headers begun but never finished.
    for sent in [&b""[..], b"GET /healthz HTTP/1.1\r\nHost: x\r\n"] {
        let mut connection = tokio::net::TcpStream::connect(&address).await.unwrap();
        connection.write_all(sent).await.unwrap();
        let mut answer = Vec::new();
        // Closed by the server: the read ends (with whatever 408 hyper may send first).
        tokio::time::timeout(Duration::from_secs(5), connection.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .ok();
    }
    // A prompt client is served as ever.
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}
