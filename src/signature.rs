//! The `WorkOS-Signature` webhook header: parsing, timestamp tolerance and HMAC-SHA256 verification.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

/// Name of the signature header, lower-case (HTTP header lookup ignores case).
pub const HEADER: &str = "workos-signature";

const NO_TIMESTAMP: &str = "Signature or timestamp missing";
const BAD_TIMESTAMP: &str = "Timestamp is not a non-negative integer of milliseconds";
const DUPLICATE_TIMESTAMP: &str = "Timestamp appears more than once";
const NO_V1: &str = "No signature hash found with expected scheme v1";

/// Length of a v1 signature in hex characters (32 bytes of HMAC-SHA256).
const HEX_LEN: usize = 64;

/// Why a webhook signature was rejected; messages follow the WorkOS SDKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is absent, empty or only whitespace.
    #[error("Signature or timestamp missing")]
    Missing,
    /// The header is present but unusable: no `t`, a bad `t`, or no well-formed `v1`.
    #[error("{0}")]
    Malformed(&'static str),
    /// The timestamp is further from now than the configured tolerance.
    #[error("Timestamp outside the tolerance zone")]
    OutOfTolerance,
    /// No `v1` signature matches any configured secret.
    #[error("Signature hash does not match the expected signature hash for payload")]
    Mismatch,
}

impl SignatureError {
    /// The machine-readable error code for JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing_signature",
            Self::Malformed(_) => "malformed_signature",
            Self::OutOfTolerance => "timestamp_out_of_tolerance",
            Self::Mismatch => "signature_mismatch",
        }
    }

    /// The HTTP status to answer with: 400 for unusable headers, 401 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Self::Missing | Self::Malformed(_) => 400,
            Self::OutOfTolerance | Self::Mismatch => 401,
        }
    }
}

/// A parsed `WorkOS-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    /// The timestamp digits exactly as sent; these are the bytes that were signed.
    pub timestamp: &'a str,
    /// The timestamp in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Every well-formed `v1` signature, decoded.
    pub signatures: Vec<[u8; 32]>,
}

/// Parses a header value such as `t=1700000000000, v1=<64 lowercase hex>`.
///
/// Parts are split on `,`, trimmed, and read by key; unknown keys and
/// malformed `v1` values are ignored, while a repeated `t` is rejected.
pub fn parse_header(value: &str) -> Result<SignatureHeader<'_>, SignatureError> {
    if value.trim().is_empty() {
        return Err(SignatureError::Missing);
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    // Read parts by key, never by position; parts without `=` are ignored.
    for (key, val) in value.split(',').filter_map(|p| p.trim().split_once('=')) {
        match key {
            "t" if timestamp.is_some() => {
                return Err(SignatureError::Malformed(DUPLICATE_TIMESTAMP))
            }
            "t" => timestamp = Some(val),
            // A malformed v1 is simply not a candidate.
            "v1" => signatures.extend(decode_signature(val)),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed(NO_TIMESTAMP))?;
    let timestamp_ms = parse_millis(timestamp).ok_or(SignatureError::Malformed(BAD_TIMESTAMP))?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed(NO_V1));
    }
    Ok(SignatureHeader {
        timestamp,
        timestamp_ms,
        signatures,
    })
}

/// Verifies a webhook request and returns the index of the secret that matched.
///
/// Checks run in order: header presence, parsing, tolerance (in both
/// directions; a negative tolerance rejects everything), then the HMAC of
/// every secret against every `v1` candidate.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[&[u8]],
    now_ms: i64,
    tolerance_ms: i64,
) -> Result<usize, SignatureError> {
    let parsed = check_header(header, now_ms, tolerance_ms)?;
    verify_parsed(&parsed, body, secrets)
}

