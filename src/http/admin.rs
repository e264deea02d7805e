//! Operator endpoints, guarded by `admin_token`: policy reload.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::{ApiError, AppState, ErrorBody};

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
        (status = 403, description = "`admin_disabled`: no admin_token is configured and the caller is not on loopback", body = ErrorBody),
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
        // Without a token only the machine itself may reload, as it may send SIGHUP.
        if !peer.ip().is_loopback() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "without admin_token (SIGNOFF_ADMIN_TOKEN) the admin API answers only on loopback",
            ));
        }
        return reload(&state);
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compare digests so neither the length nor a prefix of the token leaks through timing.
    let matches: bool = Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into();
    if !matches {
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
                format!("{error:#}"),
            ))
        }
    }
}
