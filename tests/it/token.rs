//! Sign-in with an AuthKit access token: RS256 keys made by `openssl` in the test, their key set
//! served by the stand-in WorkOS (so its calls are counted, it can fail, and keys can rotate).

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use axum::http::StatusCode;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::fake_workos::{FakeWorkos, Reply};
use crate::login::{found, login_app_with, TOKEN};
use crate::ops::exposition;
use crate::support::{audit_count, audit_of, membership, membership_event, TestApp};

const CLIENT_ID: &str = "client_test_1";
const ISSUER: &str = "https://api.workos.com/user_management/client_test_1";
/// The test clock's time (`TestApp`'s start), in seconds.
const NOW: i64 = 1_795_608_000;

/// An RSA key pair made for the tests.
struct TestKey {
    kid: String,
    private_pem: Vec<u8>,
    public_pem: Vec<u8>,
    /// The modulus, base64url.
    n: String,
}

fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the token tests need the openssl command (apt-get install openssl)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?} failed");
    out.stdout
}

/// Three 2048-bit keys, made once per test process (`openssl genrsa` takes well under a second;
/// the `rsa` crate unoptimized takes many).
fn keys() -> &'static [TestKey] {
    static KEYS: OnceLock<Vec<TestKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (1..=3)
            .map(|i| {
                let private_pem = openssl(&["genrsa", "2048"], b"");
                let public_pem = openssl(&["rsa", "-pubout"], &private_pem);
                let modulus = openssl(&["rsa", "-noout", "-modulus"], &private_pem);
                let hex_n = String::from_utf8(modulus).unwrap();
                let hex_n = hex_n.trim().strip_prefix("Modulus=").unwrap().to_owned();
                TestKey {
                    kid: format!("key_{i}"),
                    private_pem,
                    public_pem,
                    n: URL_SAFE_NO_PAD.encode(hex::decode(hex_n).unwrap()),
                }
            })
            .collect()
    })
}

/// A JWKS document of these keys, as WorkOS serves it.
fn jwks(keys: &[&TestKey]) -> Reply {
    let listed: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({"alg": "RS256", "kty": "RSA", "use": "sig", "kid": k.kid, "n": k.n, "e": "AQAB",
            "x5c": [], "x5t#S256": "unused"})
        })
        .collect();
    Reply::json(json!({ "keys": listed }))
}

