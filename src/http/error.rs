//! The request-path error type and its JSON answer `{"error": code, "message": text}`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::db::DbError;
use crate::ingest::batcher::SubmitError;
use crate::login::LoginError;
use crate::signature::SignatureError;
use crate::token::TokenError;

/// Seconds a client should wait after `503 storage_unavailable`: a restarting database takes some.
pub const STORAGE_RETRY_AFTER: &str = "5";

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    #[error("could not read the request body")]
    BodyUnreadable,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("{0}")]
    InvalidPayload(String),
    #[error("{0}")]
    InvalidEvent(String),
    #[error("no webhook secret is configured")]
    WebhooksDisabled,
    #[error("the database is unavailable; retry later")]
    StorageUnavailable(#[source] DbError),
    #[error("too many deliveries are waiting to be stored; retry later")]
    Overloaded,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("no ROLESYNC_LOGIN_TOKEN is configured")]
    LoginDisabled,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("WorkOS is unavailable and no stored membership exists ({0})")]
    WorkosUnavailable(String),
    #[error("no such membership")]
    NotFound,
    /// An access token that failed a check, with the reason.
    #[error("the access token is not valid: {detail}")]
    InvalidToken {
        reason: &'static str,
        detail: String,
    },
    #[error("no WORKOS_CLIENT_ID is configured: sign-in with an access token is off")]
    TokenSignInDisabled,
    #[error("WorkOS's key set could not be fetched ({0}) and none is cached")]
    KeysUnavailable(String),
    #[error("no such route")]
    NoSuchRoute,
    #[error("this route does not take that method")]
    MethodNotAllowed,
}

impl AppError {
    /// HTTP status and stable error code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::BodyUnreadable => (StatusCode::BAD_REQUEST, "invalid_payload"),
            Self::Signature(e) => (
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED),
                e.code(),
            ),
            Self::InvalidPayload(_) => (StatusCode::BAD_REQUEST, "invalid_payload"),
            Self::InvalidEvent(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_event"),
            Self::WebhooksDisabled => (StatusCode::SERVICE_UNAVAILABLE, "webhooks_disabled"),
            Self::StorageUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            Self::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::LoginDisabled => (StatusCode::SERVICE_UNAVAILABLE, "login_disabled"),
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::WorkosUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "workos_unavailable"),
            Self::NotFound | Self::NoSuchRoute => (StatusCode::NOT_FOUND, "not_found"),
            Self::InvalidToken { .. } => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Self::TokenSignInDisabled => {
                (StatusCode::SERVICE_UNAVAILABLE, "token_sign_in_disabled")
            }
            Self::KeysUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "jwks_unavailable"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        }
    }
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        Self::StorageUnavailable(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            Self::StorageUnavailable(cause) => {
                tracing::error!(error = %cause, "storage unavailable")
            }
            // Why, without the token: an operator reading the log sees what the client was told.
            Self::InvalidToken { reason, .. } => {
                tracing::info!(status = status.as_u16(), error = code, reason = %reason, "request refused")
            }
            Self::KeysUnavailable(why) => {
                tracing::warn!(error = code, cause = %why, "WorkOS's key set is unavailable; token sign-in refused")
            }
            _ => tracing::info!(status = status.as_u16(), error = code, "request refused"),
        }
        let mut body = json!({ "error": code, "message": self.to_string() });
        if let Self::InvalidToken { reason, .. } = &self {
            body["reason"] = json!(reason);
        }
        let body = Json(body);
        match self {
            // Nothing was stored: the sender may come back in a second (WorkOS retries on its own
            // schedule; other clients get a hint instead of a guess).
            Self::Overloaded => (status, [(header::RETRY_AFTER, "1")], body).into_response(),
            Self::StorageUnavailable(_) => {
                (status, [(header::RETRY_AFTER, STORAGE_RETRY_AFTER)], body).into_response()
            }
            // The key set is fetched again at most every 5 s while none is cached.
            Self::KeysUnavailable(_) => {
                (status, [(header::RETRY_AFTER, "5")], body).into_response()
            }
            _ => (status, body).into_response(),
        }
    }
}

impl From<LoginError> for AppError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::WorkosUnavailable(reason) => AppError::WorkosUnavailable(reason),
            LoginError::NotStored => AppError::NotFound,
            LoginError::StorageUnavailable(reason) => {
                AppError::StorageUnavailable(DbError::Unavailable(reason))
            }
        }
    }
}

impl From<TokenError> for AppError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Invalid { reason, detail } => Self::InvalidToken { reason, detail },
            TokenError::NotConfigured => Self::TokenSignInDisabled,
            TokenError::KeysUnavailable(why) => Self::KeysUnavailable(why),
        }
    }
}

impl From<SubmitError> for AppError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded => Self::Overloaded,
            SubmitError::Storage(e) => Self::StorageUnavailable(e),
        }
    }
}
