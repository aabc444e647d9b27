//! A real `redis-server` for chat-load's Redis pub/sub tests: one per test,
//! on a free loopback port, without persistence (`--save ''`,
//! `--appendonly no`), killed when dropped.

use std::io;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::unused_port;

/// Where Debian installs it; `PATH` is tried too.
const CANDIDATES: [&str; 2] = ["/usr/bin/redis-server", "redis-server"];

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Free ports tried before giving up: another process can take a port
/// between choosing it and the server binding it.
const PORT_ATTEMPTS: usize = 5;

/// The `redis-server` binary, if installed. Without it the Redis tests say
/// so loudly and pass, unless `CI` or `CHAT_REQUIRE_REDIS` is set: then it
/// is an error.
pub fn redis_server_binary() -> io::Result<Option<&'static str>> {
    crate::process::installed_or_skip(&CANDIDATES, "CHAT_REQUIRE_REDIS", "redis-server", "Redis")
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it accepts
    /// connections. `Ok(None)` if redis-server is not installed.
    pub fn start() -> io::Result<Option<RedisServer>> {
        let Some(binary) = redis_server_binary()? else {
            return Ok(None);
        };
        let mut last_log = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = unused_port()?;
            let mut server = RedisServer {
                port,
                child: Some(
                    Command::new(binary)
                        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn()?,
                ),
            };
            match server.wait_ready()? {
                None => return Ok(Some(server)),
                Some(log) => last_log = log,
            }
        }
        Err(io::Error::other(format!(
            "redis-server did not start; its last log: {last_log:#?}"
        )))
    }

    /// `None` once ready, or the log of a server that exited or never
    /// became ready.
    fn wait_ready(&mut self) -> io::Result<Option<Vec<String>>> {
        let stdout = self
            .child
            .as_mut()
            .and_then(|child| child.stdout.take())
            .ok_or_else(|| io::Error::other("no stdout"))?;
        // Drained for the server's whole life, so it never blocks on its log.
        let log = crate::process::lines_of(stdout);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(Ok(line)) if line.contains("Ready to accept connections") => return Ok(None),
                Ok(Ok(line)) => seen.push(line),
                // Exited (its port was taken), unreadable or too slow: the
                // caller retries.
                Ok(Err(_)) | Err(_) => return Ok(Some(seen)),
            }
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
