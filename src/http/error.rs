//! The one HTTP error type: a status, a stable code and a message, as `{"error":{"code","message"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::VoteRefusal;
use crate::engine::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

// A type rather than `json!` so the OpenAPI document describes exactly this body.
/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable, e.g. `invalid_request`, `unauthorized`, `not_found`.
    #[schema(example = "not_found")]
    pub code: String,
    /// For people; may change between versions.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such request")
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the limit of {limit} bytes"),
        )
    }

    /// Why a body could not be read: over the `limit` (413) or broken off (400).
    pub fn from_body_rejection(
        rejection: axum::extract::rejection::BytesRejection,
        limit: usize,
    ) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::payload_too_large(limit)
        } else {
            Self::bad_request("invalid_body", rejection.body_text())
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; it has been logged",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<VoteRefusal> for ApiError {
    fn from(refusal: VoteRefusal) -> Self {
        let status = match &refusal {
            VoteRefusal::NotPending(_)
            | VoteRefusal::Expired
            | VoteRefusal::AlreadyApproved(_)
            | VoteRefusal::StaleRevision { .. } => StatusCode::CONFLICT,
            VoteRefusal::Requester(_)
            | VoteRefusal::NotEligible(..)
            | VoteRefusal::EmailUnreadable(_) => StatusCode::FORBIDDEN,
            VoteRefusal::ReasonRequired
            | VoteRefusal::ArgsNotObject
            | VoteRefusal::ArgsUnchanged
            | VoteRefusal::RedactedValue => StatusCode::BAD_REQUEST,
            VoteRefusal::ModificationDenied { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self::new(status, refusal.code(), refusal.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Invalid(message) => Self::bad_request("invalid_request", message),
            EngineError::NotFound => Self::not_found(),
            EngineError::Unauthorized => Self::unauthorized("invalid or revoked API key"),
            EngineError::Refused(refusal) => refusal.into(),
            EngineError::Conflict { code, message } => {
                Self::new(StatusCode::CONFLICT, code, message)
            }
            EngineError::Unprocessable { code, message } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
            }
            EngineError::Quota(exceeded) => Self {
                retry_after: exceeded.retry_after_seconds(),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    exceeded.code(),
                    exceeded.to_string(),
                )
            },
            EngineError::Store(error) => {
                tracing::error!(%error, "store error");
                Self::internal()
            }
            EngineError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error");
                Self::internal()
            }
        }
    }
}
