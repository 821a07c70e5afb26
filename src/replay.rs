//! `rolesync replay`: sign fixture and scenario files with the first webhook secret and POST them.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::Config;
use crate::db::{Db, StoredEvent, StoredFilter};
use crate::ingest::event::EventKind;
use crate::ingest::Incoming;
use crate::output::emit;
use crate::reconcile::{reconcile_batch, Observation, Source};
use crate::signature;
use crate::table;
use crate::timestamp::Timestamp;

/// Where `replay` delivers unless told otherwise: the webhook endpoint of a `serve` listening on
/// `listen` (an unspecified address such as `0.0.0.0` is reached through loopback).
pub fn url_for(listen: SocketAddr) -> String {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}/webhooks/workos")
}

/// An `http(s)://` URL with a host, for `--url`.
pub fn parse_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("not an http:// or https:// URL".into());
    }
    Ok(url.into())
}

/// One body to deliver and where it came from.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub label: String,
    pub body: Vec<u8>,
}

/// Reads files and folders (sorted, `*.json`) into deliveries. A file holding an object with a
/// `deliveries` array is a scenario and yields each event in order; any other file is sent byte for byte.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Delivery>> {
    let mut out = Vec::new();
    for path in paths {
        let files = json_files(path)?;
        if files.is_empty() {
            bail!("{}: no .json files", path.display());
        }
        for file in files {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            out.extend(deliveries_of(&file, bytes)?);
        }
    }
    Ok(out)
}

fn json_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
    {
        let p = entry?.path();
        if p.is_dir() {
            files.extend(json_files(&p)?);
        } else if p.extension().is_some_and(|e| e == "json") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

fn deliveries_of(file: &Path, bytes: Vec<u8>) -> Result<Vec<Delivery>> {
    let name = file.display().to_string();
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    match parsed
        .as_ref()
        .and_then(|v| v.get("deliveries"))
        .and_then(Value::as_array)
    {
        Some(events) => events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok(Delivery {
                    label: format!("{name}#{}", i + 1),
                    body: serde_json::to_vec(e)?,
                })
            })
            .collect(),
        None => Ok(vec![Delivery {
            label: name,
            body: bytes,
        }]),
    }
}

/// The `WorkOS-Signature` header value for a body, signed now.
pub fn sign_now(body: &[u8], secret: &str) -> String {
    signature::sign(body, secret.as_bytes(), Timestamp::now().millis())
}

/// Delivers every file and prints a table; fails when any delivery was not answered 2xx. A
/// delivery that gets no answer (nothing listening, no answer within `timeout`) ends the run with
/// an error naming the URL and the cause, after the table of what was answered before.
pub async fn run(
    config: &Config,
    paths: &[PathBuf],
    url: &str,
    timeout: Duration,
) -> Result<ExitCode> {
    let Some(secret) = config.webhook_secret.as_ref().and_then(|s| s.0.first()) else {
        return Err(crate::output::MissingSetting(
            "WORKOS_WEBHOOK_SECRET: not set; replay signs with the first secret".into(),
        )
        .into());
    };
    let deliveries = load(paths)?;
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .context("cannot set up the HTTP client")?;
    let mut rows = Vec::new();
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    let mut unanswered = None;
    for d in &deliveries {
        let answer = match send(&client, url, secret.expose(), &d.body).await {
            Ok(answer) => answer,
            Err(e) => {
                unanswered = Some(no_answer(e, &d.label, url, timeout));
                break;
            }
        };
        failed += usize::from(!answer.ok);
        *totals.entry(answer.outcome.clone()).or_default() += 1;
        let status = answer.status.to_string();
        rows.push(vec![
            d.label.clone(),
            event_id(&d.body),
            status,
            answer.outcome,
        ]);
    }
    // A closed stdout stops the printing, never the verdict: failed deliveries still exit 1.
    let printed = emit(&table::render(&["FILE", "EVENT", "HTTP", "OUTCOME"], &rows));
    if let Some(error) = unanswered {
        return Err(error);
    }
    let summary: Vec<String> = totals.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let printed = printed.and_then(|()| {
        emit(&format!(
            "{} deliveries, {} failed: {}\n",
            deliveries.len(),
            failed,
            summary.join(" ")
        ))
    });
    match (failed, printed) {
        (0, printed) => printed.map(|()| ExitCode::SUCCESS),
        (_, Err(e)) if !crate::output::is_closed_stdout(&e) => Err(e),
        _ => Ok(ExitCode::FAILURE),
    }
}

