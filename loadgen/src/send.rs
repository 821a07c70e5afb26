//! Sending: a closed loop (C requests in flight) and an open loop (a fixed arrival rate, latency
//! counted from each request's due time), both generic over what one request is.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

/// One finished request.
#[derive(Debug)]
pub struct Record<R> {
    pub index: usize,
    pub latency: Duration,
    pub reply: R,
}

/// Every request of a run, ordered by index.
#[derive(Debug)]
pub struct Run<R> {
    pub records: Vec<Record<R>>,
    pub elapsed: Duration,
    /// Open loop only: how late the most delayed request started.
    pub max_lag: Duration,
}

/// Sends requests `0..count` with `concurrency` in flight; latency is the request's own time.
pub async fn closed_loop<R, F, Fut>(count: usize, concurrency: usize, send: F) -> Run<R>
where
    R: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let send = Arc::new(send);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| tokio::spawn(worker(count, next.clone(), send.clone())))
        .collect();
    let mut records = Vec::with_capacity(count);
    for w in workers {
        records.extend(w.await.expect("a sender task panicked"));
    }
    let elapsed = start.elapsed();
    records.sort_by_key(|r| r.index);
    Run {
        records,
        elapsed,
        max_lag: Duration::ZERO,
    }
}

async fn worker<R, F, Fut>(count: usize, next: Arc<AtomicUsize>, send: Arc<F>) -> Vec<Record<R>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = R>,
{
    let mut out = Vec::new();
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= count {
            return out;
        }
        let started = Instant::now();
        let reply = send(index).await;
        out.push(Record {
            index,
            latency: started.elapsed(),
            reply,
        });
    }
}

/// Starts request `i` at `i / rate` seconds, whatever the earlier ones are doing (at most
/// `max_inflight` at once); latency runs from the due time, so queueing anywhere counts.
pub async fn open_loop<R, F, Fut>(count: usize, rate: f64, max_inflight: usize, send: F) -> Run<R>
where
    R: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let send = Arc::new(send);
    let gate = Arc::new(Semaphore::new(max_inflight.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    let mut max_lag = Duration::ZERO;
    for index in 0..count {
        let due = start + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(due).await;
        let permit = gate.clone().acquire_owned().await.expect("never closed");
        max_lag = max_lag.max(due.elapsed());
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            let reply = send(index).await;
            drop(permit);
            Record {
                index,
                latency: due.elapsed(),
                reply,
            }
        }));
    }
    let mut records = Vec::with_capacity(count);
    for task in tasks {
        records.push(task.await.expect("a request task panicked"));
    }
    Run {
        records,
        elapsed: start.elapsed(),
        max_lag,
    }
}
