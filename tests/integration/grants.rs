//! Standing grants end to end: created by approvals that all asked (CLI and engine),
//! used at intake exactly once each under concurrency, never over a deny, expiring with
//! the clock, revocable; listed by the CLI and `GET /v1/grants`; audited.

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::domain::{GrantAsk, VoteRequest, Voter};

use crate::spawn_app;
use crate::support::{backends, stderr, stdout, Backend, TestAgent, TestApp};

const GRANTS_POLICY: &str = r#"version: 1
default: deny
tiers:
  low:
    route: ["slack:C0LOW"]
    approvers: ["cli:alice", "cli:bob"]
    ttl: 30m
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["cli:alice", "cli:bob"]
    ttl: 30m
    grants: {max_ttl: 8h, max_uses: 5}
  pair:
    route: ["slack:C0PAIR"]
    approvers: ["cli:alice", "cli:bob"]
    approvals: 2
    ttl: 30m
    grants: {max_ttl: 8h, max_uses: 20}
  high:
    route: ["slack:C0HIGH"]
    approvers: ["cli:alice", "cli:bob"]
    ttl: 30m
rules:
  - name: restarts
    match: ["ops.restart"]
    effect: require_approval
    tier: medium
  - name: big-restarts
    match: ["ops.restart"]
    when: "has(args.replicas) && args.replicas > 10"
    effect: require_approval
    tier: high
  - name: cheap-restarts
    match: ["ops.restart_small"]
    effect: require_approval
    tier: low
  - name: no-prod
    match: ["ops.restart"]
    when: "has(args.env) && args.env == 'prod'"
    effect: deny
  - name: payouts
    match: ["payouts.send"]
    effect: require_approval
    tier: pair
  - name: nogrant
    match: ["ops.scale"]
    effect: require_approval
    tier: high
"#;

fn ask(hours: u64, uses: Option<u32>, when: Option<&str>) -> GrantAsk {
    GrantAsk {
        ttl_seconds: hours * 3600,
        uses,
        when: when.map(str::to_string),
    }
}

fn alice() -> Voter {
    Voter::new("cli:alice".parse().unwrap())
}

/// Submits `body` and approves it as alice asking for `grant`; returns the grant's id.
async fn granted(app: &TestApp, agent: &TestAgent, body: Value, grant: GrantAsk) -> String {
    let id = app.submit_id(agent, body).await;
    app.engine()
        .record_vote_asking_grant(
            &id,
            &alice(),
            VoteRequest::Approve { note: None },
            None,
            Some(grant),
        )
        .await
        .unwrap();
    let grants = app.engine().list_grants(Some(&agent.name)).await.unwrap();
    let grant = grants
        .iter()
        .find(|grant| grant.request_id == id)
        .expect("the approval created a grant");
    grant.id.clone()
}

/// Agent `ops` with a 5-use grant, asked for `hours`, covering the restart of `web`; the
/// submission the grant covers.
async fn ops_with_restart_grant(app: &TestApp, hours: u64) -> (TestAgent, Value) {
    let agent = app.create_agent("ops", &[]).await;
    let body = json!({"action": "ops.restart", "args": {"service": "web"}});
    granted(app, &agent, body.clone(), ask(hours, Some(5), None)).await;
    (agent, body)
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_simultaneous_submissions_on_two_replicas_spend_a_three_use_grant_exactly_three_times(
    #[case] backend: Backend,
) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let agent = app.create_agent("ops", &[]).await;
    let body = json!({"action": "ops.restart", "args": {"service": "web"}});
    let grant_id = granted(&app, &agent, body.clone(), ask(1, Some(3), None)).await;
    // Half of them through a second server: replicas spend the uses exactly too.
    let answers = app.submit_on_two_replicas(&agent, body.clone(), 20).await;
    let mut by_grant = 0;
    for (status, request) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{request}");
        match request["status"].as_str() {
            Some("approved") => {
                assert_eq!(
                    request["decision"]["by"],
                    json!([format!("grant:{grant_id}")])
                );
                by_grant += 1;
            }
            Some("pending") => {}
            other => panic!("unexpected status {other:?}: {request}"),
        }
    }
    assert_eq!(by_grant, 3);
    let grants = app.engine().list_grants(None).await.unwrap();
    assert_eq!(grants[0].uses_left, 0);
    let used = app
        .query_i64("SELECT COUNT(*) FROM audit_events WHERE kind = 'grant_used'")
        .await;
    assert_eq!(used, 3);
    assert_eq!(
        app.query_i64("SELECT COUNT(*) FROM audit_events WHERE kind = 'grant_created'")
            .await,
        1
    );
    let verified = app.engine().verify_audit_chain().await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");
}

