//! The webhook report, as text or one JSON object. A run whose ledger fails reports no figures.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::deliver::Reply;
use crate::ledger::Ledger;
use crate::run::Answers;
use crate::send::Run;
use crate::server::{Ending, ProcStats, ServerSpec};
use crate::stats::Latency;
use crate::workload::{Kind, Workload};
use crate::WebhookArgs;

/// What was run, for reproducing it.
#[derive(Debug, Clone)]
pub struct Setup {
    pub label: String,
    pub database: String,
    pub server_bin: String,
    /// Server environment worth showing (no secrets, no database URL).
    pub server_env: Vec<String>,
    pub mode: String,
    pub rate: Option<f64>,
    pub client_threads: usize,
    pub seed: u64,
    pub deliveries: usize,
    pub memberships: usize,
    pub mix: Vec<(&'static str, usize)>,
    pub prefill: Option<(usize, usize, Duration)>,
}

impl Setup {
    pub fn of(a: &WebhookArgs, spec: &ServerSpec, w: &Workload, prefill: Option<Duration>) -> Self {
        let mode = match a.rate {
            Some(r) => format!("open loop at {r}/s (at most {} in flight)", a.max_inflight),
            None => format!("closed loop, concurrency {}", a.common.concurrency),
        };
        Self {
            label: a.common.label.clone(),
            database: rolesync::config::redact_url(&a.common.database_url),
            server_bin: a.common.server_bin.display().to_string(),
            server_env: shown_env(spec),
            mode,
            rate: a.rate,
            client_threads: a.common.client_threads,
            seed: w.seed,
            deliveries: w.order.len(),
            memberships: w.memberships,
            mix: mix_of(w),
            prefill: prefill.map(|d| (a.prefill_memberships, a.prefill_audit, d)),
        }
    }
}

/// The server environment without secrets or the database URL.
pub fn shown_env(spec: &ServerSpec) -> Vec<String> {
    spec.env
        .iter()
        .filter(|(k, _)| !k.contains("SECRET") && !k.contains("KEY") && !k.contains("TOKEN"))
        .filter(|(k, _)| k != "DATABASE_URL")
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

fn mix_of(w: &Workload) -> Vec<(&'static str, usize)> {
    vec![
        ("unique events", w.events.len()),
        ("duplicates", w.duplicates),
        ("older versions", w.older),
        ("created", w.count(Kind::Created)),
        ("updated", w.count(Kind::Updated)),
        ("deleted", w.count(Kind::Deleted)),
        ("unknown-role events", w.unknown_roles()),
        ("non-membership events", w.count(Kind::Other)),
    ]
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct Figures {
    pub sent: usize,
    pub elapsed: Duration,
    pub latency: Latency,
    pub max_lag: Duration,
    pub server: ProcStats,
    pub loadgen: ProcStats,
    pub resigned: usize,
    pub signing: Duration,
    /// Deliveries the first pass had answered 503 (`--retry-refused` resent them).
    pub refused: usize,
}

impl Figures {
    pub fn of(
        run: &Run<Reply>,
        server: ProcStats,
        loadgen: ProcStats,
        resigned: usize,
        signing: Duration,
        refused: usize,
    ) -> Self {
        Self {
            sent: run.records.len(),
            elapsed: run.elapsed,
            latency: Latency::of(run.records.iter().map(|r| r.latency)),
            max_lag: run.max_lag,
            server,
            loadgen,
            resigned,
            signing,
            refused,
        }
    }

    pub fn per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Peak RSS in MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Everything about one webhook run.
pub struct WebhookReport {
    pub setup: Setup,
    pub figures: Figures,
    pub answers: Answers,
    pub ledger: Ledger,
    pub ending: Ending,
}

impl WebhookReport {
    /// Prints to stdout.
    pub fn print(&self, as_json: bool) {
        match as_json {
            true => println!(
                "{}",
                serde_json::to_string_pretty(&self.json()).expect("JSON")
            ),
            false => print!("{}", self.text()),
        }
    }

    fn text(&self) -> String {
        let mut out = setup_text(&self.setup);
        match self.ledger.ok() {
            true => out += &figures_text(&self.figures, self.setup.rate),
            false => {
                out += "RESULT    FAILED: the ledger does not balance; no figures are reported\n"
            }
        }
        out += &ending_text(&self.ending);
        out += &ledger_text(&self.ledger);
        out
    }

    fn json(&self) -> Value {
        let s = &self.setup;
        let mix: serde_json::Map<String, Value> = s
            .mix
            .iter()
            .map(|(k, v)| (k.replace([' ', '-'], "_"), json!(v)))
            .collect();
        json!({
            "mode": "webhooks",
            "ok": self.ledger.ok(),
            "label": s.label, "database": s.database,
            "server_bin": s.server_bin, "server_env": s.server_env,
            "load": s.mode, "rate": s.rate, "client_threads": s.client_threads, "seed": s.seed,
            "deliveries": s.deliveries, "memberships": s.memberships, "mix": mix,
            "prefill": s.prefill.map(|(k, j, d)| {
                json!({"memberships": k, "audit_rows": j, "seconds": d.as_secs_f64()})
            }),
            "figures": self.ledger.ok().then(|| figures_json(&self.figures)),
            "answers": answers_json(&self.answers),
            "server": ending_json(&self.ending),
            "ledger": self.ledger.json(),
        })
    }
}

fn setup_text(s: &Setup) -> String {
    let mut out = String::new();
    let label = if s.label.is_empty() {
        String::new()
    } else {
        format!(" [{}]", s.label)
    };
    let _ = writeln!(out, "rolesync webhook bench{label}");
    let _ = writeln!(out, "  database  {}", s.database);
    let _ = writeln!(
        out,
        "  server    {} {}",
        s.server_bin,
        s.server_env.join(" ")
    );
    let _ = writeln!(
        out,
        "  load      {} deliveries over {} memberships, {}, seed {}, loadgen threads {}",
        s.deliveries, s.memberships, s.mode, s.seed, s.client_threads
    );
    let mix: Vec<String> = s.mix.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(out, "  mix       {}", mix.join(", "));
    if let Some((k, j, d)) = s.prefill {
        let _ = writeln!(
            out,
            "  prefill   {k} memberships, {j} audit rows in {:.1} s",
            d.as_secs_f64()
        );
    }
    out
}

fn figures_text(f: &Figures, rate: Option<f64>) -> String {
    let mut out = String::from("RESULT    OK\n");
    let _ = writeln!(
        out,
        "  throughput  {:.1} deliveries/s ({} in {:.2} s)",
        f.per_second(),
        f.sent,
        f.elapsed.as_secs_f64()
    );
    if f.refused > 0 {
        let _ = writeln!(
            out,
            "  refused     {} of them answered 503 at first (stored on a resend); the first pass stored {:.1}/s",
            f.refused,
            (f.sent - f.refused) as f64 / f.elapsed.as_secs_f64().max(1e-9)
        );
    }
    let _ = writeln!(out, "  latency ms  {}", f.latency.text());
    let _ = writeln!(out, "  {}", load_note(f, rate));
    let per = f.server.cpu_secs * 1000.0 / f.sent.max(1) as f64;
    let _ = writeln!(
        out,
        "  server      peak RSS {:.1} MiB, CPU while sending {:.1} s ({per:.3} ms per delivery), {} threads",
        mib(f.server.peak_rss_kib),
        f.server.cpu_secs,
        f.server.threads
    );
    let _ = writeln!(
        out,
        "  loadgen     CPU while sending {:.1} s, peak RSS {:.1} MiB, signing {:.0} ms, re-signed late {}",
        f.loadgen.cpu_secs,
        mib(f.loadgen.peak_rss_kib),
        f.signing.as_secs_f64() * 1000.0,
        f.resigned
    );
    out
}

/// Open loop: how late the latest request started; closed loop: the rate for the next run.
fn load_note(f: &Figures, rate: Option<f64>) -> String {
    match rate {
        Some(r) => format!(
            "open loop   offered {r}/s, latency from each due time; latest start {:.1} ms late",
            f.max_lag.as_secs_f64() * 1000.0
        ),
        None => format!(
            "next        p99 at half this rate: add --rate {:.0}",
            f.per_second() / 2.0
        ),
    }
}

fn figures_json(f: &Figures) -> Value {
    json!({
        "sent": f.sent, "seconds": f.elapsed.as_secs_f64(), "per_second": f.per_second(),
        "latency": f.latency.json(), "max_start_lag_ms": f.max_lag.as_secs_f64() * 1000.0,
        "server_peak_rss_mib": mib(f.server.peak_rss_kib), "server_cpu_seconds": f.server.cpu_secs,
        "server_threads": f.server.threads, "loadgen_cpu_seconds": f.loadgen.cpu_secs,
        "signing_ms": f.signing.as_secs_f64() * 1000.0, "resigned": f.resigned,
        "refused_first_pass": f.refused,
    })
}

fn answers_json(a: &Answers) -> Value {
    let mut map: serde_json::Map<String, Value> = crate::model::Outcome::ALL
        .iter()
        .map(|o| (o.as_str().to_owned(), json!(a.tally.get(*o))))
        .collect();
    map.insert("rejected".into(), json!(a.rejected_count()));
    map.insert("unplaced".into(), json!(a.unplaced.len()));
    Value::Object(map)
}

/// The server's exit and its log's warnings and errors.
pub fn ending_text(e: &Ending) -> String {
    let mut out = format!(
        "  server log  {} errors, {} warnings; exit: {}{}\n",
        e.errors,
        e.warnings,
        e.exit,
        if e.clean {
            ""
        } else {
            "  <-- not a clean shutdown"
        }
    );
    for (n, m) in &e.samples {
        let _ = writeln!(out, "              {n} x {m}");
    }
    out
}

pub fn ending_json(e: &Ending) -> Value {
    let samples: Vec<Value> = e
        .samples
        .iter()
        .map(|(n, m)| json!({"count": n, "message": m}))
        .collect();
    json!({"exit": e.exit, "clean": e.clean, "errors": e.errors, "warnings": e.warnings, "log_samples": samples})
}

/// The ledger lines, `OK`/`FAIL`/`info`.
pub fn ledger_text(l: &Ledger) -> String {
    let mut out = format!("LEDGER    {}\n", if l.ok() { "balances" } else { "FAILED" });
    for line in &l.lines {
        let tag = match line.ok {
            Some(true) => "OK  ",
            Some(false) => "FAIL",
            None => "info",
        };
        let _ = writeln!(out, "  {tag}  {:<18} {}", line.name, line.detail);
    }
    out
}
