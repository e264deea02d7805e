//! Operator endpoints, guarded by `admin_token`: policy reload.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::bearer_matches;
use super::{ApiError, AppState, ErrorBody};
use crate::policy::PolicyError;

/// Headers a reverse proxy adds: their presence means the peer is the proxy, not the caller.
const PROXY_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

#[derive(Serialize, ToSchema)]
pub struct Reloaded {
    /// The hash of the policy now in force.
    pub policy_hash: String,
}

/// Re-reads the policy file and swaps it in atomically, like SIGHUP; an invalid policy is
/// refused with every problem listed, and the current one stays.
#[utoipa::path(
    post,
    path = "/admin/reload",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The new policy is in force", body = Reloaded),
        (status = 401, description = "`unauthorized`: missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "`admin_disabled`: no admin_token is configured and the caller is not on loopback (or came through a proxy)", body = ErrorBody),
        (status = 422, description = "`invalid_policy`: the file does not validate; the old policy stays", body = ErrorBody),
    ),
)]
pub async fn reload_policy(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Reloaded>, ApiError> {
    let expected = state.config.admin_token.expose();
    if expected.is_empty() {
        // Without a token only the machine itself may reload, as it may send SIGHUP. A
        // proxy on the same machine connects from loopback on behalf of anyone: a request
        // that says it was forwarded is not trusted as local.
        let forwarded = PROXY_HEADERS.iter().any(|name| headers.contains_key(*name));
        if !peer.ip().is_loopback() || forwarded {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "without admin_token (SIGNOFF_ADMIN_TOKEN) the admin API answers only to direct loopback callers",
            ));
        }
        return reload(&state);
    }
    if !bearer_matches(&headers, expected) {
        return Err(ApiError::unauthorized("missing or wrong admin token"));
    }
    reload(&state)
}

fn reload(state: &AppState) -> Result<Json<Reloaded>, ApiError> {
    match state.engine.reload_policy(&state.config.policy) {
        Ok(policy) => Ok(Json(Reloaded {
            policy_hash: policy.hash().to_string(),
        })),
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "policy reload refused; keeping the current policy"
            );
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_policy",
                refusal_message(&error),
            ))
        }
    }
}

/// Why a reload was refused, for the caller: the validation problems (lines, rule names)
/// but never the policy file's path or any other detail of the server's file system, which
/// stay in the server log.
fn refusal_message(error: &anyhow::Error) -> String {
    if let Some(invalid) = error.downcast_ref::<PolicyError>() {
        format!("the policy file is invalid; the current policy stays:\n{invalid}")
    } else if let Some(unreadable) = error.downcast_ref::<std::io::Error>() {
        format!(
            "the policy file cannot be read ({}); the current policy stays",
            unreadable.kind()
        )
    } else {
        "the policy file could not be loaded; the current policy stays (the server log says why)"
            .to_string()
    }
}