#[apply(backends)]
#[tokio::test]
async fn a_grant_covers_only_its_args_tier_and_agent_and_never_a_deny(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let agent = app.create_agent("ops", &[]).await;
    let other = app.create_agent("other", &[]).await;
    let body = json!({"action": "ops.restart", "args": {"service": "web"}});
    granted(&app, &agent, body.clone(), ask(1, None, None)).await;
    // (who, body, status)
    let cases: Vec<(&TestAgent, Value, &str)> = vec![
        (
            &agent,
            json!({"action": "ops.restart", "args": {"service": "db"}}),
            "pending",
        ),
        (&other, body.clone(), "pending"),
        (
            &agent,
            json!({"action": "ops.restart", "args": {"service": "web", "replicas": 11}}),
            "pending",
        ),
        (
            &agent,
            json!({"action": "ops.restart", "args": {"service": "web", "env": "prod"}}),
            "denied",
        ),
        (&agent, body.clone(), "approved"),
    ];
    for (who, body, status) in cases {
        let request = app.submit_ok(who, body.clone()).await;
        assert_eq!(request["status"], status, "{body}: {request}");
    }
}

#[apply(backends)]
#[tokio::test]
async fn a_widened_grant_covers_args_its_condition_accepts(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let agent = app.create_agent("ops", &[]).await;
    granted(
        &app,
        &agent,
        json!({"action": "ops.restart", "args": {"service": "web"}}),
        ask(1, None, Some("args.service in ['web', 'api']")),
    )
    .await;
    let api = app
        .submit_ok(
            &agent,
            json!({"action": "ops.restart", "args": {"service": "api"}}),
        )
        .await;
    assert_eq!(api["status"], "approved");
    let db = app
        .submit_ok(
            &agent,
            json!({"action": "ops.restart", "args": {"service": "db"}}),
        )
        .await;
    assert_eq!(db["status"], "pending");
}

#[apply(backends)]
#[tokio::test]
async fn grants_expire_with_the_clock_and_stop_when_revoked(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let agent = app.create_agent("ops", &[]).await;
    let body = json!({"action": "ops.restart", "args": {"service": "web"}});
    granted(&app, &agent, body.clone(), ask(1, None, None)).await;
    app.advance(Duration::from_secs(59 * 60));
    assert_eq!(
        app.submit_ok(&agent, body.clone()).await["status"],
        "approved"
    );
    app.advance(Duration::from_secs(2 * 60));
    assert_eq!(
        app.submit_ok(&agent, body.clone()).await["status"],
        "pending"
    );

    let second = granted(&app, &agent, body.clone(), ask(4, None, None)).await;
    // Someone who is not an approver of the grant's tier may not revoke it.
    let refused = app
        .engine()
        .revoke_grant(&second, &Voter::new("slack:U0STRANGER".parse().unwrap()))
        .await;
    assert!(refused.is_err());
    let output = app.cli(&["grants", "revoke", &second, "--as", "cli:carol"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        app.submit_ok(&agent, body.clone()).await["status"],
        "pending"
    );
    let again = app.cli(&["grants", "revoke", &second, "--as", "cli:carol"]);
    assert_eq!(again.status.code(), Some(1));
    // Listings keep expired and revoked grants.
    let (status, listed) = read_grants(&app, &agent).await;
    assert_eq!(status, StatusCode::OK);
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed[0]["revoked_at"].is_string(), "{listed:?}");
    assert!(listed[1]["revoked_at"].is_null());
    assert!(listed[0]["id"].as_str().unwrap().starts_with("grt_"));
    assert_eq!(
        listed[1]["action_hash"]
            .as_str()
            .map(|hash| hash.starts_with("sha256:")),
        Some(true)
    );
    let other = app.create_agent("other", &[]).await;
    let (_, theirs) = read_grants(&app, &other).await;
    assert_eq!(theirs, json!([]));
    assert_eq!(
        app.query_i64("SELECT COUNT(*) FROM audit_events WHERE kind = 'grant_revoked'")
            .await,
        1
    );
}

