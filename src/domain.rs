//! The domain: what WorkOS reports of a membership, what rolesync stores and audits, and the words
//! both use. No storage or HTTP types: every other module builds on these.

use serde::Serialize;

use crate::timestamp::Timestamp;

/// Which path observed the membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Webhook,
    Login,
    Events,
    Resync,
    Replay,
    Cli,
    /// A refetch of the membership from the WorkOS API after an event that changed its roles
    /// without carrying them (a group or directory change, a role deleted or changed).
    Refetch,
}

impl Source {
    /// The word stored in `role_audit.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Login => "login",
            Self::Events => "events",
            Self::Resync => "resync",
            Self::Replay => "replay",
            Self::Cli => "cli",
            Self::Refetch => "refetch",
        }
    }
}

/// What a reconcile decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    Unchanged,
    Stale,
    UnknownRole,
    Removed,
}

impl Outcome {
    /// The word used in answers and in `role_audit.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Stale => "stale",
            Self::UnknownRole => "unknown_role",
            Self::Removed => "removed",
        }
    }
}

/// Longest id or role slug rolesync stores; WorkOS ids are about 32 characters and slugs shorter.
pub const MAX_ID_LEN: usize = 255;

/// Why an id or slug is refused: empty, longer than [`MAX_ID_LEN`] bytes, or holding a control
/// character (a NUL, which PostgreSQL cannot store in text, among them).
pub fn check_id(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Status of a membership that WorkOS deleted.
pub const DELETED: &str = "deleted";
/// The status under which the web app lets a role through.
pub const ACTIVE: &str = "active";

/// What WorkOS holds for one membership, as seen by one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub organization_id: String,
    pub user_id: String,
    pub membership_id: String,
    /// The primary role slug WorkOS reported; `None` when it reported none.
    pub role_slug: Option<String>,
    /// Every role slug WorkOS reported (`roles` with multiple roles on, and the primary), sorted and
    /// distinct ([`role_set`]).
    pub role_slugs: Vec<String>,
    /// Whether WorkOS sent `roles` at all: a webhook may leave it out even with multiple roles on,
    /// and then `role_slugs` is only the primary role ([`crate::reconcile::decide`] keeps the
    /// stored set and queues a refetch).
    pub roles_reported: bool,
    pub status: String,
    pub deleted: bool,
    /// A deletion inferred from WorkOS no longer listing the membership ([`inferred_deletion`]),
    /// not one WorkOS reported.
    pub inferred: bool,
    /// WorkOS manages the membership through directory sync (`directory_managed`): a deactivation
    /// that resets its role is a directory deprovision.
    pub directory_managed: bool,
    /// WorkOS `updated_at` of this state.
    pub version: Timestamp,
    pub source: Source,
    pub event_id: Option<String>,
}

/// How far past "now" a version may lie. A version far in the future (`9999-12-31`) would make
/// every later change of the membership `stale`, freezing it for ever.
pub const MAX_VERSION_AHEAD_MS: i64 = 24 * 60 * 60 * 1000;

impl Observation {
    /// Why rolesync refuses to store this observation: an id or slug it cannot store or that no
    /// WorkOS object has (see [`check_id`]), or a version more than [`MAX_VERSION_AHEAD_MS`] past `now`.
    pub fn check(&self, now: Timestamp) -> Result<(), String> {
        let fields = [
            ("organization_id", Some(&self.organization_id)),
            ("user_id", Some(&self.user_id)),
            ("id", Some(&self.membership_id)),
            ("role.slug", self.role_slug.as_ref()),
            ("status", Some(&self.status)),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                check_id(value).map_err(|why| format!("field `{name}` {why}"))?;
            }
        }
        if self.role_slugs.len() > MAX_ROLES {
            return Err(format!("field `roles` holds more than {MAX_ROLES} roles"));
        }
        for slug in &self.role_slugs {
            check_id(slug).map_err(|why| format!("field `roles` has a slug that {why}"))?;
        }
        if self.version.millis() > now.millis().saturating_add(MAX_VERSION_AHEAD_MS) {
            return Err(format!(
                "field `updated_at` {} is more than a day ahead of now ({now})",
                self.version
            ));
        }
        Ok(())
    }
}

/// Most role slugs one membership may carry; WorkOS environments define a handful of roles.
pub const MAX_ROLES: usize = 1000;

/// The role set of a membership WorkOS reports: its `roles` (absent when multiple roles are off)
/// with its primary `role`, sorted and distinct.
pub fn role_set(primary: Option<&str>, roles: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut set: Vec<String> = roles.into_iter().filter(|s| !s.is_empty()).collect();
    set.extend(primary.map(str::to_owned));
    set.sort_unstable();
    set.dedup();
    set
}