/// The header's own checks, which need no body: present, well-formed, and its timestamp within
/// `tolerance_ms` of `now_ms` in both directions. A request failing them is refused before its
/// body is read.
pub fn check_header(
    header: Option<&str>,
    now_ms: i64,
    tolerance_ms: i64,
) -> Result<SignatureHeader<'_>, SignatureError> {
    let parsed = parse_header(header.ok_or(SignatureError::Missing)?)?;
    if !within_tolerance(parsed.timestamp_ms, now_ms, tolerance_ms) {
        return Err(SignatureError::OutOfTolerance);
    }
    Ok(parsed)
}

/// Which secret, by position, signed `body` under a header that passed [`check_header`].
pub fn verify_parsed(
    parsed: &SignatureHeader<'_>,
    body: &[u8],
    secrets: &[&[u8]],
) -> Result<usize, SignatureError> {
    // Every secret against every candidate; the first matching secret wins.
    secrets
        .iter()
        .position(|secret| {
            let expected = digest(secret, parsed.timestamp, body);
            // Constant-time over all candidates: no early exit on a hit.
            let hit = parsed.signatures.iter().fold(Choice::from(0), |acc, sig| {
                acc | expected[..].ct_eq(&sig[..])
            });
            bool::from(hit)
        })
        .ok_or(SignatureError::Mismatch)
}

/// HMAC-SHA256 of `"{timestamp}.{body}"` keyed with `secret`, as raw bytes.
pub fn digest(secret: &[u8], timestamp: &str, body: &[u8]) -> [u8; 32] {
    hmac_sha256(secret, &[timestamp.as_bytes(), b".", body])
}

/// The header value WorkOS would send for `body` at `t_ms`.
///
/// A negative `t_ms` yields a header that [`parse_header`] rejects.
pub fn sign(body: &[u8], secret: &[u8], t_ms: i64) -> String {
    let timestamp = t_ms.to_string();
    let mac = digest(secret, &timestamp, body);
    format!("t={timestamp}, v1={}", hex::encode(mac))
}

