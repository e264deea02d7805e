//! An approval means exactly what its approvers saw: modifications go through the policy
//! again, votes bind to the revision shown, one person votes once under any principal,
//! separation of duties fails closed, and other workspaces cannot decide anything.

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::domain::Status;

use crate::support::fake_slack::{
    button_value, click_payload, slack_signature, slash_body, Failure, SlackDriver,
};
use crate::support::{backends, stderr, stdout, Backend, TestApp};

/// Production deploys need two people of `release` (or alice), forbidden ones are denied,
/// everything else needs one person of `ops`.
const DEPLOY_POLICY: &str = r#"version: 1
default: deny
people:
  alice: ["cli:alice", "slack:U01ALICE"]
  owen: ["cli:owen", "slack:U0OWEN"]
groups:
  ops: ["person:alice", "cli:bob", "slack:U02BOB", "slack:U0OWEN", "slack:U05HIDDEN"]
  release: ["cli:carol", "slack:U03CAROL", "cli:dave"]
tiers:
  staging:
    route: ["slack:C0STAGING"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 30m
  production:
    route: ["slack:C0PROD"]
    approvers: ["group:release", "person:alice"]
    approvals: 2
    ttl: 1h
rules:
  - name: forbidden
    match: ["deploy.app"]
    when: "args.environment == 'forbidden'"
    effect: deny
    reason: "Nobody deploys to forbidden"
  - name: production
    match: ["deploy.app"]
    when: "args.environment == 'production'"
    effect: require_approval
    tier: production
  - name: deploys
    match: ["deploy.app"]
    effect: require_approval
    tier: staging
"#;

async fn deploy_app(backend: Backend) -> Option<TestApp> {
    let app = TestApp::spawn_with_policy(backend, DEPLOY_POLICY).await?;
    app.slack.add_user("U01ALICE", "alice@example.com");
    app.slack.add_user("U02BOB", "bob@example.com");
    app.slack.add_user("U03CAROL", "carol@example.com");
    app.slack.add_user("U0OWEN", "owen@example.com");
    app.slack.add_user("U09NOBODY", "nobody@example.com");
    // U05HIDDEN has no readable email.
    Some(app)
}

macro_rules! deploy_app {
    ($backend:expr) => {
        match deploy_app($backend).await {
            Some(app) => app,
            None => return,
        }
    };
}

fn deploy(environment: &str) -> Value {
    json!({"action": "deploy.app", "args": {"environment": environment, "service": "web"}})
}

/// `signoff modify ID --as PRINCIPAL --args ARGS`.
fn modify(app: &TestApp, id: &str, principal: &str, args: &str) -> std::process::Output {
    app.cli(&["modify", id, "--as", principal, "--args", args])
}

/// Everything about a request that a refused vote must leave as it was.
async fn snapshot(app: &TestApp, id: &str) -> (Value, Vec<String>) {
    let stored = serde_json::to_value(app.stored(id).await).unwrap();
    (stored, app.audit_kinds(Some(id)).await)
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modification_into_denied_args_is_refused_and_changes_nothing(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("staging")).await;
    let before = snapshot(&app, &id).await;

    let output = modify(
        &app,
        &id,
        "cli:bob",
        r#"{"environment":"forbidden","service":"web"}"#,
    );
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let message = stderr(&output);
    assert!(
        message.contains("forbidden") && message.contains("Nobody deploys to forbidden"),
        "names the rule and its reason: {message}"
    );
    assert_eq!(snapshot(&app, &id).await, before);

    // The same through Slack's modify modal: the modal shows why.
    app.delivered("chat.postMessage", 1).await;
    let (status, answer) = app
        .slack_driver()
        .submit_modal(
            "U02BOB",
            "signoff_modify",
            &id,
            "args",
            r#"{"environment":"forbidden","service":"web"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["response_action"], "errors", "{answer}");
    let shown = answer["errors"]["args"].as_str().unwrap();
    assert!(shown.contains("Nobody deploys to forbidden"), "{shown}");
    assert_eq!(snapshot(&app, &id).await, before);
    assert_eq!(app.stored(&id).await.status, Status::Pending);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modification_into_a_higher_tier_moves_the_request_up(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("staging")).await;
    app.delivered("chat.postMessage", 1).await;

    // Bob approves staging alone, but is no approver of production: his modification
    // moves the request up and does not count as one of its approvals.
    let output = modify(
        &app,
        &id,
        "cli:bob",
        r#"{"environment":"production","service":"web"}"#,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stored = app.stored(&id).await;
    assert_eq!(
        stored.status,
        Status::Pending,
        "one staging approver cannot ship to production"
    );
    assert_eq!(stored.tier.as_deref(), Some("production"));
    assert_eq!(stored.rule.as_deref(), Some("production"));
    assert_eq!(stored.approvals_required, 2);
    assert!(stored.current_approvers().is_empty());
    assert_eq!(stored.revision, 2);

    // A card goes to production's route, and the staging card is kept current.
    app.catch_up_with_the_cli();
    let posts = app.delivered("chat.postMessage", 2).await;
    assert!(
        posts.iter().any(|post| post["channel"] == "C0PROD"),
        "{posts:#?}"
    );
    let staging = app.slack.latest_card("C0STAGING", &id).unwrap();
    assert!(
        staging["blocks"].to_string().contains("production"),
        "{staging}"
    );

    // Bob cannot approve it now; two people of production's approvers can.
    let output = app.cli(&["approve", &id, "--as", "cli:bob"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("not an approver"),
        "{}",
        stderr(&output)
    );
    assert!(app
        .cli(&["approve", &id, "--as", "cli:carol"])
        .status
        .success());
    assert_eq!(app.stored(&id).await.status, Status::Pending);
    assert!(app
        .cli(&["approve", &id, "--as", "cli:dave"])
        .status
        .success());
    let decided = app.stored(&id).await;
    assert_eq!(decided.status, Status::Approved);
    let decision = decided.decision.unwrap();
    assert!(decision.modified);
    assert_eq!(decision.args["environment"], "production");

    // Alice approves in both tiers: her modification counts as production's first approval.
    let id = app.submit_id(&agent, deploy("staging")).await;
    let output = modify(
        &app,
        &id,
        "cli:alice",
        r#"{"environment":"production","service":"web"}"#,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stored = app.stored(&id).await;
    assert_eq!(stored.tier.as_deref(), Some("production"));
    assert_eq!(stored.current_approvers().len(), 1);
    assert_eq!(stored.status, Status::Pending);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_replayed_click_after_a_modification_is_refused(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("production")).await;
    app.delivered("chat.postMessage", 1).await;
    let driver = app.slack_driver();

    // Carol's click on revision 1, signed by Slack; it counts there.
    let body = SlackDriver::interaction_body(&click_payload(
        "U03CAROL",
        "C0PROD",
        "approve",
        &button_value(&id, 1),
    ));
    let form = "application/x-www-form-urlencoded";
    let timestamp = chrono::Utc::now().timestamp();
    let signature = slack_signature(crate::support::SLACK_SIGNING_SECRET, timestamp, &body);
    let (status, _) = driver
        .post_raw(
            "/slack/interactions",
            body.clone(),
            form,
            Some((&signature, timestamp)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.stored(&id).await.current_approvers().len(), 1);

    // Alice changes the args: revision 2, Carol's approval is void, Alice's counts.
    let output = modify(
        &app,
        &id,
        "cli:alice",
        r#"{"environment":"production","service":"api"}"#,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let before = snapshot(&app, &id).await;

    // Replaying Carol's captured click cannot count for revision 2.
    let (status, answer) = driver
        .post_raw(
            "/slack/interactions",
            body,
            form,
            Some((&signature, timestamp)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains("changed since you saw it"), "{answer}");
    assert_eq!(
        snapshot(&app, &id).await,
        before,
        "a replay changes nothing"
    );

    // A stale click on the old card is refused, and the current card is shown.
    let (status, answer) = driver
        .click_at("U03CAROL", "C0PROD", "approve", &id, 1)
        .await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert!(
        answer["text"].as_str().unwrap().contains("revision 2"),
        "{answer}"
    );
    let blocks = answer["blocks"].to_string();
    assert!(
        blocks.contains(&button_value(&id, 2).replace('"', "\\\"")) && blocks.contains("api"),
        "the current card, with buttons for revision 2: {blocks}"
    );
    assert_eq!(snapshot(&app, &id).await, before);

    // A card value with no revision (an old or crafted card) votes on nothing.
    let (status, answer) = driver
        .interact({
            let mut payload = click_payload("U03CAROL", "C0PROD", "approve", &id);
            payload["response_url"] = json!(app.slack.response_url);
            payload
        })
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains("out of date"), "{answer}");
    assert!(
        !answer.contains("blocks"),
        "no card for a crafted value: {answer}"
    );
    assert_eq!(snapshot(&app, &id).await, before);

    // Someone who may not see the request gets no card from a stale click either.
    let (status, answer) = driver
        .click_at("U09NOBODY", "C0PROD", "approve", &id, 1)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains("changed since you saw it"), "{answer}");
    assert!(
        !answer.contains("api"),
        "the current args stay hidden: {answer}"
    );
    assert_eq!(snapshot(&app, &id).await, before);

    // A deny modal opened on revision 1 and submitted now is refused too.
    let (_, answer) = driver
        .submit_modal("U03CAROL", "signoff_deny", &id, "reason", "no")
        .await;
    assert_eq!(answer["response_action"], "errors", "{answer}");
    assert_eq!(snapshot(&app, &id).await, before);

    // A modify modal opened on revision 1 never overwrites revision 2.
    let (_, answer) = driver
        .submit_modal(
            "U03CAROL",
            "signoff_modify",
            &id,
            "args",
            r#"{"environment":"production","service":"db"}"#,
        )
        .await;
    assert_eq!(answer["response_action"], "errors", "{answer}");
    assert_eq!(snapshot(&app, &id).await, before);

    // The click on the current card counts.
    let (status, _) = driver
        .click_at("U03CAROL", "C0PROD", "approve", &id, 2)
        .await;
    assert_eq!(status, StatusCode::OK);
    let decided = app.stored(&id).await;
    assert_eq!(decided.status, Status::Approved);
    assert_eq!(decided.decision.unwrap().args["service"], "api");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_votes_on_the_revision_it_names_and_only_as_cli_principals(
    #[case] backend: Backend,
) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("staging")).await;
    let before = snapshot(&app, &id).await;

    for principal in [
        "slack:U01ALICE",
        "email:alice@example.com",
        "teams:0000-aad",
    ] {
        let output = app.cli(&["approve", &id, "--as", principal]);
        assert_eq!(output.status.code(), Some(1), "{principal}");
        assert!(stderr(&output).contains("cli:"), "{}", stderr(&output));
    }
    let output = app.cli(&["approve", &id, "--as", "cli:bob", "--revision", "2"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("changed since you saw it"),
        "{}",
        stderr(&output)
    );
    assert_eq!(snapshot(&app, &id).await, before);

    let output = app.cli(&["approve", &id, "--as", "cli:bob", "--revision", "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("staging"),
        "shows what was approved"
    );
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_person_counts_once_and_owners_are_refused_under_any_principal(
    #[case] backend: Backend,
) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &["cli:owen"]).await;
    let id = app.submit_id(&agent, deploy("production")).await;
    app.delivered("chat.postMessage", 1).await;
    let driver = app.slack_driver();

    // Alice in Slack, then Alice on the command line: one person, one approval.
    assert_eq!(
        driver.click("U01ALICE", "C0PROD", "approve", &id).await,
        StatusCode::OK
    );
    let output = app.cli(&["approve", &id, "--as", "cli:alice"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("already approved"),
        "{}",
        stderr(&output)
    );
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.current_approvers().len(), 1);

    // Owen owns the agent as cli:owen; as slack:U0OWEN he is an ops approver, and still
    // may not approve his own agent's staging deploy.
    let staging = app.submit_id(&agent, deploy("staging")).await;
    app.delivered("chat.postMessage", 2).await;
    let (status, answer) = driver
        .click_at("U0OWEN", "C0STAGING", "approve", &staging, 1)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains("cannot approve"), "{answer}");
    assert_eq!(app.stored(&staging).await.status, Status::Pending);

    // Vote audit events say which channel each vote came through.
    assert!(app
        .cli(&["approve", &id, "--as", "cli:carol"])
        .status
        .success());
    let mut channels = Vec::new();
    app.engine()
        .export_audit(|event| {
            if event.request_id.as_deref() == Some(id.as_str()) && event.kind == "vote" {
                channels.push(event.payload["channel"].clone());
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(channels, [json!("slack"), json!("cli")]);
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_user_whose_email_cannot_be_read_is_refused_where_people_are_named_by_email(
    #[case] backend: Backend,
) {
    let app = deploy_app!(backend);
    // The requester is named by email: U05HIDDEN could be them.
    let agent = app.create_agent("deployer", &[]).await;
    let mut body = deploy("staging");
    body["on_behalf_of"] = json!("email:someone@example.com");
    let id = app.submit_id(&agent, body).await;
    app.delivered("chat.postMessage", 1).await;
    let before = snapshot(&app, &id).await;

    let (status, answer) = app
        .slack_driver()
        .click_at("U05HIDDEN", "C0STAGING", "approve", &id, 1)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains("cannot read the email address"), "{answer}");
    assert_eq!(snapshot(&app, &id).await, before);

    // Where nobody is named by email, the same user may approve.
    let plain = app.submit_id(&agent, deploy("staging")).await;
    app.delivered("chat.postMessage", 2).await;
    let (status, answer) = app
        .slack_driver()
        .click_at("U05HIDDEN", "C0STAGING", "approve", &plain, 1)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(app.stored(&plain).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_workspace_cannot_click_or_command(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("staging")).await;
    app.delivered("chat.postMessage", 1).await;
    let before = snapshot(&app, &id).await;
    let driver = app.slack_driver();

    let foreign_team = {
        let mut payload = click_payload("U02BOB", "C0STAGING", "approve", &button_value(&id, 1));
        payload["team"]["id"] = json!("T0OTHER");
        payload["user"]["team_id"] = json!("T0OTHER");
        payload
    };
    // A Slack Connect guest: the channel's workspace is ours, the user's is not.
    let guest = {
        let mut payload = click_payload("U02BOB", "C0STAGING", "approve", &button_value(&id, 1));
        payload["user"]["team_id"] = json!("T0GUEST");
        payload
    };
    for payload in [foreign_team, guest] {
        let (status, answer) = driver.interact(payload).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
        assert!(answer.contains("wrong_workspace"), "{answer}");
    }
    assert_eq!(snapshot(&app, &id).await, before);

    // The slash command from another workspace.
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("team_id", "T0OTHER")
        .append_pair("user_id", "U02BOB")
        .append_pair("command", "/signoff")
        .append_pair("text", &format!("approve {id}"))
        .finish();
    let now = chrono::Utc::now().timestamp();
    let (status, answer) = driver
        .post_signed(
            "/slack/commands",
            body,
            "application/x-www-form-urlencoded",
            now,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(snapshot(&app, &id).await, before);

    // The home workspace still can.
    assert_eq!(
        driver.click("U02BOB", "C0STAGING", "approve", &id).await,
        StatusCode::OK
    );
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_answers_only_people_who_may_see_the_request(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app
        .submit_id(&agent, {
            let mut body = deploy("staging");
            body["on_behalf_of"] = json!("slack:U07REQUESTER");
            body
        })
        .await;
    let driver = app.slack_driver();

    let (_, answer) = driver.slash("U09MALLORY", &format!("show {id}")).await;
    assert!(
        answer["text"].as_str().unwrap().contains("may not see it"),
        "{answer}"
    );
    assert!(answer.get("blocks").is_none(), "{answer}");

    for viewer in ["U02BOB", "U07REQUESTER"] {
        let (_, answer) = driver.slash(viewer, &format!("show {id}")).await;
        assert!(
            answer["blocks"].to_string().contains(&id),
            "{viewer}: {answer}"
        );
    }

    // A typed approve acts on the current revision and says what it approved.
    let (_, answer) = driver.slash("U02BOB", &format!("approve {id}")).await;
    let text = answer["text"].as_str().unwrap();
    assert!(
        text.contains("approved") && text.contains("revision 1") && text.contains("staging"),
        "{text}"
    );
}

/// A slash command as Slack signs it, from `user`, signed at `timestamp`.
fn signed_command(user: &str, text: &str, timestamp: i64) -> (String, String) {
    let body = slash_body(user, text);
    let signature = slack_signature(crate::support::SLACK_SIGNING_SECRET, timestamp, &body);
    (body, signature)
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_typed_approve_cannot_count_for_a_later_revision(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("production")).await;
    let driver = app.slack_driver();
    let form = "application/x-www-form-urlencoded";

    // Carol types `approve ID`: it counts on revision 1.
    let typed_at = chrono::Utc::now().timestamp();
    let (body, signature) = signed_command("U03CAROL", &format!("approve {id}"), typed_at);
    let (status, answer) = driver
        .post_raw(
            "/slack/commands",
            body.clone(),
            form,
            Some((&signature, typed_at)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer.contains("revision 1"), "{answer}");

    // Alice changes the args (and approves revision 2).
    let output = modify(
        &app,
        &id,
        "cli:alice",
        r#"{"environment":"production","service":"payments"}"#,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let before = snapshot(&app, &id).await;

    // The captured command, sent again: Carol never saw revision 2.
    let (status, answer) = driver
        .post_raw("/slack/commands", body, form, Some((&signature, typed_at)))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains("changed since you saw it"), "{answer}");
    assert_eq!(snapshot(&app, &id).await, before);
    assert_eq!(app.stored(&id).await.status, Status::Pending);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modification_needs_the_quorum_of_the_policy_in_force(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("staging")).await;
    assert_eq!(app.stored(&id).await.approvals_required, 1);

    // The operator raises staging's quorum to two and reloads.
    let stricter = DEPLOY_POLICY.replacen("approvals: 1", "approvals: 2", 1);
    std::fs::write(&app.config.policy, stricter).unwrap();
    let reloaded = app.engine().reload_policy(&app.config.policy).unwrap();

    let output = modify(
        &app,
        &id,
        "cli:bob",
        r#"{"environment":"staging","service":"api"}"#,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stored = app.stored(&id).await;
    assert_eq!(
        stored.status,
        Status::Pending,
        "one approval no longer suffices"
    );
    assert_eq!(stored.approvals_required, 2);
    assert_eq!(
        stored.policy_hash,
        reloaded.hash(),
        "the policy that judged the new args"
    );
    assert!(
        app.cli(&["approve", &id, "--as", "cli:carol"])
            .status
            .code()
            == Some(1)
    );
    assert!(app.cli(&["approve", &id, "--as", "cli:dave"]).status.code() == Some(1));
    assert!(app
        .cli(&["approve", &id, "--as", "cli:alice"])
        .status
        .success());
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_are_refused_while_the_workspace_cannot_be_confirmed(#[case] backend: Backend) {
    let app = deploy_app!(backend);
    let agent = app.create_agent("deployer", &[]).await;
    let id = app.submit_id(&agent, deploy("staging")).await;
    app.delivered("chat.postMessage", 1).await;
    let before = snapshot(&app, &id).await;

    // A revoked token: auth.test cannot say which workspace is ours, so nothing counts.
    for failure in [Failure::NotOk("token_revoked"), Failure::ServerError] {
        app.slack.fail_next("auth.test", vec![failure]);
        let (status, answer) = app
            .slack_driver()
            .click_at("U02BOB", "C0STAGING", "approve", &id, 1)
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
        assert_eq!(snapshot(&app, &id).await, before);
    }
    let (status, _) = app
        .slack_driver()
        .click_at("U02BOB", "C0STAGING", "approve", &id, 1)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.stored(&id).await.status, Status::Approved);
}
