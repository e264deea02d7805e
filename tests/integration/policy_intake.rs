//! Intake-side policy features through the real entry points: counters exact under
//! concurrency, `now` from the injected clock, sampling, shadow rules.

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};

use crate::spawn_app;
use signoff::engine::Clock;

use crate::support::{backends, Backend, TestAgent, TestApp};

const COUNTER_POLICY: &str = r#"version: 1
default: deny
tiers:
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["cli:alice"]
    ttl: 30m
  high:
    route: ["slack:C0HIGH"]
    approvers: ["cli:alice"]
    ttl: 30m
rules:
  - name: first-three
    match: ["email.send"]
    when: "recent_count('1h') < 3"
    effect: allow
  - name: budget-ok
    match: ["payments.pay"]
    when: "recent_sum('amount', '24h') + args.amount <= 100"
    effect: allow
  - name: budget-over
    match: ["payments.pay"]
    when: "recent_sum('amount', '24h') + args.amount > 100"
    effect: require_approval
    tier: medium
  - name: before-epoch-noon
    match: ["clock.read"]
    when: "now.getHours('Europe/Berlin') == (now.getHours() + 1) % 24"
    effect: allow
  - name: spot-all
    match: ["tickets.update"]
    effect: allow
    sample: 1
    tier: high
  - name: spot-none
    match: ["tickets.close"]
    effect: allow
    sample: 0
    tier: high
  - name: trial-deny
    match: ["tickets.*"]
    effect: deny
    mode: shadow
"#;

/// Submits `count` requests at once; the statuses they got.
async fn submit_at_once(
    app: &TestApp,
    agent: &TestAgent,
    body: Value,
    count: usize,
) -> Vec<String> {
    statuses_of(join_all((0..count).map(|_| app.submit(agent, body.clone()))).await)
}

