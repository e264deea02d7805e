//! `signoff mcp-proxy`: a stdio MCP gateway in front of an upstream MCP server (a child
//! process). Tools are offered unchanged; every call is first submitted to signoff as
//! `prefix + tool` and reaches the upstream only once allowed or approved. It fails
//! closed: when signoff cannot be asked, nothing is forwarded.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CompleteRequestParams, CompleteResult,
    ContentBlock, GetPromptRequestParams, GetPromptResponse, ListPromptsResult,
    ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, ProgressToken, ReadResourceRequestParams, ReadResourceResponse,
    ResourceUpdatedNotificationParam, ServerConfig,
};
use rmcp::service::{NotificationContext, RequestContext, RunningService, ServiceError};
use rmcp::transport::{stdio, TokioChildProcess};
use rmcp::ServiceExt as _;
use rmcp::{ClientHandler, ErrorData as McpError, Peer, RoleClient, RoleServer, ServerHandler};
use serde_json::{json, Map, Value};

use crate::client::SignoffClient;
use crate::domain::{action_hash, ApprovalRequest, Status};

pub struct ProxyOptions {
    pub url: String,
    pub key: String,
    pub prefix: String,
    /// How long one call waits for people to decide.
    pub wait: Duration,
    /// How often a waiting call reports progress to a client that asked for it.
    pub progress_every: Duration,
    pub command: Vec<String>,
}

/// Runs the proxy until the client closes stdin (Ok) or the upstream exits (an error
/// naming it).
pub async fn run(options: ProxyOptions) -> anyhow::Result<()> {
    let (program, arguments) = options
        .command
        .split_first()
        .context("mcp-proxy needs the upstream server's command after --")?;
    let signoff = SignoffClient::new(&options.url, &options.key)?;
    let mut command = tokio::process::Command::new(program);
    command.args(arguments);
    // The upstream runs whatever the agent asks of it: it must not find the agent's key
    // in its environment and talk to signoff itself.
    command.env_remove("SIGNOFF_API_KEY");
    // Upstream stderr is inherited: its logs appear on the proxy's stderr.
    let transport = TokioChildProcess::new(command)
        .with_context(|| format!("cannot start the upstream MCP server {program:?}"))?;
    let downstream_slot = Arc::new(OnceLock::new());
    let upstream = UpstreamEvents {
        downstream: downstream_slot.clone(),
    }
    .serve(transport)
    .await
    .with_context(|| format!("the upstream MCP server {program:?} did not initialize"))?;
    // The client sees the upstream's capabilities, name and instructions.
    let upstream_info = match upstream.peer_info() {
        Some(info) => {
            let mut config = ServerConfig::new(info.capabilities.clone());
            if let Some(implementation) = &info.server_info {
                config = config.with_server_info(implementation.clone());
            }
            if let Some(instructions) = &info.instructions {
                config = config.with_instructions(instructions.clone());
            }
            config
        }
        None => ServerConfig::default(),
    };
    let gateway = Gateway {
        upstream: upstream.peer().clone(),
        upstream_info,
        signoff,
        prefix: options.prefix,
        wait: options.wait,
        progress_every: options.progress_every,
        joinable: Arc::new(Mutex::new(HashMap::new())),
        used_approvals: Arc::new(Mutex::new(HashSet::new())),
    };
    let downstream = gateway
        .serve(stdio())
        .await
        .context("the MCP client did not initialize")?;
    let _ = downstream_slot.set(downstream.peer().clone());
    finish(upstream, downstream, program).await
}

async fn finish(
    upstream: RunningService<RoleClient, UpstreamEvents>,
    downstream: RunningService<RoleServer, Gateway>,
    program: &str,
) -> anyhow::Result<()> {
    let upstream_token = upstream.cancellation_token();
    let downstream_token = downstream.cancellation_token();
    let upstream_done = tokio::spawn(upstream.waiting());
    tokio::select! {
        _ = downstream.waiting() => {
            // The client went away: stop the upstream too.
            upstream_token.cancel();
            Ok(())
        }
        _ = upstream_done => {
            downstream_token.cancel();
            anyhow::bail!("the upstream MCP server {program:?} exited; the proxy stops with it")
        }
    }
}

/// What the upstream sends on its own (notifications), passed to the client unchanged.
#[derive(Clone)]
struct UpstreamEvents {
    downstream: Arc<OnceLock<Peer<RoleServer>>>,
}

impl UpstreamEvents {
    fn downstream(&self) -> Option<&Peer<RoleServer>> {
        self.downstream.get()
    }
}

impl ClientHandler for UpstreamEvents {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_progress(params).await;
        }
    }

    #[allow(deprecated)]
    async fn on_logging_message(
        &self,
        params: rmcp::model::LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_logging_message(params).await;
        }
    }

    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_resource_updated(params).await;
        }
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_resource_list_changed().await;
        }
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_tool_list_changed().await;
        }
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        if let Some(peer) = self.downstream() {
            let _ = peer.notify_prompt_list_changed().await;
        }
    }
}

