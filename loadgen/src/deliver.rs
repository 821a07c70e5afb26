//! Webhook deliveries: bodies signed just before the run (re-signed lazily when a long run would
//! outlive the signature tolerance), one POST each, and the answer sorted into a ledger bucket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use rolesync::signature;
use serde_json::Value;
use tokio::time::Instant;

use crate::http1::{Answer, Http1};
use crate::model::Outcome;
use crate::workload::Workload;

/// Signatures older than this are made afresh at send time (rolesync accepts 180 s by default).
const RESIGN_AFTER: Duration = Duration::from_secs(120);

/// How one delivery was answered.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A 2xx naming this event and a known outcome.
    Outcome(Outcome),
    /// A non-2xx answer or a transport error: `key` groups them (`HTTP 503 storage_unavailable`).
    Rejected { key: String, message: String },
    /// A 2xx the ledger cannot place (unknown outcome, wrong event id, not JSON).
    Unplaced(String),
}

struct Delivery {
    event_id: String,
    body: Bytes,
    signature: String,
}

/// Everything needed to send delivery `i` of the run.
pub struct Deliveries {
    client: Http1,
    secret: String,
    items: Vec<Delivery>,
    signed_at: Instant,
    resigned: AtomicUsize,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Deliveries {
    /// Serializes every body of the send order (a resend shares its original's bytes), unsigned.
    pub fn prepare(w: &Workload, client: Http1, secret: &str) -> Self {
        let bodies: Vec<Bytes> = (0..w.events.len())
            .map(|seq| Bytes::from(w.body(seq)))
            .collect();
        let items = w
            .order
            .iter()
            .map(|&i| Delivery {
                event_id: w.event_id(i as usize),
                body: bodies[i as usize].clone(),
                signature: String::new(),
            })
            .collect();
        Self {
            client,
            secret: secret.to_owned(),
            items,
            signed_at: Instant::now(),
            resigned: AtomicUsize::new(0),
        }
    }

    /// Signs every delivery now; returns how long it took.
    pub fn sign_all(&mut self) -> Duration {
        let started = Instant::now();
        let t = now_ms();
        for d in &mut self.items {
            d.signature = signature::sign(&d.body, self.secret.as_bytes(), t);
        }
        self.signed_at = Instant::now();
        started.elapsed()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Deliveries whose signature was made afresh at send time.
    pub fn resigned(&self) -> usize {
        self.resigned.load(Ordering::Relaxed)
    }

    /// POSTs delivery `i` and sorts the answer.
    pub async fn send(self: Arc<Self>, i: usize) -> Reply {
        let d = &self.items[i];
        let fresh;
        let signature = if self.signed_at.elapsed() > RESIGN_AFTER {
            self.resigned.fetch_add(1, Ordering::Relaxed);
            fresh = signature::sign(&d.body, self.secret.as_bytes(), now_ms());
            fresh.as_str()
        } else {
            d.signature.as_str()
        };
        let headers = [
            ("content-type", "application/json"),
            ("WorkOS-Signature", signature),
        ];
        let sent = self.client.post(PATH, &headers, &d.body).await;
        match sent {
            Ok(answer) => read_reply(answer, &d.event_id),
            Err(e) => transport(e),
        }
    }
}

const PATH: &str = "/webhooks/workos";

fn transport(e: anyhow::Error) -> Reply {
    Reply::Rejected {
        key: "transport error".into(),
        message: format!("{e:#}"),
    }
}

fn read_reply(answer: Answer, event_id: &str) -> Reply {
    let (status, bytes) = (answer.status, answer.body);
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let code = json["error"].as_str().unwrap_or("(no error code)");
        return Reply::Rejected {
            key: format!("HTTP {status} {code}"),
            message: json["message"].as_str().unwrap_or_default().to_owned(),
        };
    }
    let outcome = json["outcome"].as_str().and_then(Outcome::parse);
    match outcome {
        Some(o) if json["event_id"].as_str() == Some(event_id) => Reply::Outcome(o),
        _ => Reply::Unplaced(format!(
            "HTTP {status} {} for {event_id}",
            String::from_utf8_lossy(&bytes)
        )),
    }
}
