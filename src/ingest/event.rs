//! WorkOS event envelopes and the membership observation they carry.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::{
    check_id, reported_roles, Observation, Refetch, Source, DELETED, ORGANIZATION_TARGET,
};
use crate::timestamp::Timestamp;

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
    /// An event that changes roles without carrying them: stored, with a refetch queued.
    Refetch(Refetch),
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
    /// Every role (multiple roles); absent or null when the environment has one role per membership.
    #[serde(default)]
    roles: Option<Vec<RoleRef>>,
    updated_at: Option<String>,
    /// Read leniently: only `true` marks the membership directory-managed; any other value is
    /// no reason to refuse the event.
    #[serde(default)]
    directory_managed: Option<serde_json::Value>,
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
    check_id(&envelope.id).map_err(|why| PayloadError(format!("event id {why}")))?;
    check_id(&envelope.event).map_err(|why| PayloadError(format!("event type {why}")))?;
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

/// Classifies an event and, for a membership event, builds its observation; one that fails
/// [`Observation::check`] against `now` is invalid.
pub fn classify(envelope: &Envelope<'_>, source: Source, now: Timestamp) -> EventKind {
    let deleted = match envelope.event.as_str() {
        "organization_membership.created" | "organization_membership.updated" => false,
        "organization_membership.deleted" => true,
        other => return refetch_kind(other, envelope.data),
    };
    // The payload's fields are under `data`: named so, as the parser names them.
    let checked = |obs: Observation| match obs.check(now) {
        Ok(()) => Ok(obs),
        Err(why) => Err(why.replacen("field `", "field `data.", 1)),
    };
    match observation(envelope, deleted, source).and_then(checked) {
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
    let roles = data
        .roles
        .map(|roles| roles.into_iter().map(|r| r.slug).collect());
    let (role_slugs, roles_reported) = reported_roles(role_slug.as_deref(), roles)
        .map_err(|why| why.replacen("field `", "field `data.", 1))?;
    let (status, role_slug) = if deleted {
        (DELETED.to_owned(), role_slug)
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
        role_slugs,
        roles_reported,
        status,
        deleted,
        inferred: false,
        directory_managed: data.directory_managed == Some(serde_json::Value::Bool(true)),
        version,
        source,
        event_id: Some(envelope.id.clone()),
    })
}

/// The event types that change a membership's roles without carrying them (see
/// `../shared/workos.md`, "Role changes that arrive without a role"); the Events API catch-up asks
/// for them too.
pub const REFETCH_EVENTS: [&str; 8] = [
    "group.member_added",
    "group.member_removed",
    "role.deleted",
    "organization_role.deleted",
    "organization_role.updated",
    "dsync.user.updated",
    "dsync.group.user_added",
    "dsync.group.user_removed",
];

