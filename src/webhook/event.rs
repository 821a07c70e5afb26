//! WorkOS event envelopes and the membership observation they carry.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::reconcile::{Observation, Source};
use crate::timestamp::Timestamp;

/// Longest event id accepted; WorkOS ids are about 32 characters.
const MAX_ID_LEN: usize = 255;

/// The envelope of every WorkOS event. `data` stays raw until the type is known.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    pub id: String,
    pub event: String,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// What an event means for rolesync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// An `organization_membership.*` event with every field the reconcile needs.
    Membership(Observation),
    /// A membership event missing or mangling a required field.
    Invalid(String),
    /// Any other event type: stored and ignored.
    Other,
}

#[derive(Debug, Deserialize)]
struct MembershipData {
    id: Option<String>,
    user_id: Option<String>,
    organization_id: Option<String>,
    status: Option<String>,
    role: Option<RoleRef>,
    updated_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RoleRef {
    slug: Option<String>,
}

/// Why a body is not an event.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

/// Parses the envelope: JSON with a non-empty string `id` and `event`.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope<'_>, PayloadError> {
    if nesting_depth(body) > MAX_DEPTH {
        return Err(PayloadError(format!(
            "JSON nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let envelope: Envelope = serde_json::from_slice(body)
        .map_err(|e| PayloadError(format!("body is not a WorkOS event: {e}")))?;
    if envelope.id.is_empty() || envelope.id.len() > MAX_ID_LEN {
        return Err(PayloadError(format!(
            "event id must be 1 to {MAX_ID_LEN} characters"
        )));
    }
    if envelope.event.is_empty() || envelope.event.len() > MAX_ID_LEN {
        return Err(PayloadError(format!(
            "event type must be 1 to {MAX_ID_LEN} characters"
        )));
    }
    Ok(envelope)
}

/// Deepest nesting accepted; `data` stays raw, so serde's own recursion limit does not reach it.
const MAX_DEPTH: usize = 64;

/// The deepest `[`/`{` nesting of a JSON text, skipping strings.
fn nesting_depth(body: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Classifies an event and, for a membership event, builds its observation.
pub fn classify(envelope: &Envelope<'_>, source: Source) -> EventKind {
    let deleted = match envelope.event.as_str() {
        "organization_membership.created" | "organization_membership.updated" => false,
        "organization_membership.deleted" => true,
        _ => return EventKind::Other,
    };
    match observation(envelope, deleted, source) {
        Ok(obs) => EventKind::Membership(obs),
        Err(reason) => EventKind::Invalid(reason),
    }
}

fn observation(
    envelope: &Envelope<'_>,
    deleted: bool,
    source: Source,
) -> Result<Observation, String> {
    let raw = envelope.data.ok_or("missing field `data`")?;
    let data: MembershipData =
        serde_json::from_str(raw.get()).map_err(|e| format!("`data` is not a membership: {e}"))?;
    let updated_at = required(data.updated_at, "data.updated_at")?;
    let version = Timestamp::parse(&updated_at).map_err(|e| format!("data.updated_at: {e}"))?;
    let role_slug = data.role.and_then(|r| r.slug).filter(|s| !s.is_empty());
    let (status, role_slug) = if deleted {
        (data.status.unwrap_or_else(|| "deleted".into()), role_slug)
    } else {
        let status = required(data.status, "data.status")?;
        (
            status,
            Some(role_slug.ok_or("missing field `data.role.slug`")?),
        )
    };
    Ok(Observation {
        organization_id: required(data.organization_id, "data.organization_id")?,
        user_id: required(data.user_id, "data.user_id")?,
        membership_id: required(data.id, "data.id")?,
        role_slug,
        status,
        deleted,
        version,
        source,
        event_id: Some(envelope.id.clone()),
    })
}

fn required(value: Option<String>, name: &str) -> Result<String, String> {
    match value {
        Some(v) if !v.is_empty() && v.len() <= MAX_ID_LEN => Ok(v),
        Some(_) => Err(format!(
            "field `{name}` must be 1 to {MAX_ID_LEN} characters"
        )),
        None => Err(format!("missing field `{name}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership_event(event: &str, data: &str) -> String {
        format!(r#"{{"id":"event_1","event":"{event}","data":{data}}}"#)
    }

    const DATA: &str = r#"{"id":"om_1","user_id":"user_1","organization_id":"org_1","status":"active",
        "role":{"slug":"admin"},"roles":[{"slug":"admin"}],"updated_at":"2023-11-18T17:10:15.121Z","extra":1}"#;

    #[test]
    fn a_membership_update_becomes_an_observation() {
        let body = membership_event("organization_membership.updated", DATA);
        let kind = classify(&parse_envelope(body.as_bytes()).unwrap(), Source::Webhook);
        let EventKind::Membership(obs) = kind else {
            panic!("expected a membership, got {kind:?}")
        };
        assert_eq!(obs.role_slug.as_deref(), Some("admin"));
        assert_eq!(obs.version.to_string(), "2023-11-18T17:10:15.121Z");
        assert_eq!(
            (obs.deleted, obs.event_id.as_deref()),
            (false, Some("event_1"))
        );
    }

    #[test]
    fn membership_events_missing_a_field_are_invalid() {
        for (field, data) in [
            (
                "updated_at",
                DATA.replace(r#""updated_at":"2023-11-18T17:10:15.121Z","#, ""),
            ),
            ("role", DATA.replace(r#""role":{"slug":"admin"},"#, "")),
            ("user_id", DATA.replace(r#""user_id":"user_1","#, "")),
            (
                "bad time",
                DATA.replace("2023-11-18T17:10:15.121Z", "yesterday"),
            ),
            ("data is a string", r#""nope""#.to_owned()),
        ] {
            let body = membership_event("organization_membership.created", &data);
            let kind = classify(&parse_envelope(body.as_bytes()).unwrap(), Source::Webhook);
            assert!(
                matches!(kind, EventKind::Invalid(_)),
                "{field}: got {kind:?}"
            );
        }
    }

    #[test]
    fn bodies_without_id_or_event_are_not_events() {
        for body in [
            "",
            "[]",
            "{}",
            r#"{"id":"e"}"#,
            r#"{"event":"x"}"#,
            r#"{"id":"","event":"x"}"#,
            r#"{"id":1,"event":"x"}"#,
        ] {
            assert!(
                parse_envelope(body.as_bytes()).is_err(),
                "{body:?} must be refused"
            );
        }
    }

    #[test]
    fn other_event_types_are_ignored() {
        let body = r#"{"id":"wh_1","event":"user.updated","data":{"id":"user_1"}}"#;
        assert_eq!(
            classify(&parse_envelope(body.as_bytes()).unwrap(), Source::Webhook),
            EventKind::Other
        );
    }
}
