//! `loadgen login --token`: one RSA key made with `openssl genrsa`, its key set for the stand-in
//! WorkOS, and AuthKit-shaped access tokens that agree with what the stand-in holds.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::fake_workos::role_of;
use crate::workload::{org_id, user_id};

/// The client id rolesync is given; its key set is served at `/sso/jwks/client_bench`.
pub const CLIENT_ID: &str = "client_bench";
const KID: &str = "key_bench";

/// The signing key and the JWKS document the stand-in serves.
pub struct Signer {
    key: EncodingKey,
    pub jwks: Value,
}

fn openssl(args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("--token needs the openssl command")?;
    child.stdin.take().expect("piped").write_all(input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("openssl {args:?} failed");
    }
    Ok(out.stdout)
}

fn hex_bytes(hex: &str) -> Result<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("x"), 16).context("modulus hex"))
        .collect()
}

impl Signer {
    /// A fresh 2048-bit key.
    pub fn new() -> Result<Self> {
        let pem = openssl(&["genrsa", "2048"], b"")?;
        let modulus = String::from_utf8(openssl(&["rsa", "-noout", "-modulus"], &pem)?)?;
        let hex = modulus
            .trim()
            .strip_prefix("Modulus=")
            .context("openssl -modulus output")?;
        let n = URL_SAFE_NO_PAD.encode(hex_bytes(hex)?);
        Ok(Self {
            key: EncodingKey::from_rsa_pem(&pem)?,
            jwks: json!({"keys": [{"alg": "RS256", "kty": "RSA", "use": "sig", "kid": KID,
                "n": n, "e": "AQAB"}]}),
        })
    }

    /// An access token for bench user `i` carrying the role the stand-in holds, minted now and
    /// valid for five minutes (WorkOS's default).
    pub fn token(&self, i: usize) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
        let claims = json!({"iss": "https://api.workos.com", "sub": user_id(i),
            "org_id": org_id(i), "role": role_of(i), "roles": [role_of(i)], "permissions": [],
            "sid": format!("session_{i}"), "jti": format!("jti_{i}"), "iat": now, "exp": now + 300});
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(KID.to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}
