//! The approval tools agents call over MCP at `POST /mcp`: the /v1 use cases as five tools
//! whose results carry the request object and a sentence telling a model what to do.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::common::schema_for_type;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig,
    Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::domain::{ApprovalRequest, ExecutionOutcome, RequestContext as ActionContext, Status};
use crate::engine::{Engine, EngineError, Submission, Submitted};
use crate::http::ApiError;
use crate::store::AgentRecord;

/// How long `request_approval` and `await_decision` wait when not told.
const DEFAULT_WAIT_SECONDS: f64 = 45.0;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestApprovalInput {
    /// What the agent wants to do: letters, digits and `. _ - : /`, e.g. `payments.refund`.
    action: String,
    /// The action's arguments, a JSON object; `{}` when left out.
    #[serde(default)]
    args: Option<Map<String, Value>>,
    /// Evidence for approvers: `summary`, `reason`, `reversible`, `links`, and any other
    /// field, visible to policy conditions.
    #[serde(default)]
    context: Option<Map<String, Value>>,
    /// The person the agent acts for, a principal such as `email:…`; they cannot approve.
    #[serde(default)]
    on_behalf_of: Option<String>,
    /// Seconds to wait for people to decide, 0 to 55 (default 45).
    #[serde(default)]
    wait_seconds: Option<f64>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwaitDecisionInput {
    /// The request id, `apr_…`.
    id: String,
    /// Seconds to wait while the request is pending, 0 to 55 (default 45).
    #[serde(default)]
    wait_seconds: Option<f64>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckPolicyInput {
    /// The action to evaluate, e.g. `payments.refund`.
    action: String,
    /// The action's arguments, a JSON object.
    #[serde(default)]
    args: Option<Map<String, Value>>,
    /// Visible to policy conditions as `context`.
    #[serde(default)]
    context: Option<Map<String, Value>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportedOutcome {
    Succeeded,
    Failed,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportExecutionInput {
    /// The id of the approved request that was executed.
    id: String,
    /// Whether the execution worked.
    outcome: ReportedOutcome,
    /// Anything worth keeping about the execution.
    #[serde(default)]
    detail: Option<Value>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequestInput {
    /// The id of the pending request to cancel.
    id: String,
}

/// The tool server; one per HTTP request (stateless), so it only holds the engine.
#[derive(Clone)]
pub struct ApprovalTools {
    engine: Engine,
}

/// A tool's failure the model should read: an `isError` result with a code and message.
struct ToolFailure(ApiError);

impl From<EngineError> for ToolFailure {
    fn from(error: EngineError) -> Self {
        Self(error.into())
    }
}

fn invalid(message: impl Into<String>) -> ToolFailure {
    ToolFailure(ApiError::bad_request("invalid_request", message))
}

impl ToolFailure {
    fn into_result(self) -> CallToolResult {
        let ToolFailure(error) = self;
        let mut result = CallToolResult::structured_error(
            json!({"error": {"code": error.code, "message": error.message}}),
        );
        result.content = vec![ContentBlock::text(format!(
            "Error ({}): {}",
            error.code, error.message
        ))];
        result
    }
}

impl ApprovalTools {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }

    /// The five tools, their input schemas generated from the input types above.
    pub fn tools() -> Vec<Tool> {
        vec![
            Tool::new(
                "request_approval",
                "Ask for approval before doing an action. Waits up to wait_seconds for the \
                 outcome. Approved: execute decision.args (not your own args), then call \
                 report_execution. Denied, expired or cancelled: do not do it. Still \
                 pending: call await_decision with the id.",
                schema_for_type::<RequestApprovalInput>(),
            ),
            Tool::new(
                "await_decision",
                "Wait for a pending request's decision; answers the request as it stands \
                 when wait_seconds pass.",
                schema_for_type::<AwaitDecisionInput>(),
            ),
            Tool::new(
                "check_policy",
                "What the policy would say about an action (allow, deny or require_approval \
                 and the rule), without asking anyone or storing anything.",
                schema_for_type::<CheckPolicyInput>(),
            ),
            Tool::new(
                "report_execution",
                "Report that an approved action was executed (succeeded or failed). Accepted \
                 once: the approval is then used up.",
                schema_for_type::<ReportExecutionInput>(),
            ),
            Tool::new(
                "cancel_request",
                "Cancel a pending request you no longer need.",
                schema_for_type::<CancelRequestInput>(),
            ),
        ]
    }

    async fn request_approval(
        &self,
        agent: &AgentRecord,
        input: RequestApprovalInput,
    ) -> Result<CallToolResult, ToolFailure> {
        let wait = wait_duration(input.wait_seconds)?;
        let context = input
            .context
            .map(|context| serde_json::from_value::<ActionContext>(Value::Object(context)))
            .transpose()
            .map_err(|error| invalid(format!("context: {error}")))?;
        let submission = Submission::from_agent(
            input.action,
            input.args.map(Value::Object),
            context,
            input.on_behalf_of.as_deref(),
            None,
        )?;
        let request = match self.engine.submit_request(agent, submission, None).await? {
            Submitted::Created(request) => *request,
            // Only with an Idempotency-Key, which MCP submissions never carry.
            Submitted::Replayed(answer) => serde_json::from_value(answer)
                .map_err(|error| EngineError::Internal(error.into()))?,
        };
        if request.status != Status::Pending || wait.is_zero() {
            return Ok(request_result(&request));
        }
        match self
            .engine
            .wait_for_decision(&agent.name, &request.id, wait)
            .await
        {
            Ok(decided) => Ok(request_result(&decided)),
            // The request exists: answer it as it stands (pending, with its id to await)
            // rather than an error that would lose the id.
            Err(EngineError::Quota(_)) => Ok(request_result(&request)),
            Err(error) => Err(error.into()),
        }
    }

    async fn await_decision(
        &self,
        agent: &AgentRecord,
        input: AwaitDecisionInput,
    ) -> Result<CallToolResult, ToolFailure> {
        let wait = wait_duration(input.wait_seconds)?;
        let request = if wait.is_zero() {
            self.engine
                .request_for_agent(&agent.name, &input.id)
                .await?
        } else {
            self.engine
                .wait_for_decision(&agent.name, &input.id, wait)
                .await?
        };
        Ok(request_result(&request))
    }

    fn check_policy(
        &self,
        agent: &AgentRecord,
        input: CheckPolicyInput,
    ) -> Result<CallToolResult, ToolFailure> {
        let args = Value::Object(input.args.unwrap_or_default());
        let context = Value::Object(input.context.unwrap_or_default());
        let verdict = self
            .engine
            .check_agent_input(&agent.name, &input.action, &args, &context)?;
        let policy = self.engine.policy();
        let explanation = serde_json::to_value(verdict.explain(policy.hash()))
            .map_err(|error| EngineError::Internal(error.into()))?;
        let effect = explanation["effect"].as_str().unwrap_or("unknown");
        let rule = explanation["rule"].as_str().unwrap_or("none");
        let text = format!(
            "The policy says {effect} for {action} (rule: {rule}). Nothing was stored; call \
             request_approval to ask.",
            action = input.action
        );
        Ok(structured(explanation, text))
    }

    async fn report_execution(
        &self,
        agent: &AgentRecord,
        input: ReportExecutionInput,
    ) -> Result<CallToolResult, ToolFailure> {
        let outcome = match input.outcome {
            ReportedOutcome::Succeeded => ExecutionOutcome::Succeeded,
            ReportedOutcome::Failed => ExecutionOutcome::Failed,
        };
        let request = self
            .engine
            .record_execution(
                &agent.name,
                &input.id,
                outcome,
                input.detail.unwrap_or(Value::Null),
            )
            .await?;
        Ok(request_result(&request))
    }

    async fn cancel_request(
        &self,
        agent: &AgentRecord,
        input: CancelRequestInput,
    ) -> Result<CallToolResult, ToolFailure> {
        let request = self.engine.cancel_request(&agent.name, &input.id).await?;
        Ok(request_result(&request))
    }

    async fn dispatch(
        &self,
        agent: &AgentRecord,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<CallToolResult, ToolFailure> {
        match name {
            "request_approval" => self.request_approval(agent, parse(arguments)?).await,
            "await_decision" => self.await_decision(agent, parse(arguments)?).await,
            "check_policy" => self.check_policy(agent, parse(arguments)?),
            "report_execution" => self.report_execution(agent, parse(arguments)?).await,
            "cancel_request" => self.cancel_request(agent, parse(arguments)?).await,
            _ => Err(invalid(format!("no tool named {name:?}"))),
        }
    }
}

fn parse<T: DeserializeOwned>(arguments: Map<String, Value>) -> Result<T, ToolFailure> {
    serde_json::from_value(Value::Object(arguments)).map_err(|error| invalid(error.to_string()))
}

fn wait_duration(seconds: Option<f64>) -> Result<Duration, ToolFailure> {
    let seconds = seconds.unwrap_or(DEFAULT_WAIT_SECONDS);
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(invalid(format!(
            "wait_seconds must be a number of seconds from 0 to 55, not {seconds}"
        )));
    }
    Ok(Duration::from_secs_f64(
        seconds.min(crate::http::MAX_WAIT_SECONDS),
    ))
}

fn structured(value: Value, text: String) -> CallToolResult {
    let mut result = CallToolResult::structured(value);
    result.content = vec![ContentBlock::text(text)];
    result
}

/// The request object as `structuredContent`, and what a model should do next.
pub fn request_result(request: &ApprovalRequest) -> CallToolResult {
    let value = serde_json::to_value(request).unwrap_or(Value::Null);
    structured(value, describe(request))
}

/// One paragraph naming the outcome, rule, reason and request id, and the next step.
pub fn describe(request: &ApprovalRequest) -> String {
    let id = &request.id;
    let rule = request.rule.as_deref().unwrap_or("none");
    let reason = request
        .decision
        .as_ref()
        .and_then(|decision| decision.reason.as_deref())
        .unwrap_or("no reason given");
    if request.executed.is_some() {
        return format!(
            "Request {id} ({action}) was approved and its execution is recorded; the approval \
             is used up.",
            action = request.action
        );
    }
    match request.status {
        Status::Approved => format!(
            "Approved (rule: {rule}; reason: {reason}). Execute {action} with decision.args \
             (an approver may have changed them), then call report_execution with id {id}.",
            action = request.action
        ),
        Status::Pending => format!(
            "Pending: waiting for {required} approval(s) (rule: {rule}). Do not execute yet; \
             call await_decision with id {id}.",
            required = request.approvals_required
        ),
        Status::Denied | Status::Expired | Status::Cancelled => format!(
            "{outcome} (rule: {rule}; reason: {reason}). Do not execute {action}. Request id \
             {id}.",
            outcome = capitalised(request.status.as_str()),
            action = request.action
        ),
    }
}

fn capitalised(word: &str) -> String {
    let mut characters = word.chars();
    characters
        .next()
        .map(|first| first.to_uppercase().chain(characters).collect())
        .unwrap_or_default()
}

impl ServerHandler for ApprovalTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("signoff", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Ask signoff before consequential actions: call request_approval, and execute \
                 only what an approved request's decision.args say.",
            )
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        // 2025-06-18 and later.
        Cow::Owned(
            ProtocolVersion::KNOWN_VERSIONS
                .iter()
                .filter(|version| version.as_str() >= ProtocolVersion::V_2025_06_18.as_str())
                .cloned()
                .collect(),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(Self::tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        // Put there by the authentication layer in front of the MCP service.
        let agent = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Arc<AgentRecord>>())
            .cloned()
            .ok_or_else(|| McpError::internal_error("no authenticated agent", None))?;
        let arguments = request.arguments.unwrap_or_default();
        let result = self
            .dispatch(&agent, &request.name, arguments)
            .await
            .unwrap_or_else(ToolFailure::into_result);
        Ok(result.into())
    }
}
