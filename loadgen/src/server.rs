//! The server under test: `rolesync migrate`, then `rolesync serve` as a child process with a scrubbed
//! environment and its log in a file, its memory and CPU from /proc, and a graceful stop.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;

/// Clock ticks per second of /proc CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub bin: PathBuf,
    pub log: PathBuf,
    /// The whole rolesync environment (`DATABASE_URL`, secrets, `RUST_LOG`, ...).
    pub env: Vec<(String, String)>,
}

impl ServerSpec {
    fn command(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(subcommand).stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            let ours = key.starts_with("ROLESYNC_") || key.starts_with("WORKOS_");
            if ours || key == "DATABASE_URL" || key == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        cmd.env("NO_COLOR", "1").envs(self.env.iter().cloned());
        cmd
    }

    /// Runs `rolesync migrate` to completion.
    pub fn migrate(&self) -> Result<()> {
        let out = self
            .command("migrate")
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "rolesync migrate failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Memory and CPU of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// Peak resident set (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// User plus system CPU, seconds.
    pub cpu_secs: f64,
    pub threads: u64,
}

impl ProcStats {
    /// These figures with the CPU counted from `before` only (memory stays the peak).
    pub fn since(self, before: &ProcStats) -> Self {
        Self {
            cpu_secs: self.cpu_secs - before.cpu_secs,
            ..self
        }
    }
}

/// Reads /proc/<pid>/status and /proc/<pid>/stat.
pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name start at field 3 (state).
    let after: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |n: usize| after.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let cpu = ticks(14).unwrap_or(0.0) + ticks(15).unwrap_or(0.0);
    Ok(ProcStats {
        peak_rss_kib: field("VmHWM:"),
        cpu_secs: cpu / TICKS_PER_SEC,
        threads: field("Threads:"),
    })
}

/// A running `rolesync serve`; killed if dropped while running.
pub struct Server {
    child: Child,
    pub url: String,
    log: PathBuf,
}

/// How the server ended and what it logged.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    pub exit: String,
    pub clean: bool,
    pub errors: usize,
    pub warnings: usize,
    /// Distinct warning/error messages (timestamps cut), with counts, most frequent first.
    pub samples: Vec<(usize, String)>,
}

impl Server {
    /// Starts the server on a free port and waits until `GET /healthz` answers 200.
    pub async fn start(spec: &ServerSpec) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = File::create(&spec.log)
            .with_context(|| format!("cannot create {}", spec.log.display()))?;
        let child = spec
            .command("serve")
            .env("ROLESYNC_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", spec.bin.display()))?;
        let mut server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: spec.log.clone(),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "rolesync exited at start ({status}):\n{}",
                    tail(&self.log, 15)
                );
            }
            let answer = client.get(format!("{}/healthz", self.url)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "rolesync did not become healthy in 60 s:\n{}",
            tail(&self.log, 15)
        )
    }

    /// SIGTERM, then up to 15 s for a graceful exit (SIGKILL after), then the log summary.
    pub async fn stop(mut self) -> Result<Ending> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut status = self.child.try_wait()?;
        while status.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = self.child.try_wait()?;
        }
        let (exit, clean) = match status {
            Some(s) => (s.to_string(), s.success()),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                ("killed after 15 s without exiting".to_owned(), false)
            }
        };
        Ok(Ending {
            exit,
            clean,
            ..scan_log(&self.log)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The level and message of a WARN or ERROR log line, in the text or the JSON format of
/// tracing-subscriber; per-request fields (`key=value`) are left out so that messages group.
fn warning(line: &str) -> Option<(&'static str, String)> {
    let (level, message) = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(v) => {
            let level = v["level"].as_str().unwrap_or_default().to_owned();
            let target = v["target"].as_str().unwrap_or_default();
            let text = v["fields"]["message"].as_str().or(v["message"].as_str());
            (level, format!("{target}: {}", text.unwrap_or_default()))
        }
        Err(_) => {
            let mut words = line.split_whitespace().skip(1);
            let level = words.next().unwrap_or_default().to_owned();
            let message: Vec<&str> = words.filter(|t| !t.contains('=')).collect();
            (level, message.join(" "))
        }
    };
    let level = ["ERROR", "WARN"].into_iter().find(|l| *l == level)?;
    Some((level, message))
}

/// Counts WARN and ERROR lines and groups them by message.
fn scan_log(path: &Path) -> Ending {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ending = Ending::default();
    let mut groups: std::collections::BTreeMap<String, usize> = Default::default();
    for (level, message) in text.lines().filter_map(warning) {
        match level {
            "ERROR" => ending.errors += 1,
            _ => ending.warnings += 1,
        }
        *groups.entry(format!("{level} {message}")).or_default() += 1;
    }
    let mut samples: Vec<(usize, String)> = groups.into_iter().map(|(m, c)| (c, m)).collect();
    samples.sort_by_key(|s| std::cmp::Reverse(s.0));
    samples.truncate(5);
    ending.samples = samples;
    ending
}
