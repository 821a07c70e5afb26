//! `loadgen login`: rolesync pointed at an in-process stand-in WorkOS that answers after a fixed delay;
//! two rounds of one login per user. Reports the latency rolesync adds (latency minus the time the
//! stand-in held that call) and
//! checks that the first round writes each membership once and the second writes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use rolesync::db::Db;
use serde_json::{json, Value};

use crate::fake_workos::{self, role_of, version_of, Fake};
use crate::http1::Http1;
use crate::ledger::Ledger;
use crate::report::{ending_json, ending_text, ledger_text, mib, shown_env};
use crate::run::server_spec;
use crate::send::{self, Run};
use crate::server::{proc_stats, Ending, ProcStats, Server, ServerSpec};
use crate::stats::Latency;
use crate::token::{self, Signer};
use crate::workload::{org_id, ts, user_id, MAX_MEMBERSHIPS};
use crate::{Common, LoginArgs};

/// How one login was answered.
#[derive(Debug, Clone)]
enum Reply {
    /// 200: the outcome (null when answered from the database), and whether role, status and source
    /// (`workos`) are what the stand-in holds.
    Answer {
        outcome: String,
        right: bool,
        body: String,
    },
    Rejected(String),
}

/// Sends the logins of one round, users in a fixed shuffled order.
struct Logins {
    client: Http1,
    token: String,
    users: Vec<usize>,
    /// Access tokens by user index, for a round of sign-ins with a token (empty before it).
    access_tokens: Vec<String>,
}

impl Logins {
    /// One login of the `k`th user: with the user's access token when `with_token`.
    async fn send(self: Arc<Self>, k: usize, with_token: bool) -> Reply {
        let i = self.users[k];
        let (body, source) = match with_token {
            true => (json!({"access_token": self.access_tokens[i]}), "token"),
            false => (
                json!({"user_id": user_id(i), "organization_id": org_id(i)}),
                "workos",
            ),
        };
        let body = body.to_string();
        let bearer = format!("Bearer {}", self.token);
        let headers = [
            ("content-type", "application/json"),
            ("authorization", bearer.as_str()),
        ];
        let response = match self.client.post(PATH, &headers, body.as_bytes()).await {
            Ok(r) => r,
            Err(e) => return Reply::Rejected(format!("transport error: {e:#}")),
        };
        let text = String::from_utf8_lossy(&response.body).into_owned();
        if !(200..300).contains(&response.status) {
            return Reply::Rejected(format!("HTTP {} {text}", response.status));
        }
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let right = answer["role"] == role_of(i)
            && answer["status"] == "active"
            && answer["source"] == source;
        Reply::Answer {
            outcome: answer["outcome"].as_str().unwrap_or("null").to_owned(),
            right,
            body: text,
        }
    }
}

const PATH: &str = "/v1/reconcile";

/// One round's figures and answers.
struct Round {
    elapsed: Duration,
    latency: Latency,
    /// Latency minus how long the stand-in actually held that login's call (its timer overshoots
    /// the delay by up to a millisecond): what rolesync, with loopback HTTP, adds.
    added: Latency,
    outcomes: BTreeMap<String, usize>,
    wrong: Vec<String>,
    rejected: Vec<String>,
}

impl Round {
    /// `held` gives, for the record's index, how long the stand-in held its call.
    fn of(run: &Run<Reply>, held: impl Fn(usize) -> Duration) -> Self {
        let mut round = Round {
            elapsed: run.elapsed,
            latency: Latency::of(run.records.iter().map(|r| r.latency)),
            added: Latency::of_micros(
                run.records
                    .iter()
                    .map(|r| r.latency.as_micros() as i64 - held(r.index).as_micros() as i64)
                    .collect(),
            ),
            outcomes: BTreeMap::new(),
            wrong: vec![],
            rejected: vec![],
        };
        for r in &run.records {
            match &r.reply {
                Reply::Answer {
                    outcome,
                    right,
                    body,
                } => {
                    *round.outcomes.entry(outcome.clone()).or_default() += 1;
                    if !right {
                        round.wrong.push(body.clone());
                    }
                }
                Reply::Rejected(why) => round.rejected.push(why.clone()),
            }
        }
        round
    }