/// An HTTP answer to one delivery.
struct Answer {
    status: u16,
    /// The `outcome` or `error` of a JSON answer, else `http_<status>`.
    outcome: String,
    ok: bool,
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: &[u8],
) -> reqwest::Result<Answer> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("WorkOS-Signature", sign_now(body, secret))
        .body(body.to_vec())
        .send()
        .await?;
    let status = response.status();
    let json: Value = response.json().await.unwrap_or(Value::Null);
    let outcome = json
        .get("outcome")
        .or_else(|| json.get("error"))
        .and_then(Value::as_str)
        .map_or_else(|| format!("http_{}", status.as_u16()), str::to_owned);
    Ok(Answer {
        status: status.as_u16(),
        outcome,
        ok: status.is_success(),
    })
}

/// The error for a delivery that got no answer: the URL and the cause, on one line.
fn no_answer(e: reqwest::Error, label: &str, url: &str, timeout: Duration) -> anyhow::Error {
    let cause = match e.is_timeout() {
        true => format!("no answer within {}s (--timeout)", timeout.as_secs()),
        false => {
            let mut causes = Vec::new();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                causes.push(s.to_string());
                source = s.source();
            }
            causes.insert(0, e.without_url().to_string());
            causes.join(": ")
        }
    };
    let url = crate::config::redact_url(url);
    anyhow::anyhow!("cannot deliver {label} to {url}: {cause}")
}

fn event_id(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    v.get("id")
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_owned()
}

/// One stored event re-run by `replay --stored`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reapplied {
    pub event_id: String,
    pub before: String,
    pub after: String,
}

/// Re-runs stored inbox events through the reconcile (source `replay`), oldest first, without
/// signature or timestamp checks, and records each new outcome. Versions keep it safe: nothing
/// newer is overwritten.
pub async fn replay_stored(
    db: &Db,
    filter: &StoredFilter,
    now: Timestamp,
) -> Result<Vec<Reapplied>> {
    let mut done = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let position = after.as_ref().map(|(t, id)| (t.as_str(), id.as_str()));
        let page = db.stored_events(filter, position, STORED_PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(done);
        };
        after = Some((last.received_at.clone(), last.event_id.clone()));
        done.extend(reapply(db, &page, now).await?);
    }
}

const STORED_PAGE: i64 = 200;

async fn reapply(db: &Db, page: &[StoredEvent], now: Timestamp) -> Result<Vec<Reapplied>> {
    let parsed: Vec<(&StoredEvent, Observation)> = page
        .iter()
        .filter_map(|e| {
            match Incoming::parse(e.payload.as_bytes(), Source::Replay, now).map(|i| i.kind) {
                Ok(EventKind::Membership(obs)) => Some((e, obs)),
                _ => None,
            }
        })
        .collect();
    let observations: Vec<&Observation> = parsed.iter().map(|(_, o)| o).collect();
    let mut tx = db.begin_write().await?;
    let outcomes = reconcile_batch(&mut tx, &observations, now).await?;
    let settled: Vec<(&str, &str)> = parsed
        .iter()
        .zip(&outcomes)
        .map(|((e, _), o)| (e.event_id.as_str(), o.as_str()))
        .collect();
    tx.set_outcomes(&settled).await?;
    tx.commit().await?;
    Ok(parsed
        .iter()
        .zip(outcomes)
        .map(|((e, _), o)| Reapplied {
            event_id: e.event_id.clone(),
            before: e.outcome.clone(),
            after: o.as_str().to_owned(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_reaches_an_unspecified_listen_address_through_loopback() {
        let cases = [
            ("127.0.0.1:8080", "http://127.0.0.1:8080/webhooks/workos"),
            ("0.0.0.0:9000", "http://127.0.0.1:9000/webhooks/workos"),
            ("[::]:9000", "http://[::1]:9000/webhooks/workos"),
            ("10.1.2.3:80", "http://10.1.2.3:80/webhooks/workos"),
        ];
        for (listen, url) in cases {
            assert_eq!(url_for(listen.parse().unwrap()), url, "{listen}");
        }
    }

    #[test]
    fn only_http_urls_with_a_host_are_taken() {
        assert!(parse_url("https://example.com/hook").is_ok());
        for bad in [
            "notaurl",
            "ftp://example.com/",
            "http://",
            "file:///tmp/x",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?}");
        }
    }
}
