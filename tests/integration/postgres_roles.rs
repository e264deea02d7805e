//! PostgreSQL with two roles, as README.md describes: a migration owner runs `signoff
//! migrate`; the servers run as a role that may only read and write rows, and may only
//! INSERT and SELECT on the audit trail, so even with its credentials history cannot be
//! rewritten (nor the guarding triggers switched off: only the owner could).

use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use signoff::config::{Config, Secret};
use signoff::domain::{Principal, VoteRequest, Voter};
use signoff::server::RunningServer;
use sqlx::Connection as _;

use crate::support::{Backend, TestDatabase, DEFAULT_POSTGRES_URL, TEST_POLICY};

/// Roles are global to the cluster: each test makes its own and drops them (after the
/// database that holds their privileges) however the test ends.
struct TestRoles {
    admin_url: String,
    database: String,
    names: Vec<String>,
}

impl Drop for TestRoles {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let database = self.database.clone();
        let names = std::mem::take(&mut self.names);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                    for name in names {
                        let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {name}"))
                            .execute(&mut admin)
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

fn as_role(url: &str, role: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("postgres url");
    parsed.set_username(role).expect("a user name");
    parsed.to_string()
}

fn config_for(directory: &std::path::Path, database_url: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        database_url: Secret::new(database_url),
        policy: directory.join("policy.yaml"),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_role_serves_without_ddl_rights_and_cannot_rewrite_the_audit_trail() {
    let directory = tempfile::tempdir().unwrap();
    let Some(database) = TestDatabase::create(Backend::Postgres, &directory).await else {
        return;
    };
    let database_name = url::Url::parse(&database.url).unwrap().path()[1..].to_string();
    let suffix = format!("{:012x}", rand::thread_rng().gen::<u64>() >> 16);
    let owner = format!("signoff_owner_{suffix}");
    let runtime = format!("signoff_app_{suffix}");
    let _roles = TestRoles {
        admin_url: std::env::var("SIGNOFF_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string()),
        database: database_name.clone(),
        names: vec![runtime.clone(), owner.clone()],
    };
    std::fs::write(directory.path().join("policy.yaml"), TEST_POLICY).unwrap();

    // As a superuser: the two roles, and the database owned by the migration owner.
    let mut superuser = sqlx::PgConnection::connect(&database.url).await.unwrap();
    for statement in [
        format!("CREATE ROLE {owner} LOGIN"),
        format!("CREATE ROLE {runtime} LOGIN"),
        format!("ALTER DATABASE {database_name} OWNER TO {owner}"),
        format!("ALTER SCHEMA public OWNER TO {owner}"),
    ] {
        sqlx::query(&statement)
            .execute(&mut superuser)
            .await
            .unwrap();
    }
    superuser.close().await.unwrap();

    // The owner migrates (`signoff migrate`, run in this process: the binary in a shared
    // target directory may be another build's), then grants the runtime role what
    // README.md lists.
    let owner_url = as_role(&database.url, &owner);
    signoff::commands::migrate(config_for(directory.path(), &owner_url))
        .await
        .expect("the owner migrates");
    let mut as_owner = sqlx::PgConnection::connect(&owner_url).await.unwrap();
    for statement in [
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {runtime}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {runtime}"),
        format!("REVOKE UPDATE, DELETE ON audit_events FROM {runtime}"),
        format!("REVOKE INSERT, UPDATE, DELETE ON _sqlx_migrations FROM {runtime}"),
    ] {
        sqlx::query(&statement)
            .execute(&mut as_owner)
            .await
            .unwrap();
    }
    as_owner.close().await.unwrap();

    // The server starts as the runtime role (no DDL: the migrations are all applied),
    // takes a request and records a decision.
    let runtime_url = as_role(&database.url, &runtime);
    let server = RunningServer::start(config_for(directory.path(), &runtime_url))
        .await
        .expect("the runtime role starts a server on a migrated database");
    let engine = server.engine().clone();
    let agent = engine.create_agent("bot", Vec::new()).await.unwrap();
    let http = reqwest::Client::new();
    let response = http
        .post(format!("http://{}/v1/requests", server.address()))
        .bearer_auth(&agent.api_key)
        .json(&json!({"action": "email.send"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let submitted: Value = response.json().await.unwrap();
    let id = submitted["id"].as_str().unwrap();
    let principal: Principal = "cli:alice".parse().unwrap();
    let (request, _) = engine
        .record_vote(
            id,
            &Voter::new(principal),
            VoteRequest::Approve { note: None },
            None,
        )
        .await
        .unwrap();
    assert_eq!(request.status.as_str(), "approved");
    server.shutdown(Duration::from_secs(10)).await;

    // With the runtime role's own credentials, history cannot be changed.
    let mut as_runtime = sqlx::PgConnection::connect(&runtime_url).await.unwrap();
    for attempt in [
        "UPDATE audit_events SET actor = 'mallory' WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 1",
        "TRUNCATE audit_events",
        "ALTER TABLE audit_events DISABLE TRIGGER USER",
        "DROP TRIGGER audit_events_no_update ON audit_events",
    ] {
        let error = sqlx::query(attempt)
            .execute(&mut as_runtime)
            .await
            .expect_err(attempt)
            .to_string();
        assert!(
            error.contains("permission denied") || error.contains("must be owner"),
            "{attempt}: {error}"
        );
    }
    as_runtime.close().await.unwrap();
    // Operator commands open the database the same way, as the runtime role too.
    let engine = signoff::server::build_engine(&config_for(directory.path(), &runtime_url))
        .await
        .expect("operator commands open the database as the runtime role");
    let verified = engine.verify_audit_chain().await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");
    assert!(engine.audit_head().await.unwrap().seq > 0);
    drop(database);
}
