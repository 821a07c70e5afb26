//! The real binary as operators run it: start-up errors, help, logs that keep secrets, and SIGTERM.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rolesync::signature;
use serde_json::Value;

use crate::fake_workos::{api_membership, page, FakeWorkos};
use crate::support::{membership_event, SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_rolesync");
const API_KEY: &str = "sk_test_process_api_key_4d2f";
const LOGIN_TOKEN: &str = "login_token_process_9c1e";
const BODY_MARKER: &str = "body-marker-that-must-never-be-logged";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `rolesync serve` with its stderr captured.
pub struct Server {
    child: Child,
    pub base: String,
    /// Taken by [`Server::finish`]; a server dropped without it (a failed test) is killed.
    logs: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.logs.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    pub async fn start(db_url: &str, envs: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env_clear()
            .env("DATABASE_URL", db_url)
            .env("ROLESYNC_LISTEN", format!("127.0.0.1:{port}"))
            .env("WORKOS_WEBHOOK_SECRET", SECRET)
            .env("ROLESYNC_LOG_FORMAT", "json")
            .env("RUST_LOG", "debug,sqlx=warn,hyper=warn,reqwest=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        // Drained from the start, so that a full pipe never blocks the server.
        let logs = std::thread::spawn(move || {
            let mut text = String::new();
            stderr.read_to_string(&mut text).unwrap();
            text
        });
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            logs: Some(logs),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(format!("{}/healthz", self.base)).await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("rolesync did not start");
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns (exit success, stderr).
    pub fn finish(mut self) -> (bool, String) {
        let status = self.child.wait().unwrap();
        let logs = self.logs.take().expect("finished once");
        (status.success(), logs.join().unwrap())
    }
}

/// POSTs a body to a running rolesync, signed now with the test secret.
pub async fn post_signed(
    client: &reqwest::Client,
    base: &str,
    body: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    let header = signature::sign(
        &body,
        SECRET.as_bytes(),
        rolesync::timestamp::Timestamp::now().millis(),
    );
    client
        .post(format!("{base}/webhooks/workos"))
        .header("WorkOS-Signature", header)
        .body(body)
        .send()
        .await
}

/// The status of a signed delivery; `None` when the server did not answer.
pub async fn post_webhook(client: &reqwest::Client, base: &str, body: Vec<u8>) -> Option<u16> {
    Some(
        post_signed(client, base, body)
            .await
            .ok()?
            .status()
            .as_u16(),
    )
}

fn body_with_marker(id: &str, user: &str) -> Vec<u8> {
    let mut event: Value =
        serde_json::from_slice(&membership_event(id, "updated", user, "admin", "active", 1))
            .unwrap();
    event["data"]["custom_attributes"]["note"] = BODY_MARKER.into();
    serde_json::to_vec(&event).unwrap()
}

both! {
    async fn a_full_session_logs_json_and_never_a_secret_or_a_body(t) {
        let fake = FakeWorkos::start().await;
        fake.always(page(vec![api_membership("user_1", "admin", "active", "2026-11-20T10:00:00.000Z")], None));
        let server = Server::start(&t.url, &[
            ("WORKOS_API_KEY", API_KEY.into()),
            ("WORKOS_API_BASE_URL", fake.url.clone()),
            ("ROLESYNC_LOGIN_TOKEN", LOGIN_TOKEN.into()),
        ]).await;
        let client = reqwest::Client::new();
        assert_eq!(post_webhook(&client, &server.base, body_with_marker("e1", "user_1")).await, Some(200));
        assert_eq!(post_webhook(&client, &server.base, body_with_marker("e1", "user_1")).await, Some(200));
        let bad = client.post(format!("{}/webhooks/workos", server.base)).header("WorkOS-Signature", "t=1, v1=00").body(body_with_marker("e2", "u")).send().await.unwrap();
        assert_eq!(bad.status(), 400);
        let login = |token: &'static str| client.post(format!("{}/v1/reconcile", server.base))
            .bearer_auth(token).json(&serde_json::json!({"user_id": "user_1", "organization_id": "org_1"})).send();
        assert_eq!(login(LOGIN_TOKEN).await.unwrap().status(), 200);
        assert_eq!(login("wrong-token").await.unwrap().status(), 401);
        let echoed = client.get(format!("{}/v1/memberships/org_1/user_1", server.base)).bearer_auth(LOGIN_TOKEN)
            .header("x-request-id", "req-from-test").send().await.unwrap();
        assert_eq!(echoed.headers()["x-request-id"], "req-from-test");
        server.terminate();
        let (ok, logs) = server.finish();
        assert!(ok, "exit 0 after SIGTERM; logs:\n{logs}");
        for secret in [SECRET, API_KEY, LOGIN_TOKEN, "wrong-token", BODY_MARKER] {
            assert!(!logs.contains(secret), "{secret} appears in the logs");
        }
        let lines: Vec<Value> = logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
        let delivered = lines.iter().find(|l| l["fields"]["message"] == "webhook delivered").expect("a delivery is logged");
        assert_eq!(delivered["span"]["route"], "/webhooks/workos");
        assert!(delivered["span"]["request_id"].as_str().is_some_and(|id| !id.is_empty()));
        assert_eq!(delivered["span"]["event_id"], "e1", "the span carries the event id recorded into it");
        let refused = lines.iter().find(|l| l["fields"]["message"] == "request refused").expect("the bad signature is logged");
        assert_eq!(refused["fields"]["error"], "malformed_signature");
        assert_eq!(refused["span"]["outcome"], "malformed_signature", "the span carries the outcome");
        assert!(lines.iter().any(|l| l["span"]["request_id"] == "req-from-test"), "the caller's request id is logged");
        let login = lines.iter().find(|l| l["fields"]["message"] == "login reconciled").expect("the login is logged");
        assert_eq!((&login["span"]["organization_id"], &login["span"]["user_id"]), (&"org_1".into(), &"user_1".into()));
    }

    async fn sigterm_during_a_stream_loses_no_acknowledged_delivery(t) {
        let server = Server::start(&t.url, &[]).await;
        let base = server.base.clone();
        let client = reqwest::Client::new();
        let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
        let senders: Vec<_> = (0..8).map(|worker| {
            let (client, base, acknowledged) = (client.clone(), base.clone(), acknowledged.clone());
            tokio::spawn(async move {
                for n in 0..400 {
                    let id = format!("e{worker}_{n}");
                    let body = membership_event(&id, "updated", &format!("user_{worker}"), "member", "active", n);
                    match post_webhook(&client, &base, body).await {
                        Some(200) => acknowledged.lock().unwrap().push(id),
                        Some(_) => {}
                        None => break,
                    }
                }
            })
        }).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.terminate();
        for s in senders {
            s.await.unwrap();
        }
        let (ok, logs) = server.finish();
        assert!(ok, "exit 0 after SIGTERM:\n{logs}");
        let acknowledged = acknowledged.lock().unwrap().clone();
        assert!(!acknowledged.is_empty(), "some deliveries were answered before the signal");
        let db = rolesync::db::Db::connect(&t.url, 2).await.unwrap();
        let stored = crate::support::strings(&db, "SELECT event_id FROM webhook_events", &[]).await;
        let stored: std::collections::HashSet<String> = stored.into_iter().collect();
        let lost: Vec<&String> = acknowledged.iter().filter(|id| !stored.contains(*id)).collect();
        assert!(lost.is_empty(), "{} acknowledged deliveries are not stored: {lost:?}", lost.len());
        db.close().await;
    }
}

/// Runs the binary to completion with only these variables; returns (exit code, stdout, stderr).
pub fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (
        output.status.code().unwrap_or(-1),
        text(output.stdout),
        text(output.stderr),
    )
}

/// What, environment, and the setting the error must name.
type SettingCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn bad_settings_stop_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}/x.db", dir.path().display());
    // Nothing listens there: the port was free a moment ago.
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let cases: Vec<SettingCase> = vec![
        (
            "serve without a webhook secret",
            vec![("DATABASE_URL", &sqlite)],
            "WORKOS_WEBHOOK_SECRET",
        ),
        (
            "unknown scheme",
            vec![
                ("DATABASE_URL", "mysql://h/db"),
                ("WORKOS_WEBHOOK_SECRET", "s"),
            ],
            "DATABASE_URL",
        ),
        (
            "not a URL",
            vec![
                ("DATABASE_URL", "rolesync.db"),
                ("WORKOS_WEBHOOK_SECRET", "s"),
            ],
            "DATABASE_URL",
        ),
        (
            "unreachable database",
            vec![
                ("DATABASE_URL", &unreachable),
                ("WORKOS_WEBHOOK_SECRET", "s"),
            ],
            "DATABASE_URL",
        ),
        (
            "bad listen address",
            vec![
                ("DATABASE_URL", &sqlite),
                ("WORKOS_WEBHOOK_SECRET", "s"),
                ("ROLESYNC_LISTEN", "nowhere"),
            ],
            "ROLESYNC_LISTEN",
        ),
        (
            "bad number",
            vec![
                ("DATABASE_URL", &sqlite),
                ("WORKOS_WEBHOOK_SECRET", "s"),
                ("ROLESYNC_LOGIN_BUDGET_MS", "fast"),
            ],
            "ROLESYNC_LOGIN_BUDGET_MS",
        ),
        (
            "bad API base URL",
            vec![
                ("DATABASE_URL", &sqlite),
                ("WORKOS_WEBHOOK_SECRET", "s"),
                ("WORKOS_API_BASE_URL", "ftp://x"),
            ],
            "WORKOS_API_BASE_URL",
        ),
    ];
    for (what, mut envs, setting) in cases {
        // Port 0: a test never depends on a fixed port being free (8080 may run the quick start).
        if setting != "ROLESYNC_LISTEN" {
            envs.push(("ROLESYNC_LISTEN", "127.0.0.1:0"));
        }
        let (code, _, stderr) = run(&["serve"], &envs);
        assert_ne!(code, 0, "{what}: must fail");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{what}: one line, got {stderr:?}"
        );
        assert!(
            stderr.contains(setting),
            "{what}: {stderr:?} names {setting}"
        );
    }
}