/// The claims of an AuthKit access token for `user` in `org_1` with `role`, minted a minute ago.
fn claims(user: &str, role: &str) -> Value {
    json!({"iss": ISSUER, "sub": user, "sid": "session_1", "jti": "jti_1", "org_id": "org_1",
        "role": role, "roles": [role], "permissions": [], "iat": NOW - 60, "exp": NOW + 240})
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    let encoding = EncodingKey::from_rsa_pem(&key.private_pem).unwrap();
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

/// `claims` with `changes` merged in (a null removes a claim).
fn with(mut claims: Value, changes: Value) -> Value {
    for (name, value) in changes.as_object().unwrap() {
        match value {
            Value::Null => claims.as_object_mut().unwrap().remove(name),
            v => claims
                .as_object_mut()
                .unwrap()
                .insert(name.clone(), v.clone()),
        };
    }
    claims
}

/// A token-enabled app over `fake`, serving the first key.
fn token_app(db: &rolesync::db::Db, fake: &FakeWorkos) -> TestApp {
    fake.jwks(jwks(&[&keys()[0]]));
    login_app_with(db, fake, |c| {
        c.login_refresh_secs = 0;
        c.client_id = Some(CLIENT_ID.into());
    })
}

impl TestApp {
    async fn sign_in(&self, body: Value) -> (StatusCode, Value) {
        self.login_with(Some(TOKEN), body.to_string()).await
    }

    async fn sign_in_with(&self, token: &str) -> (StatusCode, Value) {
        self.sign_in(json!({ "access_token": token })).await
    }
}

/// What each sign-in must leave alone: audit rows and the stored row.
async fn snapshot(t: &crate::support::TestDb) -> (i64, Option<rolesync::reconcile::Membership>) {
    (
        audit_count(&t.db).await,
        membership(&t.db, "org_1", "user_1").await,
    )
}

both! {
    async fn an_agreeing_token_is_answered_from_the_database_without_workos_or_a_write(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let before = snapshot(&t).await;
        let token = sign(&keys()[0], &claims("user_1", "admin"));
        let (status, answer) = app.sign_in_with(&token).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer, json!({"user_id": "user_1", "organization_id": "org_1", "role": "admin",
            "roles": ["admin"], "status": "active", "outcome": null, "source": "token"}));
        assert_eq!((fake.api_calls(), fake.jwks_calls()), (0, 1), "only the key set was fetched");
        let (status, again) = app.sign_in(json!({"access_token": token, "user_id": "user_1",
            "organization_id": "org_1"})).await;
        assert_eq!((status, again["source"].as_str()), (StatusCode::OK, Some("token")));
        assert_eq!(fake.calls(), 1, "the second sign-in made no WorkOS call at all");
        assert_eq!(snapshot(&t).await, before, "nothing written: no audit row, the same row");
        let metrics = exposition(&app).await;
        assert!(metrics.contains(r#"rolesync_login_answers_total{outcome="none",source="token"} 2"#), "{metrics}");
    }

    async fn a_token_agrees_only_with_the_whole_role_set_workos_last_reported(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        let mut created: Value = serde_json::from_slice(&membership_event("e1", "created", "user_1", "member", "active", 1)).unwrap();
        created["data"]["roles"] = json!([{"slug": "member"}, {"slug": "admin"}]);
        app.deliver(&serde_json::to_vec(&created).unwrap()).await;
        let before = snapshot(&t).await;
        let both = with(claims("user_1", "member"), json!({"roles": ["admin", "member"]}));
        let (status, answer) = app.sign_in_with(&sign(&keys()[0], &both)).await;
        assert_eq!((status, answer["source"].as_str(), answer["roles"].clone()), (StatusCode::OK, Some("token"), json!(["admin", "member"])), "{answer}");
        assert_eq!((fake.api_calls(), snapshot(&t).await), (0, before), "no fetch, no write");
        // A token that lists one role fewer disagrees: the login path asks WorkOS.
        let mut reply = crate::fake_workos::api_membership("user_1", "member", "active", &crate::support::v(2).to_string());
        reply["roles"] = json!([{"slug": "member"}]);
        fake.script([crate::fake_workos::page(vec![reply], None)]);
        let (_, answer) = app.sign_in_with(&sign(&keys()[0], &claims("user_1", "member"))).await;
        assert_eq!((answer["source"].as_str(), answer["roles"].clone()), (Some("workos"), json!(["member"])), "{answer}");
        assert_eq!(fake.api_calls(), 1);
    }

    async fn a_disagreeing_token_runs_one_fetch_and_heals(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        fake.script([found("user_1", "admin", "active", 2)]);
        let (status, answer) = app.sign_in_with(&sign(&keys()[0], &claims("user_1", "admin"))).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!((answer["role"].as_str(), answer["outcome"].as_str(), answer["source"].as_str()),
            (Some("admin"), Some("applied"), Some("workos")));
        assert_eq!(fake.api_calls(), 1, "one membership fetch");
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert_eq!((audit.len(), audit[1].source.as_str(), audit[1].new_role.as_deref()), (2, "login", Some("admin")));
    }

    async fn a_token_for_a_membership_not_stored_fetches_it(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        fake.script([found("user_1", "admin", "active", 2)]);
        let (_, answer) = app.sign_in_with(&sign(&keys()[0], &claims("user_1", "admin"))).await;
        assert_eq!((answer["source"].as_str(), answer["outcome"].as_str()), (Some("workos"), Some("applied")));
        assert_eq!(fake.api_calls(), 1);
    }

    async fn a_token_older_than_the_stored_version_is_answered_with_the_stored_row(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        // Stored at NOW - 10 s; the token was minted at NOW - 60 s with the role of before.
        let version = NOW - 10 - 1_795_168_800;
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", version)).await;
        let before = snapshot(&t).await;
        let (status, answer) = app.sign_in_with(&sign(&keys()[0], &claims("user_1", "admin"))).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!((answer["role"].as_str(), answer["source"].as_str()), (Some("member"), Some("database")));
        assert_eq!(fake.api_calls(), 0, "no fetch");
        assert_eq!(snapshot(&t).await, before);
    }

    async fn tokens_failing_a_check_answer_401_with_the_reason_and_change_nothing(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        let before = snapshot(&t).await;
        let key = &keys()[0];
        let good = claims("user_1", "admin");
        let valid = sign(key, &good);
        let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let parts: Vec<&str> = valid.split('.').collect();
        let hs256_with_public_key = {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(key.kid.clone());
            jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&key.public_pem)).unwrap()
        };
        let cases: Vec<(&str, String, &str)> = vec![
            ("expired", sign(key, &with(good.clone(), json!({"iat": NOW - 400, "exp": NOW - 100}))), "expired"),
            ("not yet valid", sign(key, &with(good.clone(), json!({"nbf": NOW + 300}))), "not_yet_valid"),
            ("wrong issuer", sign(key, &with(good.clone(), json!({"iss": "https://evil.example"}))), "issuer"),
            ("no issuer", sign(key, &with(good.clone(), json!({"iss": null}))), "issuer"),
            ("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "kid": key.kid})), parts[1]), "algorithm"),
            ("HS256 keyed with the public key", hs256_with_public_key, "algorithm"),
            ("tampered payload", format!("{}.{}.{}", parts[0], b64(&with(good.clone(), json!({"sub": "user_2"}))), parts[2]), "signature"),
            ("signed by a key of no set but naming a known kid", {
                let mut other = sign(&keys()[1], &good);
                other.replace_range(..other.find('.').unwrap(), parts[0]);
                other
            }, "signature"),
            ("not a JWT", "not-a-jwt".into(), "malformed"),
        ];
        for (what, token, reason) in &cases {
            let (status, answer) = app.sign_in_with(token).await;
            assert_eq!((status, answer["error"].as_str(), answer["reason"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("invalid_token"), Some(*reason)), "{what}: {answer}");
        }
        assert_eq!(fake.api_calls(), 0, "no membership was fetched");
        assert_eq!(snapshot(&t).await, before, "nothing was written");
        let metrics = exposition(&app).await;
        for (reason, count) in [("expired", 1), ("algorithm", 2), ("signature", 2), ("issuer", 2)] {
            let line = format!("rolesync_token_rejections_total{{reason=\"{reason}\"}} {count}");
            assert!(metrics.contains(&line), "{line} in {metrics}");
        }
    }

    async fn an_audience_is_ignored_as_workos_sets_none(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let token = sign(&keys()[0], &with(claims("user_1", "admin"), json!({"aud": "another-app"})));
        let (status, answer) = app.sign_in_with(&token).await;
        assert_eq!((status, answer["source"].as_str()), (StatusCode::OK, Some("token")), "{answer}");
    }

    async fn an_unknown_kid_refetches_the_key_set_once_then_answers_401(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let (status, _) = app.sign_in_with(&sign(&keys()[0], &claims("user_1", "admin"))).await;
        assert_eq!((status, fake.jwks_calls()), (StatusCode::OK, 1));
        let stranger = sign(&keys()[2], &claims("user_1", "admin"));
        let (status, answer) = app.sign_in_with(&stranger).await;
        assert_eq!((status, answer["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("unknown_kid")), "{answer}");
        assert_eq!(fake.jwks_calls(), 2, "one refetch for the unknown kid");
        let (status, _) = app.sign_in_with(&stranger).await;
        assert_eq!((status, fake.jwks_calls()), (StatusCode::UNAUTHORIZED, 2), "no second refetch within a minute");
    }

    async fn a_rotated_key_is_fetched_when_a_token_names_it(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        assert_eq!(app.sign_in_with(&sign(&keys()[0], &claims("user_1", "admin"))).await.0, StatusCode::OK);
        fake.jwks(jwks(&[&keys()[1]]));
        let (status, answer) = app.sign_in_with(&sign(&keys()[1], &claims("user_1", "admin"))).await;
        assert_eq!((status, answer["source"].as_str()), (StatusCode::OK, Some("token")), "{answer}");
        assert_eq!(fake.jwks_calls(), 2);
    }

    async fn a_cached_key_still_verifies_while_the_key_set_cannot_be_fetched(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let token = sign(&keys()[0], &claims("user_1", "admin"));
        assert_eq!(app.sign_in_with(&token).await.0, StatusCode::OK);
        fake.jwks(Reply::status(503));
        // A refetch for an unknown kid fails; the cached set stays.
        let (status, answer) = app.sign_in_with(&sign(&keys()[1], &claims("user_1", "admin"))).await;
        assert_eq!((status, answer["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("unknown_kid")), "{answer}");
        assert!(fake.jwks_calls() >= 2, "the refetch was tried");
        let (status, answer) = app.sign_in_with(&token).await;
        assert_eq!((status, answer["source"].as_str()), (StatusCode::OK, Some("token")), "{answer}");
    }

    async fn without_any_key_set_a_token_sign_in_answers_503(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        fake.jwks(Reply::status(404));
        let body = json!({"access_token": sign(&keys()[0], &claims("user_1", "admin"))}).to_string();
        let request = axum::http::Request::post("/v1/reconcile")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(axum::body::Body::from(body))
            .unwrap();
        let (status, headers, answer) = app.exchange(request).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("jwks_unavailable")), "{answer}");
        assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("5"), "when to try again");
        assert_eq!(fake.api_calls(), 0);
    }

    async fn a_key_set_without_a_usable_key_never_replaces_a_cached_one(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let good = sign(&keys()[0], &claims("user_1", "admin"));
        assert_eq!(app.sign_in_with(&good).await.1["source"], "token");
        // A token naming another key makes rolesync fetch the set again; WorkOS answers one with no key.
        fake.jwks(Reply::json(json!({"keys": []})));
        let (status, answer) = app.sign_in_with(&sign(&keys()[1], &claims("user_1", "admin"))).await;
        assert_eq!((status, answer["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("unknown_kid")), "{answer}");
        assert_eq!(fake.jwks_calls(), 2, "one refetch");
        let (status, answer) = app.sign_in_with(&good).await;
        assert_eq!((status, answer["source"].as_str()), (StatusCode::OK, Some("token")), "the cached key still verifies: {answer}");
    }

    async fn a_token_for_another_organization_or_user_than_the_body_names_is_refused(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let before = snapshot(&t).await;
        let token = sign(&keys()[0], &claims("user_1", "admin"));
        for (what, body) in [
            ("another organization", json!({"access_token": token, "organization_id": "org_2"})),
            ("another user", json!({"access_token": token, "user_id": "user_2", "organization_id": "org_1"})),
        ] {
            let (status, answer) = app.sign_in(body).await;
            assert_eq!((status, answer["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{what}: {answer}");
        }
        let no_org = sign(&keys()[0], &with(claims("user_1", "admin"), json!({"org_id": null, "role": null, "roles": null})));
        let (status, answer) = app.sign_in_with(&no_org).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "no organization selected: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("org_id"), "{answer}");
        assert_eq!((fake.api_calls(), snapshot(&t).await), (0, before));
    }

    async fn an_impersonation_token_is_answered_from_the_database_and_never_writes(t) {
        let fake = FakeWorkos::start().await;
        let app = token_app(&t.db, &fake);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        let before = snapshot(&t).await;
        fake.always(found("user_1", "admin", "active", 2));
        let act = json!({"act": {"sub": "admin@support.example"}});
        let (status, answer) = app.sign_in_with(&sign(&keys()[0], &with(claims("user_1", "admin"), act.clone()))).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!((answer["role"].as_str(), answer["source"].as_str()), (Some("member"), Some("database")), "the claims are not acted on");
        let (status, _) = app.sign_in_with(&sign(&keys()[0], &with(claims("user_2", "admin"), act))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "nothing stored: nothing fetched either");
        assert_eq!((fake.api_calls(), snapshot(&t).await), (0, before), "no fetch, no write");
    }

    async fn renamed_role_claims_are_read_where_the_settings_say(t) {
        let fake = FakeWorkos::start().await;
        fake.jwks(jwks(&[&keys()[0]]));
        let app = login_app_with(&t.db, &fake, |c| {
            c.client_id = Some(CLIENT_ID.into());
            c.token_role_claim = "app_role".into();
            c.token_roles_claim = "app_roles".into();
            c.token_issuers = Some("https://auth.example.com".parse().unwrap());
        });
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let renamed = json!({"iss": "https://auth.example.com", "role": "member", "roles": ["member"],
            "app_role": "admin", "app_roles": ["admin"]});
        let (status, answer) = app.sign_in_with(&sign(&keys()[0], &with(claims("user_1", "admin"), renamed))).await;
        assert_eq!((status, answer["source"].as_str()), (StatusCode::OK, Some("token")), "{answer}");
        let (status, answer) = app.sign_in_with(&sign(&keys()[0], &claims("user_1", "admin"))).await;
        assert_eq!((status, answer["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("issuer")), "the default issuers are replaced");
    }

    async fn without_a_client_id_a_token_sign_in_answers_503_and_id_logins_work(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app_with(&t.db, &fake, |c| c.login_refresh_secs = 0);
        let (status, answer) = app.sign_in_with(&sign(&keys()[0], &claims("user_1", "admin"))).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("token_sign_in_disabled")), "{answer}");
        fake.script([found("user_1", "admin", "active", 2)]);
        let (status, answer) = app.sign_in(json!({"user_id": "user_1", "organization_id": "org_1"})).await;
        assert_eq!((status, answer["source"].as_str()), (StatusCode::OK, Some("workos")), "{answer}");
    }
}
