//! The /v1 routes agents call: submit, read (with long-poll), list, cancel, report execution, check.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState, AuthenticatedAgent, ErrorBody, JsonBody, SubmittingAgent};
use crate::domain::{ApprovalRequest, ExecutionOutcome, RequestContext, Status};
use crate::engine::{Submission, Submitted};
use crate::policy::Explanation;
use crate::store::RequestFilter;

/// The longest long-poll, under common 60 s proxy timeouts.
pub const MAX_WAIT_SECONDS: f64 = 55.0;

fn empty_object() -> Value {
    json!({})
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// Letters, digits and `. _ - : /`, up to 200 characters, e.g. `payments.refund`.
    #[schema(example = "payments.refund")]
    action: String,
    /// A JSON object; `{}` when left out.
    #[serde(default)]
    #[schema(value_type = Object)]
    args: Option<Value>,
    /// Evidence for approvers; `null` is the same as leaving it out.
    #[serde(default)]
    context: Option<RequestContext>,
    /// The person the agent acts for: `slack:U…`, `email:…`, `teams:…` or `cli:…`. They
    /// cannot approve the request.
    #[serde(default)]
    #[schema(example = "slack:U0XYZ")]
    on_behalf_of: Option<String>,
    /// Where the final decision is sent as a Standard Webhooks event: https, or http to a
    /// loopback address.
    #[serde(default)]
    callback_url: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/requests",
    tag = "requests",
    operation_id = "submit_request",
    summary = "Submit an action for approval",
    description = "Evaluates the policy: allowed and denied actions come back final, the others \
        pending until people decide.",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false,
            description = "Same key and body answers the same again; a different body 422 \
                `idempotency_mismatch`; a retry while the first is in flight 409 \
                `idempotency_in_flight`. Per agent, kept at least 24 h."),
    ),
    request_body = SubmitBody,
    responses(
        (status = 201, description = "The request object", body = ApprovalRequest),
        (status = 400, description = "`invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`idempotency_in_flight`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 422, description = "`idempotency_mismatch`", body = ErrorBody),
        (status = 429, description = "`too_many_pending` or `rate_limited` (with `Retry-After`, \
            seconds): per-agent quotas", body = ErrorBody),
    ),
)]
pub async fn submit_request(
    State(state): State<AppState>,
    SubmittingAgent(agent): SubmittingAgent,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Result<Response, ApiError> {
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|value| {
            value.to_str().map(str::to_string).map_err(|_| {
                ApiError::bad_request("invalid_request", "Idempotency-Key must be printable ASCII")
            })
        })
        .transpose()?;
    let submission = Submission::from_agent(
        body.action,
        body.args,
        body.context,
        body.on_behalf_of.as_deref(),
        body.callback_url,
    )?;
    // Serialised straight from the request: no intermediate `Value` tree per answer.
    let answer = match state
        .engine
        .submit_request(&agent, submission, idempotency_key)
        .await?
    {
        Submitted::Created(request) => (StatusCode::CREATED, Json(request)).into_response(),
        Submitted::Replayed(response) => (StatusCode::CREATED, Json(response)).into_response(),
    };
    Ok(answer)
}

#[utoipa::path(
    get,
    path = "/v1/requests/{id}",
    tag = "requests",
    operation_id = "get_request",
    summary = "Read a request, optionally waiting for its decision",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The request id, `apr_…`"),
        ("wait" = Option<f64>, Query, minimum = 0,
            description = "Seconds to long-poll while the request is pending; at most 55 \
                (larger values are capped). The only query parameter accepted."),
    ),
    responses(
        (status = 200, description = "The request object", body = ApprovalRequest),
        (status = 400, description = "`invalid_request`: a bad query", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: unknown id, or another agent's request", body = ErrorBody),
        (status = 429, description = "`too_many_waiting`: the agent's concurrent long-polls are \
            at their limit", body = ErrorBody),
    ),
)]
pub async fn get_request(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let wait = wait_from_query(query.as_deref())?;
    let request = match wait {
        Some(wait) if !wait.is_zero() => {
            state
                .engine
                .wait_for_decision(&agent.name, &id, wait)
                .await?
        }
        _ => state.engine.request_for_agent(&agent.name, &id).await?,
    };
    Ok(Json(request).into_response())
}

