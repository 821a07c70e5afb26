//! Fuzzes event envelope parsing and classification on raw request bodies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rolesync::reconcile::Source;
use rolesync::timestamp::Timestamp;
use rolesync::ingest::event::{classify, parse_envelope, EventKind};
use rolesync::ingest::Incoming;

/// A fixed "now" for the version bound (a version more than a day past it is invalid).
fn now() -> Timestamp {
    Timestamp::from_millis(1_900_000_000_000).expect("in range")
}

/// Longest id accepted by the parser (`MAX_ID_LEN` in domain.rs).
const MAX_ID_LEN: usize = 255;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = parse_envelope(data) else {
        return;
    };
    assert!(
        (1..=MAX_ID_LEN).contains(&envelope.id.len()),
        "id {:?}",
        envelope.id
    );
    assert!(
        (1..=MAX_ID_LEN).contains(&envelope.event.len()),
        "event {:?}",
        envelope.event
    );

    let kind = classify(&envelope, Source::Webhook, now());
    let membership_type = matches!(
        envelope.event.as_str(),
        "organization_membership.created"
            | "organization_membership.updated"
            | "organization_membership.deleted"
    );
    assert_eq!(
        kind == EventKind::Other,
        !membership_type,
        "{} -> {kind:?}",
        envelope.event
    );

    if let EventKind::Membership(obs) = &kind {
        for (name, id) in [
            ("organization_id", &obs.organization_id),
            ("user_id", &obs.user_id),
            ("membership_id", &obs.membership_id),
        ] {
            assert!((1..=MAX_ID_LEN).contains(&id.len()), "{name} {id:?}");
        }
        // A deleted membership's status is not checked (the reconcile stores `deleted`).
        if !obs.deleted {
            let status = &obs.status;
            assert!(
                (1..=MAX_ID_LEN).contains(&status.len()),
                "status {status:?}"
            );
        }
        assert_eq!(
            obs.deleted,
            envelope.event == "organization_membership.deleted"
        );
        if !obs.deleted {
            assert!(obs.role_slug.is_some(), "a live membership has a role");
        }
        assert!(
            obs.role_slug.as_ref().is_none_or(|s| !s.is_empty()),
            "empty role slug"
        );
        assert_eq!(obs.source, Source::Webhook);
        assert_eq!(obs.event_id.as_deref(), Some(envelope.id.as_str()));

        // The version re-parses from its own text form, which is fixed-width.
        let text = obs.version.to_string();
        assert_eq!(text.len(), 27, "version text {text:?} is not fixed-width");
        let again = Timestamp::parse(&text)
            .unwrap_or_else(|e| panic!("version text {text:?} does not re-parse: {e}"));
        assert_eq!(again, obs.version, "version {text:?} changed on re-parse");
    }

    // The webhook path adds only the UTF-8 check on top.
    let incoming = Incoming::parse(data, Source::Webhook, now());
    assert_eq!(incoming.is_ok(), std::str::from_utf8(data).is_ok());
    if let Ok(incoming) = incoming {
        assert_eq!(incoming.kind, kind);
        assert_eq!(incoming.event_id, envelope.id);
    }
});
