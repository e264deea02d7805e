//! The HTTP edge: router, shared state, extractors (agent auth, JSON bodies) and routes.

mod admin;
mod agent_api;
mod error;
mod extract;
mod health;
mod openapi;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::engine::Engine;

pub use agent_api::MAX_WAIT_SECONDS;
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use extract::{AuthenticatedAgent, JsonBody, SubmittingAgent};
pub use openapi::ApiDoc;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub config: Arc<Config>,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest long-poll plus headroom; nothing else comes close.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP latency by route template (never by raw path, which would explode label sets).
async fn record_http_latency(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let response = next.run(request).await;
    metrics::histogram!(
        crate::telemetry::HTTP_DURATION,
        "method" => method,
        "route" => route,
        "status" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The agent API (/v1 and /mcp), health routes and OpenAPI document, plus `channel_routes` (Slack,
/// Teams), under the shared layers: request ids, tracing, timeout and the body limit.
pub fn router(state: AppState, channel_routes: Router) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route(
            "/v1/requests",
            post(agent_api::submit_request).get(agent_api::list_requests),
        )
        .route("/v1/requests/{id}", get(agent_api::get_request))
        .route("/v1/requests/{id}/cancel", post(agent_api::cancel_request))
        .route(
            "/v1/requests/{id}/execution",
            post(agent_api::record_execution),
        )
        .route("/v1/check", post(agent_api::check_policy))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/admin/reload", post(admin::reload_policy))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(health::not_found)
        .method_not_allowed_fallback(health::method_not_allowed)
        .with_state(state.clone())
        .merge(crate::mcp::routes(state))
        .merge(channel_routes)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(record_http_latency))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let request_id = request
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!(
                    "http",
                    method = %request.method(),
                    path = %request.uri().path(),
                    request_id = %request_id,
                )
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}
