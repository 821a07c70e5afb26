//! `rolesync resync`: reconcile every membership of an organization against the WorkOS API, and
//! remove the stored ones WorkOS no longer has.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;

use crate::db::{Db, Key};
use crate::reconcile::{
    decide, inferred_deletion, reconcile_batch, Membership, Observation, Outcome, Source, DELETED,
};
use crate::timestamp::Timestamp;
use crate::workos::{ApiMembership, WorkosClient};

const CHUNK: usize = 200;
const LIST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// One membership's comparison: what is stored, what WorkOS says, and what the reconcile does.
#[derive(Debug, Clone)]
pub struct Change {
    pub stored: Option<Membership>,
    pub observed: Observation,
    pub outcome: Outcome,
}

/// Every membership of `organization_id` in WorkOS, all statuses, all pages.
pub async fn list_organization(
    workos: &WorkosClient,
    organization_id: &str,
) -> anyhow::Result<Vec<ApiMembership>> {
    let filters = [("organization_id", organization_id.to_owned())];
    Ok(workos
        .list_memberships(&filters, Instant::now() + LIST_DEADLINE, MAX_PAGES, |_| {
            false
        })
        .await?)
}

/// 100,000 memberships: more pages than that is a runaway cursor.
const MAX_PAGES: usize = 1000;

/// Who asks for a resync: the path (`resync`, or `refetch` for a directory event) and the event
/// that asked, recorded in the audit rows.
#[derive(Debug, Clone, Copy)]
pub struct Cause<'a> {
    pub source: Source,
    pub event_id: Option<&'a str>,
}

impl Cause<'_> {
    /// An operator's `rolesync resync`.
    pub const OPERATOR: Cause<'static> = Cause {
        source: Source::Resync,
        event_id: None,
    };
}

/// The observations a resync makes: each WorkOS membership, and an inferred deletion
/// ([`inferred_deletion`]) for each stored, not yet deleted membership that WorkOS no longer lists.
pub fn observations(
    found: &[ApiMembership],
    stored: &[Membership],
    now: Timestamp,
) -> anyhow::Result<Vec<Observation>> {
    observations_for(found, stored, Cause::OPERATOR, now)
}

/// [`observations`] for a cause.
fn observations_for(
    found: &[ApiMembership],
    stored: &[Membership],
    cause: Cause<'_>,
    now: Timestamp,
) -> anyhow::Result<Vec<Observation>> {
    // A membership WorkOS lists with a value rolesync refuses is skipped, not the whole
    // organization; it still counts as listed, so it is never taken for a deletion.
    let mut out: Vec<Observation> = found
        .iter()
        .filter_map(|m| match m.observation(cause.source, now) {
            Ok(obs) => Some(obs),
            Err(e) => {
                tracing::warn!(membership_id = %m.id, error = %e, "skipping a membership rolesync cannot store");
                None
            }
        })
        .collect();
    let present: HashSet<(&str, &str)> = found
        .iter()
        .map(|m| (m.organization_id.as_str(), m.user_id.as_str()))
        .collect();
    for gone in stored
        .iter()
        .filter(|s| s.status != DELETED && !present.contains(&(&s.organization_id, &s.user_id)))
    {
        out.push(inferred_deletion(
            &gone.organization_id,
            &gone.user_id,
            Some(gone),
            cause.source,
        ));
    }
    for obs in &mut out {
        obs.event_id = cause.event_id.map(str::to_owned);
    }
    Ok(out)
}

/// Resyncs one organization. With `dry_run` the rules run against the stored rows and nothing is written.
pub async fn resync(
    db: &Db,
    workos: &WorkosClient,
    organization_id: &str,
    dry_run: bool,
    now: Timestamp,
) -> anyhow::Result<Vec<Change>> {
    resync_for(db, workos, organization_id, dry_run, Cause::OPERATOR, now).await
}

/// [`resync`] for a cause.
pub async fn resync_for(
    db: &Db,
    workos: &WorkosClient,
    organization_id: &str,
    dry_run: bool,
    cause: Cause<'_>,
    now: Timestamp,
) -> anyhow::Result<Vec<Change>> {
    // Stored rows first: only a membership stored before the listing began can be missing from it.
    // One a webhook stores meanwhile may be on a page already served, and is no deletion.
    let stored = db.memberships(Some(organization_id)).await?;
    // An API key of another WorkOS environment lists no memberships: that is no deletion of all.
    let deadline = Instant::now() + LIST_DEADLINE;
    if !workos
        .organization_exists(organization_id, deadline)
        .await?
    {
        anyhow::bail!(
            "WorkOS does not know organization {organization_id:?}: check that WORKOS_API_KEY belongs to the environment that holds it; nothing was changed"
        );
    }
    let found = list_organization(workos, organization_id).await?;
    let observed = observations_for(&found, &stored, cause, now)?;
    let by_key: HashMap<Key, Membership> = stored
        .into_iter()
        .map(|m| ((m.organization_id.clone(), m.user_id.clone()), m))
        .collect();
    let outcomes = match dry_run {
        true => preview(db, &observed, &by_key, now).await?,
        false => apply(db, &observed, now).await?,
    };
    Ok(observed
        .into_iter()
        .zip(outcomes)
        .map(|(o, outcome)| Change {
            stored: by_key
                .get(&(o.organization_id.clone(), o.user_id.clone()))
                .cloned(),
            observed: o,
            outcome,
        })
        .collect())
}

async fn preview(
    db: &Db,
    observed: &[Observation],
    stored: &HashMap<Key, Membership>,
    now: Timestamp,
) -> anyhow::Result<Vec<Outcome>> {
    let known: HashSet<String> = db.roles().await?.into_iter().collect();
    Ok(observed
        .iter()
        .map(|o| {
            let row = stored.get(&(o.organization_id.clone(), o.user_id.clone()));
            decide(row, o, &known, None, now).outcome
        })
        .collect())
}

async fn apply(db: &Db, observed: &[Observation], now: Timestamp) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(observed.len());
    for chunk in observed.chunks(CHUNK) {
        let mut tx = db.begin_write().await?;
        let refs: Vec<&Observation> = chunk.iter().collect();
        outcomes.extend(reconcile_batch(&mut tx, &refs, now).await?);
        tx.commit().await?;
    }
    Ok(outcomes)
}
