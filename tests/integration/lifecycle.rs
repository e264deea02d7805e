//! Expiry from the database, restarts, and decisions made by another process.

use std::time::{Duration, Instant};

use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use signoff::domain::Status;
use signoff::engine::Clock;

use crate::spawn_app;
use crate::support::{backends, stderr, Backend};

#[apply(backends)]
#[tokio::test]
async fn the_sweeper_expires_overdue_requests(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "flash.go"})).await;

    // Past the one-second ttl. Read the store directly: the sweeper, not a reader, must
    // do the expiring.
    app.advance(Duration::from_secs(2));
    assert_eq!(app.stored(&id).await.status, Status::Pending);
    assert_eq!(app.sweep().await.expired, 1);
    let expired = app.stored(&id).await;
    assert_eq!(expired.status, Status::Expired);
    let decision = expired.decision.unwrap();
    assert_eq!(decision.by[0].as_str(), "system:expiry");
    assert!(decision.at >= expired.expires_at.unwrap());

    // Expired counts as denied: no late approval.
    assert!(app.approve(&id, "cli:alice").await.is_err());
}

#[apply(backends)]
#[tokio::test]
async fn a_restart_keeps_everything_and_expires_what_fell_due(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let mut acknowledged = Vec::new();
    for n in 0..5 {
        let request = app
            .submit_ok(&agent, json!({"action": "email.send", "args": {"n": n}}))
            .await;
        acknowledged.push(request["id"].as_str().unwrap().to_string());
    }
    let allowed = app.submit_ok(&agent, json!({"action": "users.get"})).await;
    let approved_id = acknowledged[0].clone();
    app.approve(&approved_id, "cli:alice").await.unwrap();
    let flash = app.submit_ok(&agent, json!({"action": "flash.go"})).await;
    let flash_id = flash["id"].as_str().unwrap().to_string();

    app.stop().await;
    // While no server runs, the flash request's one-second ttl passes.
    let expires_at: chrono::DateTime<chrono::Utc> =
        flash["expires_at"].as_str().unwrap().parse().unwrap();
    let remaining = (expires_at - app.clock.now()).to_std().unwrap_or_default();
    app.advance(remaining + Duration::from_millis(50));
    app.start_again().await;

    for id in &acknowledged {
        let (status, _) = app.get_request(&agent, id, None).await;
        assert_eq!(
            status,
            reqwest::StatusCode::OK,
            "request {id} lost across restart"
        );
    }
    assert_eq!(app.stored(&approved_id).await.status, Status::Approved);
    assert_eq!(app.stored(&acknowledged[1]).await.status, Status::Pending);
    assert_eq!(
        app.stored(allowed["id"].as_str().unwrap()).await.status,
        Status::Approved
    );
    // The first sweep after the restart expires what fell due meanwhile.
    assert_eq!(app.stored(&flash_id).await.status, Status::Pending);
    assert_eq!(app.sweep().await.expired, 1);
    assert_eq!(app.stored(&flash_id).await.status, Status::Expired);
    assert!(app.engine().verify_audit_chain().await.unwrap().is_ok());
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_decision_wakes_the_long_poll(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "email.send"})).await;

    let waiting = app.spawn_long_poll(&agent, &id, 30);
    let config_path = app.config_path.clone();
    let cli_id = id.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
            .arg("--config")
            .arg(config_path)
            .args([
                "approve",
                &cli_id,
                "--as",
                "cli:alice",
                "--note",
                "looks fine",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let decided_at = Instant::now();
    let (body, answered_at) = waiting.await.unwrap();
    assert_eq!(body["status"], "approved");
    assert_eq!(body["votes"][0]["note"], "looks fine");
    let lag = answered_at.saturating_duration_since(decided_at);
    assert!(
        lag < Duration::from_secs(3),
        "long-poll woke {lag:?} after the CLI decided"
    );
}
