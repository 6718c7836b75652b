//! Extractors that turn every malformed request into the API's JSON error
//! shape (axum's own rejections are plain text).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};
use crate::wire::Object;

/// Reads the body under the configured limit: 413 `payload_too_large` past it.
pub(super) async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body exceeds the configured limit",
            )
        } else {
            ApiError::invalid_json(format!("could not read the request body: {rejection}"))
        }
    })
}

/// The request's media type, lower-cased, without parameters.
pub(super) fn media_type(req: &Request) -> Option<String> {
    let ct = req.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase(),
    )
}

pub(super) fn unsupported(found: Option<&str>, expected: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnsupportedMediaType,
        format!(
            "Content-Type {} is not supported; send {expected}",
            found.unwrap_or("(none)")
        ),
    )
}

/// Parses JSON text, naming the line and column of a syntax error.
pub(super) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_json(format!("body is not valid: {e}")))
}

/// [`parse_json`] of a body that must be a JSON object.
pub(super) fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    parse_json::<Object<T>>(bytes).map(|o| o.0)
}

/// A JSON body (`Content-Type: application/json`), or the API error.
#[derive(Debug)]
pub(super) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct = media_type(&req);
        if ct.as_deref() != Some("application/json") {
            return Err(unsupported(ct.as_deref(), "application/json"));
        }
        let bytes = body_bytes(req, state).await?;
        parse_object(&bytes).map(Self)
    }
}

/// A body that may be empty (then `T::default()`), else JSON.
#[derive(Debug)]
pub(super) struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct = media_type(&req);
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        if ct.as_deref() != Some("application/json") {
            return Err(unsupported(ct.as_deref(), "application/json"));
        }
        parse_object(&bytes).map(Self)
    }
}

/// The single `{id}` segment of a path, validated by `T`'s `FromStr`
/// (400 `invalid_id` when it does not parse).
#[derive(Debug)]
pub(super) struct IdPath<T>(pub T);

impl<T, S> FromRequestParts<S> for IdPath<T>
where
    T: std::str::FromStr<Err = hexmatch::Error>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(ErrorCode::InvalidId, format!("bad path parameter: {e}")))?;
        raw.parse().map(Self).map_err(ApiError::from)
    }
}