/// What a role-changing event without a role asks to refetch; any other type is `Other`.
fn refetch_kind(event: &str, data: Option<&RawValue>) -> EventKind {
    if !REFETCH_EVENTS.contains(&event) {
        return EventKind::Other;
    }
    let data: serde_json::Value = match data.map(|raw| serde_json::from_str(raw.get())) {
        Some(Ok(value)) => value,
        Some(Err(e)) => return EventKind::Invalid(format!("`data` is not JSON: {e}")),
        None => return EventKind::Invalid("missing field `data`".into()),
    };
    let text = |path: &[&str]| {
        path.iter()
            .try_fold(&data, |v, key| v.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let checked = |value: Option<String>, name: &str| -> Result<String, String> {
        let value = value.ok_or_else(|| format!("missing field `data.{name}`"))?;
        check_id(&value).map_err(|why| format!("field `data.{name}` {why}"))?;
        Ok(value)
    };
    let refetch = match event {
        "group.member_added" | "group.member_removed" => checked(
            text(&["organization_membership_id"]),
            "organization_membership_id",
        )
        .and_then(|id| match id.starts_with(ORGANIZATION_TARGET) {
            true => Err(format!(
                "field `data.organization_membership_id` {id:?} is no membership id"
            )),
            false => Ok(Refetch::Membership(id)),
        }),
        "role.deleted" => checked(text(&["slug"]), "slug").map(|slug| Refetch::Role {
            slug,
            organization_id: None,
            gone: true,
        }),
        "organization_role.deleted" | "organization_role.updated" => {
            let slug = checked(text(&["slug"]), "slug");
            let organization = checked(text(&["organization_id"]), "organization_id");
            slug.and_then(|slug| {
                Ok(Refetch::Role {
                    slug,
                    organization_id: Some(organization?),
                    gone: event.ends_with(".deleted"),
                })
            })
        }
        // A directory user or group names no membership: every membership of its organization.
        _ => {
            let organization = text(&["organization_id"])
                .or_else(|| text(&["user", "organization_id"]))
                .or_else(|| text(&["group", "organization_id"]));
            checked(organization, "organization_id").map(Refetch::Organization)
        }
    };
    match refetch {
        Ok(refetch) => EventKind::Refetch(refetch),
        Err(reason) => EventKind::Invalid(reason),
    }
}

/// A field the observation needs; what it may hold is [`Observation::check`]'s to say.
fn required(value: Option<String>, name: &str) -> Result<String, String> {
    value.ok_or_else(|| format!("missing field `{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' now: after every version they use.
    const NOW: Timestamp = match Timestamp::from_millis(1_900_000_000_000) {
        Some(now) => now,
        None => panic!("in range"),
    };

    fn membership_event(event: &str, data: &str) -> String {
        format!(r#"{{"id":"event_1","event":"{event}","data":{data}}}"#)
    }

    #[test]
    fn nesting_is_accepted_up_to_the_limit_and_refused_beyond() {
        // The envelope is one level; `context` holds the rest.
        let nested = |levels: usize| {
            let inner = "[".repeat(levels - 1) + &"]".repeat(levels - 1);
            format!(r#"{{"id":"event_1","event":"x","context":{inner}}}"#)
        };
        assert_eq!(nesting_depth(nested(MAX_DEPTH).as_bytes()), MAX_DEPTH);
        assert!(
            parse_envelope(nested(MAX_DEPTH).as_bytes()).is_ok(),
            "{MAX_DEPTH} levels"
        );
        let refused = parse_envelope(nested(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        assert!(refused.0.contains("nested deeper"), "{refused}");
        let in_strings = r#"{"s":"[[ \" {{ \\","t":[1]}"#;
        serde_json::from_str::<serde_json::Value>(in_strings).expect("valid JSON");
        assert_eq!(
            nesting_depth(in_strings.as_bytes()),
            2,
            "brackets inside strings, escaped quotes included, do not count"
        );
    }

    const DATA: &str = r#"{"id":"om_1","user_id":"user_1","organization_id":"org_1","status":"active",
        "role":{"slug":"admin"},"roles":[{"slug":"admin"}],"updated_at":"2023-11-18T17:10:15.121Z","extra":1}"#;

    #[test]
    fn a_membership_update_becomes_an_observation() {
        let body = membership_event("organization_membership.updated", DATA);
        let kind = classify(
            &parse_envelope(body.as_bytes()).unwrap(),
            Source::Webhook,
            NOW,
        );
        let EventKind::Membership(obs) = kind else {
            panic!("expected a membership, got {kind:?}")
        };
        assert_eq!(obs.role_slug.as_deref(), Some("admin"));
        assert_eq!(obs.version.to_string(), "2023-11-18T17:10:15.121000Z");
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
            let kind = classify(
                &parse_envelope(body.as_bytes()).unwrap(),
                Source::Webhook,
                NOW,
            );
            assert!(
                matches!(kind, EventKind::Invalid(_)),
                "{field}: got {kind:?}"
            );
        }
    }

    #[test]
    fn membership_events_with_values_no_workos_object_has_are_invalid_naming_the_field() {
        let long = "x".repeat(256);
        for (field, data) in [
            (
                "role.slug",
                DATA.replace(r#""slug":"admin"}"#, &format!(r#""slug":"{long}"}}"#)),
            ),
            ("user_id", DATA.replace("user_1", r"user\u0000nul")),
            ("organization_id", DATA.replace("org_1", r"org\n1")),
            (
                "status",
                DATA.replace(r#""active""#, &format!(r#""{long}""#)),
            ),
            (
                "updated_at",
                DATA.replace("2023-11-18T17:10:15.121Z", "9999-12-31T23:59:59.999Z"),
            ),
        ] {
            let body = membership_event("organization_membership.updated", &data);
            let kind = classify(
                &parse_envelope(body.as_bytes()).unwrap(),
                Source::Webhook,
                NOW,
            );
            let EventKind::Invalid(reason) = &kind else {
                panic!("{field}: got {kind:?}");
            };
            assert!(reason.contains(field), "{field}: {reason}");
        }
        let a_day_ahead = Timestamp::from_millis(NOW.millis() + 24 * 3600 * 1000).unwrap();
        let data = DATA.replace("2023-11-18T17:10:15.121Z", &a_day_ahead.to_string());
        let body = membership_event("organization_membership.updated", &data);
        let kind = classify(
            &parse_envelope(body.as_bytes()).unwrap(),
            Source::Webhook,
            NOW,
        );
        assert!(
            matches!(kind, EventKind::Membership(_)),
            "a day ahead is accepted: {kind:?}"
        );
    }

    #[test]
    fn directory_managed_is_true_only_when_it_says_true_and_never_refuses_an_event() {
        for (value, managed) in [
            ("true", true),
            ("false", false),
            ("\"yes\"", false),
            ("null", false),
        ] {
            let data = DATA.replace(r#""extra":1"#, &format!(r#""directory_managed":{value}"#));
            let body = membership_event("organization_membership.updated", &data);
            let kind = classify(
                &parse_envelope(body.as_bytes()).unwrap(),
                Source::Webhook,
                NOW,
            );
            let EventKind::Membership(obs) = kind else {
                panic!("{value}: expected a membership, got {kind:?}")
            };
            assert_eq!(obs.directory_managed, managed, "{value}");
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
            r#"{"id":"event\u0000","event":"x"}"#,
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
            classify(
                &parse_envelope(body.as_bytes()).unwrap(),
                Source::Webhook,
                NOW
            ),
            EventKind::Other
        );
    }

    mod props {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use time::format_description::well_known::Rfc3339;
        use time::{OffsetDateTime, UtcOffset};

        /// Parses and classifies; any panic fails the property.
        fn parse_and_classify(body: &[u8]) -> Option<EventKind> {
            parse_envelope(body)
                .ok()
                .map(|envelope| classify(&envelope, Source::Webhook, NOW))
        }

        /// A JSON string value, or (rarely) a non-string.
        fn json_value() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-z0-9_ .:+-]{0,12}".prop_map(|s| format!("{s:?}")),
                1 => Just("null".to_owned()),
                1 => Just(String::new()),
                1 => "-?[0-9]{1,4}",
                1 => Just(r#"{"slug":"admin"}"#.to_owned()),
                1 => Just("[]".to_owned()),
            ]
        }

        /// RFC 3339-shaped text, often valid, sometimes out of range.
        fn rfc3339_ish() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]{1,12})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
                1 => "[0-9]{4}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{0,12})?(Z|z|[+-][0-2][0-9]:[0-5][0-9])?",
            ]
        }

        /// A membership event whose fields are each present, absent or mangled.
        fn json_ish_event() -> impl Strategy<Value = String> {
            let event = prop_oneof![
                Just("organization_membership.created".to_owned()),
                Just("organization_membership.updated".to_owned()),
                Just("organization_membership.deleted".to_owned()),
                "[a-z_.]{0,20}",
            ];
            // Mostly a usable value, so that some events make it to an observation.
            let field = |name: &'static str| {
                prop_oneof![
                    12 => "[a-z0-9_]{1,12}".prop_map(|v| format!("{v:?}")),
                    1 => json_value(),
                    1 => Just(String::new()),
                ]
                .prop_map(move |v| {
                    if v.is_empty() {
                        v
                    } else {
                        format!(r#""{name}":{v}"#)
                    }
                })
            };
            let updated_at = prop_oneof![
                4 => rfc3339_ish().prop_map(|t| format!(r#""updated_at":"{t}""#)),
                1 => field("updated_at"),
            ];
            let role = prop_oneof![
                4 => "[a-z_]{0,8}".prop_map(|s| format!(r#""role":{{"slug":"{s}"}}"#)),
                1 => field("role"),
            ];
            (
                event,
                (field("id"), field("user_id"), field("organization_id")),
                (field("status"), role, updated_at),
                prop_oneof![3 => Just(String::new()), 1 => "[ ,{}\\[\\]\":a-z0-9]{1,4}"],
            )
                .prop_map(|(event, (id, user, org), (status, role, at), junk)| {
                    let fields: Vec<String> = [id, user, org, status, role, at]
                        .into_iter()
                        .filter(|f| !f.is_empty())
                        .collect();
                    format!(
                        r#"{{"id":"event_1","event":"{event}","data":{{{}}}{junk}}}"#,
                        fields.join(",")
                    )
                })
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(body in vec(any::<u8>(), 0..512)) {
                let _ = parse_and_classify(&body);
            }

            #[test]
            fn arbitrary_strings_never_panic(body in any::<String>()) {
                let _ = parse_and_classify(body.as_bytes());
            }

            #[test]
            fn json_ish_events_never_panic_and_memberships_are_complete(body in json_ish_event()) {
                if let Some(EventKind::Membership(obs)) = parse_and_classify(body.as_bytes()) {
                    prop_assert!(!obs.organization_id.is_empty() && !obs.user_id.is_empty());
                    prop_assert!(!obs.membership_id.is_empty());
                    // A deleted membership's status is not checked: the reconcile stores `deleted`.
                    prop_assert!(obs.deleted || !obs.status.is_empty(), "status of {}", body);
                    let text = obs.version.to_string();
                    prop_assert_eq!(Timestamp::parse(&text).ok(), Some(obs.version), "{}", text);
                }
            }

            #[test]
            fn a_valid_updated_at_round_trips_the_version(
                // Year 0000 to the tests' now (a version more than a day ahead is refused).
                ms in -62_167_219_200_000..=1_900_000_000_000i64,
                sub_ms_nanos in 0..1_000_000i64,
                offset_minutes in -(23 * 60 + 59)..=(23 * 60 + 59i32),
                deleted in any::<bool>(),
            ) {
                let version = Timestamp::from_micros(ms * 1000 + sub_ms_nanos / 1000).expect("in range");
                // The same instant, written with a local offset and sub-millisecond digits.
                let nanos = i128::from(ms) * 1_000_000 + i128::from(sub_ms_nanos);
                let offset = UtcOffset::from_whole_seconds(offset_minutes * 60).expect("offset");
                let local = OffsetDateTime::from_unix_timestamp_nanos(nanos)
                    .expect("in range")
                    .to_offset(offset);
                // RFC 3339 has four-digit years only: the offset may push the edges out.
                let local = local.format(&Rfc3339);
                prop_assume!(local.is_ok());
                for updated_at in [version.to_string(), local.unwrap()] {
                    let data = DATA.replace("2023-11-18T17:10:15.121Z", &updated_at);
                    let event = if deleted {
                        "organization_membership.deleted"
                    } else {
                        "organization_membership.updated"
                    };
                    let body = membership_event(event, &data);
                    let kind = parse_and_classify(body.as_bytes());
                    let Some(EventKind::Membership(obs)) = kind else {
                        panic!("{updated_at}: expected a membership, got {kind:?}");
                    };
                    prop_assert_eq!(obs.version, version, "{}", updated_at);
                    let text = obs.version.to_string();
                    prop_assert_eq!(text.len(), 27, "fixed width: {}", text);
                    prop_assert_eq!(Timestamp::parse(&text).ok(), Some(version), "{}", text);
                }
            }
        }
    }
}