#[apply(backends)]
#[tokio::test]
async fn the_cli_asks_for_grants_within_the_tiers_caps(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let agent = app.create_agent("ops", &[]).await;
    let body = json!({"action": "ops.restart", "args": {"service": "web"}});
    let id = app.submit_id(&agent, body.clone()).await;
    // Beyond the caps, or a `when` that does not compile: refused, nothing cast.
    for flags in [
        vec!["--grant", "9h"],
        vec!["--grant", "1h", "--grant-uses", "6"],
        vec!["--grant", "1h", "--grant-when", "args.service =="],
    ] {
        let mut args = vec!["approve", id.as_str(), "--as", "cli:alice"];
        args.extend(flags.iter().copied());
        let output = app.cli(&args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{flags:?}: {}",
            stdout(&output)
        );
        assert!(app.stored(&id).await.votes.is_empty(), "{flags:?}");
    }
    let output = app.cli(&[
        "approve",
        &id,
        "--as",
        "cli:alice",
        "--grant",
        "2h",
        "--grant-uses",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("grant grt_"),
        "{}",
        stdout(&output)
    );
    let listed = app.cli(&["grants", "list", "--json"]);
    let grants: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(grants[0]["uses_left"], 2);
    assert_eq!(grants[0]["tier"], "medium");
    assert_eq!(grants[0]["created_by"], json!(["cli:alice"]));
    assert_eq!(
        app.submit_ok(&agent, body.clone()).await["status"],
        "approved"
    );

    // A tier without grants refuses the vote.
    let scale = app.submit_id(&agent, json!({"action": "ops.scale"})).await;
    let output = app.cli(&["approve", &scale, "--as", "cli:alice", "--grant", "1h"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("does not allow grants"),
        "{}",
        stderr(&output)
    );
}

#[apply(backends)]
#[tokio::test]
async fn a_grant_needs_every_approval_of_the_decision_to_ask(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let agent = app.create_agent("payer", &[]).await;
    let body = json!({"action": "payouts.send", "args": {"to": "x"}});
    let vote = |id: String, who: &'static str, grant: Option<GrantAsk>| {
        let engine = app.engine().clone();
        async move {
            engine
                .record_vote_asking_grant(
                    &id,
                    &Voter::new(who.parse().unwrap()),
                    VoteRequest::Approve { note: None },
                    None,
                    grant,
                )
                .await
                .unwrap()
        }
    };
    let first = app.submit_id(&agent, body.clone()).await;
    vote(first.clone(), "cli:alice", Some(ask(4, Some(10), None))).await;
    vote(first.clone(), "cli:bob", None).await;
    assert_eq!(
        app.stored(&first).await.status,
        signoff::domain::Status::Approved
    );
    assert!(app.engine().list_grants(None).await.unwrap().is_empty());
    let second = app.submit_id(&agent, body.clone()).await;
    vote(second.clone(), "cli:alice", Some(ask(4, Some(10), None))).await;
    vote(second.clone(), "cli:bob", Some(ask(2, None, None))).await;
    let grants = app.engine().list_grants(None).await.unwrap();
    assert_eq!(grants.len(), 1);
    // The shortest duration and the fewest uses win.
    assert_eq!((grants[0].expires_at - grants[0].created_at).num_hours(), 2);
    assert_eq!(grants[0].uses_left, 10);
}

async fn read_grants(app: &TestApp, agent: &TestAgent) -> (StatusCode, Value) {
    let response = app
        .http
        .get(app.url("/v1/grants"))
        .bearer_auth(&agent.key)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

const SLACK_GRANTS_POLICY: &str = r#"version: 1
default: deny
tiers:
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["slack:U01ALICE"]
    ttl: 30m
    grants: {max_ttl: 6h, max_uses: 4}
  plain:
    route: ["slack:C0PLAIN"]
    approvers: ["slack:U01ALICE"]
    ttl: 30m
rules:
  - name: restarts
    match: ["ops.restart"]
    effect: require_approval
    tier: medium
  - name: scales
    match: ["ops.scale"]
    effect: require_approval
    tier: plain
"#;

#[apply(backends)]
#[tokio::test]
async fn slack_cards_offer_approve_for_and_the_command_lists_and_revokes(#[case] backend: Backend) {
    let app = spawn_app!(backend, SLACK_GRANTS_POLICY);
    app.slack.add_user("U01ALICE", "alice@example.com");
    let agent = app.create_agent("ops", &[]).await;
    let body = json!({"action": "ops.restart", "args": {"service": "web"}});
    let id = app.submit_id(&agent, body.clone()).await;
    let plain = app.submit_id(&agent, json!({"action": "ops.scale"})).await;
    app.delivered("chat.postMessage", 2).await;
    let card = app.slack.latest_card("C0MEDIUM", &id).unwrap();
    let menu = card["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|block| block["elements"].as_array().cloned().unwrap_or_default())
        .find(|element| element["action_id"] == "approve_for")
        .expect("an Approve for menu");
    let labels: Vec<&str> = menu["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|option| option["text"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["Approve for 1h", "Approve for 4h", "Approve for 6h"]
    );
    let plain_card = app.slack.latest_card("C0PLAIN", &plain).unwrap();
    assert!(!plain_card["blocks"].to_string().contains("approve_for"));

    let four_hours = menu["options"][1]["value"].as_str().unwrap().to_string();
    let (status, _) = app
        .slack_driver()
        .choose("U01ALICE", "C0MEDIUM", "approve_for", &four_hours)
        .await;
    assert_eq!(status, StatusCode::OK);
    let grants = app.engine().list_grants(None).await.unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].expires_at - grants[0].created_at).num_hours(), 4);
    assert_eq!(grants[0].uses_left, 4);
    assert_eq!(grants[0].created_by[0].as_str(), "slack:U01ALICE");
    assert_eq!(
        app.submit_ok(&agent, body.clone()).await["status"],
        "approved"
    );

    let (_, listed) = app.slack_driver().slash("U01ALICE", "grants").await;
    assert!(
        listed["text"].as_str().unwrap().contains(&grants[0].id),
        "{listed}"
    );
    let (_, stranger) = app.slack_driver().slash("U09MALLORY", "grants").await;
    assert!(
        !stranger["text"].to_string().contains(&grants[0].id),
        "{stranger}"
    );
    let (_, revoked) = app
        .slack_driver()
        .slash("U01ALICE", &format!("grants revoke {}", grants[0].id))
        .await;
    assert!(
        revoked["text"].as_str().unwrap().contains("revoked"),
        "{revoked}"
    );
    assert_eq!(app.submit_ok(&agent, body).await["status"], "pending");
}