/// The server the MCP client talks to.
#[derive(Clone)]
struct Gateway {
    upstream: Peer<RoleClient>,
    upstream_info: ServerConfig,
    signoff: SignoffClient,
    prefix: String,
    wait: Duration,
    progress_every: Duration,
    /// Calls whose request was still pending when the wait ran out, by action hash: the
    /// same call again joins that request instead of submitting another.
    joinable: Arc<Mutex<HashMap<String, String>>>,
    /// Approved requests a call has already run: two identical calls that joined one
    /// request both see it approved (its receipt is recorded later), and only the first
    /// to claim it may run it.
    used_approvals: Arc<Mutex<HashSet<String>>>,
}

fn upstream_error(error: ServiceError) -> McpError {
    match error {
        ServiceError::McpError(error) => error,
        other => McpError::internal_error(format!("the upstream MCP server failed: {other}"), None),
    }
}

/// Refuses an answer that is not about this call: another request than the one asked
/// about, or another action. Such an answer decides nothing.
fn check_answer(
    request: &ApprovalRequest,
    expected_id: Option<&str>,
    action: &str,
) -> anyhow::Result<()> {
    if expected_id.is_some_and(|id| id != request.id) {
        anyhow::bail!(
            "signoff answered about request {} instead of {}",
            request.id,
            expected_id.unwrap_or_default()
        );
    }
    if request.action != action {
        anyhow::bail!(
            "signoff answered about the action {:?} (request {})",
            request.action,
            request.id
        );
    }
    Ok(())
}

/// The arguments an approved request says to run: its decision's, which must be an
/// object, and only while no execution is recorded.
fn approved_arguments(request: &ApprovalRequest) -> Result<Map<String, Value>, &'static str> {
    if request.executed.is_some() {
        return Err("its approval is already used");
    }
    match request.decision.as_ref().map(|decision| &decision.args) {
        Some(Value::Object(arguments)) => Ok(arguments.clone()),
        Some(_) => Err("its decision's args are not an object"),
        None => Err("the answer carries no decision"),
    }
}

fn refusal(text: String, request: Option<&ApprovalRequest>) -> CallToolResult {
    let mut result = match request.and_then(|request| serde_json::to_value(request).ok()) {
        Some(value) => CallToolResult::structured_error(value),
        None => CallToolResult::error(Vec::new()),
    };
    result.content = vec![ContentBlock::text(text)];
    result
}

impl Gateway {
    fn remember(&self, hash: &str, id: &str) {
        if let Ok(mut joinable) = self.joinable.lock() {
            joinable.insert(hash.to_string(), id.to_string());
        }
    }

    fn forget(&self, hash: &str) {
        if let Ok(mut joinable) = self.joinable.lock() {
            joinable.remove(hash);
        }
    }

    fn joinable_request(&self, hash: &str) -> Option<String> {
        self.joinable.lock().ok()?.get(hash).cloned()
    }

    /// True for the one call that may run this approval; false once another call has
    /// (or when the set cannot be read: then nobody runs it).
    fn claim_approval(&self, id: &str) -> bool {
        self.used_approvals
            .lock()
            .is_ok_and(|mut used| used.insert(id.to_string()))
    }

    fn approval_used(&self, id: &str) -> bool {
        self.used_approvals
            .lock()
            .map_or(true, |used| used.contains(id))
    }

    /// The request this call is judged by: an earlier one still open for the same call,
    /// else a new submission; then waited on up to `--wait`.
    async fn decide(
        &self,
        action: &str,
        args: &Value,
        hash: &str,
        progress: Option<(&Peer<RoleServer>, ProgressToken)>,
    ) -> anyhow::Result<ApprovalRequest> {
        let earlier = match self.joinable_request(hash) {
            Some(id) if !self.approval_used(&id) => {
                let request = self.signoff.poll(&id, Duration::ZERO).await?;
                check_answer(&request, Some(&id), action)?;
                Some(request)
            }
            _ => None,
        };
        let request = match earlier {
            // An earlier approval already used: this is a new call.
            Some(request) if request.executed.is_none() => request,
            _ => {
                self.forget(hash);
                let body = json!({"action": action, "args": args});
                let request = self.signoff.submit(&body, None).await?;
                check_answer(&request, None, action)?;
                request
            }
        };
        let id = request.id.clone();
        let decided = match progress {
            None => self.signoff.wait_for_decision(request, self.wait).await?,
            Some((peer, token)) => self.wait_with_progress(request, peer, token).await?,
        };
        check_answer(&decided, Some(&id), action)?;
        Ok(decided)
    }

