//! The audit chain: one event per change, append-only in the database, tampering found.

use rstest::rstest;
use serde_json::{json, Value};

use crate::spawn_app;
use crate::support::{stdout, Backend};

#[rstest]
#[tokio::test]
async fn every_change_is_chained_and_exported(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = &app.submit_id(&agent, json!({"action": "email.send"})).await;
    app.approve(id, "cli:alice").await.unwrap();
    app.post_json(
        &agent,
        &format!("/v1/requests/{id}/execution"),
        json!({"outcome": "succeeded"}),
    )
    .await;

    let output = app.cli(&["audit", "export"]);
    assert!(output.status.success());
    let events: Vec<Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    // Deliveries (the card being posted) are audited too, whenever the worker gets to them.
    let kinds: Vec<&str> = events
        .iter()
        .map(|event| event["kind"].as_str().unwrap())
        .filter(|kind| *kind != "delivered")
        .collect();
    assert_eq!(
        kinds,
        vec![
            "agent_created",
            "submitted",
            "verdict",
            "vote",
            "decided",
            "executed"
        ]
    );
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["seq"], index as i64 + 1);
        if index > 0 {
            assert_eq!(event["prev_hash"], events[index - 1]["hash"]);
        }
    }
    let vote = events.iter().find(|event| event["kind"] == "vote").unwrap();
    assert_eq!(vote["actor"], "cli:alice");

    let output = app.cli(&["audit", "verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).starts_with("audit chain intact"));
}

#[rstest]
#[tokio::test]
async fn the_database_refuses_to_rewrite_history(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let app = spawn_app!(backend);
    app.create_agent("bot", &[]).await;
    let update = app
        .execute_sql("UPDATE audit_events SET actor = 'mallory' WHERE seq = 1")
        .await;
    assert!(update.is_err(), "UPDATE on audit_events must fail");
    let delete = app
        .execute_sql("DELETE FROM audit_events WHERE seq = 1")
        .await;
    assert!(delete.is_err(), "DELETE on audit_events must fail");
    assert!(app.engine().verify_audit_chain().await.unwrap().is_ok());
}

#[rstest]
#[tokio::test]
async fn verify_names_the_first_altered_event(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    for n in 0..3 {
        app.submit_ok(&agent, json!({"action": "users.get", "args": {"n": n}}))
            .await;
    }
    // An attacker with database access disables the guard and edits event 4.
    let (disable, enable) = match backend {
        Backend::Sqlite => (
            "DROP TRIGGER audit_events_no_update",
            "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
        ),
        Backend::Postgres => (
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update",
            "ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update",
        ),
    };
    app.execute_sql(disable).await.unwrap();
    let tamper = match backend {
        Backend::Sqlite => "UPDATE audit_events SET payload = '{\"action\":\"users.get\",\"args\":{\"n\":99}}' WHERE seq = 4",
        Backend::Postgres => "UPDATE audit_events SET payload = '{\"action\":\"users.get\",\"args\":{\"n\":99}}'::jsonb WHERE seq = 4",
    };
    assert_eq!(app.execute_sql(tamper).await.unwrap(), 1);
    app.execute_sql(enable).await.unwrap();

    let output = app.cli(&["audit", "verify"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("seq 4"), "{}", stdout(&output));
    let broken = app
        .engine()
        .verify_audit_chain()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(broken.seq, 4);
}
