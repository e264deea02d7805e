//! MCP for agents: the approval tools served at `POST /mcp` (tools.rs) and the
//! `signoff mcp-proxy` gateway in front of another MCP server (proxy.rs).

pub mod proxy;
mod tools;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::http::{ApiError, AppState, AuthenticatedAgent};

pub use tools::{describe, ApprovalTools};

/// The path the MCP service answers at.
pub const MCP_PATH: &str = "/mcp";

/// `/mcp`: rmcp's Streamable HTTP service, stateless (no sessions: any replica can answer
/// any request, and each HTTP request is authenticated on its own), answering plain JSON
/// unless a tool streams progress. The agent's key is checked before rmcp sees the request.
pub fn routes(state: AppState) -> Router {
    let engine = state.engine.clone();
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        // The Bearer key, not the Host header, is what keeps other sites out; signoff
        // answers under whatever names its operators give it.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(state.config.max_body_bytes);
    let service = StreamableHttpService::new(
        move || Ok(ApprovalTools::new(engine.clone())),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    Router::new()
        .route_service(MCP_PATH, service)
        .layer(axum::middleware::from_fn_with_state(state, authenticate))
}

/// Refuses requests without a valid agent key (401 with `WWW-Authenticate: Bearer`) or
/// with a declared body over the limit (rmcp enforces the limit on streamed bodies too);
/// hands the agent to the tools through the request's extensions.
async fn authenticate(
    axum::extract::State(state): axum::extract::State<AppState>,
    AuthenticatedAgent(agent): AuthenticatedAgent,
    mut request: Request,
    next: Next,
) -> Response {
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > state.config.max_body_bytes) {
        return ApiError::payload_too_large(state.config.max_body_bytes).into_response();
    }
    request.extensions_mut().insert(Arc::new(agent));
    next.run(request).await
}
