//! `loadgen webhooks`: generate, migrate, prefill, start the server, send, read its memory, check the
//! ledger against the database, stop the server, report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rolesync::db::Db;

use crate::deliver::{Deliveries, Reply};
use crate::http1::Http1;
use crate::ledger::{self, Ledger, Snapshot};
use crate::model::{self, Outcome, Tally};
use crate::report::{Figures, Setup, WebhookReport};
use crate::send::{self, Record, Run};
use crate::server::{proc_stats, Server, ServerSpec};
use crate::workload::{Kind, Workload, MAX_MEMBERSHIPS};
use crate::{Common, WebhookArgs};

/// The answers of a run, sorted into the ledger's buckets.
#[derive(Debug, Default)]
pub struct Answers {
    pub tally: Tally,
    /// Non-2xx answers and transport errors by kind: count and first message.
    pub rejected: BTreeMap<String, (usize, String)>,
    pub unplaced: Vec<String>,
}

impl Answers {
    fn of(records: &[Record<Reply>]) -> Self {
        let mut answers = Self::default();
        for r in records {
            match &r.reply {
                Reply::Outcome(o) => answers.tally.add(*o),
                Reply::Rejected { key, message } => {
                    let entry = answers
                        .rejected
                        .entry(key.clone())
                        .or_insert((0, message.clone()));
                    entry.0 += 1;
                }
                Reply::Unplaced(text) => answers.unplaced.push(text.clone()),
            }
        }
        answers
    }

    pub fn rejected_count(&self) -> usize {
        self.rejected.values().map(|(n, _)| n).sum()
    }
}

fn validate(args: &WebhookArgs) -> Result<()> {
    if args.deliveries == 0 {
        bail!("--deliveries must be at least 1");
    }
    if args.memberships == 0 || args.memberships > MAX_MEMBERSHIPS {
        bail!("--memberships must be 1 to {MAX_MEMBERSHIPS}");
    }
    if args.prefill_memberships > MAX_MEMBERSHIPS {
        bail!("--prefill-memberships must be at most {MAX_MEMBERSHIPS}");
    }
    if args.prefill_audit > 0 && args.prefill_memberships == 0 {
        bail!("--prefill-audit spreads its rows over the prefilled memberships: give --prefill-memberships too");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of deliveries per second");
    }
    Ok(())
}

