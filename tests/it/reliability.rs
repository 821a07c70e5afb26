//! The reliability suite: every order converges, hostile input changes nothing, and no acknowledged
//! delivery is lost to a crash, a database outage or a second replica.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use rolesync::db::{self, Backend, Db};
use rolesync::ingest::{deliver_batch, Incoming};
use rolesync::reconcile::Source;
use rolesync::timestamp::Timestamp;
use tokio::net::{TcpListener, TcpStream};

use crate::process::{post_signed, post_webhook, Server};
use crate::support::{
    assert_chain, audit_of, int, membership, membership_event, strings, TestApp, TestDb,
};

/// All orders of `items`.
fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for (i, &first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            out.push(tail);
        }
    }
    out
}

both! {
    async fn every_order_of_a_six_event_scenario_converges(t) {
        let steps = [("created", "member", "pending"), ("updated", "member", "active"), ("updated", "admin", "active"),
            ("deleted", "admin", "active"), ("updated", "member", "inactive"), ("updated", "admin", "active")];
        let orders = permutations(&[0, 1, 2, 3, 4, 5]);
        assert_eq!(orders.len(), 720);
        for (n, order) in orders.iter().enumerate() {
            let user = format!("user_perm_{n}");
            for &i in order {
                let (kind, role, status) = steps[i];
                let body = membership_event(&format!("{user}_e{i}"), kind, &user, role, status, i as i64 + 1);
                deliver_batch(&t.db, &[Incoming::parse(&body, Source::Webhook, Timestamp::now()).unwrap()], Timestamp::now()).await.unwrap();
            }
            let row = membership(&t.db, "org_1", &user).await.unwrap();
            assert_eq!((row.role_slug.as_deref(), row.status.as_str()), (Some("admin"), "active"), "order {order:?}");
            assert_chain(&audit_of(&t.db, "org_1", &user).await);
        }
        assert_eq!(t.db.event_count().await.unwrap(), 720 * 6);
    }

    async fn hostile_bodies_get_a_clear_4xx_and_change_nothing(t) {
        let app = TestApp::new(&t.db);
        let mut files: Vec<_> = std::fs::read_dir("fixtures/hostile").unwrap().map(|e| e.unwrap().path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "json"));
        files.sort();
        assert!(files.len() >= 10);
        for path in files {
            let (status, answer) = app.deliver(&std::fs::read(&path).unwrap()).await;
            assert!(status.is_client_error(), "{}: {status} {answer}", path.display());
            assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{}: {answer}", path.display());
        }
        let huge = format!("t=1, v1={}", "a".repeat(64 * 1024));
        let (status, answer) = app.post_webhook(br#"{"id":"e","event":"x"}"#, Some(&huge)).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_signature")), "a 64 KiB signature header");
        assert_eq!(t.db.event_count().await.unwrap(), 0);
        assert_eq!(crate::support::audit_count(&t.db).await, 0);
    }

    async fn a_sigkill_mid_stream_loses_no_acknowledged_delivery(t) {
        let (deliveries, model) = workload(6, 60);
        let mut server = Server::start(&t.url, &[]).await;
        let client = reqwest::Client::new();
        let acknowledged = send_all(&client, &server.base, &deliveries, 8, Some(Duration::from_millis(150))).await;
        server.kill();
        let pending: Vec<_> = deliveries.iter().filter(|(id, _)| !acknowledged.contains(id)).cloned().collect();
        assert!(!pending.is_empty(), "the kill happened mid-stream");
        let server = Server::start(&t.url, &[]).await;
        let retried = send_all(&client, &server.base, &pending, 8, None).await;
        assert_eq!(retried.len(), pending.len(), "every retry is acknowledged");
        server.terminate();
        server.finish();
        assert_stored_once_and_converged(&t.url, &deliveries, &model).await;
    }
}

/// An event id and its body.
type Delivery = (String, Vec<u8>);

/// `memberships` × `versions` signed-update bodies in a shuffled order, and the newest role per user.
fn workload(memberships: usize, versions: usize) -> (Vec<Delivery>, BTreeMap<String, String>) {
    let mut deliveries = Vec::new();
    let mut model = BTreeMap::new();
    for m in 0..memberships {
        let user = format!("user_{m}");
        for n in 1..=versions {
            let role = if (n + m) % 3 == 0 { "admin" } else { "member" };
            let id = format!("e_{m}_{n}");
            deliveries.push((
                id.clone(),
                membership_event(&id, "updated", &user, role, "active", n as i64),
            ));
            model.insert(user.clone(), role.to_owned());
        }
    }
    fastrand::shuffle(&mut deliveries);
    (deliveries, model)
}