#[test]
fn a_database_password_is_never_printed_by_help_or_a_refused_url() {
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "help",
            &["serve", "--help"],
            "postgres://app:hunter2@db/rolesync",
        ),
        (
            "unknown scheme",
            &["roles", "list"],
            "mysql://app:hunter2@db/rolesync",
        ),
        ("not a URL", &["roles", "list"], "app:hunter2@db"),
        (
            "unreachable",
            &["roles", "list"],
            "postgres://app:hunter2@127.0.0.1:1/rolesync",
        ),
    ];
    for (what, args, url) in cases {
        let (_, stdout, stderr) = run(args, &[("DATABASE_URL", url)]);
        assert!(
            !stdout.contains("hunter2") && !stderr.contains("hunter2"),
            "{what}: {stdout}{stderr}"
        );
    }
    let (code, _, stderr) = run(
        &[
            "roles",
            "list",
            "--database-url",
            "mysql://app:hunter2@db/x",
        ],
        &[],
    );
    assert_eq!(code, 2, "a usage error");
    assert!(
        !stderr.contains("hunter2") && stderr.contains("app:****@db"),
        "{stderr}"
    );
}

#[test]
fn help_describes_every_setting_and_its_variable() {
    let (code, help, _) = run(&["serve", "--help"], &[]);
    assert_eq!(code, 0);
    let example = std::fs::read_to_string(".env.example").unwrap();
    let variables: Vec<&str> = example
        .lines()
        .filter_map(|l| l.trim_start_matches("# ").split_once('='))
        .map(|(k, _)| k.trim())
        .collect();
    assert!(variables.len() >= 15, "{variables:?}");
    for variable in variables.iter().filter(|v| **v != "RUST_LOG") {
        assert!(
            help.contains(&format!("env: {variable}")),
            "--help names {variable}"
        );
    }
    for sub in [
        "migrate",
        "roles",
        "audit",
        "replay",
        "reconcile",
        "sync",
        "resync",
        "prune",
    ] {
        let (code, text, _) = run(&[sub, "--help"], &[]);
        assert!(code == 0 && text.contains("DATABASE_URL"), "{sub} --help");
    }
}

