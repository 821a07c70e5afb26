//! The ledger: every answer accounted for, and the answers checked against the database (inbox rows,
//! audit rows, final memberships) and against the generator's model.

use std::collections::BTreeMap;

use anyhow::Result;
use rolesync::db::{self, Db};
use serde_json::{json, Value};

use crate::model::{Expected, Outcome, Tally};
use crate::workload::{org_id, ts, user_id, user_index};

/// One ledger line: `ok` is `None` for information that cannot fail.
#[derive(Debug, Clone)]
pub struct Line {
    pub ok: Option<bool>,
    pub name: String,
    pub detail: String,
}

/// The lines of a run.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub lines: Vec<Line>,
}

impl Ledger {
    /// A line that passes when `ok`.
    pub fn check(&mut self, name: &str, ok: bool, detail: String) {
        self.lines.push(Line {
            ok: Some(ok),
            name: name.to_owned(),
            detail,
        });
    }

    /// A line that cannot fail.
    pub fn note(&mut self, name: &str, detail: String) {
        self.lines.push(Line {
            ok: None,
            name: name.to_owned(),
            detail,
        });
    }

    /// `expected == actual`, shown as `actual (expected)`.
    pub fn equal(&mut self, name: &str, actual: i64, expected: i64, what: &str) {
        let sign = if actual == expected { "=" } else { "!=" };
        self.check(
            name,
            actual == expected,
            format!("{actual} {sign} {expected} {what}"),
        );
    }

    /// Whether no line failed.
    pub fn ok(&self) -> bool {
        self.lines.iter().all(|l| l.ok != Some(false))
    }

    pub fn json(&self) -> Value {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .map(|l| json!({"check": l.name, "ok": l.ok, "detail": l.detail}))
            .collect();
        json!({"ok": self.ok(), "lines": lines})
    }
}

/// Row counts per outcome, and where the audit trail ended, before the run.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub inbox: BTreeMap<String, i64>,
    pub audit: BTreeMap<String, i64>,
    pub audit_max_id: i64,
}

async fn grouped(db: &Db, table: &str) -> Result<BTreeMap<String, i64>> {
    let sql = format!("SELECT outcome, COUNT(*) FROM {table} GROUP BY outcome");
    let rows = db.rows(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| (r[0].text().unwrap_or_default(), r[1].int()))
        .collect())
}

/// Reads the counts now.
pub async fn snapshot(db: &Db) -> Result<Snapshot> {
    let audit_max_id = db
        .rows("SELECT COALESCE(MAX(id), 0) FROM role_audit", &[])
        .await?[0][0]
        .int();
    Ok(Snapshot {
        inbox: grouped(db, "webhook_events").await?,
        audit: grouped(db, "role_audit").await?,
        audit_max_id,
    })
}

impl Snapshot {
    /// Per outcome, `self - before` (outcomes that did not move are left out).
    pub fn since(&self, before: &Snapshot) -> Snapshot {
        let delta = |now: &BTreeMap<String, i64>, then: &BTreeMap<String, i64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v != 0)
                .collect()
        };
        Snapshot {
            inbox: delta(&self.inbox, &before.inbox),
            audit: delta(&self.audit, &before.audit),
            audit_max_id: self.audit_max_id,
        }
    }

    fn count(map: &BTreeMap<String, i64>, outcome: &str) -> i64 {
        map.get(outcome).copied().unwrap_or(0)
    }

    pub fn inbox_of(&self, outcome: &str) -> i64 {
        Self::count(&self.inbox, outcome)
    }

    pub fn audit_of(&self, outcome: &str) -> i64 {
        Self::count(&self.audit, outcome)
    }
}

/// Inbox rows of the run against the answers: same total and the same split by outcome.
pub fn check_inbox(ledger: &mut Ledger, delta: &Snapshot, answers: &Tally, unique: usize) {
    let stored: i64 = delta.inbox.values().sum();
    let fresh = (answers.total() - answers.get(Outcome::Duplicate)) as i64;
    ledger.equal("inbox rows", stored, fresh, "non-duplicate 2xx answers");
    ledger.equal(
        "inbox rows",
        stored,
        unique as i64,
        "unique events generated",
    );
    let mismatched: Vec<String> = delta
        .inbox
        .keys()
        .map(String::as_str)
        .chain(Outcome::ALL.iter().map(|o| o.as_str()))
        .filter(|&o| o != "duplicate")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|o| {
            let answered = Outcome::parse(o).map_or(0, |x| answers.get(x)) as i64;
            let stored = delta.inbox_of(o);
            (answered != stored).then(|| format!("{o}: {stored} stored, {answered} answered"))
        })
        .collect();
    ledger.check(
        "inbox outcomes",
        mismatched.is_empty(),
        match mismatched.is_empty() {
            true => "every stored outcome matches the answers".into(),
            false => mismatched.join("; "),
        },
    );
}

