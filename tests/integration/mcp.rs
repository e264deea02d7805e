//! MCP: rmcp's own client against `POST /mcp` and against `signoff mcp-proxy` (the real
//! binary) in front of a recording upstream server (examples/mcp_recording_server.rs).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, GetPromptRequestParams, ProgressNotificationParam,
};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, RoleClient, ServiceExt as _};
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Map, Value};
use tokio::io::AsyncReadExt as _;

use crate::support::{backends, error_code, eventually, stderr, Backend, TestAgent, TestApp};

const MCP_POLICY: &str = r#"version: 1
default: deny
default_tier: medium
groups:
  sre: ["cli:alice", "cli:bob"]
tiers:
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["group:sre"]
    approvals: 1
    ttl: 30m
rules:
  - name: harmless
    match: ["mcp.echo", "mcp.fail", "mcp.crash", "reports.get"]
    effect: allow
  - name: email-needs-a-person
    match: ["mcp.send_email", "email.send"]
    effect: require_approval
  - name: no-drop
    match: ["mcp.delete_*", "db.drop_*"]
    effect: deny
    reason: "Dropping tables is never allowed"
"#;

macro_rules! spawn_mcp_app {
    ($backend:expr) => {
        match TestApp::spawn_with_policy($backend, MCP_POLICY).await {
            Some(app) => app,
            None => return,
        }
    };
}

