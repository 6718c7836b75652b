//! The server's one error type: a stable [`ErrorCode`] and a human
//! message. [`ErrorCode::status`] is the only place codes map to HTTP
//! statuses; the match is exhaustive, so a new code cannot go out without
//! one. Codes cross the network as their `snake_case` names and are
//! decoded back into the enum ([`ErrorBody`]), never recognised by text.

use std::fmt;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error code the server answers with (see `docs/API.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body or an item is not the expected JSON.
    InvalidJson,
    /// A latitude or longitude is out of range or not finite.
    InvalidPosition,
    /// A driver or order id breaks the id rules.
    InvalidId,
    /// A timestamp cannot be read or is out of range.
    InvalidTimestamp,
    /// Any other invalid value (`k`, a radius, a vehicle, a status …).
    InvalidParameter,
    /// No driver has that id.
    UnknownDriver,
    /// No match has that order id.
    UnknownOrder,
    /// No region has that id.
    UnknownRegion,
    /// No eligible driver within the search limits.
    NoDriverAvailable,
    /// The named driver is not available (taken meanwhile).
    DriverNotAvailable,
    /// The order's state does not allow the change.
    OrderConflict,
    /// The reservation lapsed before the change.
    ReservationExpired,
    /// Stored snapshot data failed its checks.
    CorruptSnapshot,
    /// This cluster node does not own the region (any more).
    NotOwner,
    /// Missing or invalid credentials.
    Unauthorized,
    /// Valid credentials that do not open this operation.
    Forbidden,
    /// No such route.
    NotFound,
    /// The route exists, the method does not.
    MethodNotAllowed,
    /// The body is larger than the limit.
    PayloadTooLarge,
    /// The request line or a header cannot be parsed as HTTP/1.1.
    MalformedRequest,
    /// The request target (path and query) is longer than the server reads.
    UriTooLong,
    /// The request's headers are too many or too large.
    HeadersTooLarge,
    /// The body's content type is not accepted here.
    UnsupportedMediaType,
    /// The route needs a WebSocket upgrade.
    UpgradeRequired,
    /// The client sent too many requests; see `Retry-After`.
    RateLimited,
    /// Too many requests in flight; retry shortly.
    Overloaded,
    /// Start-up (the snapshot restore) is not finished.
    NotReady,
    /// The request took longer than the configured timeout.
    Timeout,
    /// A dependency (Redis, another node) cannot serve the request now.
    Unavailable,
    /// A bug or an unexpected failure.
    Internal,
}

impl ErrorCode {
    /// The HTTP status of this code: the one place codes map to statuses.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson
            | Self::InvalidPosition
            | Self::InvalidId
            | Self::InvalidTimestamp
            | Self::InvalidParameter
            | Self::MalformedRequest => StatusCode::BAD_REQUEST,
            Self::UnknownDriver | Self::UnknownOrder | Self::UnknownRegion | Self::NotFound => {
                StatusCode::NOT_FOUND
            }
            Self::NoDriverAvailable
            | Self::DriverNotAvailable
            | Self::OrderConflict
            | Self::ReservationExpired => StatusCode::CONFLICT,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            // A cluster node asked for a region it does not own (any more).
            Self::NotOwner => StatusCode::MISDIRECTED_REQUEST,
            Self::Overloaded | Self::NotReady | Self::Timeout | Self::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::CorruptSnapshot | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `snake_case` name, as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidPosition => "invalid_position",
            Self::InvalidId => "invalid_id",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::InvalidParameter => "invalid_parameter",
            Self::UnknownDriver => "unknown_driver",
            Self::UnknownOrder => "unknown_order",
            Self::UnknownRegion => "unknown_region",
            Self::NoDriverAvailable => "no_driver_available",
            Self::DriverNotAvailable => "driver_not_available",
            Self::OrderConflict => "order_conflict",
            Self::ReservationExpired => "reservation_expired",
            Self::CorruptSnapshot => "corrupt_snapshot",
            Self::NotOwner => "not_owner",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MalformedRequest => "malformed_request",
            Self::UriTooLong => "uri_too_long",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::UpgradeRequired => "upgrade_required",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::NotReady => "not_ready",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The code of an engine error.
    pub fn of_engine(e: &hexmatch::Error) -> Self {
        use hexmatch::Error as E;
        match e {
            E::InvalidPosition(_) => Self::InvalidPosition,
            E::InvalidId(_) => Self::InvalidId,
            E::InvalidTimestamp(_) => Self::InvalidTimestamp,
            E::InvalidParameter(_) => Self::InvalidParameter,
            E::UnknownDriver(_) => Self::UnknownDriver,
            E::UnknownOrder(_) => Self::UnknownOrder,
            E::NoDriverAvailable => Self::NoDriverAvailable,
            E::DriverNotAvailable(_) => Self::DriverNotAvailable,
            E::OrderConflict(_) => Self::OrderConflict,
            E::ReservationExpired(_) => Self::ReservationExpired,
            E::CorruptSnapshot(_) => Self::CorruptSnapshot,
            // The engine's error is `#[non_exhaustive]`: a variant added
            // there and not here is a bug, reported as one.
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error: a stable code, a human message and, for `rate_limited`, how
/// long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after_s: Option<u64>,
}

