//! The command line as a new user meets it: every bad input gets one line on stderr, exit 2 for a
//! usage error and 1 for a runtime failure, and changes nothing; no panic, whatever the input.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rolesync::db::Db;
use rolesync::timestamp::Timestamp;
use sqlx::{Connection, Executor, PgConnection};

use crate::process::Server;
use crate::support::{obs, postgres_admin_url, rows, SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_rolesync");

/// What a finished run left: exit code, stdout, stderr.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Exit `code` with exactly one line on stderr that contains each of `words`.
    fn refused(&self, code: i32, words: &[&str], what: &str) {
        assert_eq!(self.code, code, "{what}: exit status; {self:?}");
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "{what}: one line on stderr; {self:?}"
        );
        for word in words {
            assert!(self.stderr.contains(word), "{what}: names {word}; {self:?}");
        }
    }
}

/// Runs the binary in `dir` with only these variables, stdout to `stdout`; killed after 30 s.
fn run_with(args: &[&str], envs: &[(&str, &str)], dir: &std::path::Path, stdout: Stdio) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(envs.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            r.read_to_string(&mut text).unwrap();
            text
        })
    };
    let out = child.stdout.take().map(|o| drain(Box::new(o)));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("rolesync {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.map(|o| o.join().unwrap()).unwrap_or_default(),
        stderr: err.join().unwrap(),
    }
}

/// Runs the binary in the repository (where `fixtures/` is) with only these variables.
fn rolesync(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    run_with(args, envs, repo, Stdio::piped())
}

