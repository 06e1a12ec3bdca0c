//! A real `redis-server` of a test's own: no persistence, on a loopback
//! port below the ephemeral range, killed and reaped on drop. Shared by
//! tests/shared_limits.rs and tests/acme.rs (`#[path]` module).

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::common;
use crate::common::eventually;

/// False (after a note) when `redis-server` is not installed and CI is not
/// set, so that `cargo test` on a machine without it skips these tests as it
/// skips the browser test without Chromium; under `CI=true` a missing
/// redis-server fails the test instead.
pub fn redis_server_installed() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is missing and CI is set: install the Debian package `redis-server` \
             (apt-get install --no-install-recommends redis-server)"
        );
        eprintln!(
            "note: skipping a shared rate-limit test: redis-server is missing \
             (apt-get install --no-install-recommends redis-server)"
        );
    }
    found
}

/// `redis-server` on a loopback port, without persistence; killed (and
/// reaped) on drop, after a SIGCONT if the test stopped it.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    stopped: bool,
    /// Redis's working directory (nothing is written there with persistence off).
    _dir: tempfile::TempDir,
    output: Arc<Mutex<Vec<String>>>,
}

/// A loopback port for Redis (see [`common::loopback_port`]): a proxy's
/// reconnect attempts cannot connect to themselves on it while Redis is down.
pub fn redis_port() -> u16 {
    common::loopback_port()
}

impl RedisServer {
    /// A fresh Redis on a free port.
    pub async fn start() -> RedisServer {
        // A port free a moment ago can be taken before redis-server binds
        // it (by another test of this file); then take another.
        for _ in 0..5 {
            if let Some(redis) = Self::try_start_on(redis_port()).await {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 5 ports");
    }

    /// Redis on `port` (a restart on the port of one that was killed).
    pub async fn start_on(port: u16) -> RedisServer {
        Self::try_start_on(port)
            .await
            .unwrap_or_else(|| panic!("redis-server did not start on port {port}"))
    }

    /// `None` when redis-server exited during startup (the port was taken).
    pub async fn try_start_on(port: u16) -> Option<RedisServer> {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start /usr/bin/redis-server (Debian package redis-server)");
        let output = common::pump(child.stdout.take().unwrap());
        let _ = common::pump(child.stderr.take().unwrap());
        let mut redis = RedisServer {
            child: Some(child),
            port,
            stopped: false,
            _dir: dir,
            output,
        };
        // Ready when it answers PING; gone when the process exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis.exited() {
                eprintln!(
                    "redis-server on port {port} exited during startup:\n{}",
                    redis.output_text()
                );
                return None;
            }
            if redis.ping().await {
                return Some(redis);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within 10 s:\n{}",
                redis.output_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server running").id()
    }

    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn output_text(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Whether this process answers PING on its port (and not some other
    /// Redis that held the port, while this one is failing to bind it).
    pub async fn ping(&self) -> bool {
        let attempt = async {
            let mut con = self.try_connection().await?;
            let pong: String = redis::cmd("PING").query_async(&mut con).await?;
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut con)
                .await?;
            Ok::<_, redis::RedisError>((pong, info))
        };
        let Ok(Ok((pong, info))) = tokio::time::timeout(Duration::from_secs(1), attempt).await
        else {
            return false;
        };
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        pong == "PONG" && pid == Some(self.pid())
    }

    pub async fn try_connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// A connection of the test's own, for looking at the keys.
    pub async fn connection(&self) -> MultiplexedConnection {
        tokio::time::timeout(Duration::from_secs(5), self.try_connection())
            .await
            .expect("connect to redis-server in time")
            .expect("connect to redis-server")
    }

    /// SIGKILL, and reap it: the port refuses connections once this returns.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("redis-server running");
        child.kill().unwrap();
        child.wait().unwrap();
        self.stopped = false;
    }

    /// SIGSTOP: still accepting connections (the kernel does), never
    /// answering. Returns once the process is seen stopped.
    pub async fn stop(&mut self) {
        signal(self.pid(), "STOP");
        self.stopped = true;
        let pid = self.pid();
        let stopped = eventually(Duration::from_secs(5), || process_state(pid) == Some('T')).await;
        assert!(stopped, "redis-server {pid} not stopped after SIGSTOP");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                let _ = Command::new("kill")
                    .arg("-CONT")
                    .arg(child.id().to_string())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// The state letter in /proc/PID/stat (`T` for stopped).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}
