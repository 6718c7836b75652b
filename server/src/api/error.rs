//! One error type for the whole API, mapped to status + stable code in
//! exactly one place ([`ApiError::status`]).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An API error: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    code: &'static str,
    message: String,
    retry_after_s: Option<u64>,
}

/// The JSON body of every error: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable `snake_case` code (see API.md).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with a code of API.md and a message.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// `400 invalid_json`.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new("invalid_json", message)
    }

    /// `400 invalid_parameter`.
    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new("invalid_parameter", message)
    }

    /// `429 rate_limited` with a `Retry-After`.
    pub fn rate_limited(retry_after_s: u64) -> Self {
        Self {
            retry_after_s: Some(retry_after_s.max(1)),
            ..Self::new(
                "rate_limited",
                format!("too many requests; retry after {}s", retry_after_s.max(1)),
            )
        }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The HTTP status of a code: the one place codes map to statuses.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "unknown_driver" | "unknown_order" | "not_found" => StatusCode::NOT_FOUND,
            "no_driver_available"
            | "driver_not_available"
            | "order_conflict"
            | "reservation_expired" => StatusCode::CONFLICT,
            "unauthorized" => StatusCode::UNAUTHORIZED,
            "forbidden" => StatusCode::FORBIDDEN,
            "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
            "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            "unsupported_media_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "upgrade_required" => StatusCode::UPGRADE_REQUIRED,
            "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
            // A cluster node asked for a region it does not own (any more).
            "not_owner" => StatusCode::MISDIRECTED_REQUEST,
            "overloaded" | "not_ready" | "timeout" | "unavailable" => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            "internal" => StatusCode::INTERNAL_SERVER_ERROR,
            // invalid_json, invalid_position, invalid_id, invalid_timestamp,
            // invalid_parameter and any other input error.
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<hexmatch::Error> for ApiError {
    fn from(e: hexmatch::Error) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = self.retry_after_s;
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(s) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Result of a handler.
pub(crate) type ApiResult<T> = Result<T, ApiError>;
