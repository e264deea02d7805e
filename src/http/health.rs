//! Liveness, readiness and the JSON 404.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::bearer_matches;
use super::{ApiError, AppState, ErrorBody};
use crate::telemetry;

// Types rather than `json!` so the OpenAPI document describes exactly these bodies.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// Always `ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// The hash of the policy in force.
    pub policy_hash: String,
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)),
)]
pub async fn healthz() -> impl IntoResponse {
    Json(Health { status: "ok" })
}

/// Ready when the database answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The database answers", body = Readiness),
        (status = 503, description = "`not_ready`: the database is not reachable", body = ErrorBody),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    match state.engine.ping().await {
        Ok(()) => Ok(Json(Readiness {
            status: "ready",
            policy_hash: state.engine.policy().hash().to_string(),
        })),
        Err(error) => {
            tracing::warn!(%error, "database not ready");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the database is not reachable",
            ))
        }
    }
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not answer that method",
    )
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 401, description = "`unauthorized`: metrics_token is set and the bearer token is missing or wrong", body = ErrorBody),
        (status = 503, description = "No Prometheus recorder in this process", body = ErrorBody),
    ),
)]
/// Prometheus text format. Gauges that describe the database (pending requests, outbox
/// backlog) are read at scrape time, so every replica reports the same truth. With
/// `metrics_token` set, only scrapers that send it as a bearer token are answered.
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let token = state.config.metrics_token.expose();
    if !token.is_empty() && !bearer_matches(&headers, token) {
        return Err(ApiError::unauthorized("missing or wrong metrics token"));
    }
    let Some(handle) = telemetry::prometheus() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics_unavailable",
            "another metrics recorder is installed in this process",
        ));
    };
    let engine = &state.engine;
    match (engine.pending_count().await, engine.outbox_backlog().await) {
        (Ok(pending), Ok(backlog)) => {
            metrics::gauge!(telemetry::PENDING).set(pending as f64);
            for kind in ["card", "reminder", "webhook"] {
                let waiting = backlog
                    .by_kind
                    .iter()
                    .find(|(name, _)| name == kind)
                    .map_or(0, |(_, count)| *count);
                metrics::gauge!(telemetry::OUTBOX_BACKLOG, "kind" => kind).set(waiting as f64);
            }
        }
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "metrics: database gauges not refreshed")
        }
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    ))
}