/// The JSON body of every error: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable `snake_case` code (see `docs/API.md`).
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// `400 invalid_json`.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidJson, message)
    }

    /// `400 invalid_parameter`.
    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParameter, message)
    }

    /// `503 unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// `500 internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// `429 rate_limited` with a `Retry-After`.
    pub fn rate_limited(retry_after_s: u64) -> Self {
        let s = retry_after_s.max(1);
        Self {
            retry_after_s: Some(s),
            ..Self::new(
                ErrorCode::RateLimited,
                format!("too many requests; retry after {s}s"),
            )
        }
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human message, without the code.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// Code and message as the wire shows them.
    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl From<ErrorDetail> for ApiError {
    fn from(d: ErrorDetail) -> Self {
        Self::new(d.code, d.message)
    }
}

impl From<hexmatch::Error> for ApiError {
    fn from(e: hexmatch::Error) -> Self {
        Self::new(ErrorCode::of_engine(&e), e.to_string())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

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

/// Result of a fallible server operation.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code: its wire name round-trips through serde, and
    /// `as_str` agrees with serde.
    #[test]
    fn codes_round_trip_by_name() {
        use ErrorCode as C;
        let all = [
            C::InvalidJson,
            C::InvalidPosition,
            C::InvalidId,
            C::InvalidTimestamp,
            C::InvalidParameter,
            C::UnknownDriver,
            C::UnknownOrder,
            C::UnknownRegion,
            C::NoDriverAvailable,
            C::DriverNotAvailable,
            C::OrderConflict,
            C::ReservationExpired,
            C::CorruptSnapshot,
            C::NotOwner,
            C::Unauthorized,
            C::Forbidden,
            C::NotFound,
            C::MethodNotAllowed,
            C::PayloadTooLarge,
            C::MalformedRequest,
            C::UriTooLong,
            C::HeadersTooLarge,
            C::UnsupportedMediaType,
            C::UpgradeRequired,
            C::RateLimited,
            C::Overloaded,
            C::NotReady,
            C::Timeout,
            C::Unavailable,
            C::Internal,
        ];
        for c in all {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), c);
        }
        assert!(serde_json::from_str::<ErrorCode>("\"no_such_code\"").is_err());
    }

    #[test]
    fn statuses_follow_the_contract() {
        assert_eq!(
            ErrorCode::InvalidTimestamp.status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(ErrorCode::UnknownOrder.status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorCode::OrderConflict.status(), StatusCode::CONFLICT);
        assert_eq!(
            ErrorCode::NotOwner.status(),
            StatusCode::MISDIRECTED_REQUEST
        );
        assert_eq!(
            ErrorCode::RateLimited.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            ErrorCode::NotReady.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn engine_errors_keep_their_code() {
        for e in [
            hexmatch::Error::NoDriverAvailable,
            hexmatch::Error::DriverNotAvailable("d".into()),
            hexmatch::Error::InvalidId("x".into()),
        ] {
            assert_eq!(ErrorCode::of_engine(&e).as_str(), e.code());
        }
    }
}
