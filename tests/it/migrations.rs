//! Migrations: idempotent, and the same tables and columns on both backends.

use std::collections::BTreeSet;

use rolesync::db::{Backend, Db};

use crate::support::{exec, rows, strings, TestDb};

async fn columns(db: &Db) -> BTreeSet<(String, String)> {
    let sql = match db.backend() {
        Backend::Sqlite => {
            "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p \
             WHERE m.type IN ('table', 'view') AND m.name NOT LIKE 'sqlite_%' AND m.name NOT LIKE '_sqlx%'"
        }
        Backend::Postgres => {
            "SELECT table_name::text, column_name::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name NOT LIKE '_sqlx%'"
        }
    };
    rows(db, sql, &[])
        .await
        .into_iter()
        .map(|mut r| (r[0].take().unwrap(), r[1].take().unwrap()))
        .collect()
}

both! {
    async fn migrating_twice_is_a_no_op(t) {
        let before = columns(&t.db).await;
        t.db.migrate().await.expect("second migrate");
        assert_eq!(columns(&t.db).await, before);
        let roles = t.db.roles().await.unwrap();
        assert_eq!(roles, ["admin", "member"], "seeded roles, once");
        t.db.check_ready().await.expect("ready after migrations");
    }

    async fn an_up_to_date_database_is_only_read_and_a_changed_migration_is_named(t) {
        let state = t.db.migration_state().await.unwrap();
        assert!(state.is_current() && state.applied == state.known && state.known >= 2, "{state:?}");
        assert_eq!(t.db.apply_migrations().await.unwrap(), 0, "nothing pending");
        let changed = match t.db.backend() {
            Backend::Sqlite => "UPDATE _sqlx_migrations SET checksum = X'00' WHERE version = 1",
            Backend::Postgres => "UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 1",
        };
        exec(&t.db, changed).await;
        let error = t.db.migration_state().await.unwrap_err().to_string();
        assert!(error.contains("migration 1 was changed"), "{error}");
    }
}

#[tokio::test]
async fn both_migration_sets_produce_the_same_tables_and_columns() {
    let sqlite = TestDb::new(Backend::Sqlite).await;
    let postgres = TestDb::new(Backend::Postgres).await;
    let (s, p) = (columns(&sqlite.db).await, columns(&postgres.db).await);
    assert_eq!(s, p, "SQLite and PostgreSQL schemas differ");
    for column in [
        "membership_id",
        "role_slug",
        "workos_role_slug",
        "status",
        "version",
        "updated_at",
        "role_slugs",
        "workos_role_slugs",
    ] {
        assert!(
            s.contains(&("memberships".into(), column.into())),
            "memberships.{column}"
        );
    }
    assert_eq!(s.iter().filter(|(t, _)| t == "role_audit").count(), 17);
}

/// The SQL of one migration file of a backend.
fn migration_sql(backend: Backend, prefix: &str) -> String {
    let dir = match backend {
        Backend::Sqlite => "migrations/sqlite",
        Backend::Postgres => "migrations/postgres",
    };
    let file = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .unwrap_or_else(|| panic!("{dir}/{prefix}*"));
    std::fs::read_to_string(file).unwrap()
}

/// Rows as releases before 0003 wrote them (milliseconds), beside one written since.
const OLD_AND_NEW: [(&str, &str); 2] = [
    ("old", "2026-11-20T10:00:00.123Z"),
    ("new", "2026-11-20T10:00:00.123400Z"),
];

async fn insert_text_versions(db: &Db) {
    for (user, version) in OLD_AND_NEW {
        exec(db, &format!("INSERT INTO memberships (organization_id, user_id, membership_id, role_slug, workos_role_slug, status, version, updated_at) \
             VALUES ('org_1', '{user}', 'om_{user}', 'admin', 'admin', 'active', '{version}', '{version}')")).await;
    }
}

