//! Extractors: the agent behind a Bearer key, and JSON bodies with our own error shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::{ApiError, AppState};
use crate::store::AgentRecord;

/// The agent whose API key authorised this request, read from the database.
pub struct AuthenticatedAgent(pub AgentRecord);

impl FromRequestParts<AppState> for AuthenticatedAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let agent = state.engine.authenticate_agent(bearer_key(parts)?).await?;
        agent.map(Self).ok_or_else(revoked_or_unknown)
    }
}

/// The agent behind a submission: `AuthenticatedAgent`, but from the engine's cache of
/// recent submitters when it can (the database still refuses a revoked agent's insert).
pub struct SubmittingAgent(pub AgentRecord);

impl FromRequestParts<AppState> for SubmittingAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let agent = state
            .engine
            .authenticate_submitter(bearer_key(parts)?)
            .await?;
        agent.map(Self).ok_or_else(revoked_or_unknown)
    }
}

fn revoked_or_unknown() -> ApiError {
    ApiError::unauthorized("invalid or revoked API key")
}

fn bearer_key(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key>"))?;
    header
        .to_str()
        .ok()
        .and_then(|value| {
            // The scheme is case-insensitive (RFC 9110); the key is not.
            let (scheme, key) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key)
        })
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization must be Bearer <api key>"))
}

/// A JSON body, read within the body limit before parsing. The content type is not
/// checked, so `curl -d` works as people expect.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                ApiError::from_body_rejection(rejection, state.config.max_body_bytes)
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request("invalid_request", error.to_string())
        }
        _ => ApiError::bad_request("invalid_json", format!("malformed JSON: {error}")),
    })
}

/// Whether `headers` carry `Authorization: Bearer <expected>`. Digests are compared in
/// constant time, so neither the token's length nor a matching prefix leaks through timing.
pub fn bearer_matches(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}
