//! `POST /webhooks/workos`: the [`Verified`] extractor limits the body and verifies the signature
//! over the raw bytes; the handler then parses and hands the delivery to the group commit,
//! answering only after the commit.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap};
use axum::Json;

use super::error::AppError;
use super::state::AppState;
use crate::domain::Source;
use crate::ingest::event::EventKind;
use crate::ingest::{Incoming, Receipt};
use crate::metrics::{PositionLabel, ReasonLabel};
use crate::signature::{self, SignatureError};

/// Largest body accepted, checked before the body is read in full.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A webhook delivery whose signature verified over its raw bytes, before anything parsed them.
/// The header's own checks (present, well-formed, timestamp within tolerance) run before the body
/// is read; a refusal is counted here, as the handler never runs.
pub struct Verified {
    pub body: Bytes,
    /// The position of the configured secret that matched.
    pub secret: usize,
}

impl FromRequest<Arc<AppState>> for Verified {
    type Rejection = AppError;

    async fn from_request(request: Request, app: &Arc<AppState>) -> Result<Self, AppError> {
        let verified = verify(app, request).await;
        if let Err(e) = &verified {
            count(app, Err(e));
        }
        verified
    }
}

async fn verify(app: &AppState, request: Request) -> Result<Verified, AppError> {
    if app.webhook_secrets.is_empty() {
        return Err(AppError::WebhooksDisabled);
    }
    let (parts, body) = request.into_parts();
    refuse_declared_oversize(&parts.headers)?;
    let header = match parts.headers.get(signature::HEADER).map(|v| v.to_str()) {
        Some(Err(_)) => return Err(SignatureError::Malformed("header is not ASCII text").into()),
        Some(Ok(text)) => Some(text),
        None => None,
    };
    let now = app.clock.now().millis();
    let parsed = signature::check_header(header, now, app.tolerance_ms)?;
    let body = read_limited(body).await?;
    let secrets: Vec<&[u8]> = app
        .webhook_secrets
        .iter()
        .map(|s| s.expose().as_bytes())
        .collect();
    let secret = signature::verify_parsed(&parsed, &body, &secrets)?;
    Ok(Verified { body, secret })
}

/// The webhook route handler: parse, store, answer after the commit.
pub async fn receive(
    State(app): State<Arc<AppState>>,
    delivery: Verified,
) -> Result<Json<Receipt>, AppError> {
    let result = handle(&app, delivery).await;
    count(&app, result.as_ref().map(|r| r.outcome.as_str()));
    result
}

/// Counts an answer by outcome or error code (and a refused signature by reason).
fn count(app: &AppState, result: Result<&str, &AppError>) {
    let label = match result {
        Ok(outcome) => outcome,
        Err(e) => e.status_and_code().1,
    };
    app.metrics.outcome(label);
    tracing::Span::current().record("outcome", label);
    if let Err(AppError::Signature(e)) = result {
        app.metrics
            .signature_failures
            .get_or_create(&ReasonLabel {
                reason: e.code().to_owned(),
            })
            .inc();
    }
}

async fn handle(app: &AppState, delivery: Verified) -> Result<Json<Receipt>, AppError> {
    let Verified { body, secret } = delivery;
    app.metrics
        .signature_secret
        .get_or_create(&PositionLabel {
            position: secret.to_string(),
        })
        .inc();
    let incoming = Incoming::parse(&body, Source::Webhook, app.clock.now())
        .map_err(|e| AppError::InvalidPayload(e.0))?;
    tracing::Span::current().record("event_id", incoming.event_id.as_str());
    tracing::debug!(secret_position = secret, event_type = %incoming.event_type, "signature verified");
    let invalid = match &incoming.kind {
        EventKind::Invalid(reason) => Some(reason.clone()),
        _ => None,
    };
    let receipt = app.batcher.submit(incoming).await?;
    tracing::info!(event_id = %receipt.event_id, outcome = %receipt.outcome, secret_position = secret, "webhook delivered");
    // Refused however the inbox took it (stored now, or a duplicate of the first delivery), so that
    // every retry of one delivery gets the same answer.
    match invalid {
        Some(reason) => Err(AppError::InvalidEvent(format!(
            "event {}: {reason}",
            receipt.event_id
        ))),
        None => Ok(Json(receipt)),
    }
}

/// Refuses a declared length over the limit before anything is read.
fn refuse_declared_oversize(headers: &HeaderMap) -> Result<(), AppError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        true => Err(AppError::PayloadTooLarge(MAX_BODY_BYTES)),
        false => Ok(()),
    }
}

/// Reads at most the limit.
async fn read_limited(body: Body) -> Result<Bytes, AppError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                AppError::PayloadTooLarge(MAX_BODY_BYTES)
            } else {
                AppError::BodyUnreadable
            }
        })
}