/// HMAC-SHA256 over the concatenation of `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// ASCII digits only (no sign, no spaces), fitting in an `i64`.
fn parse_millis(digits: &str) -> Option<i64> {
    // `str::parse` alone would accept a leading `+`.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Exactly 64 lowercase hex characters, as WorkOS writes and its SDKs compare.
fn decode_signature(text: &str) -> Option<[u8; 32]> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if text.len() != HEX_LEN || !text.bytes().all(lower_hex) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// `|now_ms - timestamp_ms| <= tolerance_ms`, without overflow.
fn within_tolerance(timestamp_ms: i64, now_ms: i64, tolerance_ms: i64) -> bool {
    // An overflowing difference is necessarily beyond any i64 tolerance.
    now_ms
        .checked_sub(timestamp_ms)
        .and_then(i64::checked_abs)
        .is_some_and(|distance| distance <= tolerance_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    const SECRET: &[u8] = b"whsec_primary";
    const OTHER: &[u8] = b"whsec_other";
    const NOW: i64 = 1_700_000_000_000;
    const TOL: i64 = 300_000;
    const BODY: &[u8] = br#"{"id":"event_01","event":"organization_membership.updated"}"#;

    /// A well-formed but wrong signature.
    const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn hex_sig(secret: &[u8], t: &str, body: &[u8]) -> String {
        hex::encode(digest(secret, t, body))
    }

    fn check(header: &str, body: &[u8], secrets: &[&[u8]]) -> Result<usize, SignatureError> {
        verify(Some(header), body, secrets, NOW, TOL)
    }

    #[test]
    fn hmac_matches_the_node_sdk_test_vector() {
        // The vector is over the empty message, which `digest` cannot produce.
        let mac = hmac_sha256(b"test_secret", &[]);
        assert_eq!(
            hex::encode(mac),
            "f7f9bd47fb987337b5796fdc1fdb9ba221d0d5396814bfcaf9521f43fd8927fd",
            "HMAC-SHA256 of the empty message under test_secret must match the SDK vector"
        );
    }

    #[test]
    fn digest_signs_timestamp_dot_body() {
        let whole = hmac_sha256(SECRET, &[b"1700000000000.hello"]);
        assert_eq!(
            digest(SECRET, "1700000000000", b"hello"),
            whole,
            "digest must cover the timestamp digits, a dot, then the body"
        );
    }

    #[test]
    fn sign_produces_the_workos_header_format() {
        let header = sign(BODY, SECRET, NOW);
        let expected = format!("t={NOW}, v1={}", hex_sig(SECRET, &NOW.to_string(), BODY));
        assert_eq!(header, expected, "sign must write `t=<ms>, v1=<hex>`");
    }

    #[test]
    fn a_valid_header_verifies() {
        let header = sign(BODY, SECRET, NOW);
        assert_eq!(check(&header, BODY, &[SECRET]), Ok(0), "signed request");
    }

    #[test]
    fn comma_space_and_no_space_forms_both_verify() {
        let sig = hex_sig(SECRET, &NOW.to_string(), BODY);
        let forms = [
            format!("t={NOW}, v1={sig}"),
            format!("t={NOW},v1={sig}"),
            format!("  v1={sig} ,   t={NOW}  "),
        ];
        for header in &forms {
            assert_eq!(check(header, BODY, &[SECRET]), Ok(0), "form {header:?}");
        }
    }

    #[test]
    fn any_of_several_v1_signatures_may_match() {
        let sig = hex_sig(SECRET, &NOW.to_string(), BODY);
        let header = format!("t={NOW}, v1={ZEROS}, v1={sig}");
        assert_eq!(check(&header, BODY, &[SECRET]), Ok(0), "second v1 is right");
    }

    #[test]
    fn unknown_keys_and_malformed_extra_v1_are_ignored() {
        let sig = hex_sig(SECRET, &NOW.to_string(), BODY);
        let header = format!("v0={ZEROS}, t={NOW}, junk, v1=abc, x=y=z, v1={sig}");
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Ok(0),
            "noise around a good v1"
        );
    }

    #[test]
    fn a_rotated_secret_reports_its_position() {
        let header = sign(BODY, SECRET, NOW);
        assert_eq!(
            check(&header, BODY, &[OTHER, SECRET]),
            Ok(1),
            "second secret"
        );
        assert_eq!(
            check(&header, BODY, &[SECRET, OTHER]),
            Ok(0),
            "first secret"
        );
    }

    #[test]
    fn no_secrets_means_mismatch() {
        let header = sign(BODY, SECRET, NOW);
        assert_eq!(
            check(&header, BODY, &[]),
            Err(SignatureError::Mismatch),
            "no secrets"
        );
    }

    #[test]
    fn absent_empty_or_blank_headers_are_missing() {
        let cases: [Option<&str>; 4] = [None, Some(""), Some("   "), Some("\t ")];
        for header in cases {
            let got = verify(header, BODY, &[SECRET], NOW, TOL);
            assert_eq!(got, Err(SignatureError::Missing), "header {header:?}");
        }
    }

    #[test]
    fn garbage_headers_are_malformed_with_a_reason() {
        let sig = hex_sig(SECRET, &NOW.to_string(), BODY);
        let cases = [
            ("hello".to_string(), NO_TIMESTAMP),
            ("t=".to_string(), BAD_TIMESTAMP),
            ("v1=abc".to_string(), NO_TIMESTAMP),
            (format!("v1={sig}"), NO_TIMESTAMP),
            // Keys are case-sensitive: `T` and `V1` are unknown keys.
            (format!("T={NOW}, v1={sig}"), NO_TIMESTAMP),
            (format!("t=abc, v1={sig}"), BAD_TIMESTAMP),
            (format!("t=-5, v1={sig}"), BAD_TIMESTAMP),
            (format!("t=+5, v1={sig}"), BAD_TIMESTAMP),
            (format!("t=1 2, v1={sig}"), BAD_TIMESTAMP),
            (format!("t=99999999999999999999, v1={sig}"), BAD_TIMESTAMP),
            (format!("t={NOW}, t={NOW}, v1={sig}"), DUPLICATE_TIMESTAMP),
            (format!("t={NOW}"), NO_V1),
            (format!("t={NOW}, v1=abc"), NO_V1),
            (format!("t={NOW}, v1={sig}00"), NO_V1),
            // WorkOS writes lowercase hex and its SDKs compare the hex text.
            (format!("t={NOW}, v1={}", sig.to_uppercase()), NO_V1),
            (format!("t={NOW}, V1={sig}"), NO_V1),
        ];
        for (header, reason) in &cases {
            let got = check(header, BODY, &[SECRET]);
            assert_eq!(
                got,
                Err(SignatureError::Malformed(reason)),
                "header {header:?}"
            );
        }
    }

    #[test]
    fn tolerance_is_inclusive_and_applies_both_ways() {
        let cases = [
            (NOW - TOL, Ok(0), "exactly tolerance old"),
            (NOW + TOL, Ok(0), "exactly tolerance ahead"),
            (
                NOW - TOL - 1,
                Err(SignatureError::OutOfTolerance),
                "one ms too old",
            ),
            (
                NOW + TOL + 1,
                Err(SignatureError::OutOfTolerance),
                "one ms too far ahead",
            ),
        ];
        for (t, expected, what) in cases {
            let header = sign(BODY, SECRET, t);
            assert_eq!(check(&header, BODY, &[SECRET]), expected, "{what}");
        }
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let header = sign(BODY, SECRET, i64::MAX);
        let out = Err(SignatureError::OutOfTolerance);
        let cases = [
            (i64::MIN, i64::MAX, out, "now - t overflows"),
            (i64::MIN, 0, out, "now - t overflows, zero tolerance"),
            (0, i64::MAX - 1, out, "distance one past tolerance"),
            (0, i64::MAX, Ok(0), "distance exactly i64::MAX"),
            (i64::MAX, 0, Ok(0), "exact time at i64::MAX"),
        ];
        for (now, tolerance, expected, what) in cases {
            let got = verify(Some(&header), BODY, &[SECRET], now, tolerance);
            assert_eq!(got, expected, "{what}");
        }
        let got = verify(Some(&sign(BODY, SECRET, 0)), BODY, &[SECRET], 0, -1);
        assert_eq!(got, out, "a negative tolerance rejects even an exact time");
    }

    #[test]
    fn tolerance_is_checked_before_the_signature() {
        let header = format!("t={}, v1={ZEROS}", NOW - TOL - 1);
        let got = check(&header, BODY, &[SECRET]);
        assert_eq!(got, Err(SignatureError::OutOfTolerance), "stale and wrong");
    }

    #[test]
    fn a_changed_body_byte_or_wrong_secret_is_a_mismatch() {
        let header = sign(BODY, SECRET, NOW);
        let mut tampered = BODY.to_vec();
        tampered[5] ^= 0x01;
        let mismatch = Err(SignatureError::Mismatch);
        assert_eq!(
            check(&header, &tampered, &[SECRET]),
            mismatch,
            "changed body"
        );
        assert_eq!(check(&header, BODY, &[OTHER]), mismatch, "wrong secret");
    }

    #[test]
    fn non_ascii_bodies_sign_and_verify() {
        let body = "{\"name\":\"Zoë Ångström 🎉\"}\u{0}\u{7f}".as_bytes();
        let header = sign(body, SECRET, NOW);
        assert_eq!(check(&header, body, &[SECRET]), Ok(0), "UTF-8 body");
        let raw = [0xff, 0xfe, 0x00, 0x80];
        let header = sign(&raw, SECRET, NOW);
        assert_eq!(check(&header, &raw, &[SECRET]), Ok(0), "non-UTF-8 body");
    }

    #[test]
    fn parse_keeps_the_exact_timestamp_digits() {
        let sig = hex_sig(SECRET, "0042", BODY);
        let header = format!("t=0042, v1={sig}");
        let parsed = parse_header(&header).expect("valid header");
        assert_eq!(parsed.timestamp, "0042", "digits kept verbatim");
        assert_eq!(parsed.timestamp_ms, 42, "value parsed");
        assert_eq!(
            parsed.signatures,
            vec![digest(SECRET, "0042", BODY)],
            "v1 decoded"
        );
    }

    #[test]
    fn errors_map_to_codes_statuses_and_sdk_messages() {
        let cases = [
            (
                SignatureError::Missing,
                "missing_signature",
                400,
                NO_TIMESTAMP,
            ),
            (
                SignatureError::Malformed(NO_V1),
                "malformed_signature",
                400,
                NO_V1,
            ),
            (
                SignatureError::OutOfTolerance,
                "timestamp_out_of_tolerance",
                401,
                "Timestamp outside the tolerance zone",
            ),
            (
                SignatureError::Mismatch,
                "signature_mismatch",
                401,
                "Signature hash does not match the expected signature hash for payload",
            ),
        ];
        for (err, code, status, message) in cases {
            assert_eq!(err.code(), code, "code of {err:?}");
            assert_eq!(err.status(), status, "status of {err:?}");
            assert_eq!(err.to_string(), message, "message of {err:?}");
        }
    }

    #[test]
    fn header_name_is_lower_case() {
        assert_eq!(HEADER, "workos-signature", "header name");
    }

    /// Which part of a signed request a mutation hits.
    #[derive(Debug, Clone, Copy)]
    enum Target {
        Body,
        Timestamp,
        Signature,
    }

    /// Applies `byte ^= flip` at `at` within `target`; returns the new header
    /// (None if it is no longer UTF-8, so no `&str` could carry it) and body.
    fn mutate(
        header: &str,
        body: &[u8],
        target: Target,
        at: Index,
        flip: u8,
    ) -> (Option<String>, Vec<u8>) {
        let (mut header, mut body) = (header.as_bytes().to_vec(), body.to_vec());
        // The header starts with `t=`; the signature hex ends it.
        let digits = header
            .iter()
            .skip(2)
            .take_while(|b| b.is_ascii_digit())
            .count();
        let sig_start = header.len() - HEX_LEN;
        let body_len = body.len();
        match target {
            Target::Body => body[at.index(body_len)] ^= flip,
            Target::Timestamp => header[2 + at.index(digits)] ^= flip,
            Target::Signature => header[sig_start + at.index(HEX_LEN)] ^= flip,
        }
        (String::from_utf8(header).ok(), body)
    }

    proptest! {
        #[test]
        fn any_single_byte_change_is_rejected_and_the_original_accepted(
            body in vec(any::<u8>(), 1..256),
            secret in vec(any::<u8>(), 0..64),
            t_ms in 0..=i64::MAX,
            target in prop_oneof![Just(Target::Body), Just(Target::Timestamp), Just(Target::Signature)],
            at in any::<Index>(),
            flip in 1..=u8::MAX,
        ) {
            let header = sign(&body, &secret, t_ms);
            let ok = verify(Some(&header), &body, &[&secret], t_ms, TOL);
            prop_assert_eq!(ok, Ok(0), "the unmodified request must verify");
            // A header that is no longer UTF-8 cannot reach `verify` at all.
            let (tampered, body) = mutate(&header, &body, target, at, flip);
            if let Some(tampered) = tampered {
                let got = verify(Some(&tampered), &body, &[&secret], t_ms, TOL);
                prop_assert!(got.is_err(), "{:?} change accepted: {}", target, tampered);
            }
        }

        #[test]
        fn parse_header_never_panics_on_arbitrary_strings(value in any::<String>()) {
            let _ = parse_header(&value);
            let _ = verify(Some(&value), b"", &[SECRET], NOW, TOL);
        }

        #[test]
        fn parse_header_never_panics_on_header_like_strings(
            value in "((t|v1|T|x)?=?[0-9a-fA-F+ -]{0,70}[, ]{0,2}){0,4}"
        ) {
            let _ = parse_header(&value);
            let _ = verify(Some(&value), b"", &[SECRET], NOW, TOL);
        }
    }
}