/// `?wait=SECONDS`, at most 55; anything else in the query is an error.
fn wait_from_query(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(query) = query.filter(|query| !query.is_empty()) else {
        return Ok(None);
    };
    let mut wait = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "wait" {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("unknown query parameter {name:?}; only wait=SECONDS is accepted"),
            ));
        }
        let seconds: f64 = value
            .parse()
            .ok()
            .filter(|seconds: &f64| seconds.is_finite() && *seconds >= 0.0)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_request",
                    format!("wait must be a number of seconds from 0 to 55, not {value:?}"),
                )
            })?;
        wait = Some(Duration::from_secs_f64(seconds.min(MAX_WAIT_SECONDS)));
    }
    Ok(wait)
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only requests in this status.
    #[param(value_type = Option<Status>)]
    status: Option<String>,
    /// At most this many (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// The agent's own requests, oldest first; `?status=pending` and `?limit=N` narrow it.
#[utoipa::path(
    get,
    path = "/v1/requests",
    tag = "requests",
    operation_id = "list_requests",
    summary = "List the agent's own requests, oldest first",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "The request objects", body = Vec<ApprovalRequest>),
        (status = 400, description = "`invalid_request`: a bad query", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ),
)]
pub async fn list_requests(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query
        .map_err(|rejection| ApiError::bad_request("invalid_request", rejection.body_text()))?;
    let status = query
        .status
        .map(|text| {
            Status::parse(&text).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_request",
                    format!("status {text:?} is not one of pending, approved, denied, expired, cancelled"),
                )
            })
        })
        .transpose()?;
    let requests = state
        .engine
        .list_requests(RequestFilter {
            status,
            agent: Some(agent.name),
            limit: query.limit.unwrap_or(100).clamp(1, 1000),
        })
        .await?;
    Ok(Json(requests).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/requests/{id}/cancel",
    tag = "requests",
    operation_id = "cancel_request",
    summary = "Cancel a pending request",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The request id, `apr_…`")),
    responses(
        (status = 200, description = "The cancelled request object", body = ApprovalRequest),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`not_pending`: already final", body = ErrorBody),
    ),
)]
pub async fn cancel_request(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let request = state.engine.cancel_request(&agent.name, &id).await?;
    Ok(Json(request).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutionBody {
    outcome: ExecutionOutcome,
    /// Anything worth keeping about the execution.
    #[serde(default)]
    detail: Value,
}

#[utoipa::path(
    post,
    path = "/v1/requests/{id}/execution",
    tag = "requests",
    operation_id = "record_execution",
    summary = "Report that an approved action was executed",
    description = "Accepted once, for approved requests only: the approval is consumed.",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The request id, `apr_…`")),
    request_body = ExecutionBody,
    responses(
        (status = 200, description = "The request object with `executed` set", body = ApprovalRequest),
        (status = 400, description = "`invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`not_approved` or `already_executed`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
    ),
)]
pub async fn record_execution(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExecutionBody>,
) -> Result<Response, ApiError> {
    let request = state
        .engine
        .record_execution(&agent.name, &id, body.outcome, body.detail)
        .await?;
    Ok(Json(request).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    #[schema(example = "payments.refund")]
    action: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    args: Value,
    /// Visible to `when` conditions as `context`.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    context: Value,
}

/// The verdict the policy would give, without storing anything.
#[utoipa::path(
    post,
    path = "/v1/check",
    tag = "policy",
    operation_id = "check_policy",
    summary = "Evaluate the policy without storing a request",
    security(("bearer" = [])),
    request_body = CheckBody,
    responses(
        (status = 200, description = "The verdict and every matching rule", body = Explanation),
        (status = 400, description = "`invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
    ),
)]
pub async fn check_policy(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    JsonBody(body): JsonBody<CheckBody>,
) -> Result<Response, ApiError> {
    let verdict =
        state
            .engine
            .check_agent_input(&agent.name, &body.action, &body.args, &body.context)?;
    Ok(Json(verdict.explain(state.engine.policy().hash())).into_response())
}
