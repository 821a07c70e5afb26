//! Migrations: idempotent, and the same tables and columns on both backends.

use std::collections::BTreeSet;

use rolesync::db::{Backend, Db};

use crate::support::TestDb;

async fn columns(db: &Db) -> BTreeSet<(String, String)> {
    let sql = match db.backend() {
        Backend::Sqlite => {
            "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name NOT LIKE '_sqlx%'"
        }
        Backend::Postgres => {
            "SELECT table_name::text, column_name::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name NOT LIKE '_sqlx%'"
        }
    };
    let rows: Vec<(String, String)> = sqlx::query_as(sql).fetch_all(db.pool()).await.unwrap();
    rows.into_iter().collect()
}

both! {
    async fn migrating_twice_is_a_no_op(t) {
        let before = columns(&t.db).await;
        t.db.migrate().await.expect("second migrate");
        assert_eq!(columns(&t.db).await, before);
        let roles = rolesync::db::roles::list(t.db.pool()).await.unwrap();
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
        sqlx::query(changed).execute(t.db.pool()).await.unwrap();
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

both! {
    async fn millisecond_rows_gain_microseconds_and_keep_their_order(t) {
        let pool = t.db.pool();
        // Rows as releases before 0003 wrote them, beside one written since.
        for (user, version) in [("old", "2026-11-20T10:00:00.123Z"), ("new", "2026-11-20T10:00:00.123400Z")] {
            sqlx::query(&format!("INSERT INTO memberships (organization_id, user_id, membership_id, role_slug, workos_role_slug, status, version, updated_at) \
                 VALUES ('org_1', '{user}', 'om_{user}', 'admin', 'admin', 'active', '{version}', '{version}')"))
                .execute(pool).await.unwrap();
        }
        sqlx::raw_sql(&migration_sql(t.db.backend(), "0003")).execute(pool).await.expect("0003 applies again");
        let rows = rolesync::db::memberships::list(pool, Some("org_1")).await.unwrap();
        let versions: Vec<String> = rows.iter().map(|r| r.version.to_string()).collect();
        assert_eq!(versions, ["2026-11-20T10:00:00.123400Z", "2026-11-20T10:00:00.123000Z"], "new, then old (by user id)");
        let stored: Vec<String> = sqlx::query_scalar("SELECT version FROM memberships ORDER BY version").fetch_all(pool).await.unwrap();
        assert_eq!(stored, ["2026-11-20T10:00:00.123000Z", "2026-11-20T10:00:00.123400Z"], "text order is time order");
    }
}