/// An operator who takes `grants` off a tier stops the grants made in it: after the
/// reload, a submission such a grant covers waits for people again (while another tier
/// still allows grants, so intake still looks for them).
#[apply(backends)]
#[tokio::test]
async fn a_tier_that_no_longer_allows_grants_stops_its_grants(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let (agent, body) = ops_with_restart_grant(&app, 1).await;
    reload(
        &app,
        &GRANTS_POLICY.replacen("    grants: {max_ttl: 8h, max_uses: 5}\n", "", 1),
    );
    let request = app.submit_ok(&agent, body).await;
    assert_eq!(request["status"], "pending", "{request}");
}

/// A grant is its creators' approval: it never approves a request made on behalf of one
/// of them (under any of their principals), who could not approve it by hand either.
#[apply(backends)]
#[tokio::test]
async fn a_grant_never_approves_a_request_on_behalf_of_its_creator(#[case] backend: Backend) {
    let policy = GRANTS_POLICY.replacen(
        "tiers:",
        "people:\n  alice: [\"cli:alice\", \"slack:U01ALICE\"]\ntiers:",
        1,
    );
    let app = spawn_app!(backend, &policy);
    let agent = app.create_agent("ops", &[]).await;
    let args = json!({"service": "web"});
    granted(
        &app,
        &agent,
        json!({"action": "ops.restart", "args": args, "on_behalf_of": "cli:bob"}),
        ask(1, Some(5), None),
    )
    .await;
    for requester in ["cli:alice", "slack:U01ALICE"] {
        let body = json!({"action": "ops.restart", "args": args, "on_behalf_of": requester});
        let request = app.submit_ok(&agent, body).await;
        assert_eq!(request["status"], "pending", "{requester}: {request}");
    }
    let body = json!({"action": "ops.restart", "args": args, "on_behalf_of": "cli:carol"});
    let request = app.submit_ok(&agent, body).await;
    assert_eq!(request["status"], "approved", "{request}");
}

