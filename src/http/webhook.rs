//! `POST /webhooks/workos`: limit the body, verify the signature over the raw bytes, then parse and
//! hand the delivery to the group commit, answering only after the commit.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
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

/// The webhook route handler: every answer is counted by outcome or error code.
pub async fn receive(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Receipt>, AppError> {
    let result = handle(&app, &headers, body).await;
    let label = match &result {
        Ok(receipt) => receipt.outcome.as_str(),
        Err(e) => e.status_and_code().1,
    };
    app.metrics.outcome(label);
    tracing::Span::current().record("outcome", label);
    if let Err(AppError::Signature(e)) = &result {
        app.metrics
            .signature_failures
            .get_or_create(&ReasonLabel {
                reason: e.code().to_owned(),
            })
            .inc();
    }
    result
}

async fn handle(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<Receipt>, AppError> {
    let body = read_limited(headers, body).await?;
    let secret = verify(app, headers, &body)?;
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

/// Refuses a declared length over the limit before reading, then reads at most the limit.
async fn read_limited(headers: &HeaderMap, body: Body) -> Result<Bytes, AppError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(AppError::PayloadTooLarge(MAX_BODY_BYTES));
    }
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

/// Verifies the signature header; returns the position of the secret that matched.
fn verify(app: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<usize, AppError> {
    if app.webhook_secrets.is_empty() {
        return Err(AppError::WebhooksDisabled);
    }
    let header = match headers.get(signature::HEADER).map(|v| v.to_str()) {
        Some(Err(_)) => return Err(SignatureError::Malformed("header is not ASCII text").into()),
        Some(Ok(text)) => Some(text),
        None => None,
    };
    let secrets: Vec<&[u8]> = app
        .webhook_secrets
        .iter()
        .map(|s| s.expose().as_bytes())
        .collect();
    let now = app.clock.now().millis();
    Ok(signature::verify(
        header,
        body,
        &secrets,
        now,
        app.tolerance_ms,
    )?)
}
