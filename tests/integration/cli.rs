//! The operator and agent command line, run as a separate process on the same database.

use std::time::Duration;

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::domain::Status;

use crate::spawn_app;
use crate::support::{backends, error_code, eventually, stderr, stdout, Backend, TestAgent};

fn request_cli(app: &crate::support::TestApp, key: &str, args: &[&str]) -> std::process::Output {
    request_cli_at(&app.base_url, key, args)
}

/// `signoff request` against the server at `url`.
fn request_cli_at(url: &str, key: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
        .args(["request", "--url", url, "--key", key])
        .args(args)
        .output()
        .unwrap()
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_created_listed_and_revoked(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let output = app.cli(&[
        "agents",
        "add",
        "cli-bot",
        "--owner",
        "cli:alice",
        "--owner",
        "slack:U0OWNER",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let created: Value = serde_json::from_str(stdout(&output).trim()).expect("one JSON object");
    assert_eq!(created["agent"], "cli-bot");
    let key = created["api_key"].as_str().unwrap().to_string();
    assert!(created["webhook_secret"]
        .as_str()
        .unwrap()
        .starts_with("whsec_"));

    // The key is stored only as a hash.
    let agent = app.store().await.agent("cli-bot").await.unwrap().unwrap();
    assert_ne!(agent.api_key_hash, key);
    assert!(
        !format!("{agent:?}").contains(&agent.webhook_secret),
        "Debug must not print secrets"
    );
    assert_eq!(agent.owners.len(), 2);

    let bot = TestAgent {
        name: "cli-bot".into(),
        key: key.clone(),
        webhook_secret: String::new(),
    };
    // Two submissions: the second finds the agent in the server's cache of submitters.
    let (status, first) = app
        .submit_with_key(&bot, json!({"action": "users.get"}), Some("k-1"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = app.submit(&bot, json!({"action": "users.get"})).await;
    assert_eq!(status, StatusCode::CREATED);

    let output = app.cli(&["agents", "add", "cli-bot"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("already exists"));
    let output = app.cli(&["agents", "add", "bad name!"]);
    assert_eq!(output.status.code(), Some(1));

    let output = app.cli(&["agents", "list"]);
    assert!(stdout(&output).contains("cli-bot"));
    assert!(!stdout(&output).contains(&key));

    // Revoked by another process: the server learns nothing of it but what the database
    // says, and every use of the key fails at once, cached or not.
    let output = app.cli(&["agents", "revoke", "cli-bot"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stored_before = app.store().await.latest_audit_seq().await.unwrap();
    // First while the agent is still cached: a replay inserts nothing for the database to
    // refuse, so the engine must check the agent itself.
    let (status, body) = app
        .submit_with_key(&bot, json!({"action": "users.get"}), Some("k-1"))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "an Idempotency-Key replay: {body}"
    );
    for pending in [false, true] {
        let action = if pending { "email.send" } else { "users.get" };
        let (status, body) = app.submit(&bot, json!({"action": action})).await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{action}: {body}"
        );
    }
    let (status, _) = app
        .get_request(&bot, first["id"].as_str().unwrap(), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.store().await.latest_audit_seq().await.unwrap(),
        stored_before,
        "refused submissions must store nothing"
    );
    assert_eq!(
        app.cli(&["agents", "revoke", "cli-bot"]).status.code(),
        Some(1)
    );
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_and_decide_pending_requests(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let refund = app
        .submit_ok(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 700}}),
        )
        .await;
    let email = app
        .submit_ok(
            &agent,
            json!({"action": "email.send", "args": {"to": "x@y.z"}}),
        )
        .await;
    let other = app
        .submit_ok(
            &agent,
            json!({"action": "email.send", "args": {"to": "q@y.z"}}),
        )
        .await;
    app.submit_ok(&agent, json!({"action": "users.get"})).await;
    let (refund_id, email_id, other_id) = (
        refund["id"].as_str().unwrap(),
        email["id"].as_str().unwrap(),
        other["id"].as_str().unwrap(),
    );

    let output = app.cli(&["pending", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let listed: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    let ids: Vec<&str> = listed
        .iter()
        .map(|request| request["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![refund_id, email_id, other_id]);
    assert!(app.cli(&["pending"]).status.success());

    let output = app.cli(&["approve", refund_id, "--as", "cli:alice"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("1 of 2"));
    let output = app.cli(&["approve", refund_id, "--as", "cli:alice"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("already approved"),
        "{}",
        stderr(&output)
    );
    let output = app.cli(&["approve", refund_id, "--as", "cli:nobody"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("not an approver"));

    let output = app.cli(&[
        "modify",
        refund_id,
        "--as",
        "cli:bob",
        "--args",
        "{\"amount\": 300}",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = app.cli(&["modify", refund_id, "--as", "cli:bob", "--args", "not json"]);
    assert_eq!(output.status.code(), Some(1));
    let output = app.cli(&["approve", refund_id, "--as", "cli:frank", "--note", "ok"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let refund = app.stored(refund_id).await;
    let decision = refund.decision.unwrap();
    assert!(decision.modified);
    assert_eq!(decision.args, json!({"amount": 300}));

    let output = app.cli(&["deny", email_id, "--as", "cli:carol"]);
    assert_ne!(
        output.status.code(),
        Some(0),
        "deny without --reason must fail"
    );
    let output = app.cli(&[
        "deny",
        email_id,
        "--as",
        "cli:carol",
        "--reason",
        "wrong recipient",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (_, body) = app.get_request(&agent, email_id, None).await;
    assert_eq!(body["status"], "denied");
    assert_eq!(body["decision"]["reason"], "wrong recipient");

    let output = app.cli(&["approve", "apr_missing", "--as", "cli:alice"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no such request"));

    let listed: Vec<Value> =
        serde_json::from_str(&stdout(&app.cli(&["pending", "--json"]))).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], other_id);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_command_exits_by_outcome(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("shell-bot", &[]).await;
    let key = agent.key.clone();

    let output = tokio::task::block_in_place(|| {
        request_cli(
            &app,
            &key,
            &["--action", "users.get", "--args", "{\"id\": 1}"],
        )
    });
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(printed["status"], "approved");

    let output =
        tokio::task::block_in_place(|| request_cli(&app, &key, &["--action", "db.drop_all"]));
    assert_eq!(output.status.code(), Some(2));

    let output = tokio::task::block_in_place(|| {
        request_cli(&app, &key, &["--action", "email.send", "--wait", "0.2s"])
    });
    assert_eq!(output.status.code(), Some(4));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&output)).unwrap()["status"],
        "pending"
    );

    // The CLI waits on the server's clock: once its long-poll waits, the test moves that
    // clock past the one-second ttl and sweeps, which wakes the long-poll.
    let (url, flash_key) = (app.base_url.clone(), key.clone());
    let waiting = tokio::task::spawn_blocking(move || {
        request_cli_at(&url, &flash_key, &["--action", "flash.go", "--wait", "20s"])
    });
    let flash = eventually(Duration::from_secs(10), || async {
        app.engine().awaited_request_ids().pop()
    })
    .await;
    app.advance(Duration::from_secs(2));
    app.sweep().await;
    let output = waiting.await.unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(app.stored(&flash).await.status, Status::Expired);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&output)).unwrap()["status"],
        "expired"
    );

    let output =
        tokio::task::block_in_place(|| request_cli(&app, "sk_wrong", &["--action", "users.get"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("unauthorized"));
    let output = tokio::task::block_in_place(|| {
        request_cli(&app, &key, &["--action", "users.get", "--args", "[1]"])
    });
    assert_eq!(output.status.code(), Some(1));
}

#[tokio::test]
async fn policy_check_reports_rule_and_line() {
    let directory = tempfile::tempdir().unwrap();
    let good = directory.path().join("good.yaml");
    std::fs::write(&good, crate::support::TEST_POLICY).unwrap();
    let bad = directory.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\nrules:\n  - name: refunds\n    match: [\"payments.*\"]\n    effect: require_approval\n    tier: nope\n  - name: drops\n    match: [\"db.[\"]\n    effect: deny\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
            .args(args)
            .output()
            .unwrap()
    };
    let output = run(&["policy", "check", good.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    let output = run(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let errors = stderr(&output);
    assert!(
        errors.contains("line 3: rule \"refunds\": unknown tier \"nope\""),
        "{errors}"
    );
    assert!(
        errors.contains("line 7: rule \"drops\": bad glob"),
        "{errors}"
    );

    let output = run(&[
        "policy",
        "explain",
        good.to_str().unwrap(),
        "--action",
        "payments.refund",
        "--args",
        "{\"amount\": 5000}",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let explained: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(explained["verdict"], "require_approval");
    assert_eq!(explained["tier"], "high");
    assert_eq!(explained["matches"][0]["rule"], "large-refund");

    let output = run(&[
        "policy",
        "explain",
        good.to_str().unwrap(),
        "--action",
        "x",
        "--args",
        "{",
    ]);
    assert_eq!(output.status.code(), Some(1));
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    for _ in 0..2 {
        let output = app.cli(&["migrate"]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
}
