//! `POST /webhooks/workos`: limit the body, verify the signature over the raw bytes, then parse,
//! store in the inbox and reconcile in one transaction, and answer only after the commit.

pub mod event;
pub mod signature;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::Serialize;

use crate::app::AppState;
use crate::db::{self, Db, DbError};
use crate::error::AppError;
use crate::reconcile::{reconcile_in, Source};
use crate::timestamp::Timestamp;
use event::{classify, parse_envelope, Envelope, EventKind};

/// Largest body accepted, checked before the body is read in full.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The answer to a stored (or duplicate) delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Receipt {
    pub event_id: String,
    pub outcome: String,
}

/// The webhook route handler.
pub async fn receive(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Receipt>, AppError> {
    let body = read_limited(&headers, body).await?;
    let secret = verify(&app, &headers, &body)?;
    let envelope = parse_envelope(&body).map_err(|e| AppError::InvalidPayload(e.0))?;
    tracing::Span::current().record("event_id", envelope.id.as_str());
    tracing::debug!(secret_position = secret, event_type = %envelope.event, "signature verified");
    let payload = std::str::from_utf8(&body).map_err(|_| AppError::BodyUnreadable)?;
    let receipt = deliver(
        &app.db,
        &envelope,
        payload,
        Source::Webhook,
        app.clock.now(),
    )
    .await?;
    tracing::info!(event_id = %receipt.event_id, outcome = %receipt.outcome, secret_position = secret, "webhook delivered");
    if receipt.outcome == INVALID {
        return Err(AppError::InvalidEvent(format!(
            "event {} is missing a required field",
            receipt.event_id
        )));
    }
    Ok(Json(receipt))
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
    let header = headers
        .get(signature::HEADER)
        .map(|v| v.to_str().unwrap_or(""));
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

/// Outcome stored for a membership event missing a required field.
pub const INVALID: &str = "invalid";
/// Outcome of an event type rolesync does not act on.
pub const IGNORED: &str = "ignored";
/// Outcome of an event id already in the inbox.
pub const DUPLICATE: &str = "duplicate";

/// Stores one event in the inbox and reconciles it, in one transaction. An event id already stored is
/// a `duplicate` and changes nothing.
pub async fn deliver(
    db: &Db,
    envelope: &Envelope<'_>,
    payload: &str,
    source: Source,
    now: Timestamp,
) -> Result<Receipt, DbError> {
    let mut tx = db.begin_write().await?;
    let id = envelope.id.as_str();
    let fresh = db::inbox::insert(&mut *tx, id, &envelope.event, now, payload, "pending").await?;
    if !fresh {
        tx.rollback().await?;
        return Ok(Receipt {
            event_id: id.to_owned(),
            outcome: DUPLICATE.to_owned(),
        });
    }
    let outcome = match classify(envelope, source) {
        EventKind::Membership(obs) => reconcile_in(&mut tx, db, &obs, now).await?.as_str(),
        EventKind::Invalid(reason) => {
            tracing::warn!(event_id = id, %reason, "invalid membership event");
            INVALID
        }
        EventKind::Other => IGNORED,
    };
    db::inbox::set_outcome(&mut *tx, id, outcome).await?;
    tx.commit().await?;
    Ok(Receipt {
        event_id: id.to_owned(),
        outcome: outcome.to_owned(),
    })
}