#[tokio::test]
async fn millisecond_rows_gain_microseconds_and_keep_their_order_on_sqlite() {
    let t = TestDb::new(Backend::Sqlite).await;
    insert_text_versions(&t.db).await;
    exec(&t.db, &migration_sql(Backend::Sqlite, "0003")).await;
    let rows = t.db.memberships(Some("org_1")).await.unwrap();
    let versions: Vec<String> = rows.iter().map(|r| r.version.to_string()).collect();
    assert_eq!(
        versions,
        ["2026-11-20T10:00:00.123400Z", "2026-11-20T10:00:00.123000Z"],
        "new, then old (by user id)"
    );
    let stored = strings(
        &t.db,
        "SELECT version FROM memberships ORDER BY version",
        &[],
    )
    .await;
    assert_eq!(
        stored,
        ["2026-11-20T10:00:00.123000Z", "2026-11-20T10:00:00.123400Z"],
        "text order is time order"
    );
}

/// A PostgreSQL database made by an older build: migrations up to `last` applied by sqlx's own
/// migrator, from copies of those files (the same checksums as this build's).
async fn postgres_at(t: &TestDb, last: &str) {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir("migrations/postgres").unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name[..4] <= *last {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&t.url).await.unwrap();
    migrator.run(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn postgres_times_become_timestamptz_keeping_every_microsecond_and_their_order() {
    let t = TestDb::unmigrated(Backend::Postgres, 2).await;
    // Rows of a release before 0003 (milliseconds), and of one before 0004 (microseconds as text).
    postgres_at(&t, "0002").await;
    insert_text_versions(&t.db).await;
    postgres_at(&t, "0003").await;
    exec(&t.db, "INSERT INTO role_audit (recorded_at, organization_id, user_id, membership_id, source, outcome, detail, version) \
         VALUES ('2026-11-20T10:00:01.000001Z', 'org_1', 'new', 'om_new', 'webhook', 'applied', '', '2026-11-20T10:00:00.123400Z'); \
         INSERT INTO webhook_events (event_id, event_type, received_at, outcome) \
         VALUES ('e1', 'x', '2026-11-20T10:00:02.999999Z', 'ignored'); \
         INSERT INTO sync_state (name, cursor, updated_at) VALUES ('events', 'evt_1', '2026-11-20T10:00:03.000007Z')").await;
    let state = t.db.migration_state().await.unwrap();
    assert_eq!(
        state.applied + 2,
        state.known,
        "0004 and 0005 pending: {state:?}"
    );
    assert_eq!(t.db.apply_migrations().await.unwrap(), 2);

    let types = strings(&t.db, "SELECT table_name || '.' || column_name || ' ' || data_type FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%' AND column_name IN ('version', 'updated_at', 'recorded_at', 'received_at', 'created_at') \
         ORDER BY 1", &[]).await;
    assert_eq!(
        types,
        [
            "memberships.updated_at timestamp with time zone",
            "memberships.version timestamp with time zone",
            "role_audit.recorded_at timestamp with time zone",
            "role_audit.version timestamp with time zone",
            "roles.created_at timestamp with time zone",
            "sync_state.updated_at timestamp with time zone",
            "webhook_events.received_at timestamp with time zone",
        ]
    );
    let rows = t.db.memberships(Some("org_1")).await.unwrap();
    let versions: Vec<String> = rows.iter().map(|r| r.version.to_string()).collect();
    assert_eq!(
        versions,
        ["2026-11-20T10:00:00.123400Z", "2026-11-20T10:00:00.123000Z"],
        "new, then old (by user id)"
    );
    // What the web app reads: real timestamps, to the microsecond.
    let micros = strings(&t.db, "SELECT (extract(epoch FROM version) * 1000000)::bigint::text FROM memberships ORDER BY version", &[]).await;
    assert_eq!(micros, ["1795168800123000", "1795168800123400"]);
    let audit = t.db.audit(Some("org_1"), None, 10).await.unwrap();
    assert_eq!(
        (audit[0].recorded_at.as_str(), audit[0].version.as_str()),
        ("2026-11-20T10:00:01.000001Z", "2026-11-20T10:00:00.123400Z")
    );
    let other = strings(
        &t.db,
        "SELECT received_at FROM webhook_events UNION ALL SELECT updated_at FROM sync_state",
        &[],
    )
    .await;
    assert_eq!(
        other,
        ["2026-11-20T10:00:02.999999Z", "2026-11-20T10:00:03.000007Z"]
    );
    assert_eq!(
        t.db.cursor("events").await.unwrap().as_deref(),
        Some("evt_1")
    );
    t.db.check_ready().await.expect("ready after 0004");
}
