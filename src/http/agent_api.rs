//! The /v1 routes agents call: submit, read (with long-poll), list, cancel, report execution, check.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState, AuthenticatedAgent, JsonBody};
use crate::domain::{ExecutionOutcome, Principal, RequestContext, Status};
use crate::engine::{Submission, Submitted};
use crate::store::RequestFilter;

/// The longest long-poll, under common 60 s proxy timeouts.
const MAX_WAIT_SECONDS: f64 = 55.0;

fn empty_object() -> Value {
    json!({})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    action: String,
    #[serde(default = "empty_object")]
    args: Value,
    #[serde(default)]
    context: RequestContext,
    #[serde(default)]
    on_behalf_of: Option<String>,
    #[serde(default)]
    callback_url: Option<String>,
}

pub async fn submit_request(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
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
    let on_behalf_of = body
        .on_behalf_of
        .map(|text| text.parse::<Principal>())
        .transpose()
        .map_err(|error| {
            ApiError::bad_request("invalid_request", format!("on_behalf_of: {error}"))
        })?;
    let submission = Submission {
        action: body.action,
        args: body.args,
        context: body.context,
        on_behalf_of,
        callback_url: body.callback_url,
    };
    let answer = match state
        .engine
        .submit_request(&agent, submission, idempotency_key)
        .await?
    {
        Submitted::Created(request) => (StatusCode::CREATED, Json(json!(request))),
        Submitted::Replayed(response) => (StatusCode::CREATED, Json(response)),
    };
    Ok(answer.into_response())
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
}

/// The agent's own requests, oldest first; `?status=pending` and `?limit=N` narrow it.
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

pub async fn cancel_request(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let request = state.engine.cancel_request(&agent.name, &id).await?;
    Ok(Json(request).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionBody {
    outcome: ExecutionOutcome,
    #[serde(default)]
    detail: Value,
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    action: String,
    #[serde(default = "empty_object")]
    args: Value,
    #[serde(default = "empty_object")]
    context: Value,
}

/// The verdict the policy would give, without storing anything.
pub async fn check_policy(
    State(state): State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    JsonBody(body): JsonBody<CheckBody>,
) -> Result<Response, ApiError> {
    if body.action.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "action must not be empty",
        ));
    }
    if !body.args.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "args must be a JSON object",
        ));
    }
    let verdict = state
        .engine
        .check(&agent.name, &body.action, &body.args, &body.context);
    Ok(Json(verdict.explain(state.engine.policy().hash())).into_response())
}