/// Audit rows of the run against the answers: one per applied/removed/unknown_role answer, at most one
/// per stale answer, none for anything else.
pub fn check_audit_counts(ledger: &mut Ledger, delta: &Snapshot, answers: &Tally) {
    for o in [Outcome::Applied, Outcome::Removed, Outcome::UnknownRole] {
        let what = format!("'{}' answers", o.as_str());
        let name = format!("audit {}", o.as_str());
        ledger.equal(
            &name,
            delta.audit_of(o.as_str()),
            answers.get(o) as i64,
            &what,
        );
    }
    let stale = delta.audit_of("stale");
    let answered = answers.get(Outcome::Stale) as i64;
    ledger.check(
        "audit stale",
        stale <= answered,
        format!("{stale} <= {answered} 'stale' answers (a late repeat the trail explains is not audited)"),
    );
    let others: Vec<String> = delta
        .audit
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "applied" | "removed" | "unknown_role" | "stale"))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    ledger.check(
        "audit other",
        others.is_empty(),
        match others.is_empty() {
            true => "no audit row with any other outcome".into(),
            false => others.join(", "),
        },
    );
}

/// Counts rows of `role_audit` added by the run (`$1` is the last id before it) matching `sql`.
async fn count_new_audit(db: &Db, before: &Snapshot, sql: &str) -> Result<i64> {
    Ok(db.rows(sql, &[db::Value::Int(before.audit_max_id)]).await?[0][0].int())
}

/// Every new audit row is a webhook decision naming a stored event with the same outcome, and no
/// event is audited twice.
pub async fn check_audit_rows(ledger: &mut Ledger, db: &Db, before: &Snapshot) -> Result<()> {
    let orphans = count_new_audit(
        db,
        before,
        "SELECT COUNT(*) FROM role_audit a WHERE a.id > $1 AND (a.source <> 'webhook' \
         OR a.event_id IS NULL OR NOT EXISTS (SELECT 1 FROM webhook_events w WHERE w.event_id = a.event_id))",
    )
    .await?;
    let what = "rows not naming a stored webhook event";
    ledger.equal("audit sources", orphans, 0, what);
    let differing = count_new_audit(
        db,
        before,
        "SELECT COUNT(*) FROM role_audit a JOIN webhook_events w ON w.event_id = a.event_id \
         WHERE a.id > $1 AND a.outcome <> w.outcome",
    )
    .await?;
    let what = "rows whose outcome differs from their event's stored outcome";
    ledger.equal("audit vs inbox", differing, 0, what);
    let twice = count_new_audit(
        db,
        before,
        "SELECT COUNT(*) FROM (SELECT event_id FROM role_audit WHERE id > $1 \
         GROUP BY event_id HAVING COUNT(*) > 1) AS d",
    )
    .await?;
    ledger.equal(
        "audit per event",
        twice,
        0,
        "events with more than one audit row",
    );
    Ok(())
}

#[derive(Debug)]
struct Row {
    user_id: String,
    membership_id: String,
    role_slug: Option<String>,
    workos_role_slug: Option<String>,
    status: String,
    version: String,
}

/// The final memberships against the model: the right rows, each at its newest version and state.
pub async fn check_memberships(
    ledger: &mut Ledger,
    db: &Db,
    expected: &[Option<Expected>],
) -> Result<()> {
    let m = expected.len();
    let rows: Vec<Row> = db
        .rows(
            "SELECT user_id, membership_id, role_slug, workos_role_slug, status, version FROM memberships \
             WHERE organization_id >= 'org_bench_' AND organization_id <= $1 AND user_id < $2",
            &[
                db::Value::from(org_id(m.saturating_sub(1))),
                db::Value::from(user_id(m)),
            ],
        )
        .await?
        .into_iter()
        .map(|r| Row {
            user_id: r[0].text().unwrap_or_default(),
            membership_id: r[1].text().unwrap_or_default(),
            role_slug: r[2].text(),
            workos_role_slug: r[3].text(),
            status: r[4].text().unwrap_or_default(),
            version: r[5].text().unwrap_or_default(),
        })
        .collect();
    let want = expected.iter().filter(|e| e.is_some()).count();
    ledger.equal(
        "membership rows",
        rows.len() as i64,
        want as i64,
        "memberships the model expects",
    );
    let mut found: Vec<Option<&Row>> = vec![None; m];
    for row in &rows {
        if let Some(i) = user_index(&row.user_id).filter(|&i| i < m) {
            found[i] = Some(row);
        }
    }
    let wrong: Vec<String> = (0..m)
        .filter_map(|i| differs(i, expected[i].as_ref(), found[i]))
        .collect();
    let detail = match wrong.first() {
        None => format!("all {m} match the model (newest version, role, status)"),
        Some(first) => format!("{} of {m} differ; first: {first}", wrong.len()),
    };
    ledger.check("membership state", wrong.is_empty(), detail);
    Ok(())
}

fn differs(i: usize, want: Option<&Expected>, got: Option<&Row>) -> Option<String> {
    let (want, got) = match (want, got) {
        (None, None) => return None,
        (Some(_), None) => return Some(format!("{}: no row", user_id(i))),
        (None, Some(_)) => return Some(format!("{}: unexpected row", user_id(i))),
        (Some(w), Some(g)) => (w, g),
    };
    let role_ok = want.role.is_none_or(|r| r == got.role_slug.as_deref());
    let same = role_ok
        && got.workos_role_slug.as_deref() == want.workos
        && want.status.is_none_or(|s| s == got.status)
        && got.version == ts(want.version)
        && got.membership_id == crate::workload::membership_id(i);
    (!same).then(|| {
        format!(
            "{}: want role {:?} workos {:?} status {:?} version {}, got role {:?} workos {:?} status {} version {}",
            user_id(i),
            want.role,
            want.workos,
            want.status,
            ts(want.version),
            got.role_slug,
            got.workos_role_slug,
            got.status,
            got.version
        )
    })
}