/// The write end of a pipe whose reader has already gone, as `| true` leaves it.
fn closed_pipe() -> Stdio {
    let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
    let writer = reader.stdin.take().unwrap();
    reader.wait().unwrap();
    Stdio::from(writer)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn inbox(db: &Db) -> Vec<(String, Option<String>)> {
    rows(
        db,
        "SELECT event_id, payload FROM webhook_events ORDER BY event_id",
        &[],
    )
    .await
    .into_iter()
    .map(|mut row| (row[0].take().unwrap(), row[1].take()))
    .collect()
}

async fn roles(db: &Db) -> Vec<String> {
    db.roles().await.unwrap()
}

/// A PostgreSQL database that exists but was never migrated; dropped with the guard.
struct EmptyPostgres {
    url: String,
    name: String,
}

impl EmptyPostgres {
    async fn new() -> Self {
        let name = format!(
            "rolesync_empty_{}_{}",
            std::process::id(),
            fastrand::u32(..)
        );
        let admin = postgres_admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }

    async fn tables(&self) -> i64 {
        let mut conn = PgConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    }

    async fn drop_database(self) {
        let mut conn = PgConnection::connect(&postgres_admin_url()).await.unwrap();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        conn.execute(sql.as_str()).await.unwrap();
    }
}

both! {
    async fn prune_refuses_durations_out_of_range_or_without_a_unit_and_keeps_every_id(t) {
        let now = Timestamp::now();
        let body = r#"{"id":"e_fresh","event":"x","data":{}}"#;
        let ignored = rolesync::ingest::Incoming::parse(body.as_bytes(), rolesync::reconcile::Source::Webhook, now).unwrap();
        rolesync::ingest::deliver_batch(&t.db, &[ignored], now).await.unwrap();
        let env = [("DATABASE_URL", t.url.as_str())];
        for (flag, value) in [
            ("--ids-older-than", "800000d"),
            ("--ids-older-than", "18446744073709551s"),
            ("--payloads-older-than", "800000d"),
            ("--payloads-older-than", "36501d"),
            ("--payloads-older-than", "0"),
            ("--payloads-older-than", "45"),
        ] {
            let run = rolesync(&["prune", flag, value], &env);
            run.refused(2, &[flag, value], &format!("prune {flag} {value}"));
        }
        let run = rolesync(&["prune", "--ids-older-than", "36500d", "--payloads-older-than", "3d"], &env);
        assert_eq!((run.code, run.stdout.as_str()), (0, "0 payloads dropped\n0 event ids deleted\n"), "{run:?}");
        assert_eq!(inbox(&t.db).await, [("e_fresh".to_owned(), Some(body.to_owned()))], "the fresh id and its payload stay");
        rolesync(&["prune"], &env).refused(2, &["--payloads-older-than", "--ids-older-than"], "prune of nothing");
    }

    async fn audit_and_replay_print_cells_of_any_length_without_a_panic(t) {
        let huge = "s".repeat(100_000);
        let mut o = obs(1, Some(&huge), "active", false);
        o.user_id = "u".repeat(70_000);
        rolesync::reconcile::reconcile(&t.db, &o, Timestamp::now()).await.unwrap();
        let run = rolesync(&["audit"], &[("DATABASE_URL", &t.url)]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let line = run.stdout.lines().nth(1).expect("one audit row");
        assert!(line.contains(&format!("{}…", "s".repeat(63))) && line.len() < 1_000, "{line}");

        let server = Server::start(&t.url, &[]).await;
        let url = format!("{}/webhooks/workos", server.base);
        let run = rolesync(&["replay", "fixtures/hostile", "fixtures/workos", "--url", &url], &[("WORKOS_WEBHOOK_SECRET", SECRET)]);
        assert_eq!(run.code, 1, "hostile files are refused, and nothing panics: {}", run.stderr);
        assert!(run.stderr.is_empty() && run.stdout.contains("huge_id.json"), "{run:?}");
        server.terminate();
        assert!(server.finish().0);
    }

    async fn a_closed_stdout_ends_each_printing_command_quietly(t) {
        let server = Server::start(&t.url, &[]).await;
        let listen = server.base.trim_start_matches("http://").to_owned();
        let envs = [("DATABASE_URL", t.url.as_str()), ("WORKOS_WEBHOOK_SECRET", SECRET), ("ROLESYNC_LISTEN", &listen)];
        let cwd = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for args in [
            &["audit"][..],
            &["roles", "list"],
            &["roles", "add", "closed_pipe_role"],
            &["replay", "fixtures/workos"],
            &["replay", "--stored"],
            &["migrate"],
            &["prune", "--payloads-older-than", "30d"],
        ] {
            let run = run_with(args, &envs, cwd, closed_pipe());
            assert_eq!((run.code, run.stderr.as_str()), (0, ""), "rolesync {args:?} | true");
        }
        let wrong = [("DATABASE_URL", t.url.as_str()), ("WORKOS_WEBHOOK_SECRET", "whsec_wrong"), ("ROLESYNC_LISTEN", &listen)];
        let run = run_with(&["replay", "fixtures/workos"], &wrong, cwd, closed_pipe());
        assert_eq!(run.code, 1, "deliveries refused (401) still exit 1 when stdout is closed: {run:?}");
        server.terminate();
        assert!(server.finish().0);
    }

    async fn role_slugs_are_checked_and_a_refused_one_writes_nothing(t) {
        let env = [("DATABASE_URL", t.url.as_str())];
        let long = "r".repeat(256);
        for (slug, shown) in [
            ("", "''"),
            (" ", "' '"),
            ("two words", "'two words'"),
            ("new\nline", "'new\\nline'"),
            ("tab\there", "'tab\\there'"),
            ("x,y", "'x,y'"),
            ("caf\u{e9}", "caf\u{e9}"),
            (long.as_str(), "rrrr"),
        ] {
            for action in ["add", "remove"] {
                let run = rolesync(&["roles", action, "fine", slug], &env);
                run.refused(2, &[shown, "<SLUGS>"], &format!("roles {action} {slug:?}"));
                assert!(run.stderr.len() < 400, "the line is short: {}", run.stderr);
            }
        }
        assert_eq!(roles(&t.db).await, ["admin", "member"], "nothing written");
        let accepted = ["org-billing-admin", "billing_admin-2", &"r".repeat(255)];
        let mut args = vec!["roles", "add"];
        args.extend(accepted.iter().map(|s| &**s));
        let run = rolesync(&args, &env);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(roles(&t.db).await.len(), 5);
    }

    async fn empty_or_blank_ids_are_refused_by_every_command(t) {
        // Refused before any request: nothing listens at the API address.
        let api = format!("http://127.0.0.1:{}", free_port());
        let env = [("DATABASE_URL", t.url.as_str()), ("WORKOS_API_KEY", "sk_test"), ("WORKOS_API_BASE_URL", &api)];
        let cases: [(&[&str], &str); 9] = [
            (&["audit", "--org", ""], "--org"),
            (&["audit", "--user", " "], "--user"),
            (&["reconcile", "--user", "", "--org", "org_1"], "--user"),
            (&["reconcile", "--user", "user_1", "--org", ""], "--org"),
            (&["resync", "--org", ""], "--org"),
            (&["resync", "--org", "org 1", "--dry-run"], "--org"),
            (&["replay", "--stored", "--event-id", ""], "--event-id"),
            (&["replay", "--stored", "--outcome", ""], "--outcome"),
            (&["replay", "--stored", "--outcome", "unkown_role"], "--outcome"),
        ];
        for (args, flag) in cases {
            rolesync(args, &env).refused(2, &[flag], &format!("{args:?}"));
        }
        for limit in ["-1", "0", "many"] {
            rolesync(&["audit", "--limit", limit], &env).refused(2, &["--limit"], &format!("--limit {limit}"));
        }
        assert!(t.db.memberships(None).await.unwrap().is_empty());
    }

    async fn replay_follows_the_listen_address_and_names_the_url_and_the_cause(t) {
        let server = Server::start(&t.url, &[]).await;
        let listen = server.base.trim_start_matches("http://").to_owned();
        let signed = [("WORKOS_WEBHOOK_SECRET", SECRET), ("ROLESYNC_LISTEN", listen.as_str())];
        let run = rolesync(&["replay", "fixtures/workos"], &signed);
        assert_eq!(run.code, 0, "delivered to ROLESYNC_LISTEN: {run:?}");
        assert!(run.stdout.contains("9 deliveries, 0 failed"), "{}", run.stdout);

        let missing = format!("{}/no/such/route", server.base);
        let run = rolesync(&["replay", "fixtures/workos/role_created.json", "--url", &missing], &signed);
        assert_eq!(run.code, 1, "{run:?}");
        let row = run.stdout.lines().nth(1).unwrap();
        assert!(row.contains(" 404 ") && !row.ends_with(" -"), "the 404 has an outcome: {row}");
        assert!(!run.stdout.contains("-=1"), "{}", run.stdout);

        let empty = tempfile::tempdir().unwrap();
        let folder = empty.path().display().to_string();
        rolesync(&["replay", &folder], &signed).refused(1, &[&folder, "no .json files"], "an empty folder");
        rolesync(&["replay", "fixtures/workos", "--url", "notaurl"], &signed).refused(2, &["--url", "notaurl"], "--url notaurl");
        rolesync(&["replay", "fixtures/workos", "--timeout", "0s"], &signed).refused(2, &["--timeout"], "--timeout 0s");

        let nobody = format!("http://127.0.0.1:{}/webhooks/workos", free_port());
        let run = rolesync(&["replay", "fixtures/workos", "--url", &nobody], &signed);
        run.refused(1, &[&nobody, "refused"], "nothing listening");

        // Accepted by the kernel, never answered.
        let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/webhooks/workos", stalled.local_addr().unwrap());
        let started = Instant::now();
        let run = rolesync(&["replay", "fixtures/workos", "--url", &url, "--timeout", "1s"], &signed);
        run.refused(1, &[&url, "no answer within 1s"], "a stalled server");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        server.terminate();
        assert!(server.finish().0);
    }

    async fn migrate_twice_says_up_to_date_and_serve_logs_no_notice(t) {
        let env = [("DATABASE_URL", t.url.as_str())];
        let run = rolesync(&["migrate"], &env);
        assert_eq!((run.code, run.stdout.ends_with(": up to date\n")), (0, true), "{run:?}");
        let server = Server::start(&t.url, &[("RUST_LOG", "info".into())]).await;
        server.terminate();
        let (ok, logs) = server.finish();
        assert!(ok && !logs.contains("already exists") && !logs.contains("_sqlx_migrations"), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_other_than_serve_and_migrate_refuse_a_missing_or_unmigrated_database() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let url = format!("sqlite://{}", missing.display());
    let commands: [&[&str]; 6] = [
        &["audit"],
        &["roles", "list"],
        &["roles", "add", "creator"],
        &["prune", "--payloads-older-than", "30d"],
        &["replay", "--stored"],
        &["resync", "--org", "org_1"],
    ];
    let envs = |url: &str| {
        let api: [(&str, String); 3] = [
            ("DATABASE_URL", url.to_owned()),
            ("WORKOS_API_KEY", "sk_test".into()),
            (
                "WORKOS_API_BASE_URL",
                format!("http://127.0.0.1:{}", free_port()),
            ),
        ];
        api
    };
    for args in commands {
        let env = envs(&url);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let run = rolesync(args, &env);
        let path = missing.display().to_string();
        run.refused(1, &[&path, "rolesync migrate"], &format!("{args:?}"));
    }
    let run = run_with(&["audit"], &[], dir.path(), Stdio::piped());
    let default = dir.path().join("rolesync.db").display().to_string();
    run.refused(
        1,
        &[&default, "rolesync migrate"],
        "the default database, elsewhere",
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file created"
    );
    let zero = dir.path().join("zero.db");
    std::fs::write(&zero, b"").unwrap();
    for args in commands {
        let env = envs(&format!("sqlite://{}", zero.display()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let path = zero.display().to_string();
        rolesync(args, &env).refused(
            1,
            &[&path, "rolesync migrate"],
            &format!("{args:?} on an empty file"),
        );
    }
    assert_eq!(
        std::fs::metadata(&zero).unwrap().len(),
        0,
        "the empty file is left empty"
    );

    let empty = EmptyPostgres::new().await;
    for args in commands {
        let env = envs(&empty.url);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        rolesync(args, &env).refused(1, &[&empty.url, "rolesync migrate"], &format!("{args:?}"));
    }
    assert_eq!(empty.tables().await, 0, "no table created");
    let run = rolesync(&["migrate"], &[("DATABASE_URL", &empty.url)]);
    assert!(run.stdout.ends_with(": 5 migrations applied\n"), "{run:?}");
    assert!(rolesync(&["audit"], &[("DATABASE_URL", &empty.url)]).code == 0);
    empty.drop_database().await;
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_at_once_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notadb.txt");
    std::fs::write(&file, "these are my notes\n").unwrap();
    let url = format!("sqlite://{}", file.display());
    for args in [&["roles", "list"][..], &["migrate"], &["audit"]] {
        let started = Instant::now();
        let run = rolesync(args, &[("DATABASE_URL", &url)]);
        run.refused(
            1,
            &["notadb.txt is not a SQLite database"],
            &format!("{args:?}"),
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "at once: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "these are my notes\n"
    );
}

/// Settings beyond what a duration or a pool can hold are refused at start, before any work.
#[test]
fn settings_out_of_range_or_blank_are_refused_with_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/x.db", dir.path().display());
    let cases = [
        ("ROLESYNC_DB_MAX_CONNECTIONS", "0"),
        ("ROLESYNC_LOGIN_REFRESH_SECS", "99999999999"),
        ("ROLESYNC_LOGIN_BUDGET_MS", "18446744073709551615"),
        ("ROLESYNC_REQUEST_TIMEOUT_SECS", "18446744073709551615"),
        ("ROLESYNC_SHUTDOWN_GRACE_SECS", "18446744073709551615"),
        ("ROLESYNC_SYNC_INTERVAL_SECS", "18446744073709551615"),
        ("ROLESYNC_SYNC_LOOKBACK", "3"),
        ("WORKOS_API_KEY", ""),
        ("WORKOS_API_KEY", "  "),
        ("ROLESYNC_LOGIN_TOKEN", ""),
    ];
    for (variable, value) in cases {
        for args in [&["serve"][..], &["roles", "list"]] {
            let envs = [
                ("DATABASE_URL", url.as_str()),
                ("WORKOS_WEBHOOK_SECRET", "s"),
                ("ROLESYNC_LISTEN", "127.0.0.1:0"),
                (variable, value),
            ];
            let what = format!("{variable}={value:?} {args:?}");
            rolesync(args, &envs).refused(2, &[variable], &what);
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
    // A setting a command needs and nobody set is a usage error too.
    let missing: [(&[&str], &str); 3] = [
        (&["serve"], "WORKOS_WEBHOOK_SECRET"),
        (&["replay", "fixtures/workos"], "WORKOS_WEBHOOK_SECRET"),
        (&["sync"], "WORKOS_API_KEY"),
    ];
    for (args, variable) in missing {
        let envs = [("DATABASE_URL", url.as_str())];
        rolesync(args, &envs).refused(2, &[variable], &format!("{args:?} without {variable}"));
    }
    let envs = [("DATABASE_URL", url.as_str())];
    rolesync(&["roles", "list", "--db-max-connections", "-1"], &envs).refused(
        2,
        &["--db-max-connections", "-1"],
        "a negative number names its option",
    );
    for args in [
        &["prune", "--payloads-older-than", "-1d"][..],
        &["sync", "--sync-lookback", "-1d"],
    ] {
        rolesync(args, &envs).refused(
            2,
            &[args[1], "-1d"],
            &format!("{args:?}: a negative duration names its option"),
        );
    }
    let envs = [
        ("DATABASE_URL", url.as_str()),
        ("ROLESYNC_LOG_FORMAT", "xml"),
    ];
    rolesync(&["roles", "list"], &envs).refused(
        2,
        &["ROLESYNC_LOG_FORMAT", "json", "pretty"],
        "the possible values are named",
    );
}

/// `.env.example` says "copy to .env and export": done as it stands, every command still runs.
#[test]
fn the_example_environment_exported_as_it_stands_is_accepted() {
    let example = std::fs::read_to_string(".env.example").unwrap();
    let mut envs: Vec<(&str, &str)> = example
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    for arg in rolesync::cli::command().get_arguments() {
        if let Some(variable) = arg.get_env().and_then(|v| v.to_str()) {
            assert!(
                example.contains(&format!("{variable}=")),
                ".env.example lists {variable}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/example.db", dir.path().display());
    envs.push(("DATABASE_URL", &url));
    let run = rolesync(&["migrate"], &envs);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn each_subcommand_help_shows_the_settings_it_uses() {
    let help = |args: &[&str]| {
        let run = rolesync(args, &[]);
        assert_eq!(run.code, 0, "{args:?}");
        run.stdout
    };
    let add = help(&["roles", "add", "--help"]);
    assert!(add.contains("<SLUGS>...  Role slugs"), "{add}");
    let serve_only = [
        "ROLESYNC_LISTEN",
        "WORKOS_WEBHOOK_SECRET",
        "WORKOS_API_KEY",
        "ROLESYNC_LOGIN_TOKEN",
        "ROLESYNC_RATE_LIMIT_PER_IP",
        "ROLESYNC_SHUTDOWN_GRACE_SECS",
    ];
    let cases: [(&[&str], &[&str], &[&str]); 5] = [
        (&["roles", "add", "--help"], &["DATABASE_URL"], &serve_only),
        (
            &["audit", "--help"],
            &["DATABASE_URL", "--limit"],
            &serve_only,
        ),
        (
            &["replay", "--help"],
            &["ROLESYNC_LISTEN", "WORKOS_WEBHOOK_SECRET", "--timeout"],
            &["WORKOS_API_KEY", "ROLESYNC_LOGIN_TOKEN"],
        ),
        (
            &["resync", "--help"],
            &["WORKOS_API_KEY", "WORKOS_API_BASE_URL", "DATABASE_URL"],
            &["ROLESYNC_LISTEN", "WORKOS_WEBHOOK_SECRET"],
        ),
        (&["serve", "--help"], &serve_only, &[]),
    ];
    for (args, shown, hidden) in cases {
        let text = help(args);
        for s in shown {
            assert!(text.contains(s), "{args:?} shows {s}");
        }
        for h in hidden {
            assert!(!text.contains(h), "{args:?} hides {h}");
        }
    }
    let run = rolesync(&["roles", "list", "--listen", "127.0.0.1:0"], &[]);
    assert_ne!(run.code, 2, "a hidden setting is still accepted: {run:?}");
}
