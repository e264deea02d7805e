//! The audit chain: one event per change, append-only in the database, tampering found.

use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::audit::{AuditEvent, AuditHead, NewAuditEvent, GENESIS_HASH};
use signoff::domain::AuditKind;
use sqlx::Connection as _;

use crate::spawn_app;
use crate::support::{backends, stderr, stdout, Backend, TestApp};

#[apply(backends)]
#[tokio::test]
async fn every_change_is_chained_and_exported(#[case] backend: Backend) {
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

#[apply(backends)]
#[tokio::test]
async fn the_database_refuses_to_rewrite_history(#[case] backend: Backend) {
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

#[apply(backends)]
#[tokio::test]
async fn verify_names_the_first_altered_event(#[case] backend: Backend) {
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

/// What an attacker with full database access does: switches the append-only guards off,
/// deletes every event from `from_seq` on and, unless `replacement` is empty, writes those
/// given in their place (already chained and hashed), then switches the guards back on.
async fn rewrite_tail(app: &TestApp, from_seq: i64, replacement: &[AuditEvent]) {
    let delete = format!("DELETE FROM audit_events WHERE seq >= {from_seq}");
    let insert =
        "INSERT INTO audit_events (seq, at, request_id, kind, actor, payload, prev_hash, hash) \
                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    macro_rules! rewrite {
        ($connection:expr, $disable:expr, $enable:expr) => {{
            let mut connection = $connection;
            for statement in $disable {
                sqlx::query(statement)
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
            sqlx::query(&delete).execute(&mut connection).await.unwrap();
            for event in replacement {
                sqlx::query(insert)
                    .bind(event.seq)
                    .bind(event.at)
                    .bind(&event.request_id)
                    .bind(&event.kind)
                    .bind(&event.actor)
                    .bind(sqlx::types::Json(&event.payload))
                    .bind(&event.prev_hash)
                    .bind(&event.hash)
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
            for statement in $enable {
                sqlx::query(statement)
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
        }};
    }
    match app.backend {
        Backend::Sqlite => rewrite!(
            sqlx::SqliteConnection::connect(&app.database.url).await.unwrap(),
            ["DROP TRIGGER audit_events_no_delete", "DROP TRIGGER audit_events_no_replace"],
            [
                "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
                "CREATE TRIGGER audit_events_no_replace BEFORE INSERT ON audit_events WHEN EXISTS (SELECT 1 FROM audit_events WHERE seq = NEW.seq) BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
            ]
        ),
        Backend::Postgres => rewrite!(
            sqlx::PgConnection::connect(&app.database.url).await.unwrap(),
            ["ALTER TABLE audit_events DISABLE TRIGGER USER"],
            ["ALTER TABLE audit_events ENABLE TRIGGER USER"]
        ),
    }
}

/// The trail as `audit export` prints it.
fn exported(app: &TestApp) -> Vec<AuditEvent> {
    let output = app.cli(&["audit", "export"]);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn saved_head(app: &TestApp) -> (String, AuditHead) {
    let output = app.cli(&["audit", "head"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output).trim().to_string();
    let head: AuditHead = serde_json::from_str(&text).expect("{\"seq\",\"hash\"}");
    (text, head)
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_a_saved_head_catches_a_rewritten_and_rehashed_tail(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    // An empty trail's head is seq 0 and the genesis hash, and every trail holds it.
    let (genesis_text, genesis) = saved_head(&app);
    assert_eq!(genesis, AuditHead::genesis());
    assert_eq!(
        genesis_text,
        format!(r#"{{"seq":0,"hash":"{GENESIS_HASH}"}}"#)
    );
    let agent = app.create_agent("bot", &[]).await;
    for n in 0..3 {
        app.submit_ok(&agent, json!({"action": "users.get", "args": {"n": n}}))
            .await;
    }
    let (head_text, head) = saved_head(&app);
    assert_eq!(head.seq, app.audit_seq().await);
    let output = app.cli(&["audit", "verify", "--head", &head_text]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).contains(&format!("holds the head at seq {}", head.seq)));
    app.stop().await;

    // The attacker rewrites history from event 3 on and rehashes every event after it.
    let events = exported(&app);
    let mut previous = events[1].hash.clone();
    let rewritten: Vec<AuditEvent> = events[2..]
        .iter()
        .map(|event| {
            let mut payload = event.payload.clone();
            if let Some(args) = payload.get_mut("args") {
                *args = json!({"n": 99});
            }
            let kind = AuditKind::parse(&event.kind).expect("a known audit kind");
            let sealed = NewAuditEvent {
                at: event.at,
                request_id: event.request_id.clone(),
                kind,
                actor: "cli:mallory".into(),
                payload,
            }
            .seal(event.seq, previous.clone());
            previous = sealed.hash.clone();
            sealed
        })
        .collect();
    rewrite_tail(&app, 3, &rewritten).await;

    // The chain links, so a plain verify finds nothing...
    let output = app.cli(&["audit", "verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
    // ...but the saved head is no longer there.
    let output = app.cli(&["audit", "verify", "--head", &head_text]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(
        stdout(&output).contains(&format!("first bad seq: {}", head.seq)),
        "{}",
        stdout(&output)
    );
    assert!(stdout(&output).contains("rewritten"), "{}", stdout(&output));
    // The genesis head is held by any trail.
    let output = app.cli(&["audit", "verify", "--head", &genesis_text]);
    assert!(output.status.success(), "{}", stdout(&output));
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_a_saved_head_catches_a_trail_cut_short(#[case] backend: Backend) {
    let mut app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    for n in 0..3 {
        app.submit_ok(&agent, json!({"action": "users.get", "args": {"n": n}}))
            .await;
    }
    let (head_text, head) = saved_head(&app);
    app.stop().await;
    let keep = head.seq - 2;
    rewrite_tail(&app, keep + 1, &[]).await;

    let output = app.cli(&["audit", "verify"]);
    assert!(output.status.success(), "{}", stdout(&output));
    let output = app.cli(&["audit", "verify", "--head", &head_text]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let printed = stdout(&output);
    assert!(
        printed.contains(&format!("first bad seq: {}", head.seq)),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("ends at seq {keep}")),
        "{printed}"
    );
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_a_malformed_head(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    app.create_agent("bot", &[]).await;
    for bad in [
        "not json",
        r#"{"seq":1}"#,
        r#"{"seq":1,"hash":"abc"}"#,
        r#"{"seq":-3,"hash":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
    ] {
        let output = app.cli(&["audit", "verify", "--head", bad]);
        assert_eq!(output.status.code(), Some(1), "{bad}");
        assert!(
            stderr(&output).starts_with("error: --head: "),
            "{bad}: {}",
            stderr(&output)
        );
    }
    // A well-formed head the trail never had is caught, naming its seq.
    let output = app.cli(&[
        "audit",
        "verify",
        "--head",
        &format!(r#"{{"seq":1,"hash":"{}"}}"#, "ab".repeat(32)),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("first bad seq: 1"),
        "{}",
        stdout(&output)
    );
}

#[apply(backends)]
#[tokio::test]
async fn the_database_refuses_replace_upsert_and_truncate(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    app.create_agent("bot", &[]).await;
    let copy_of_event_1 = "INSERT INTO audit_events (seq, at, request_id, kind, actor, payload, prev_hash, hash) \
                           SELECT seq, at, request_id, kind, 'mallory', payload, prev_hash, hash FROM audit_events WHERE seq = 1";
    let attempts: Vec<String> = match backend {
        // REPLACE deletes the row it replaces without firing DELETE triggers.
        Backend::Sqlite => vec![
            copy_of_event_1.replacen("INSERT", "INSERT OR REPLACE", 1),
            copy_of_event_1.replacen("INSERT", "REPLACE", 1),
            format!("{copy_of_event_1} ON CONFLICT (seq) DO UPDATE SET actor = 'mallory'"),
        ],
        Backend::Postgres => vec![
            format!("{copy_of_event_1} ON CONFLICT (seq) DO UPDATE SET actor = 'mallory'"),
            "TRUNCATE audit_events".into(),
        ],
    };
    for attempt in &attempts {
        let refused = app.execute_sql(attempt).await;
        assert!(refused.is_err(), "must be refused: {attempt}");
    }
    assert_eq!(
        app.query_i64("SELECT COUNT(*) FROM audit_events WHERE actor = 'mallory'")
            .await,
        0
    );
    assert_eq!(app.query_i64("SELECT COUNT(*) FROM audit_events").await, 1);
    assert!(app.engine().verify_audit_chain().await.unwrap().is_ok());
}
