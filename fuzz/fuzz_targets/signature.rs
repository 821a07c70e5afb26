//! Fuzzes `WorkOS-Signature` parsing and verification.
//!
//! Input layout: everything before the first `\n` is the header (lossy UTF-8),
//! everything after it is the body. Without a `\n` the whole input is both.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rolesync::signature::{digest, parse_header, sign, verify, SignatureError};

const SECRETS: [&[u8]; 2] = [b"secret", b"other"];
const NOW: i64 = 1_700_000_000_000;
const TOL: i64 = 180_000;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    let header = String::from_utf8_lossy(head);

    check_header(&header, body, NOW);
    // At the header's own time the tolerance passes and the HMACs are compared.
    if let Ok(parsed) = parse_header(&header) {
        check_header(&header, body, parsed.timestamp_ms);
    }

    // Round trip: what `sign` writes verifies at its own time, under either position.
    let t = derived_time(data);
    let signed = sign(body, b"secret", t);
    let parsed = parse_header(&signed).expect("a signed header parses");
    assert_eq!(parsed.timestamp_ms, t, "timestamp of {signed:?}");
    assert_eq!(
        verify(Some(&signed), body, &SECRETS, t, TOL),
        Ok(0),
        "signed header {signed:?} must verify at t"
    );
    assert_eq!(
        verify(Some(&signed), body, &[b"other", b"secret"], t, TOL),
        Ok(1),
        "signed header {signed:?} must verify under the second secret"
    );
    assert_eq!(
        verify(Some(&signed), body, &[b"other"], t, TOL),
        Err(SignatureError::Mismatch),
        "signed header {signed:?} must not verify under another secret"
    );
    // The fuzzed header's noise around a good signature must not hide it.
    if !header.contains('t') {
        let noisy = format!("{header},{signed}");
        assert_eq!(
            verify(Some(&noisy), body, &SECRETS, t, TOL),
            Ok(0),
            "noise around a good signature: {noisy:?}"
        );
    }
});

/// Checks that `verify` agrees with `parse_header` and with the HMACs it claims to compare.
fn check_header(header: &str, body: &[u8], now: i64) {
    let got = verify(Some(header), body, &SECRETS, now, TOL);
    let parsed = match parse_header(header) {
        Ok(parsed) => parsed,
        Err(e) => {
            assert_eq!(
                got,
                Err(e),
                "verify must report the parse error of {header:?}"
            );
            return;
        }
    };
    assert!(
        !parsed.signatures.is_empty(),
        "parsed header without v1: {header:?}"
    );
    assert!(
        !parsed.timestamp.is_empty() && parsed.timestamp.bytes().all(|b| b.is_ascii_digit()),
        "timestamp digits {:?}",
        parsed.timestamp
    );
    assert!(
        parsed.timestamp_ms >= 0,
        "negative timestamp from {header:?}"
    );
    assert_eq!(
        parsed.timestamp.parse::<i64>().ok(),
        Some(parsed.timestamp_ms)
    );

    let in_tolerance = now
        .checked_sub(parsed.timestamp_ms)
        .and_then(i64::checked_abs)
        .is_some_and(|d| d <= TOL);
    let first_match = SECRETS.iter().position(|s| {
        parsed
            .signatures
            .contains(&digest(s, parsed.timestamp, body))
    });
    let expected = match (in_tolerance, first_match) {
        (false, _) => Err(SignatureError::OutOfTolerance),
        (true, Some(i)) => Ok(i),
        (true, None) => Err(SignatureError::Mismatch),
    };
    assert_eq!(got, expected, "verify({header:?}) at now={now}");
}

/// A non-negative time from the input: its last 8 bytes, so edges such as 0 and i64::MAX are reachable.
fn derived_time(data: &[u8]) -> i64 {
    let mut raw = [0u8; 8];
    let tail = &data[data.len().saturating_sub(8)..];
    raw[..tail.len()].copy_from_slice(tail);
    i64::from_le_bytes(raw) & i64::MAX
}