fn arguments(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn call(name: &'static str, args: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name).with_arguments(arguments(args))
}

fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|content| content.as_text().map(|text| text.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_error(result: &CallToolResult) -> bool {
    result.is_error == Some(true)
}

/// rmcp's Streamable HTTP client on `/mcp` with `key` as the Bearer token.
async fn mcp_client(app: &TestApp, key: &str) -> RunningService<RoleClient, ()> {
    let config = StreamableHttpClientTransportConfig::with_uri(app.url("/mcp")).auth_header(key);
    ().serve(StreamableHttpClientTransport::from_config(config))
        .await
        .expect("MCP client connects to /mcp")
}

/// The upstream MCP server the proxy starts: built by `cargo test` as an example.
fn recording_server() -> PathBuf {
    let test_binary = std::env::current_exe().expect("current_exe");
    let profile_directory = test_binary
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let server = profile_directory.join("examples").join(format!(
        "mcp_recording_server{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        server.exists(),
        "{} is missing; `cargo test` builds it from examples/ (a filtered `cargo test --test integration` does not: `cargo build --example mcp_recording_server`)",
        server.display()
    );
    server
}

/// A client that keeps the progress notifications it receives.
#[derive(Clone, Default)]
struct ProgressRecorder {
    received: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for ProgressRecorder {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.received.lock().expect("lock").push(params);
    }
}

/// `signoff mcp-proxy` as a child process, its upstream recording into a temp file.
struct Proxy {
    client: RunningService<RoleClient, ProgressRecorder>,
    progress: ProgressRecorder,
    child: tokio::process::Child,
    record: PathBuf,
    _directory: tempfile::TempDir,
}

impl Proxy {
    async fn start(url: &str, key: &str, extra: &[&str]) -> Self {
        let directory = tempfile::tempdir().expect("tempdir");
        let record = directory.path().join("calls.jsonl");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
            .args(["mcp-proxy", "--url", url, "--key", key])
            .args(extra)
            .arg("--")
            .arg(recording_server())
            .env("RECORD_FILE", &record)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start signoff mcp-proxy");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let progress = ProgressRecorder::default();
        let client = progress
            .clone()
            .serve((stdout, stdin))
            .await
            .expect("MCP client connects to the proxy");
        Self {
            client,
            progress,
            child,
            record,
            _directory: directory,
        }
    }

    /// Every call the upstream received, in order.
    fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON line"))
            .collect()
    }

    async fn call(&self, name: &'static str, args: Value) -> CallToolResult {
        self.client
            .call_tool(call(name, args))
            .await
            .expect("tools/call answers")
    }
}

/// The agent's pending requests, over /v1.
async fn pending_ids(app: &TestApp, agent: &TestAgent) -> Vec<String> {
    let requests: Vec<Value> = app
        .http
        .get(app.url("/v1/requests?status=pending"))
        .bearer_auth(&agent.key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON");
    requests
        .iter()
        .map(|request| request["id"].as_str().expect("id").to_string())
        .collect()
}

async fn the_one_pending(app: &TestApp, agent: &TestAgent) -> String {
    eventually(Duration::from_secs(10), || async {
        let ids = pending_ids(app, agent).await;
        (ids.len() == 1).then(|| ids[0].clone())
    })
    .await
}

/// The id of the agent's one request for `action`.
async fn only_request_for(app: &TestApp, agent: &TestAgent, action: &str) -> String {
    let requests: Vec<Value> = app
        .http
        .get(app.url("/v1/requests"))
        .bearer_auth(&agent.key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON");
    let ids: Vec<&str> = requests
        .iter()
        .filter(|request| request["action"] == action)
        .map(|request| request["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 1, "{requests:?}");
    ids[0].to_string()
}

fn cli_ok(app: &TestApp, args: &[&str]) {
    let output = app.cli(args);
    assert!(output.status.success(), "{:?}: {}", args, stderr(&output));
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_endpoint_offers_the_five_tools_with_generated_schemas(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let client = mcp_client(&app, &agent.key).await;
    let tools = client.list_all_tools().await.expect("tools/list");
    let mut names: Vec<&str> = tools.iter().map(|tool| &*tool.name).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "await_decision",
            "cancel_request",
            "check_policy",
            "report_execution",
            "request_approval"
        ]
    );
    let request_approval = tools
        .iter()
        .find(|tool| tool.name == "request_approval")
        .expect("request_approval");
    let schema = Value::Object((*request_approval.input_schema).clone());
    assert_eq!(schema["required"], json!(["action"]), "{schema}");
    assert!(schema["properties"]["wait_seconds"].is_object(), "{schema}");

    let check = client
        .call_tool(call("check_policy", json!({"action": "db.drop_users"})))
        .await
        .expect("check_policy");
    assert!(!is_error(&check));
    let verdict = check.structured_content.clone().expect("structured");
    assert_eq!(verdict["effect"], "deny", "{verdict}");
    assert_eq!(app.request_count().await, 0, "check_policy stores nothing");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tools_decide_like_the_http_api(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let client = mcp_client(&app, &agent.key).await;

    // Allowed: approved at once, with what to do.
    let allowed = client
        .call_tool(call(
            "request_approval",
            json!({"action": "reports.get", "args": {"n": 1}}),
        ))
        .await
        .expect("call");
    assert!(!is_error(&allowed));
    let request = allowed.structured_content.clone().expect("request object");
    assert_eq!(request["status"], "approved", "{request}");
    assert!(
        text_of(&allowed).contains("decision.args"),
        "{}",
        text_of(&allowed)
    );

    // Denied: a normal result naming rule and reason.
    let denied = client
        .call_tool(call("request_approval", json!({"action": "db.drop_users"})))
        .await
        .expect("call");
    assert!(!is_error(&denied), "a denial is not a tool error");
    let text = text_of(&denied);
    assert!(text.contains("Denied"), "{text}");
    assert!(text.contains("no-drop"), "{text}");
    assert!(text.contains("Dropping tables is never allowed"), "{text}");

    // Needs approval: pending after a zero wait, then approved on the CLI.
    let pending = client
        .call_tool(call(
            "request_approval",
            json!({"action": "email.send", "args": {"to": "a@example.com"}, "wait_seconds": 0}),
        ))
        .await
        .expect("call");
    let id = pending.structured_content.clone().expect("request")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(
        text_of(&pending).contains("await_decision"),
        "{}",
        text_of(&pending)
    );
    assert!(text_of(&pending).contains(&id));
    cli_ok(&app, &["approve", &id, "--as", "cli:alice"]);
    let decided = client
        .call_tool(call("await_decision", json!({"id": id, "wait_seconds": 5})))
        .await
        .expect("await_decision");
    assert_eq!(
        decided.structured_content.clone().expect("request")["status"],
        "approved"
    );

    let executed = client
        .call_tool(call(
            "report_execution",
            json!({"id": id, "outcome": "succeeded"}),
        ))
        .await
        .expect("report_execution");
    assert!(!is_error(&executed), "{}", text_of(&executed));
    assert!(app.stored(&id).await.executed.is_some());
    let kinds = app.audit_kinds(Some(&id)).await;
    assert!(kinds.contains(&"submitted".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"executed".to_string()), "{kinds:?}");

    // Cancel a fresh pending one.
    let another = client
        .call_tool(call(
            "request_approval",
            json!({"action": "email.send", "wait_seconds": 0}),
        ))
        .await
        .expect("call");
    let another_id = another.structured_content.clone().expect("request")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let cancelled = client
        .call_tool(call("cancel_request", json!({"id": another_id})))
        .await
        .expect("cancel");
    assert_eq!(
        cancelled.structured_content.clone().expect("request")["status"],
        "cancelled"
    );
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_input_and_other_agents_ids_are_tool_errors(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let other = app.create_agent("other-bot", &[]).await;
    let theirs = app.submit_id(&other, json!({"action": "email.send"})).await;
    let client = mcp_client(&app, &agent.key).await;

    let missing_action = client
        .call_tool(call("request_approval", json!({"args": {}})))
        .await
        .expect("a result, not a protocol error");
    assert!(is_error(&missing_action));
    assert!(
        text_of(&missing_action).contains("action"),
        "{}",
        text_of(&missing_action)
    );

    let foreign = client
        .call_tool(call(
            "await_decision",
            json!({"id": theirs, "wait_seconds": 0}),
        ))
        .await
        .expect("a result");
    assert!(is_error(&foreign));
    assert!(
        text_of(&foreign).contains("not_found"),
        "{}",
        text_of(&foreign)
    );
    let foreign_cancel = client
        .call_tool(call("cancel_request", json!({"id": theirs})))
        .await
        .expect("a result");
    assert!(is_error(&foreign_cancel));
    assert_eq!(app.stored(&theirs).await.status.as_str(), "pending");
    assert_eq!(app.request_count().await, 1, "nothing was submitted");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_endpoint_refuses_bad_keys_unknown_methods_and_large_bodies(
    #[case] backend: Backend,
) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}});
    let post = |key: Option<&str>, body: &Value| {
        let mut request = app
            .http
            .post(app.url("/mcp"))
            .header("Accept", "application/json, text/event-stream")
            .header("MCP-Protocol-Version", "2025-06-18")
            .json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    for key in [None, Some("not-a-key")] {
        let response = post(key, &initialize).await.expect("answer");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()["www-authenticate"].to_str().unwrap(),
            "Bearer"
        );
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(error_code(&body), "unauthorized");
    }

    let unknown = post(
        Some(&agent.key),
        &json!({"jsonrpc": "2.0", "id": 7, "method": "no/such_method", "params": {}}),
    )
    .await
    .expect("answer");
    let status = unknown.status();
    let body = unknown.text().await.expect("body");
    assert!(status.is_success(), "{status}: {body}");
    assert!(
        body.contains("-32601"),
        "a JSON-RPC method-not-found error: {body}"
    );

    let huge = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "request_approval",
        "arguments": {"action": "email.send", "args": {"blob": "x".repeat(app.config.max_body_bytes)}}}});
    let response = post(Some(&agent.key), &huge).await.expect("answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.request_count().await, 0);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_allowed_calls_and_never_denied_ones(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let proxy = Proxy::start(&app.base_url, &agent.key, &["--wait", "5s"]).await;

    let tools = proxy.client.list_all_tools().await.expect("tools/list");
    let names: Vec<&str> = tools.iter().map(|tool| &*tool.name).collect();
    assert_eq!(
        names,
        ["echo", "get", "send_email", "delete_table", "fail", "crash"]
    );

    // Prompts pass through unchecked: they run nothing.
    let prompts = proxy.client.list_all_prompts().await.expect("prompts/list");
    assert_eq!(prompts.len(), 1);
    let prompt = proxy
        .client
        .get_prompt(GetPromptRequestParams::new("greeting"))
        .await
        .expect("prompts/get");
    assert!(format!("{prompt:?}").contains("hello from the greeting prompt"));
    assert_eq!(app.request_count().await, 0);

    let echoed = proxy.call("echo", json!({"text": "hello"})).await;
    assert!(!is_error(&echoed), "{}", text_of(&echoed));
    assert!(text_of(&echoed).contains("hello"));
    assert_eq!(
        proxy.received(),
        [json!({"tool": "echo", "arguments": {"text": "hello"}})]
    );
    // The receipt is recorded: the approval is used up.
    let echo_id = only_request_for(&app, &agent, "mcp.echo").await;
    eventually(Duration::from_secs(10), || async {
        app.stored(&echo_id).await.executed.is_some().then_some(())
    })
    .await;

    let denied = proxy.call("delete_table", json!({"table": "users"})).await;
    assert!(is_error(&denied));
    let text = text_of(&denied);
    assert!(text.contains("no-drop"), "{text}");
    assert!(text.contains("Dropping tables is never allowed"), "{text}");
    assert_eq!(
        proxy.received().len(),
        1,
        "the denied call never reached the upstream"
    );

    // An upstream isError is recorded as a failed execution.
    let failed = proxy.call("fail", json!({})).await;
    assert!(is_error(&failed));
    let fail_id = only_request_for(&app, &agent, "mcp.fail").await;
    let outcome = eventually(Duration::from_secs(10), || async {
        let executed = app.stored(&fail_id).await.executed?;
        Some(serde_json::to_value(executed).expect("JSON")["outcome"].clone())
    })
    .await;
    assert_eq!(outcome, "failed");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_runs_an_approved_call_with_the_modified_args(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let proxy = Proxy::start(&app.base_url, &agent.key, &["--wait", "30s"]).await;

    let peer = proxy.client.peer().clone();
    let in_flight = tokio::spawn(async move {
        peer.call_tool(call("send_email", json!({"to": "all@example.com"})))
            .await
            .expect("tools/call answers")
    });
    let id = the_one_pending(&app, &agent).await;
    assert!(proxy.received().is_empty(), "nothing runs before approval");
    cli_ok(
        &app,
        &[
            "modify",
            &id,
            "--as",
            "cli:alice",
            "--args",
            r#"{"to":"one@example.com"}"#,
        ],
    );
    // One approval is required: the approver's modification is it.
    let result = in_flight.await.expect("join");
    assert!(!is_error(&result), "{}", text_of(&result));
    assert_eq!(
        proxy.received(),
        [json!({"tool": "send_email", "arguments": {"to": "one@example.com"}})]
    );
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_pending_call_joins_its_request_and_an_approval_runs_once(
    #[case] backend: Backend,
) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let proxy = Proxy::start(&app.base_url, &agent.key, &["--wait", "0.3s"]).await;

    let first = proxy
        .call("send_email", json!({"to": "a@example.com", "n": 1}))
        .await;
    assert!(is_error(&first));
    let id = the_one_pending(&app, &agent).await;
    assert!(text_of(&first).contains(&id), "{}", text_of(&first));
    // Equal arguments in another order: the same call.
    let again = proxy
        .call("send_email", json!({"n": 1, "to": "a@example.com"}))
        .await;
    assert!(is_error(&again));
    assert!(text_of(&again).contains(&id), "{}", text_of(&again));
    assert_eq!(app.request_count().await, 1, "joined, not submitted again");

    cli_ok(&app, &["approve", &id, "--as", "cli:alice"]);
    let ran = proxy
        .call("send_email", json!({"to": "a@example.com", "n": 1}))
        .await;
    assert!(!is_error(&ran), "{}", text_of(&ran));
    assert_eq!(proxy.received().len(), 1);
    assert_eq!(app.request_count().await, 1);

    // The approval is used up: the same call again is a new request.
    let later = proxy
        .call("send_email", json!({"to": "a@example.com", "n": 1}))
        .await;
    assert!(is_error(&later));
    assert_eq!(app.request_count().await, 2);
    assert_eq!(proxy.received().len(), 1);

    // A denial of a joined request reaches the caller with its reason.
    let second_id = pending_ids(&app, &agent).await.pop().expect("pending");
    cli_ok(
        &app,
        &[
            "deny",
            &second_id,
            "--as",
            "cli:alice",
            "--reason",
            "not today",
        ],
    );
    let denied = proxy
        .call("send_email", json!({"to": "a@example.com", "n": 1}))
        .await;
    assert!(is_error(&denied));
    assert!(
        text_of(&denied).contains("not today"),
        "{}",
        text_of(&denied)
    );
    assert_eq!(proxy.received().len(), 1);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_sends_progress_notifications(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let proxy = Proxy::start(
        &app.base_url,
        &agent.key,
        &["--wait", "30s", "--progress-every", "0.2s"],
    )
    .await;
    // rmcp's client gives every request a progress token of its own.
    let params = call("send_email", json!({"to": "b@example.com"}));
    let peer = proxy.client.peer().clone();
    let in_flight = tokio::spawn(async move { peer.call_tool(params).await.expect("answer") });
    let id = the_one_pending(&app, &agent).await;
    let progress = proxy.progress.clone();
    eventually(Duration::from_secs(10), || async {
        let received = progress.received.lock().expect("lock");
        received
            .iter()
            .any(|notification| notification.message.as_deref().unwrap_or("").contains(&id))
            .then_some(())
    })
    .await;
    cli_ok(&app, &["approve", &id, "--as", "cli:alice"]);
    let result = in_flight.await.expect("join");
    assert!(!is_error(&result), "{}", text_of(&result));
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_fails_closed_when_signoff_is_down(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    // A port nothing listens on: a listener bound and dropped.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let proxy = Proxy::start(
        &format!("http://127.0.0.1:{closed_port}"),
        &agent.key,
        &["--wait", "1s"],
    )
    .await;
    assert_eq!(
        proxy
            .client
            .list_all_tools()
            .await
            .expect("tools/list")
            .len(),
        6
    );
    let result = proxy.call("echo", json!({"text": "hi"})).await;
    assert!(is_error(&result));
    assert!(
        text_of(&result).contains("could not be asked"),
        "{}",
        text_of(&result)
    );
    assert!(proxy.received().is_empty(), "nothing reached the upstream");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_stops_with_a_clear_message_when_the_upstream_exits(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let mut proxy = Proxy::start(&app.base_url, &agent.key, &["--wait", "5s"]).await;
    let _ = proxy.client.call_tool(call("crash", json!({}))).await;
    let status = tokio::time::timeout(Duration::from_secs(20), proxy.child.wait())
        .await
        .expect("the proxy exits")
        .expect("exit status");
    assert!(!status.success());
    let mut errors = String::new();
    proxy
        .child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut errors)
        .await
        .expect("read stderr");
    assert!(
        errors.contains("recording server: crashing on purpose"),
        "{errors}"
    );
    assert!(errors.contains("upstream MCP server"), "{errors}");
    assert!(errors.contains("exited"), "{errors}");
}

/// The Python interpreter with the official `mcp` SDK: `SIGNOFF_TEST_PYTHON` (set by
/// .ci/run), else the venv .ci/run makes at target/python-venv. None (with a loud line)
/// when neither has the package; CI must have it.
fn python_with_mcp() -> Option<PathBuf> {
    let candidates = std::env::var_os("SIGNOFF_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([Path::new(env!("CARGO_MANIFEST_DIR")).join("target/python-venv/bin/python")]);
    for python in candidates {
        let has_sdk = std::process::Command::new(&python)
            .args(["-c", "import mcp"])
            .output()
            .is_ok_and(|output| output.status.success());
        if has_sdk {
            return Some(python);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI: no Python with the `mcp` package (set SIGNOFF_TEST_PYTHON or run .ci/run)"
    );
    eprintln!(
        "SKIPPED: the Python MCP SDK interoperability test: no Python with the `mcp` package \
         (python3 -m venv target/python-venv && target/python-venv/bin/pip install mcp)"
    );
    None
}

async fn run_python(python: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_interop.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("run python");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python {args:?} failed:\n{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("\"passed\""), "{printed}");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_mcp_sdk_drives_the_endpoint_and_the_proxy(#[case] backend: Backend) {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("python-bot", &[]).await;
    run_python(&python, &["http", &app.base_url, &agent.key]).await;
    let upstream = recording_server();
    run_python(
        &python,
        &[
            "proxy",
            env!("CARGO_BIN_EXE_signoff"),
            &app.base_url,
            &agent.key,
            upstream.to_str().expect("UTF-8 path"),
        ],
    )
    .await;
}

#[test]
fn the_example_mcp_policy_is_valid() {
    let source = include_str!("../../examples/mcp-policy.yaml");
    if let Err(error) = signoff::policy::Policy::parse(source) {
        panic!("examples/mcp-policy.yaml: {error}");
    }
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_submissions_count_against_the_same_quotas_as_http(#[case] backend: Backend) {
    let mut app = spawn_mcp_app!(backend);
    app.config.max_pending_per_agent = 1;
    app.restart().await;
    let agent = app.create_agent("mcp-bot", &[]).await;
    // One pending over /v1 fills the cap for MCP too.
    app.submit_id(&agent, json!({"action": "email.send"})).await;
    let client = mcp_client(&app, &agent.key).await;
    let refused = client
        .call_tool(call(
            "request_approval",
            json!({"action": "email.send", "args": {"n": 2}, "wait_seconds": 0}),
        ))
        .await
        .expect("a result");
    assert!(is_error(&refused));
    assert!(
        text_of(&refused).contains("too_many_pending"),
        "{}",
        text_of(&refused)
    );
    assert_eq!(app.request_count().await, 1);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_wait_meets_the_long_poll_cap_still_answers_its_id(
    #[case] backend: Backend,
) {
    let mut app = spawn_mcp_app!(backend);
    app.config.max_waiting_per_agent = 1;
    app.restart().await;
    let agent = app.create_agent("mcp-bot", &[]).await;
    let held = app
        .submit_id(&agent, json!({"action": "email.send", "args": {"n": 1}}))
        .await;
    let long_poll = app.spawn_long_poll(&agent, &held, 30);
    app.until_awaited(&held).await;

    let client = mcp_client(&app, &agent.key).await;
    let answered = client
        .call_tool(call(
            "request_approval",
            json!({"action": "email.send", "args": {"n": 2}, "wait_seconds": 5}),
        ))
        .await
        .expect("a result");
    assert!(!is_error(&answered), "{}", text_of(&answered));
    let request = answered.structured_content.clone().expect("request object");
    assert_eq!(request["status"], "pending");
    assert!(text_of(&answered).contains("await_decision"));
    // The long-poll slot is taken: awaiting is refused with the quota's code.
    let refused = client
        .call_tool(call(
            "await_decision",
            json!({"id": request["id"], "wait_seconds": 5}),
        ))
        .await
        .expect("a result");
    assert!(is_error(&refused));
    assert!(
        text_of(&refused).contains("too_many_waiting"),
        "{}",
        text_of(&refused)
    );

    cli_ok(&app, &["approve", &held, "--as", "cli:alice"]);
    let (body, _) = long_poll.await.expect("join");
    assert_eq!(body["status"], "approved");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identical_calls_joining_one_approval_run_it_once(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let proxy = Proxy::start(&app.base_url, &agent.key, &["--wait", "0.3s"]).await;
    let args = json!({"to": "twice@example.com"});
    let first = proxy.call("send_email", args.clone()).await;
    assert!(is_error(&first), "{}", text_of(&first));
    let id = the_one_pending(&app, &agent).await;
    cli_ok(&app, &["approve", &id, "--as", "cli:alice"]);

    // Both join the approved request before either has recorded its receipt.
    let (one, two) = tokio::join!(
        proxy.call("send_email", args.clone()),
        proxy.call("send_email", args.clone())
    );
    assert_eq!(
        proxy.received(),
        [json!({"tool": "send_email", "arguments": args})],
        "one approval, one run"
    );
    let refused: Vec<&CallToolResult> = [&one, &two].into_iter().filter(|r| is_error(r)).collect();
    assert_eq!(refused.len(), 1, "{} / {}", text_of(&one), text_of(&two));
    assert!(
        text_of(refused[0]).contains("Not run"),
        "{}",
        text_of(refused[0])
    );
}

/// A signoff stand-in answering every submission and every poll with a scripted status
/// and body: what the proxy does with answers a real server should never give.
#[derive(Clone, Default)]
struct ScriptedSignoff {
    submit_answer: Arc<Mutex<Answer>>,
    poll_answer: Arc<Mutex<Answer>>,
}

/// An HTTP status and body.
type Answer = (u16, String);

impl ScriptedSignoff {
    async fn start(&self) -> String {
        use axum::http::Method;
        let script = self.clone();
        let router = axum::Router::new().fallback(move |method: Method| {
            let script = script.clone();
            async move {
                let slot = if method == Method::POST {
                    &script.submit_answer
                } else {
                    &script.poll_answer
                };
                let (status, body) = slot.lock().expect("lock").clone();
                (
                    StatusCode::from_u16(status).expect("status"),
                    [("content-type", "application/json")],
                    body,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{address}")
    }

    fn answer(&self, submit: Answer, poll: Answer) {
        *self.submit_answer.lock().expect("lock") = submit;
        *self.poll_answer.lock().expect("lock") = poll;
    }
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_runs_nothing_on_an_answer_it_cannot_trust(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    // Genuine request objects to bend: an allowed echo, approved by the policy...
    let approved = app
        .submit_ok(
            &agent,
            json!({"action": "mcp.echo", "args": {"text": "hi"}}),
        )
        .await;
    // ...a pending one, renamed to the same action...
    let mut pending = app
        .submit_ok(
            &agent,
            json!({"action": "mcp.send_email", "args": {"text": "hi"}}),
        )
        .await;
    pending["action"] = json!("mcp.echo");
    // ...and an approval already used.
    let executed: Value = app
        .http
        .post(app.url(&format!(
            "/v1/requests/{}/execution",
            approved["id"].as_str().expect("id")
        )))
        .bearer_auth(&agent.key)
        .json(&json!({"outcome": "succeeded"}))
        .send()
        .await
        .expect("receipt")
        .json()
        .await
        .expect("JSON");
    assert!(!executed["executed"].is_null(), "{executed}");
    let approved_with = |change: &dyn Fn(&mut Value)| {
        let mut body = approved.clone();
        change(&mut body);
        (201, body.to_string())
    };
    let plain = |status: u16, body: &str| (status, body.to_string());
    let cases: Vec<(&str, Answer, Answer)> = vec![
        (
            "a server error",
            plain(500, r#"{"error":{"code":"internal","message":"boom"}}"#),
            plain(500, "{}"),
        ),
        (
            "rate limited",
            plain(
                429,
                r#"{"error":{"code":"rate_limited","message":"slow down"}}"#,
            ),
            plain(429, "{}"),
        ),
        ("not JSON", plain(200, "<html>hello</html>"), plain(200, "")),
        (
            "not a request",
            plain(201, r#"{"status":"approved"}"#),
            plain(200, "{}"),
        ),
        (
            "another action approved",
            approved_with(&|body| body["action"] = json!("mcp.get")),
            plain(200, "{}"),
        ),
        (
            "approved without a decision",
            approved_with(&|body| body["decision"] = Value::Null),
            plain(200, "{}"),
        ),
        (
            "decision args not an object",
            approved_with(&|body| body["decision"]["args"] = json!("rm -rf /")),
            plain(200, "{}"),
        ),
        (
            "decision args null",
            approved_with(&|body| body["decision"]["args"] = Value::Null),
            plain(200, "{}"),
        ),
        (
            "approval already used",
            (201, executed.to_string()),
            plain(200, "{}"),
        ),
        (
            "the poll answers another request",
            (201, pending.to_string()),
            approved_with(&|body| body["action"] = json!("mcp.echo")),
        ),
    ];
    let scripted = ScriptedSignoff::default();
    let url = scripted.start().await;
    for (case, submit, poll) in cases {
        scripted.answer(submit, poll);
        let proxy = Proxy::start(&url, &agent.key, &["--wait", "2s"]).await;
        let result = proxy.call("echo", json!({"text": "hi"})).await;
        assert!(is_error(&result), "{case}: {}", text_of(&result));
        assert!(
            text_of(&result).contains("Not run"),
            "{case}: {}",
            text_of(&result)
        );
        assert!(proxy.received().is_empty(), "{case}: reached the upstream");
    }
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_never_inherits_the_agent_key(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    let directory = tempfile::tempdir().expect("tempdir");
    let environment = directory.path().join("environment.txt");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
        .args(["mcp-proxy", "--wait", "1s", "--"])
        .arg(recording_server())
        .env("SIGNOFF_URL", &app.base_url)
        .env("SIGNOFF_API_KEY", &agent.key)
        .env("ENVIRONMENT_FILE", &environment)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start signoff mcp-proxy");
    let stdout = child.stdout.take().expect("stdout");
    let stdin = child.stdin.take().expect("stdin");
    let client = ().serve((stdout, stdin)).await.expect("MCP client connects");
    let echoed = client
        .call_tool(call("echo", json!({"text": "hi"})))
        .await
        .expect("tools/call answers");
    assert!(!is_error(&echoed), "{}", text_of(&echoed));
    let inherited = std::fs::read_to_string(&environment).expect("environment file");
    assert!(inherited.contains("SIGNOFF_URL"), "{inherited}");
    assert!(!inherited.contains("SIGNOFF_API_KEY"), "{inherited}");
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let mut errors = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut errors).await;
    }
    assert!(
        !errors.contains(&agent.key),
        "the key in the logs: {errors}"
    );
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mcp_method_needs_the_key_and_odd_bodies_change_nothing(#[case] backend: Backend) {
    let app = spawn_mcp_app!(backend);
    let agent = app.create_agent("mcp-bot", &[]).await;
    for method in [
        reqwest::Method::GET,
        reqwest::Method::DELETE,
        reqwest::Method::PUT,
    ] {
        let response = app
            .http
            .request(method.clone(), app.url("/mcp"))
            .header("Accept", "application/json, text/event-stream")
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method}");
        let with_key = app
            .http
            .request(method.clone(), app.url("/mcp"))
            .bearer_auth(&agent.key)
            .header("Accept", "application/json, text/event-stream")
            .send()
            .await
            .expect("answer");
        let status = with_key.status();
        let body = with_key.text().await.expect("body");
        assert!(status.is_client_error(), "{method}: {status} {body}");
    }

    let submit = |n: u64| {
        json!({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {
            "name": "request_approval",
            "arguments": {"action": "reports.get", "args": {"n": n}, "wait_seconds": 0}}})
    };
    let post = |body: reqwest::Body| {
        app.http
            .post(app.url("/mcp"))
            .bearer_auth(&agent.key)
            .header("Accept", "application/json, text/event-stream")
            .header("Content-Type", "application/json")
            .header("MCP-Protocol-Version", "2025-06-18")
            .body(body)
            .send()
    };
    // A JSON-RPC batch (dropped from the protocol in 2025-06-18).
    let batch = post(json!([submit(1), submit(2)]).to_string().into())
        .await
        .expect("answer");
    let status = batch.status();
    let body = batch.text().await.expect("body");
    assert!(!status.is_server_error(), "{status}: {body}");
    assert_eq!(app.request_count().await, 0, "{status}: {body}");

    // An oversized body streamed without a Content-Length.
    let huge = submit(3).to_string().replace(
        "\"n\":3",
        &format!("\"blob\":\"{}\"", "x".repeat(app.config.max_body_bytes)),
    );
    let status_line = post_chunked(&app.base_url, &agent.key, huge.as_bytes()).await;
    assert!(status_line.contains(" 413 "), "{status_line}");
    assert_eq!(app.request_count().await, 0);

    // Malformed JSON: an error that names no internals.
    let garbage = post("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\":".into())
        .await
        .expect("answer");
    let status = garbage.status();
    let body = garbage.text().await.expect("body");
    assert!(status.is_client_error(), "{status}: {body}");
    assert!(!body.contains("src/") && !body.contains("sqlx"), "{body}");
}

/// POSTs `body` to /mcp with `Transfer-Encoding: chunked` (no Content-Length) over a raw
/// connection; answers the response's status line.
async fn post_chunked(base_url: &str, key: &str, body: &[u8]) -> String {
    use tokio::io::AsyncWriteExt as _;
    let address = base_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
         Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n\
         MCP-Protocol-Version: 2025-06-18\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    for chunk in body.chunks(4096) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        // The server may answer and close before the whole body is sent.
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}
