//! The SQLite that rolesync links: built as .cargo/config.toml asks. Here and not in the crate,
//! which forbids unsafe code: reading SQLite's allocation statistics is an FFI call.

/// .cargo/config.toml builds the bundled SQLite without the shared page-cache group and the
/// allocation statistics, each of which takes a process-wide mutex on the committer's path.
#[test]
fn the_bundled_sqlite_has_no_global_memory_management() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    let options: Vec<String> = conn
        .prepare("PRAGMA compile_options")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
    assert!(
        !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
        "{options:?}"
    );
    let mut current = 0;
    let mut highest = 0;
    use rusqlite::ffi::{sqlite3_status, SQLITE_OK, SQLITE_STATUS_MEMORY_USED};
    // SAFETY: two valid out-pointers for the duration of the call; sqlite3_status is thread-safe.
    let rc = unsafe { sqlite3_status(SQLITE_STATUS_MEMORY_USED, &mut current, &mut highest, 0) };
    // The high-water mark of memory in use stays 0 when allocations are not counted.
    assert_eq!(
        (rc, highest),
        (SQLITE_OK, 0),
        "allocation statistics are off"
    );
}