/// Sends with `workers` concurrent senders; after `stop_after`, stops sending. Returns the ids
/// answered 2xx.
async fn send_all(
    client: &reqwest::Client,
    base: &str,
    deliveries: &[Delivery],
    workers: usize,
    stop_after: Option<Duration>,
) -> HashSet<String> {
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(after) = stop_after {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    let queue = Arc::new(std::sync::Mutex::new(deliveries.to_vec()));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (client, base, queue, stop) =
                (client.clone(), base.to_owned(), queue.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let Some((id, body)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    if post_webhook(&client, &base, body)
                        .await
                        .is_some_and(|s| (200..300).contains(&s))
                    {
                        acked.push(id);
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked = HashSet::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked
}

async fn assert_stored_once_and_converged(
    url: &str,
    deliveries: &[Delivery],
    model: &BTreeMap<String, String>,
) {
    let db = Db::connect(url, 2).await.unwrap();
    let stored = strings(&db, "SELECT event_id FROM webhook_events", &[]).await;
    assert_eq!(
        stored.len(),
        deliveries.len(),
        "every delivery stored exactly once"
    );
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len());
    for (user, role) in model {
        let row = membership(&db, "org_1", user).await.unwrap();
        assert_eq!(
            row.role_slug.as_deref(),
            Some(role.as_str()),
            "{user} converged on the newest version"
        );
        assert_chain(&audit_of(&db, "org_1", user).await);
    }
    db.close().await;
}

/// A TCP proxy in front of PostgreSQL that the test can cut (dropping every connection) and restore.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    continue;
                }
                let (up, gen) = (up2.clone(), gen2.clone());
                tokio::spawn(pipe(inbound, target, up, gen));
            }
        });
        Self {
            port,
            up,
            generation,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn pipe(
    mut inbound: TcpStream,
    target: &str,
    up: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let born = generation.load(Ordering::SeqCst);
    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
    let watch = async {
        while up.load(Ordering::SeqCst) && generation.load(Ordering::SeqCst) == born {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = copy => {},
        () = watch => {},
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_mid_stream_gives_503s_and_retries_apply() {
    let t = TestDb::new(Backend::Postgres).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let via_proxy = t
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    let db = Db::connect(&via_proxy, 4).await.unwrap();
    let app = TestApp::new(&db);
    let (deliveries, model) = workload(4, 30);
    let mut outcomes: HashMap<String, StatusCode> = HashMap::new();
    for (n, (id, body)) in deliveries.iter().enumerate() {
        if n == deliveries.len() / 3 {
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, _) = app.deliver(body).await;
        if n >= deliveries.len() / 3 && n < deliveries.len() * 2 / 3 {
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "no 2xx while the database is away"
            );
        }
        if n == deliveries.len() * 2 / 3 {
            proxy.restore();
        }
        outcomes.insert(id.clone(), status);
    }
    for _ in 0..50 {
        let failed: Vec<&Delivery> = deliveries
            .iter()
            .filter(|(id, _)| !outcomes[id].is_success())
            .collect();
        if failed.is_empty() {
            break;
        }
        for (id, body) in failed {
            outcomes.insert(id.clone(), app.deliver(body).await.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        outcomes.values().all(|s| s.is_success()),
        "every retry applied after the database returned"
    );
    assert_stored_once_and_converged(&t.url, &deliveries, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_apply_each_delivery_once() {
    let t = TestDb::new(Backend::Postgres).await;
    let (a, b) = (
        Server::start(&t.url, &[]).await,
        Server::start(&t.url, &[]).await,
    );
    let (deliveries, model) = workload(5, 40);
    let client = reqwest::Client::new();
    let mut answers: HashMap<String, Vec<String>> = HashMap::new();
    for chunk in deliveries.chunks(16) {
        let sends = chunk.iter().flat_map(|(id, body)| {
            [&a.base, &b.base].map(|base| {
                let (client, base, body, id) =
                    (client.clone(), base.clone(), body.clone(), id.clone());
                tokio::spawn(async move { (id, answer(&client, &base, body).await) })
            })
        });
        for task in sends.collect::<Vec<_>>() {
            let (id, outcome) = task.await.unwrap();
            answers.entry(id).or_default().push(outcome);
        }
    }
    for (id, got) in &answers {
        let applied = got.iter().filter(|o| *o != "duplicate").count();
        assert_eq!(
            applied, 1,
            "{id} applied once across both processes: {got:?}"
        );
    }
    a.terminate();
    b.terminate();
    a.finish();
    b.finish();
    assert_stored_once_and_converged(&t.url, &deliveries, &model).await;
}

async fn answer(client: &reqwest::Client, base: &str, body: Vec<u8>) -> String {
    let response = post_signed(client, base, body).await.unwrap();
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.unwrap();
    json["outcome"].as_str().unwrap().to_owned()
}

/// Under a steady stream of commits the SQLite checkpointer starts the WAL over; writers checkpoint
/// by themselves only at 10,000 frames (about 40 MiB), which a checkpointer that only ever copies
/// (never restarts), or one that only the group-commit worker's commits wake, lets the WAL reach.
async fn wal_stays_small(through_the_pool: bool) {
    let t = TestDb::new(Backend::Sqlite).await;
    let wal = format!("{}-wal", t.url.trim_start_matches("sqlite://"));
    let mut committer = t.db.committer();
    let payload = "x".repeat(16 * 1024);
    let mut largest = 0;
    for batch in 0..60 {
        let deliveries: Vec<Incoming> = (0..50)
            .map(|i| Incoming {
                event_id: format!("evt_{batch}_{i}"),
                event_type: "user.created".into(),
                payload: payload.clone(),
                kind: rolesync::ingest::event::EventKind::Other,
            })
            .collect();
        let receipts = if through_the_pool {
            let mut tx = t.db.begin_write().await.unwrap();
            let receipts =
                rolesync::ingest::deliver_batch_in(&mut tx, &deliveries, Timestamp::now())
                    .await
                    .unwrap();
            tx.commit().await.unwrap();
            receipts
        } else {
            rolesync::ingest::deliver_batch_on(&mut committer, &deliveries, Timestamp::now())
                .await
                .unwrap()
        };
        assert!(receipts.iter().all(|r| r.outcome == "ignored"));
        // A restarted WAL is overwritten from its start, so its size is the most frames it held.
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    let frames = largest / (4096 + 24);
    assert!(frames < 8_000, "the WAL grew to {frames} frames");
    assert_eq!(t.db.event_count().await.unwrap(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_checkpointer_keeps_the_wal_small_under_steady_commits() {
    wal_stays_small(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_checkpointer_keeps_the_wal_small_under_steady_pool_commits() {
    wal_stays_small(true).await;
}

/// Two replicas' batches can share events of no membership, which take no lock: each batch inserts
/// its inbox rows in event-id order, so a batch of `[y, x]` that meets another transaction's
/// uncommitted `x` waits for it before it takes `y`, and that transaction can still store `y`
/// (inserted in the order given, the batch would hold `y` while waiting for `x`: a deadlock, and
/// PostgreSQL would abort one of the two).
#[tokio::test]
async fn batches_sharing_unlocked_events_wait_for_each_other_instead_of_deadlocking() {
    use rolesync::ingest::deliver_batch_on;
    use sqlx::{Connection, Executor};
    let t = TestDb::new(Backend::Postgres).await;
    let ignored = |id: &str| {
        let body = format!(r#"{{"id":"{id}","event":"user.updated","data":{{}}}}"#);
        Incoming::parse(body.as_bytes(), Source::Webhook, Timestamp::now()).unwrap()
    };
    let insert = |id: &str| {
        format!(
            "INSERT INTO webhook_events (event_id, event_type, received_at, outcome) \
             VALUES ('{id}', 'user.updated', '2026-11-25T12:00:00.000Z', 'ignored')"
        )
    };
    let mut other = sqlx::PgConnection::connect(&t.url).await.unwrap();
    let mut other_tx = other.begin().await.unwrap();
    other_tx.execute(insert("x").as_str()).await.unwrap();

    let mut mine = t.db.committer();
    let batch = vec![ignored("y"), ignored("x")];
    let committed = tokio::spawn(async move {
        let result = deliver_batch_on(&mut mine, &batch, Timestamp::now()).await;
        (result, mine)
    });
    let waiting = || async {
        // The committer's connection is the only one of this database that waits on a lock.
        let sql = "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'";
        int(&t.db, sql, &[]).await
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while waiting().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never waited for the uncommitted x"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    other_tx
        .execute(insert("y").as_str())
        .await
        .expect("y is free: the batch waits for x before it takes y");
    assert_eq!(
        waiting().await,
        1,
        "the batch still waits for x, not aborted as a deadlock victim"
    );
    other_tx.commit().await.unwrap();

    let (result, mut mine) = committed.await.unwrap();
    assert!(
        matches!(result, Err(db::DbError::Conflict)),
        "both ids were stored meanwhile: {result:?}"
    );
    let batch = vec![ignored("y"), ignored("x")];
    let again = deliver_batch_on(&mut mine, &batch, Timestamp::now())
        .await
        .unwrap();
    let outcomes: Vec<&str> = again.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["duplicate", "duplicate"],
        "the retry finds both stored"
    );
}
