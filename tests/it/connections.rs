//! Connection limits over a real listener and raw sockets: the header and idle timeouts, the cap on
//! open connections, and a shutdown that does not wait for connections that owe it nothing.

use std::time::{Duration, Instant};

use rolesync::config::Config;
use rolesync::db::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::support::{membership_event, TestApp, TestDb};

const GET_HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: rolesync\r\n\r\n";

/// A server on a fresh SQLite database, its address and the sender that stops it.
struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    app: TestApp,
    _db: TestDb,
}

async fn start(adjust: impl FnOnce(&mut Config)) -> Server {
    let db = TestDb::new(Backend::Sqlite).await;
    let app = TestApp::with_config(&db.db, adjust);
    let listener = rolesync::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let done = tokio::spawn(rolesync::server::serve(
        listener,
        app.state.clone(),
        shutdown,
        Duration::from_secs(20),
    ));
    Server {
        addr,
        stop: Some(stop),
        done,
        app,
        _db: db,
    }
}

/// Whether the server closed the socket within `within` (end of stream or a reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Sends one request on a kept-alive connection and reads its whole (small) answer's status line.
async fn ask(stream: &mut TcpStream, request: &[u8], within: Duration) -> Option<String> {
    stream.write_all(request).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_are_closed_after_the_header_timeout_while_webhooks_go_on()
{
    let server = start(|c| {
        c.header_timeout_secs = 1;
        c.idle_timeout_secs = 60;
    })
    .await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"POST /webhooks/workos HTTP/1.1\r\nHost: rolesync\r\nContent-Le")
        .await
        .unwrap();
    assert!(
        !closed_within(&mut silent, Duration::from_millis(300)).await,
        "open before the timeout"
    );
    let body = membership_event("e1", "created", "user_1", "admin", "active", 1);
    let request = server.app.signed_webhook(&body);
    let header = request.headers()["workos-signature"]
        .to_str()
        .unwrap()
        .to_owned();
    let answer = reqwest::Client::new()
        .post(format!("http://{}/webhooks/workos", server.addr))
        .header("WorkOS-Signature", header)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "a signed webhook is served meanwhile");
    assert!(
        closed_within(&mut silent, Duration::from_secs(3)).await,
        "a silent connection is closed"
    );
    assert!(
        closed_within(&mut half, Duration::from_secs(3)).await,
        "a half-sent request is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    let server = start(|c| {
        c.header_timeout_secs = 1;
        c.idle_timeout_secs = 3;
    })
    .await;
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    let status = ask(&mut kept, GET_HEALTH, Duration::from_secs(2)).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    assert!(
        !closed_within(&mut kept, Duration::from_millis(1800)).await,
        "idle past the header timeout: still open"
    );
    assert!(
        closed_within(&mut kept, Duration::from_secs(3)).await,
        "idle past the idle timeout: closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_new_connections_wait_while_established_ones_go_on() {
    let server = start(|c| c.max_connections = 2).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    for stream in [&mut first, &mut second] {
        assert_eq!(
            ask(stream, GET_HEALTH, Duration::from_secs(2))
                .await
                .as_deref(),
            Some("HTTP/1.1 200 OK")
        );
    }
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(GET_HEALTH).await.unwrap();
    let mut buf = [0u8; 1024];
    let waited = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "a third connection waits while two are open"
    );
    assert_eq!(
        ask(&mut first, GET_HEALTH, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("HTTP/1.1 200 OK"),
        "an established connection goes on"
    );
    drop(second);
    let n = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "the waiting request is answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_and_half_sent_connections_at_once() {
    let mut server = start(|_| {}).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(
        ask(&mut idle, GET_HEALTH, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"POST /webhooks/workos HTTP/1.1\r\nHost: rolesync\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), &mut server.done)
        .await
        .expect("serve returns well within the 20 s grace")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    for (what, stream) in [
        ("idle", &mut idle),
        ("half-sent", &mut half),
        ("silent", &mut silent),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(1)).await,
            "{what} connection closed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_missing_signature_is_refused_before_the_body_is_read() {
    let server = start(|_| {}).await;
    let stale = format!("WorkOS-Signature: t=1, v1={}\r\n", "0".repeat(64));
    for (what, header) in [("stale", stale.as_str()), ("missing", "")] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST /webhooks/workos HTTP/1.1\r\nHost: rolesync\r\n{header}Content-Length: 100\r\n\r\n{{\"id\":"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // The other 94 bytes never come: the answer must not wait for them.
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer while the body is incomplete"))
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        let expected = match what {
            "stale" => "HTTP/1.1 401",
            _ => "HTTP/1.1 400",
        };
        assert!(text.starts_with(expected), "{what}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_busy_when_its_header_deadline_passed_is_still_closed_when_idle() {
    let server = start(|c| {
        c.header_timeout_secs = 1;
        c.idle_timeout_secs = 2;
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // A request whose body is held back past the header deadline: it is in flight meanwhile.
    let body = b"{}";
    let head = format!(
        "POST /webhooks/workos HTTP/1.1\r\nHost: rolesync\r\nWorkOS-Signature: t={}, v1={}\r\nContent-Length: {}\r\n\r\n",
        rolesync::timestamp::Clock::now(&*server.app.clock).millis(),
        "0".repeat(64),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(body).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"),
        "a mismatch, answered"
    );
    assert!(
        closed_within(&mut stream, Duration::from_secs(4)).await,
        "closed after 2 s idle"
    );
}