/// The role set a payload reports: `roles` (entries as read: `None` for one without a string
/// `slug`) with the primary role, and whether `roles` was there. An entry without a slug, or with an
/// empty one, makes the whole payload refused: a mangled set must not shrink a stored one.
pub fn reported_roles(
    primary: Option<&str>,
    roles: Option<Vec<Option<String>>>,
) -> Result<(Vec<String>, bool), String> {
    let reported = roles.is_some();
    let mut slugs = Vec::new();
    for (i, slug) in roles.into_iter().flatten().enumerate() {
        match slug {
            Some(slug) if !slug.is_empty() => slugs.push(slug),
            _ => return Err(format!("field `roles[{i}].slug` is missing or empty")),
        }
    }
    Ok((role_set(primary, slugs), reported))
}

/// A `memberships` row, with its role set (`membership_roles`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Membership {
    pub organization_id: String,
    pub user_id: String,
    pub membership_id: String,
    /// The primary role the app gates on (single-role apps).
    pub role_slug: Option<String>,
    pub workos_role_slug: Option<String>,
    /// The roles rolesync applied (the rows of `membership_roles`), sorted; empty for a deleted
    /// membership. Answers name it `roles`.
    #[serde(rename = "roles")]
    pub role_slugs: Vec<String>,
    /// The role set WorkOS last reported, unknown slugs included, sorted (`workos_roles`).
    #[serde(rename = "workos_roles")]
    pub workos_role_slugs: Vec<String>,
    pub status: String,
    pub version: Timestamp,
    pub updated_at: Timestamp,
}

/// A `role_audit` row to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub recorded_at: Timestamp,
    pub organization_id: String,
    pub user_id: String,
    pub membership_id: String,
    pub source: Source,
    pub event_id: Option<String>,
    pub workos_role_slug: Option<String>,
    pub old_role: Option<String>,
    pub new_role: Option<String>,
    /// The role sets before and after (`role_audit.old_roles` / `new_roles`); `None` where no row was stored.
    pub old_roles: Option<Vec<String>>,
    pub new_roles: Option<Vec<String>>,
    pub old_status: Option<String>,
    pub new_status: Option<String>,
    pub outcome: Outcome,
    pub detail: String,
    /// The observation's version.
    pub version: Timestamp,
}

/// What the audit trail says a membership was as of a version: the latest row at or before it
/// (stale rows count only at exactly that version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryMark {
    pub version: Timestamp,
    pub workos_role_slug: Option<String>,
    pub new_status: Option<String>,
}

/// What applying one item of a batch came to: a reconcile's outcome, or for a delivery that
/// reconciles nothing, how the inbox took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Reconciled(Outcome),
    /// An event type rolesync does not act on, stored.
    Ignored,
    /// A membership event missing or mangling a required field, stored.
    Invalid,
    /// An event that changes a membership's roles without carrying them, stored with a refetch of
    /// what it names queued in the same transaction ([`Refetch`]).
    RefetchQueued,
    /// An event id the inbox already holds (or that came earlier in the batch); nothing changed.
    Duplicate,
}

impl Applied {
    /// The word of answers and of `webhook_events.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reconciled(outcome) => outcome.as_str(),
            Self::Ignored => "ignored",
            Self::Invalid => "invalid",
            Self::RefetchQueued => "refetch_queued",
            Self::Duplicate => "duplicate",
        }
    }
}

/// What an event that changes roles without carrying them asks to fetch again from the WorkOS API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refetch {
    /// One membership (`om_...`): a group membership change.
    Membership(String),
    /// Every membership of an organization: a directory-sync change, which names a directory user
    /// rather than a membership.
    Organization(String),
    /// Every stored membership holding this role (in this organization, for an organization role):
    /// a role deleted (`gone`: WorkOS moves its holders to the default role, asynchronously) or changed.
    Role {
        slug: String,
        organization_id: Option<String>,
        gone: bool,
    },
}

impl Refetch {
    /// The `refetch_queue.target` of a membership or an organization; `None` for a role, which is
    /// queued as the memberships holding it.
    pub fn target(&self) -> Option<String> {
        match self {
            Self::Membership(id) => Some(id.clone()),
            Self::Organization(id) => Some(format!("{ORGANIZATION_TARGET}{id}")),
            Self::Role { .. } => None,
        }
    }
}

/// The prefix of an organization's `refetch_queue.target` (a membership's is its `om_...` id).
pub const ORGANIZATION_TARGET: &str = "org:";
