//! The agent HTTP API: verdicts, auth, bad input, idempotency, long-poll, cancel, execution.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use signoff::domain::action_hash;

use crate::spawn_app;
use crate::support::{backends, error_code, Backend};

#[apply(backends)]
#[tokio::test]
async fn verdicts_shape_the_request_object(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("finance-bot", &[]).await;

    let allowed = app
        .submit_ok(&agent, json!({"action": "users.get", "args": {"id": 7}}))
        .await;
    assert_eq!(allowed["status"], "approved");
    assert_eq!(allowed["rule"], "read-only");
    assert_eq!(allowed["decision"]["outcome"], "approved");
    assert_eq!(allowed["decision"]["by"], json!(["policy:read-only"]));
    assert_eq!(allowed["decision"]["args"], json!({"id": 7}));
    assert_eq!(allowed["decision"]["modified"], false);
    assert_eq!(
        allowed["action_hash"],
        action_hash("users.get", &json!({"id": 7}))
    );
    assert_eq!(allowed["policy_hash"], app.engine().policy().hash());
    assert_eq!(allowed["agent"], "finance-bot");
    assert!(allowed["id"].as_str().unwrap().starts_with("apr_"));

    let denied = app
        .submit_ok(&agent, json!({"action": "db.drop_users"}))
        .await;
    assert_eq!(denied["status"], "denied");
    assert_eq!(denied["decision"]["by"], json!(["policy:no-drop"]));
    assert_eq!(
        denied["decision"]["reason"],
        "Dropping tables is never allowed"
    );

    let unmatched = app
        .submit_ok(&agent, json!({"action": "users.delete"}))
        .await;
    assert_eq!(unmatched["status"], "denied");
    assert_eq!(unmatched["decision"]["by"], json!(["policy:default"]));

    let pending = app
        .submit_ok(
            &agent,
            json!({
                "action": "payments.refund",
                "args": {"amount": 2000, "order": "A-1"},
                "context": {"summary": "refund", "reason": "damaged", "reversible": false, "links": ["https://example.com/o/1"]},
                "on_behalf_of": "slack:U0XYZ"
            }),
        )
        .await;
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["tier"], "high");
    assert_eq!(pending["rule"], "large-refund");
    assert_eq!(pending["approvals_required"], 2);
    assert_eq!(pending["votes"], json!([]));
    assert_eq!(pending["decision"], json!(null));
    assert_eq!(pending["on_behalf_of"], "slack:U0XYZ");
    assert_eq!(pending["context"]["reason"], "damaged");
    let created: chrono::DateTime<chrono::Utc> =
        pending["created_at"].as_str().unwrap().parse().unwrap();
    let expires: chrono::DateTime<chrono::Utc> =
        pending["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(expires - created, chrono::Duration::hours(1));

    // The stored object is what the agent was answered.
    let (status, fetched) = app
        .get_request(&agent, pending["id"].as_str().unwrap(), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, pending);
}