/// The server's environment: the database, `RUST_LOG`, `extra`, then `--server-env` (which wins).
pub fn server_spec(common: &Common, extra: &[(&str, String)]) -> Result<ServerSpec> {
    let mut env = vec![
        ("DATABASE_URL".to_owned(), common.database_url.clone()),
        ("RUST_LOG".to_owned(), common.server_log.clone()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    for pair in &common.server_env {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--server-env {pair:?} is not KEY=VALUE"))?;
        env.push((k.to_owned(), v.to_owned()));
    }
    Ok(ServerSpec {
        bin: common.server_bin.clone(),
        log: common.work_dir.join("server.log"),
        env,
    })
}

/// Prefills (when asked) and reads the counts the ledger starts from.
async fn prepare(args: &WebhookArgs) -> Result<(Option<Duration>, Snapshot)> {
    let db = Db::connect(&args.common.database_url, 2).await?;
    let mut took = None;
    if args.prefill_memberships > 0 {
        took = Some(crate::prefill::run(&db, args.prefill_memberships, args.prefill_audit).await?);
    }
    let before = ledger::snapshot(&db).await?;
    db.close().await;
    Ok((took, before))
}

/// Signs everything, warms the connections and sends, closed or open loop.
async fn send_all(
    args: &WebhookArgs,
    w: &Workload,
    server: &Server,
    secret: &str,
) -> (Run<Reply>, usize, Duration, usize) {
    let client = Http1::new(&server.url).expect("the server's URL is http://ip:port");
    if let Err(e) = client.warm_up(args.common.concurrency).await {
        eprintln!("loadgen: warming up: {e:#}");
    }
    let mut deliveries = Deliveries::prepare(w, client, secret);
    let signing = deliveries.sign_all();
    let deliveries = Arc::new(deliveries);
    let n = deliveries.len();
    let target = deliveries.clone();
    let one = move |i: usize| target.clone().send(i);
    let mut run = match args.rate {
        Some(rate) => send::open_loop(n, rate, args.max_inflight, one).await,
        None => send::closed_loop(n, args.common.concurrency, one).await,
    };
    let refused = match args.retry_refused {
        true => retry_refused(&mut run, &deliveries, args.common.concurrency).await,
        false => 0,
    };
    (run, deliveries.resigned(), signing, refused)
}

/// Resends, a second apart, every delivery whose latest answer was a 503 until none is left (at
/// most 60 rounds). Latencies stay those of the first answers. Returns how many the first pass had.
async fn retry_refused(
    run: &mut Run<Reply>,
    deliveries: &Arc<Deliveries>,
    concurrency: usize,
) -> usize {
    let refused =
        |r: &Reply| matches!(r, Reply::Rejected { key, .. } if key.starts_with("HTTP 503"));
    let (mut rounds, mut resent, mut first) = (0, 0, None);
    while rounds < 60 {
        let again: Arc<Vec<usize>> = Arc::new(
            run.records
                .iter()
                .filter(|r| refused(&r.reply))
                .map(|r| r.index)
                .collect(),
        );
        first.get_or_insert(again.len());
        if again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (target, which) = (deliveries.clone(), again.clone());
        let replies = send::closed_loop(again.len(), concurrency, move |j| {
            target.clone().send(which[j])
        })
        .await;
        for record in replies.records {
            run.records[again[record.index]].reply = record.reply;
        }
        rounds += 1;
        resent += again.len();
    }
    eprintln!("loadgen: resent {resent} deliveries answered 503, in {rounds} rounds");
    first.unwrap_or(0)
}

/// Every ledger line of a webhook run.
async fn check(
    args: &WebhookArgs,
    w: &Workload,
    answers: &Answers,
    before: &Snapshot,
) -> Result<Ledger> {
    let db = Db::connect(&args.common.database_url, 2).await?;
    let delta = ledger::snapshot(&db).await?.since(before);
    let mut l = Ledger::default();
    balance(&mut l, answers, w.order.len());
    let t = &answers.tally;
    l.equal(
        "duplicates",
        t.get(Outcome::Duplicate) as i64,
        w.duplicates as i64,
        "resends generated",
    );
    l.equal(
        "ignored",
        t.get(Outcome::Ignored) as i64,
        w.count(Kind::Other) as i64,
        "non-membership events generated",
    );
    ledger::check_inbox(&mut l, &delta, t, w.events.len());
    ledger::check_audit_counts(&mut l, &delta, t);
    ledger::check_audit_rows(&mut l, &db, before).await?;
    ledger::check_memberships(&mut l, &db, &model::expected_rows(w)).await?;
    let serial = args.rate.is_none() && args.common.concurrency == 1;
    compare_model(&mut l, t, &model::serial_outcomes(w), serial);
    db.close().await;
    Ok(l)
}

/// sent = applied + unchanged + duplicate + stale + unknown_role + removed + ignored + rejected.
fn balance(l: &mut Ledger, a: &Answers, sent: usize) {
    let rejected = a.rejected_count();
    let parts: Vec<String> = Outcome::ALL
        .iter()
        .map(|&o| format!("{} {}", o.as_str(), a.tally.get(o)))
        .chain([format!("rejected {rejected}")])
        .chain((!a.unplaced.is_empty()).then(|| format!("unplaced {}", a.unplaced.len())))
        .collect();
    let total = a.tally.total() + rejected + a.unplaced.len();
    let sign = if total == sent { "=" } else { "!=" };
    l.check(
        "balance",
        total == sent,
        format!("sent {sent} {sign} {}", parts.join(" + ")),
    );
    let detail = match a.rejected.is_empty() {
        true => "0 non-2xx answers or transport errors".to_owned(),
        false => a
            .rejected
            .iter()
            .map(|(k, (n, m))| format!("{n} x {k} ({m})"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    l.check("rejected", rejected == 0, detail);
    let first = a.unplaced.first().cloned().unwrap_or_default();
    l.check(
        "unplaced",
        a.unplaced.is_empty(),
        format!(
            "{} 2xx answers with no known outcome {first}",
            a.unplaced.len()
        ),
    );
}

/// The answers against the outcomes of the same deliveries decided one by one in send order: exact
/// at concurrency 1, information otherwise (requests of one membership may overtake each other).
fn compare_model(l: &mut Ledger, answered: &Tally, serial: &Tally, strict: bool) {
    let parts: Vec<String> = Outcome::ALL
        .iter()
        .filter(|&&o| answered.get(o) != serial.get(o))
        .map(|&o| {
            format!(
                "{} {} (model {})",
                o.as_str(),
                answered.get(o),
                serial.get(o)
            )
        })
        .collect();
    let detail = match parts.is_empty() {
        true => "every outcome count equals the send-order model".to_owned(),
        false => parts.join(", "),
    };
    match strict {
        true => l.check("send-order model", parts.is_empty(), detail),
        false => l.note(
            "send-order model",
            format!("{detail} (concurrent: overtaking in flight moves a few)"),
        ),
    }
}

/// `loadgen webhooks`; `Ok(false)` when the ledger does not balance.
pub async fn webhooks(args: WebhookArgs) -> Result<bool> {
    validate(&args)?;
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let prefilled = args.prefill_memberships.min(args.memberships);
    let w = Workload::generate(
        seed,
        args.deliveries,
        args.memberships,
        prefilled,
        &args.mix,
    );
    let secret = format!("whsec_bench_{:016x}", fastrand::u64(..));
    let spec = server_spec(&args.common, &[("WORKOS_WEBHOOK_SECRET", secret.clone())])?;
    spec.migrate()?;
    let (prefill, before) = prepare(&args).await?;
    let server = Server::start(&spec).await?;
    eprintln!(
        "loadgen: server up at {} (pid {}); sending {} deliveries",
        server.url,
        server.pid(),
        w.order.len()
    );
    let idle = (proc_stats(server.pid())?, proc_stats(std::process::id())?);
    let (run, resigned, signing, refused) = send_all(&args, &w, &server, &secret).await;
    let server_stats = proc_stats(server.pid())?.since(&idle.0);
    let loadgen_stats = proc_stats(std::process::id())?.since(&idle.1);
    let answers = Answers::of(&run.records);
    let ledger = check(&args, &w, &answers, &before).await?;
    let ending = server.stop().await?;
    let report = WebhookReport {
        setup: Setup::of(&args, &spec, &w, prefill),
        figures: Figures::of(
            &run,
            server_stats,
            loadgen_stats,
            resigned,
            signing,
            refused,
        ),
        answers,
        ledger,
        ending,
    };
    report.print(args.common.json);
    Ok(report.ledger.ok())
}