    fn per_second(&self) -> f64 {
        self.latency.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the database holds for the bench: audit rows, and per user (role, status, version, updated_at).
struct DbState {
    audit: i64,
    audit_login_applied: i64,
    rows: BTreeMap<String, (Option<String>, String, String, String)>,
}

async fn db_state(db: &Db) -> Result<DbState> {
    let count = |sql: &'static str| async move { anyhow::Ok(db.rows(sql, &[]).await?[0][0].int()) };
    let audit = count("SELECT COUNT(*) FROM role_audit").await?;
    let audit_login_applied =
        count("SELECT COUNT(*) FROM role_audit WHERE source = 'login' AND outcome = 'applied'")
            .await?;
    let rows = db
        .rows(
            "SELECT user_id, role_slug, status, version, updated_at FROM memberships",
            &[],
        )
        .await?
        .into_iter()
        .map(|r| {
            let text = |i: usize| r[i].text().unwrap_or_default();
            (text(0), (r[1].text(), text(2), text(3), text(4)))
        })
        .collect();
    Ok(DbState {
        audit,
        audit_login_applied,
        rows,
    })
}

/// A round's answers: none rejected, each right, each with the outcome this round must give.
fn check_round(l: &mut Ledger, name: &str, r: &Round, users: usize, want: &str) {
    let first = r.rejected.first().cloned().unwrap_or_default();
    l.check(
        &format!("{name} rejected"),
        r.rejected.is_empty(),
        format!("{} non-2xx or transport errors {first}", r.rejected.len()),
    );
    let first = r.wrong.first().cloned().unwrap_or_default();
    l.check(
        &format!("{name} answers"),
        r.wrong.is_empty(),
        format!(
            "{} answers without the WorkOS role/status/source {first}",
            r.wrong.len()
        ),
    );
    let got = r.outcomes.get(want).copied().unwrap_or(0);
    l.equal(
        &format!("{name} outcomes"),
        got as i64,
        users as i64,
        &format!("'{want}' of {users} logins; all: {:?}", r.outcomes),
    );
}

/// After round 1: one row per user as WorkOS holds it, one `login`/`applied` audit row per user.
fn check_first_state(l: &mut Ledger, s: &DbState, users: usize) {
    let wrong = (0..users)
        .filter(|&i| {
            let want = (
                Some(role_of(i).to_owned()),
                "active".to_owned(),
                ts(version_of(i)),
            );
            s.rows
                .get(&user_id(i))
                .map(|(r, st, v, _)| (r.clone(), st.clone(), v.clone()))
                != Some(want)
        })
        .count();
    l.equal(
        "memberships",
        s.rows.len() as i64,
        users as i64,
        "rows after the first round",
    );
    l.equal(
        "membership state",
        wrong as i64,
        0,
        "rows not at the WorkOS role, status and version",
    );
    l.equal(
        "audit first",
        s.audit,
        users as i64,
        "audit rows after the first round",
    );
    l.equal(
        "audit login",
        s.audit_login_applied,
        users as i64,
        "login/applied audit rows",
    );
}

/// After round 2 (or 3): nothing written.
fn check_nothing_written(l: &mut Ledger, name: &str, before: &DbState, after: &DbState) {
    l.equal(
        &format!("audit {name}"),
        after.audit - before.audit,
        0,
        &format!("audit rows written by the {name} round"),
    );
    let moved = before
        .rows
        .iter()
        .filter(|(u, row)| after.rows.get(*u) != Some(row))
        .count();
    l.equal(
        &format!("updated_at {name}"),
        moved as i64,
        0,
        &format!("memberships rewritten by the {name} round (updated_at or state changed)"),
    );
}

fn check_fake(l: &mut Ledger, fake: &Fake, users: usize) {
    l.equal(
        "workos calls",
        Fake::count(&fake.calls) as i64,
        2 * users as i64,
        "membership fetches (one per login of rounds 1 and 2; none for --token round 3)",
    );
    l.equal(
        "workos auth",
        Fake::count(&fake.bad_auth) as i64,
        0,
        "calls without Bearer sk_bench",
    );
    l.equal(
        "workos other",
        Fake::count(&fake.other) as i64,
        0,
        "calls to any other path",
    );
    l.equal(
        "workos lookups",
        Fake::count(&fake.strangers) as i64,
        0,
        "calls naming no bench membership",
    );
}

/// The server's environment: pointed at the stand-in, no refresh or rate limits.
fn login_spec(common: &Common, fake_url: String, token: &str) -> Result<ServerSpec> {
    let secret = format!("whsec_bench_{:016x}", fastrand::u64(..));
    server_spec(
        common,
        &[
            ("WORKOS_WEBHOOK_SECRET", secret),
            ("WORKOS_API_BASE_URL", fake_url),
            ("WORKOS_API_KEY", fake_workos::API_KEY.to_owned()),
            ("ROLESYNC_LOGIN_TOKEN", token.to_owned()),
            ("ROLESYNC_LOGIN_REFRESH_SECS", "0".to_owned()),
            ("ROLESYNC_WORKOS_RPS", "0".to_owned()),
            // Newer servers also follow the Events API from `serve`; the stand-in has none.
            ("ROLESYNC_SYNC_INTERVAL_SECS", "0".to_owned()),
        ],
    )
}

/// Both rounds (and with `--token` the third), each followed by a look at the database.
async fn rounds(
    args: &LoginArgs,
    logins: &mut Arc<Logins>,
    fake: &Fake,
    signer: Option<&Signer>,
) -> Result<(Vec<Round>, Vec<DbState>)> {
    let delay = Duration::from_millis(args.delay_ms);
    let c = args.common.concurrency;
    let db = Db::connect(&args.common.database_url, 2).await?;
    let mut rounds = vec![round(logins, fake, c, delay).await];
    let mut states = vec![db_state(&db).await?];
    rounds.push(round(logins, fake, c, delay).await);
    states.push(db_state(&db).await?);
    if let Some(signer) = signer {
        // Minted now, so that none expires during the round; signing is not timed.
        let tokens: Result<Vec<String>> = (0..args.memberships).map(|i| signer.token(i)).collect();
        Arc::get_mut(logins)
            .expect("no round running")
            .access_tokens = tokens?;
        let rate = rounds[1].per_second();
        rounds.push(token_round(logins, rate, c).await);
        states.push(db_state(&db).await?);
    }
    db.close().await;
    Ok((rounds, states))
}

fn checks(users: usize, rounds: &[Round], states: &[DbState], fake: &Fake) -> Ledger {
    let mut l = Ledger::default();
    check_round(&mut l, "round 1", &rounds[0], users, "applied");
    check_first_state(&mut l, &states[0], users);
    check_round(&mut l, "round 2", &rounds[1], users, "unchanged");
    check_nothing_written(&mut l, "second", &states[0], &states[1]);
    if let (Some(third), Some(after)) = (rounds.get(2), states.get(2)) {
        // Answered from the database: no outcome, nothing written.
        check_round(&mut l, "round 3", third, users, "null");
        check_nothing_written(&mut l, "third", &states[1], after);
        l.equal(
            "jwks fetches",
            Fake::count(&fake.jwks_calls) as i64,
            1,
            "key set fetches (the first token's; then cached)",
        );
    }
    check_fake(&mut l, fake, users);
    l
}

/// `loadgen login`; `Ok(false)` when a check fails.
pub async fn run(args: LoginArgs) -> Result<bool> {
    if args.memberships == 0 || args.memberships > MAX_MEMBERSHIPS {
        bail!("--memberships must be 1 to {MAX_MEMBERSHIPS}");
    }
    let signer = args.token.then(Signer::new).transpose()?;
    let jwks = signer.as_ref().map(|s| s.jwks.clone());
    let (fake_url, fake) = fake_workos::start(Duration::from_millis(args.delay_ms), jwks).await?;
    let token = format!("bench_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let mut spec = login_spec(&args.common, fake_url.clone(), &token)?;
    if args.token {
        spec.env
            .push(("WORKOS_CLIENT_ID".into(), token::CLIENT_ID.into()));
    }
    spec.migrate()?;
    let server = Server::start(&spec).await?;
    let mut users: Vec<usize> = (0..args.memberships).collect();
    fastrand::shuffle(&mut users);
    let mut logins = Arc::new(Logins {
        client: Http1::new(&server.url)?,
        token,
        users,
        access_tokens: vec![],
    });
    logins.client.warm_up(args.common.concurrency).await?;
    let (rounds, states) = rounds(&args, &mut logins, &fake, signer.as_ref()).await?;
    let stats = proc_stats(server.pid())?;
    let ledger = checks(args.memberships, &rounds, &states, &fake);
    let harness = direct_round(&logins, &fake_url, &fake, args.common.concurrency).await?;
    let ending = server.stop().await?;
    let held = Latency::of_micros(fake.held_us.lock().expect("not poisoned").clone());
    let env = shown_env(&spec);
    let report = LoginReport {
        args: &args,
        env,
        rounds,
        held,
        harness,
        stats,
        ending,
        ledger,
    };
    report.print();
    Ok(report.ledger.ok())
}

/// The harness's own share of "added": the same client calling the stand-in directly (at most 2,000
/// calls, same concurrency), each latency minus the stand-in's hold of that call.
async fn direct_round(
    logins: &Arc<Logins>,
    fake_url: &str,
    fake: &Arc<Fake>,
    concurrency: usize,
) -> Result<Latency> {
    let n = logins.users.len().min(2000);
    let stand_in = Arc::new(Http1::new(fake_url)?);
    stand_in.warm_up(concurrency).await?;
    let users = logins.clone();
    let run = send::closed_loop(n, concurrency, move |k| {
        let (users, stand_in) = (users.clone(), stand_in.clone());
        async move {
            let i = users.users[k];
            let path = format!(
                "/user_management/organization_memberships?user_id={}&organization_id={}",
                user_id(i),
                org_id(i)
            );
            let bearer = format!("Bearer {}", fake_workos::API_KEY);
            let sent = stand_in.get(&path, &[("authorization", &bearer)]).await;
            matches!(sent, Ok(r) if (200..300).contains(&r.status))
        }
    })
    .await;
    if run.records.iter().any(|r| !r.reply) {
        bail!("a direct call to the stand-in failed");
    }
    let held = fake.held_by_user.lock().expect("not poisoned");
    Ok(Latency::of_micros(
        run.records
            .iter()
            .map(|r| {
                let hold = held.get(&logins.users[r.index]).copied().unwrap_or(0);
                r.latency.as_micros() as i64 - hold
            })
            .collect(),
    ))
}

/// Sign-ins with a token at `rate` (round 2's, so both meet the same load; unpaced, the round would
/// run the server flat out and measure its queue): `concurrency` senders, each waiting between its
/// sign-ins. Latency is each request's own time (not from a due time: the timer's millisecond
/// would count); no WorkOS call is held, so all of it is added.
async fn token_round(logins: &Arc<Logins>, rate: f64, concurrency: usize) -> Round {
    let gap = Duration::from_secs_f64(concurrency.max(1) as f64 / rate.max(1.0));
    let target = logins.clone();
    let run = send::closed_loop(logins.users.len(), concurrency, move |k| {
        let target = target.clone();
        async move {
            let started = tokio::time::Instant::now();
            let reply = target.send(k, true).await;
            let took = started.elapsed();
            tokio::time::sleep(gap.saturating_sub(took)).await;
            (reply, took)
        }
    })
    .await;
    let records = run
        .records
        .into_iter()
        .map(|r| send::Record {
            index: r.index,
            latency: r.reply.1,
            reply: r.reply.0,
        })
        .collect();
    let run = Run {
        records,
        elapsed: run.elapsed,
        max_lag: run.max_lag,
    };
    Round::of(&run, |_| Duration::ZERO)
}

/// One round of logins by ids; "added" is each latency minus the stand-in's hold of that call.
async fn round(logins: &Arc<Logins>, fake: &Fake, concurrency: usize, delay: Duration) -> Round {
    let target = logins.clone();
    let run = send::closed_loop(logins.users.len(), concurrency, move |k| {
        target.clone().send(k, false)
    })
    .await;
    let held = fake.held_by_user.lock().expect("not poisoned");
    Round::of(&run, |k| {
        let user = logins.users[k];
        held.get(&user)
            .map_or(delay, |&us| Duration::from_micros(us as u64))
    })
}

struct LoginReport<'a> {
    args: &'a LoginArgs,
    env: Vec<String>,
    rounds: Vec<Round>,
    /// How long the stand-in actually held each call.
    held: Latency,
    /// The same client calling the stand-in directly: latency minus hold.
    harness: Latency,
    stats: ProcStats,
    ending: Ending,
    ledger: Ledger,
}

const ROUND_NAMES: [&str; 3] = [
    "round 1 (first logins: fetch + write)",
    "round 2 (same logins: fetch, no write)",
    "round 3 (same users, agreeing access tokens at round 2's rate: no fetch, no write)",
];

impl LoginReport<'_> {
    fn print(&self) {
        match self.args.common.json {
            true => println!(
                "{}",
                serde_json::to_string_pretty(&self.json()).expect("JSON")
            ),
            false => print!("{}", self.text()),
        }
    }

    fn text(&self) -> String {
        let c = &self.args.common;
        let mut out = String::from("rolesync login bench");
        if !c.label.is_empty() {
            let _ = write!(out, " [{}]", c.label);
        }
        let database = rolesync::config::redact_url(&c.database_url);
        let _ = writeln!(out, "\n  database  {database}");
        let _ = writeln!(
            out,
            "  server    {} {}",
            c.server_bin.display(),
            self.env.join(" ")
        );
        let _ = writeln!(
            out,
            "  load      {} users x {} rounds, concurrency {}, stand-in WorkOS delay {} ms, loadgen threads {}",
            self.args.memberships, self.rounds.len(), c.concurrency, self.args.delay_ms, c.client_threads
        );
        match self.ledger.ok() {
            true => out += &self.figures_text(),
            false => out += "RESULT    FAILED: a check failed; no figures are reported\n",
        }
        out += &ending_text(&self.ending);
        out += &ledger_text(&self.ledger);
        out
    }

    fn figures_text(&self) -> String {
        let mut out = String::from("RESULT    OK\n");
        for (name, r) in ROUND_NAMES.iter().zip(&self.rounds) {
            let _ = writeln!(out, "  {name}: {:.1} logins/s", r.per_second());
            let _ = writeln!(out, "    latency ms          {}", r.latency.text());
            let _ = writeln!(out, "    added by rolesync   {}", r.added.text());
        }
        let (held, asked) = (self.held.text(), self.args.delay_ms);
        let _ = writeln!(
            out,
            "  stand-in    held each call {held} (asked {asked} ms)"
        );
        let _ = writeln!(
            out,
            "  harness     the same client calling the stand-in directly, latency minus hold: {}",
            self.harness.text()
        );
        let s = &self.stats;
        let rss = mib(s.peak_rss_kib);
        let _ = writeln!(
            out,
            "  server      peak RSS {rss:.1} MiB, CPU {:.1} s, {} threads",
            s.cpu_secs, s.threads
        );
        out
    }

    fn json(&self) -> Value {
        let c = &self.args.common;
        let rounds: Vec<Value> = self.rounds.iter().map(round_json).collect();
        let ok = self.ledger.ok();
        let figures = json!({
            "rounds": rounds,
            "stand_in_held": self.held.json(),
            "harness_added": self.harness.json(),
            "server_peak_rss_mib": mib(self.stats.peak_rss_kib),
            "server_cpu_seconds": self.stats.cpu_secs,
        });
        json!({
            "mode": "login", "ok": ok, "label": c.label,
            "database": rolesync::config::redact_url(&c.database_url),
            "server_bin": c.server_bin.display().to_string(), "server_env": self.env,
            "users": self.args.memberships, "concurrency": c.concurrency,
            "delay_ms": self.args.delay_ms, "client_threads": c.client_threads,
            "figures": ok.then_some(figures),
            "server": ending_json(&self.ending),
            "ledger": self.ledger.json(),
        })
    }
}

fn round_json(r: &Round) -> Value {
    json!({
        "per_second": r.per_second(),
        "seconds": r.elapsed.as_secs_f64(),
        "latency": r.latency.json(),
        "added_by_rolesync": r.added.json(),
        "outcomes": r.outcomes,
    })
}