#[apply(backends)]
#[tokio::test]
async fn agents_must_authenticate(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;

    let response = app
        .http
        .post(app.url("/v1/requests"))
        .json(&json!({"action": "users.get"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&response.json().await.unwrap()), "unauthorized");

    let response = app
        .http
        .post(app.url("/v1/requests"))
        .bearer_auth("sk_not-a-real-key")
        .json(&json!({"action": "users.get"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    app.engine().revoke_agent("bot").await.unwrap();
    let (status, body) = app.submit(&agent, json!({"action": "users.get"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "unauthorized");
    assert_eq!(app.request_count().await, 0);
}

#[apply(backends)]
#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let audit_before = app.audit_seq().await;

    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            "{\"action\": ".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "missing action",
            "{\"args\": {}}".into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "args not an object",
            r#"{"action":"users.get","args":[1]}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "unknown field",
            r#"{"action":"users.get","argz":{}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "empty action",
            r#"{"action":""}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "bad on_behalf_of",
            r#"{"action":"users.get","on_behalf_of":"bob"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "plain http callback",
            r#"{"action":"users.get","callback_url":"http://example.com/hook"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "context not an object",
            r#"{"action":"users.get","context":[1]}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "body over the limit",
            format!(
                r#"{{"action":"users.get","args":{{"blob":"{}"}}}}"#,
                "x".repeat(300_000)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (name, body, expected_status, expected_code) in cases {
        let response = app
            .http
            .post(app.url("/v1/requests"))
            .bearer_auth(&agent.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected_status, "{name}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error_code(&body), expected_code, "{name}: {body}");
    }
    assert_eq!(app.request_count().await, 0);
    assert_eq!(app.audit_seq().await, audit_before);

    let (status, body) = app.get_request(&agent, "apr_doesnotexist", None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let response = app
        .http
        .get(app.url("/v1/requests/apr_x?wait=soon"))
        .bearer_auth(&agent.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[apply(backends)]
#[tokio::test]
async fn another_agents_request_is_not_found(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let owner = app.create_agent("owner-bot", &[]).await;
    let other = app.create_agent("other-bot", &[]).await;
    let request = app.submit_ok(&owner, json!({"action": "email.send"})).await;
    let id = request["id"].as_str().unwrap();

    let (status, body) = app.get_request(&other, id, None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (status, _) = app
        .post_json(&other, &format!("/v1/requests/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(app.stored(id).await.status.as_str(), "pending");
}

#[apply(backends)]
#[tokio::test]
async fn idempotency_key_replays_and_refuses_mismatches(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let body = json!({"action": "email.send", "args": {"to": "a@b.c"}});

    let (first_status, first) = app
        .submit_with_key(&agent, body.clone(), Some("key-1"))
        .await;
    assert_eq!(first_status, StatusCode::CREATED);
    let (again_status, again) = app
        .submit_with_key(&agent, body.clone(), Some("key-1"))
        .await;
    assert_eq!(again_status, StatusCode::CREATED);
    assert_eq!(again, first);

    let (status, mismatch) = app
        .submit_with_key(
            &agent,
            json!({"action": "email.send", "args": {"to": "other@b.c"}}),
            Some("key-1"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(&mismatch), "idempotency_mismatch");

    // A retry while the first attempt is still being processed is told to come back.
    let in_flight =
        signoff::store::IdempotencyKey::new(agent.name.clone(), "key-2", "being processed");
    let reservation = app
        .store()
        .await
        .reserve_idempotency_key(&in_flight, signoff::domain::now())
        .await
        .unwrap();
    assert_eq!(reservation, signoff::store::Reservation::Reserved);
    let (status, busy) = app
        .submit_with_key(&agent, body.clone(), Some("key-2"))
        .await;
    assert_eq!(
        (status, error_code(&busy)),
        (StatusCode::CONFLICT, "idempotency_in_flight")
    );

    // Keys are kept for 24 hours, then purged.
    let stale = signoff::store::IdempotencyKey {
        key: "key-stale".into(),
        ..in_flight.clone()
    };
    let long_ago = signoff::domain::now() - chrono::Duration::hours(25);
    app.store()
        .await
        .reserve_idempotency_key(&stale, long_ago)
        .await
        .unwrap();
    assert_eq!(app.engine().purge_idempotency_keys().await.unwrap(), 1);
    let (_, again) = app
        .submit_with_key(&agent, body.clone(), Some("key-1"))
        .await;
    assert_eq!(again, first);

    // Keys belong to one agent: another agent may use the same key.
    let other = app.create_agent("other", &[]).await;
    let (status, theirs) = app
        .submit_with_key(&other, body.clone(), Some("key-1"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(theirs["id"], first["id"]);
    assert_eq!(app.request_count().await, 2);
}

#[apply(backends)]
#[tokio::test]
async fn long_poll_answers_when_the_decision_commits(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let request = app
        .submit_ok(
            &agent,
            json!({"action": "email.send", "args": {"to": "x@y.z"}}),
        )
        .await;
    let id = request["id"].as_str().unwrap().to_string();

    // Short wait on a pending request: answers pending after the wait.
    let started = Instant::now();
    let (status, still) = app.get_request(&agent, &id, Some(0.3)).await;
    assert_eq!(
        (status, still["status"].as_str()),
        (StatusCode::OK, Some("pending"))
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    let waiting = app.spawn_long_poll(&agent, &id, 30);
    // Decide while the long-poll waits, so the wake is what answers it.
    app.until_awaited(&id).await;
    app.approve(&id, "cli:alice").await.unwrap();
    let decided_at = Instant::now();
    let (body, answered_at) = waiting.await.unwrap();
    let elapsed = answered_at.saturating_duration_since(decided_at);
    assert_eq!(body["status"], "approved");
    assert_eq!(body["decision"]["by"], json!(["cli:alice"]));
    assert!(
        elapsed < Duration::from_secs(10),
        "long-poll took {elapsed:?}"
    );

    // Already final: answers at once.
    let started = Instant::now();
    let (_, final_body) = app.get_request(&agent, &id, Some(30.0)).await;
    assert_eq!(final_body["status"], "approved");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[apply(backends)]
#[tokio::test]
async fn cancel_only_pending(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let request = app.submit_ok(&agent, json!({"action": "email.send"})).await;
    let id = request["id"].as_str().unwrap();

    let (status, cancelled) = app
        .post_json(&agent, &format!("/v1/requests/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["decision"]["outcome"], "cancelled");
    assert_eq!(cancelled["decision"]["by"], json!(["agent:bot"]));

    let (status, again) = app
        .post_json(&agent, &format!("/v1/requests/{id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, error_code(&again)),
        (StatusCode::CONFLICT, "not_pending")
    );
    // A cancelled request cannot be approved afterwards.
    assert!(app.approve(id, "cli:alice").await.is_err());
}

#[apply(backends)]
#[tokio::test]
async fn execution_is_accepted_once_and_only_when_approved(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = &app.submit_id(&agent, json!({"action": "email.send"})).await;
    let path = format!("/v1/requests/{id}/execution");

    let (status, body) = app
        .post_json(&agent, &path, json!({"outcome": "succeeded"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "not_approved")
    );

    app.approve(id, "cli:bob").await.unwrap();
    let (status, body) = app
        .post_json(&agent, &path, json!({"outcome": "bogus"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );

    let (status, executed) = app
        .post_json(
            &agent,
            &path,
            json!({"outcome": "succeeded", "detail": {"message_id": "m1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{executed}");
    assert_eq!(executed["executed"]["outcome"], "succeeded");
    assert_eq!(executed["executed"]["detail"], json!({"message_id": "m1"}));

    let (status, body) = app
        .post_json(&agent, &path, json!({"outcome": "succeeded"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "already_executed")
    );

    let denied = app.submit_ok(&agent, json!({"action": "db.drop_x"})).await;
    let (status, _) = app
        .post_json(
            &agent,
            &format!("/v1/requests/{}/execution", denied["id"].as_str().unwrap()),
            json!({"outcome": "failed"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[apply(backends)]
#[tokio::test]
async fn check_evaluates_without_storing(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let audit_before = app.audit_seq().await;
    let (status, verdict) = app
        .post_json(
            &agent,
            "/v1/check",
            json!({"action": "payments.refund", "args": {"amount": 500}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(verdict["verdict"], "require_approval");
    assert_eq!(verdict["tier"], "high");
    assert_eq!(verdict["rule"], "large-refund");
    assert_eq!(verdict["matches"][0]["rule"], "large-refund");
    let (_, verdict) = app
        .post_json(
            &agent,
            "/v1/check",
            json!({"action": "payments.refund", "args": {"amount": 5}}),
        )
        .await;
    assert_eq!(verdict["verdict"], "allow");
    assert_eq!(app.request_count().await, 0);
    assert_eq!(app.audit_seq().await, audit_before);
}

#[apply(backends)]
#[tokio::test]
async fn health_and_readiness(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    for path in ["/healthz", "/readyz"] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(response.headers().contains_key("x-request-id"));
    }
    let response = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(&response.json().await.unwrap()), "not_found");
}

#[apply(backends)]
#[tokio::test]
async fn context_is_open_and_nulls_mean_absent(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;

    let plain = app
        .submit_ok(
            &agent,
            json!({"action": "users.get", "args": null, "context": null}),
        )
        .await;
    assert_eq!(plain["status"], "approved");
    assert_eq!(plain["args"], json!({}));

    // Fields beyond summary/reason/reversible/links are kept and reach `when` conditions.
    let vip = app
        .submit_ok(
            &agent,
            json!({"action": "crm.update", "context": {"summary": "Upgrade", "customer_tier": "vip", "links": ["..."]}}),
        )
        .await;
    assert_eq!(
        (vip["status"].as_str(), vip["rule"].as_str()),
        (Some("pending"), Some("vip-customers"))
    );
    assert_eq!(vip["context"]["customer_tier"], "vip");
    assert_eq!(vip["context"]["links"], json!(["..."]));
    let basic = app
        .submit_ok(
            &agent,
            json!({"action": "crm.update", "context": {"customer_tier": "basic"}}),
        )
        .await;
    assert_eq!(
        basic["status"], "denied",
        "no rule matches, so the default applies"
    );
}