/// The statuses submissions got, each asserted created.
fn statuses_of(answers: Vec<(StatusCode, Value)>) -> Vec<String> {
    answers
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["status"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

fn count_of(statuses: &[String], wanted: &str) -> usize {
    statuses.iter().filter(|status| *status == wanted).count()
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_simultaneous_submissions_on_two_replicas_against_recent_count_allow_exactly_three(
    #[case] backend: Backend,
) {
    let app = spawn_app!(backend, COUNTER_POLICY);
    let agent = app.create_agent("mailer", &[]).await;
    let other = app.create_agent("other", &[]).await;
    // Half of them through a second server: replicas count each other's too.
    let statuses = statuses_of(
        app.submit_on_two_replicas(&agent, json!({"action": "email.send"}), 20)
            .await,
    );
    assert_eq!(count_of(&statuses, "approved"), 3, "{statuses:?}");
    assert_eq!(count_of(&statuses, "denied"), 17, "{statuses:?}");
    // Another agent has its own count.
    let theirs = app.submit_ok(&other, json!({"action": "email.send"})).await;
    assert_eq!(theirs["status"], "approved");
    // The window moves with the injected clock.
    app.advance(Duration::from_secs(59 * 60));
    let still = app.submit_ok(&agent, json!({"action": "email.send"})).await;
    assert_eq!(still["status"], "denied");
    app.advance(Duration::from_secs(2 * 60));
    let again = submit_at_once(&app, &agent, json!({"action": "email.send"}), 5).await;
    assert_eq!(count_of(&again, "approved"), 3, "{again:?}");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recent_sum_adds_pending_and_approved_amounts_only(#[case] backend: Backend) {
    let app = spawn_app!(backend, COUNTER_POLICY);
    let agent = app.create_agent("payer", &[]).await;
    let first = app
        .submit_ok(
            &agent,
            json!({"action": "payments.pay", "args": {"amount": 60}}),
        )
        .await;
    assert_eq!(first["status"], "approved");
    // Without a numeric amount the conditions fail, closed: pending. Such requests stay
    // pending and add 0 to the sum (the last submission below shows it).
    for args in [json!({}), json!({"amount": "lots"})] {
        let request = app
            .submit_ok(&agent, json!({"action": "payments.pay", "args": args}))
            .await;
        assert_eq!(request["status"], "pending", "{request}");
    }
    let over = app
        .submit_ok(
            &agent,
            json!({"action": "payments.pay", "args": {"amount": 50}}),
        )
        .await;
    assert_eq!(over["status"], "pending", "60 + 50 > 100");
    assert_eq!(over["rule"], "budget-over");
    // The pending 50 counts too: 60 + 50 + 1 > 100.
    let next = app
        .submit_ok(
            &agent,
            json!({"action": "payments.pay", "args": {"amount": 1}}),
        )
        .await;
    assert_eq!(next["status"], "pending");
    // A denied request no longer counts.
    let over_id = over["id"].as_str().unwrap();
    let next_id = next["id"].as_str().unwrap();
    for id in [over_id, next_id] {
        app.engine()
            .record_vote(
                id,
                &signoff::domain::Voter::new("cli:alice".parse().unwrap()),
                signoff::domain::VoteRequest::Deny {
                    reason: "no".into(),
                },
                None,
            )
            .await
            .unwrap();
    }
    let fits = app
        .submit_ok(
            &agent,
            json!({"action": "payments.pay", "args": {"amount": 40}}),
        )
        .await;
    assert_eq!(fits["status"], "approved", "{fits}");
    // Concurrent submissions see each other: 20 at once of 10 each fill what is left (0).
    let statuses = submit_at_once(
        &app,
        &agent,
        json!({"action": "payments.pay", "args": {"amount": 10}}),
        20,
    )
    .await;
    assert_eq!(count_of(&statuses, "approved"), 0, "{statuses:?}");
    // Buckets the migration builds from these requests hold the same sum: 300 is over.
    rebuild_buckets_as_the_migration_does(&app, backend).await;
    let after = app
        .submit_ok(
            &agent,
            json!({"action": "payments.pay", "args": {"amount": 0}}),
        )
        .await;
    assert_eq!(after["rule"], "budget-over", "{after}");
}

#[apply(backends)]
#[tokio::test]
async fn now_is_the_engine_clock_with_time_zones(#[case] backend: Backend) {
    let app = spawn_app!(backend, COUNTER_POLICY);
    let agent = app.create_agent("reader", &[]).await;
    // Berlin is one hour ahead of UTC in winter and two in summer: the rule holds for the
    // clock's date only when it is winter there.
    let winter = matches!(chrono::Datelike::month(&app.clock.now()), 11 | 12 | 1 | 2);
    let request = app.submit_ok(&agent, json!({"action": "clock.read"})).await;
    let expected = if winter { "approved" } else { "denied" };
    assert_eq!(request["status"], expected, "{request}");
    let (status, check) = app
        .post_json(&agent, "/v1/check", json!({"action": "clock.read"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{check}");
    assert_eq!(
        check["verdict"],
        if winter { "allow" } else { "deny" },
        "{check}"
    );
}

#[apply(backends)]
#[tokio::test]
async fn sampled_rules_send_their_matches_to_review(#[case] backend: Backend) {
    let app = spawn_app!(backend, COUNTER_POLICY);
    let agent = app.create_agent("tickets", &[]).await;
    let sampled = app
        .submit_ok(&agent, json!({"action": "tickets.update"}))
        .await;
    assert_eq!(sampled["status"], "pending", "{sampled}");
    assert_eq!(sampled["tier"], "high");
    assert_eq!(sampled["sampled"], true);
    let id = sampled["id"].as_str().unwrap();
    let verdict = verdict_payload(&app, id).await;
    assert_eq!(verdict["sampled"], true, "{verdict}");
    let unsampled = app
        .submit_ok(&agent, json!({"action": "tickets.close"}))
        .await;
    assert_eq!(unsampled["status"], "approved");
    assert_eq!(unsampled["sampled"], false);
    // /v1/check reports the rate, never a draw.
    let (_, check) = app
        .post_json(&agent, "/v1/check", json!({"action": "tickets.update"}))
        .await;
    assert_eq!(check["verdict"], "allow", "{check}");
    assert_eq!(check["matches"][0]["sample"], 1.0, "{check}");
}

#[apply(backends)]
#[tokio::test]
async fn shadow_rules_are_recorded_and_never_enforced(#[case] backend: Backend) {
    let app = spawn_app!(backend, COUNTER_POLICY);
    let agent = app.create_agent("tickets", &[]).await;
    let request = app
        .submit_ok(&agent, json!({"action": "tickets.close"}))
        .await;
    assert_eq!(
        request["status"], "approved",
        "the shadow deny is not enforced"
    );
    assert_eq!(
        request["shadow"],
        json!([{"rule": "trial-deny", "effect": "deny", "tier": null}])
    );
    let id = request["id"].as_str().unwrap();
    let (_, fetched) = app.get_request(&agent, id, None).await;
    assert_eq!(fetched["shadow"][0]["rule"], "trial-deny");
    let plain = app.submit_ok(&agent, json!({"action": "email.send"})).await;
    assert_eq!(plain["shadow"], json!([]));
    let (_, check) = app
        .post_json(&agent, "/v1/check", json!({"action": "tickets.close"}))
        .await;
    assert_eq!(check["shadow"][0]["effect"], "deny", "{check}");
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("signoff_shadow_matches_total")
                && line.contains("rule=\"trial-deny\"")
                && line.contains("effect=\"deny\"")),
        "{metrics}"
    );
}

/// The payload of the request's `verdict` audit event.
async fn verdict_payload(app: &TestApp, id: &str) -> Value {
    let mut found = Value::Null;
    app.engine()
        .export_audit(|event| {
            if event.request_id.as_deref() == Some(id) && event.kind == "verdict" {
                found = event.payload.clone();
            }
            Ok(())
        })
        .await
        .unwrap();
    found
}

/// Every submission of `probe` carries what it expects the counters to be: it is allowed
/// only when `recent_count` and `recent_sum` equal them, so an allowed probe proves both.
const PROBE_POLICY: &str = r#"version: 1
default: deny
tiers:
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["cli:alice", "cli:bob"]
    approvals: 2
    ttl: 30m
rules:
  - name: held
    match: ["probe"]
    when: "has(args.hold)"
    effect: require_approval
    tier: medium
  - name: as-expected
    match: ["probe"]
    when: "recent_count('2h') == args.count && recent_sum('amount', '2h') == args.sum"
    effect: allow
"#;

/// What the test knows of each submission: when, whether it still counts, its amount.
struct Counted {
    id: String,
    at: chrono::DateTime<chrono::Utc>,
    counts: bool,
    amount: f64,
}

/// The counters over `(now - 2h, now]`, worked out from the submissions one by one.
fn expected_counters(history: &[Counted], now: chrono::DateTime<chrono::Utc>) -> (i64, f64) {
    let since = now - chrono::Duration::hours(2);
    let within = history
        .iter()
        .filter(|entry| entry.counts && entry.at > since);
    within.fold((0, 0.0), |(count, sum), entry| {
        (count + 1, sum + entry.amount)
    })
}

/// Counters are exact to the microsecond at a window's start, whichever minute and hour
/// buckets the window covers: requests on and next to minute and hour boundaries, a
/// modification, a denial, an expiry and requests with too many numeric args to keep sums
/// for, each probed on both sides of the moment it leaves the window.
#[apply(backends)]
#[tokio::test]
async fn counters_are_exact_at_the_window_start_across_minutes_and_hours(#[case] backend: Backend) {
    use chrono::{DateTime, Duration as Span, Utc};
    let app = spawn_app!(backend, PROBE_POLICY);
    let agent = app.create_agent("prober", &[]).await;
    let start: DateTime<Utc> = "2026-12-08T10:58:00Z".parse().unwrap();
    let mut history: Vec<Counted> = Vec::new();
    let alice = signoff::domain::Voter::new("cli:alice".parse().unwrap());
    let bob = signoff::domain::Voter::new("cli:bob".parse().unwrap());
    let many_numbers = |amount: f64| {
        let mut args: serde_json::Map<String, Value> = (0..20)
            .map(|index| (format!("n{index}"), json!(index)))
            .collect();
        args.insert("amount".into(), json!(amount));
        args.insert("hold".into(), json!(true));
        Value::Object(args)
    };

    // Allowed exactly when the counters are what the history says.
    async fn probe(
        app: &TestApp,
        agent: &TestAgent,
        history: &mut Vec<Counted>,
        amount: f64,
        off_by: i64,
    ) -> bool {
        let now = app.clock.now();
        let (count, sum) = expected_counters(history, now);
        let answer = app
            .submit_ok(
                agent,
                json!({"action": "probe", "args": {"amount": amount, "count": count + off_by, "sum": sum}}),
            )
            .await;
        let allowed = answer["status"] == "approved";
        history.push(Counted {
            id: answer["id"].as_str().unwrap().into(),
            at: now,
            counts: allowed,
            amount,
        });
        allowed
    }
    async fn hold(app: &TestApp, agent: &TestAgent, history: &mut Vec<Counted>, args: Value) {
        let answer = app
            .submit_ok(agent, json!({"action": "probe", "args": args.clone()}))
            .await;
        assert_eq!(answer["status"], "pending", "{answer}");
        history.push(Counted {
            id: answer["id"].as_str().unwrap().into(),
            at: app.clock.now(),
            counts: true,
            amount: args["amount"].as_f64().unwrap(),
        });
    }

    let at = |milliseconds: i64| start + Span::milliseconds(milliseconds);
    app.clock.set(at(0));
    assert!(probe(&app, &agent, &mut history, 1.5, 0).await);
    assert!(
        !probe(&app, &agent, &mut history, 1.5, 1).await,
        "a wrong count is refused"
    );
    app.clock.set(at(30_250));
    hold(
        &app,
        &agent,
        &mut history,
        json!({"hold": true, "amount": 2.25}),
    )
    .await;
    app.clock.set(at(119_999));
    assert!(probe(&app, &agent, &mut history, 0.5, 0).await);
    app.clock.set(at(120_000));
    hold(&app, &agent, &mut history, many_numbers(4.0)).await;
    assert!(probe(&app, &agent, &mut history, 0.75, 0).await);

    // A modification replaces the held amount in the sum; a denial takes it out.
    app.clock.set(at(600_000));
    let modified = history[2].id.clone();
    app.engine()
        .record_vote(
            &modified,
            &alice,
            signoff::domain::VoteRequest::Modify {
                args: json!({"hold": true, "amount": 3.0}),
                note: None,
            },
            None,
        )
        .await
        .unwrap();
    history[2].amount = 3.0;
    assert!(probe(&app, &agent, &mut history, 0.25, 0).await);
    app.clock.set(at(630_000));
    app.engine()
        .record_vote(
            &modified,
            &bob,
            signoff::domain::VoteRequest::Deny {
                reason: "no".into(),
            },
            None,
        )
        .await
        .unwrap();
    history[2].counts = false;
    assert!(probe(&app, &agent, &mut history, 0.25, 0).await);

    // The one with many numbers expires at the next sweep after its 30 minutes.
    app.clock.set(at(3_600_000));
    app.sweep().await;
    for entry in history.iter_mut() {
        if entry.counts && entry.at + Span::minutes(30) <= at(3_600_000) {
            let stored = app.engine().request(&entry.id).await.unwrap();
            if stored.status.as_str() == "expired" {
                entry.counts = false;
            }
        }
    }
    assert!(history
        .iter()
        .any(|entry| entry.amount == 4.0 && !entry.counts));
    assert!(probe(&app, &agent, &mut history, 1.0, 0).await);
    app.clock.set(at(4_000_000));
    hold(&app, &agent, &mut history, many_numbers(8.5)).await;

    // Two hours on, each probe just before and just after one of the early requests
    // leaves the window.
    for offset in [
        0, 1, 30_249, 30_250, 30_251, 119_998, 119_999, 120_000, 120_001, 600_000, 3_600_000,
        4_000_000, 4_000_001,
    ] {
        app.clock.set(at(7_200_000 + offset));
        assert!(
            probe(&app, &agent, &mut history, 0.5, 0).await,
            "counters at {}",
            at(7_200_000 + offset)
        );
    }

    // The migration's backfill builds buckets the requests imply, to the same counters.
    rebuild_buckets_as_the_migration_does(&app, backend).await;
    app.clock.set(at(7_200_000 + 4_000_002));
    assert!(
        probe(&app, &agent, &mut history, 0.5, 0).await,
        "after the backfill"
    );
}

/// A judged submission keeps its Idempotency-Key answer like any other: the retry gets
/// the same request, and the counter counted it once.
#[apply(backends)]
#[tokio::test]
async fn a_judged_submission_replays_under_its_idempotency_key(#[case] backend: Backend) {
    let app = spawn_app!(backend, COUNTER_POLICY);
    let agent = app.create_agent("mailer", &[]).await;
    let body = json!({"action": "email.send"});
    let (status, first) = app
        .submit_with_key(&agent, body.clone(), Some("once"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (_, again) = app
        .submit_with_key(&agent, body.clone(), Some("once"))
        .await;
    assert_eq!(again["id"], first["id"], "{again}");
    let statuses = submit_at_once(&app, &agent, body, 3).await;
    assert_eq!(count_of(&statuses, "approved"), 2, "{statuses:?}");
}

/// Empties `request_counters` and fills it again with the migration's own statements.
async fn rebuild_buckets_as_the_migration_does(app: &TestApp, backend: Backend) {
    let migration = match backend {
        Backend::Sqlite => {
            include_str!("../../migrations/sqlite/20261208010001_request_counters.sql")
        }
        Backend::Postgres => {
            include_str!("../../migrations/postgres/20261208010001_request_counters.sql")
        }
    };
    let start = migration
        .find("-- The buckets the stored requests imply")
        .expect("the migration's backfill");
    let backfill = &migration[start..];
    app.execute_sql_batch(&format!(
        "BEGIN; DELETE FROM request_counters; {backfill}; COMMIT;"
    ))
    .await
    .unwrap();
}