/// An operator who shortens a tier's `max_ttl` shortens the grants already made in it:
/// a grant asked for 4 h stops once the new 30 min cap has passed since it was made.
#[apply(backends)]
#[tokio::test]
async fn a_shorter_max_ttl_shortens_existing_grants(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let (agent, body) = ops_with_restart_grant(&app, 4).await;
    reload(
        &app,
        &GRANTS_POLICY.replacen(
            "{max_ttl: 8h, max_uses: 5}",
            "{max_ttl: 30m, max_uses: 5}",
            1,
        ),
    );
    let request = app.submit_ok(&agent, body.clone()).await;
    assert_eq!(request["status"], "approved", "{request}");
    app.advance(Duration::from_secs(31 * 60));
    let request = app.submit_ok(&agent, body).await;
    assert_eq!(request["status"], "pending", "{request}");
}

/// Swaps the policy file for `policy` and reloads it, as SIGHUP would.
fn reload(app: &TestApp, policy: &str) {
    assert_ne!(policy, GRANTS_POLICY, "the test changes the policy");
    std::fs::write(&app.config.policy, policy).unwrap();
    app.engine().reload_policy(&app.config.policy).unwrap();
}

/// A lower `max_uses` caps the grants already made: a 5-use grant used twice has one use
/// left once the cap is 3, whatever its own count says.
#[apply(backends)]
#[tokio::test]
async fn a_lower_max_uses_caps_existing_grants(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let (agent, body) = ops_with_restart_grant(&app, 4).await;
    for _ in 0..2 {
        let request = app.submit_ok(&agent, body.clone()).await;
        assert_eq!(request["status"], "approved", "{request}");
    }
    reload(
        &app,
        &GRANTS_POLICY.replacen(
            "{max_ttl: 8h, max_uses: 5}",
            "{max_ttl: 8h, max_uses: 3}",
            1,
        ),
    );
    let statuses = join_all((0..3).map(|_| app.submit_ok(&agent, body.clone()))).await;
    let approved = statuses
        .iter()
        .filter(|request| request["status"] == "approved")
        .count();
    assert_eq!(approved, 1, "{statuses:?}");
    let grants = app.engine().list_grants(Some("ops")).await.unwrap();
    assert_eq!((grants[0].uses_granted, grants[0].uses_left), (5, 2));
}

/// A grant is its creators' approval: once the policy no longer lists one of them among
/// the tier's approvers, the grant approves nothing more.
#[apply(backends)]
#[tokio::test]
async fn a_grant_stops_when_its_creator_may_no_longer_approve(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANTS_POLICY);
    let (agent, body) = ops_with_restart_grant(&app, 4).await;
    let request = app.submit_ok(&agent, body.clone()).await;
    assert_eq!(request["status"], "approved", "{request}");
    reload(
        &app,
        &GRANTS_POLICY.replacen(
            "    approvers: [\"cli:alice\", \"cli:bob\"]\n    ttl: 30m\n    grants: {max_ttl: 8h, max_uses: 5}",
            "    approvers: [\"cli:bob\"]\n    ttl: 30m\n    grants: {max_ttl: 8h, max_uses: 5}",
            1,
        ),
    );
    let request = app.submit_ok(&agent, body).await;
    assert_eq!(request["status"], "pending", "{request}");
}