#[test]
fn migrate_twice_and_manage_roles_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/cli.db", dir.path().display());
    let envs = [("DATABASE_URL", url.as_str())];
    let (code, first, _) = run(&["migrate"], &envs);
    assert_eq!((code, first), (0, format!("{url}: 4 migrations applied\n")));
    let (code, second, _) = run(&["migrate"], &envs);
    assert_eq!(
        (code, second),
        (0, format!("{url}: up to date\n")),
        "a second migrate is a no-op"
    );
    let (code, out, _) = run(&["roles", "add", "creator", "admin"], &envs);
    assert_eq!(
        (code, out.as_str()),
        (0, "creator: added\nadmin: already known\n")
    );
    assert_eq!(run(&["roles", "list"], &envs).1, "admin\ncreator\nmember\n");
    assert_eq!(
        run(&["roles", "remove", "creator"], &envs).1,
        "creator: removed\n"
    );
    let (code, table, _) = run(&["audit", "--limit", "5"], &envs);
    assert_eq!(code, 0);
    assert!(table.starts_with("ID  RECORDED"), "{table}");
}

/// Soft and hard "Max open files" of a process, from /proc.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_its_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Started with a soft limit of 256, as a shell's `ulimit -Sn 256` would leave it.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" serve", BIN])
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/x.db", dir.path().display()),
        )
        .env("ROLESYNC_LISTEN", format!("127.0.0.1:{port}"))
        .env("WORKOS_WEBHOOK_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "serve did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (soft, hard) = open_file_limits(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        soft, hard,
        "the soft limit (256 at start) is raised to the hard one"
    );
}