    /// Long-polls in steps of `progress_every`, telling the client after each step.
    async fn wait_with_progress(
        &self,
        mut request: ApprovalRequest,
        peer: &Peer<RoleServer>,
        token: ProgressToken,
    ) -> anyhow::Result<ApprovalRequest> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.wait;
        while !request.status.is_final() {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                break;
            }
            request = self
                .signoff
                .poll(
                    &request.id,
                    remaining.min(self.progress_every.max(Duration::from_millis(100))),
                )
                .await?;
            if !request.status.is_final() {
                let waited = started.elapsed().as_secs_f64();
                let _ = peer
                    .notify_progress(
                        ProgressNotificationParam::new(token.clone(), waited)
                            .with_total(self.wait.as_secs_f64())
                            .with_message(format!(
                                "waiting for approval of {} ({:.0} s so far)",
                                request.id, waited
                            )),
                    )
                    .await;
            }
        }
        Ok(request)
    }

    async fn gated_call(
        &self,
        mut call: CallToolRequestParams,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let action = format!("{}{}", self.prefix, call.name);
        let args = Value::Object(call.arguments.clone().unwrap_or_default());
        let hash = action_hash(&action, &args);
        let progress = context
            .meta
            .get_progress_token()
            .map(|token| (&context.peer, token));
        let request = match self.decide(&action, &args, &hash, progress).await {
            Ok(request) => request,
            Err(error) => {
                return Ok(refusal(
                    format!(
                        "Not run: signoff at {} could not be asked about {action} ({error:#}). \
                         Nothing was sent to the tool.",
                        self.signoff.url()
                    ),
                    None,
                ))
            }
        };
        let rule = request.rule.as_deref().unwrap_or("none");
        let reason = request
            .decision
            .as_ref()
            .and_then(|decision| decision.reason.as_deref())
            .unwrap_or("no reason given");
        match request.status {
            Status::Approved => {
                self.forget(&hash);
                // An approver's modification is what the tool receives; an approval that
                // names no arguments to run, or was already run, runs nothing.
                let decided_args = match approved_arguments(&request) {
                    Ok(arguments) => arguments,
                    Err(problem) => {
                        return Ok(refusal(
                            format!(
                                "Not run: signoff approved {action} (request {id}) but {problem}. \
                                 Nothing was sent to the tool.",
                                id = request.id
                            ),
                            Some(&request),
                        ))
                    }
                };
                if !self.claim_approval(&request.id) {
                    return Ok(refusal(
                        format!(
                            "Not run: the approval of {action} (request {id}) was used by an \
                             identical call made at the same time; an approval runs once. Call \
                             the tool again to ask for a new approval.",
                            id = request.id
                        ),
                        Some(&request),
                    ));
                }
                call.arguments = Some(decided_args);
                let result = self.upstream.call_tool(call).await;
                let outcome = match &result {
                    Ok(result) if result.is_error != Some(true) => "succeeded",
                    _ => "failed",
                };
                // The receipt is recorded in the background: the caller need not wait.
                let signoff = self.signoff.clone();
                let id = request.id.clone();
                tokio::spawn(async move {
                    if let Err(error) = signoff.report_execution(&id, outcome, Value::Null).await {
                        tracing::warn!(request_id = %id, error = format!("{error:#}"), "execution receipt not recorded");
                    }
                });
                result.map_err(upstream_error)
            }
            Status::Pending => {
                self.remember(&hash, &request.id);
                Ok(refusal(
                    format!(
                        "Not run yet: {action} is still waiting for approval (request {id}, \
                         rule: {rule}). Call the tool again with the same arguments to wait \
                         for that request's decision.",
                        id = request.id
                    ),
                    Some(&request),
                ))
            }
            Status::Denied | Status::Expired | Status::Cancelled => {
                self.forget(&hash);
                Ok(refusal(
                    format!(
                        "Not run: {action} was {outcome} (rule: {rule}; reason: {reason}; \
                         request {id}).",
                        outcome = request.status.as_str(),
                        id = request.id
                    ),
                    Some(&request),
                ))
            }
        }
    }
}

impl ServerHandler for Gateway {
    fn get_info(&self) -> ServerConfig {
        self.upstream_info.clone()
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        self.upstream
            .list_tools(request)
            .await
            .map_err(upstream_error)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        self.gated_call(request, &context).await.map(Into::into)
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        self.upstream
            .list_resources(request)
            .await
            .map_err(upstream_error)
    }

    async fn list_resource_templates(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        self.upstream
            .list_resource_templates(request)
            .await
            .map_err(upstream_error)
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        self.upstream
            .read_resource_once(request)
            .await
            .map_err(upstream_error)
    }

    async fn list_prompts(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        self.upstream
            .list_prompts(request)
            .await
            .map_err(upstream_error)
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        self.upstream
            .get_prompt_once(request)
            .await
            .map_err(upstream_error)
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, McpError> {
        self.upstream
            .complete(request)
            .await
            .map_err(upstream_error)
    }

    async fn on_roots_list_changed(&self, _context: NotificationContext<RoleServer>) {
        let _ = self.upstream.notify_roots_list_changed().await;
    }
}
