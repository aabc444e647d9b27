//! A real `nats-server` with JetStream for the cluster tests: one per test,
//! on a loopback port of its own ([`unused_port`]), its store in a
//! directory of its own that is removed when the test ends. Restartable on the same port and store, as an
//! operator restarts a broker, or on an empty store, as a broker in a
//! container without a volume comes back. Three of them in one JetStream
//! cluster are [`crate::nats_cluster`]'s.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::ports::unused_port;
use crate::process::LogTail;

/// Where Debian installs it; `PATH` is tried too.
const CANDIDATES: [&str; 2] = ["/usr/bin/nats-server", "nats-server"];

/// How long a broker may take to accept connections.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many ports a broker's first start tries (see [`Broker::run`]).
const PORT_ATTEMPTS: usize = 3;

/// The `nats-server` binary, if installed. Without it the cluster tests say
/// so loudly and pass, unless `CI` or `CHAT_REQUIRE_NATS` is set: then it
/// is an error.
pub fn nats_server_binary() -> io::Result<Option<&'static str>> {
    crate::process::installed_or_skip(&CANDIDATES, "CHAT_REQUIRE_NATS", "nats-server", "cluster")
}

/// One broker process and its store.
pub struct Broker {
    binary: &'static str,
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
    log: Option<LogTail>,
    /// More `nats-server` arguments (authentication, for example).
    extra: Vec<String>,
}

impl Broker {
    /// Starts a broker on a free port. `Ok(None)` if nats-server is not
    /// installed (see [`nats_server_binary`]).
    pub fn start() -> io::Result<Option<Broker>> {
        let Some(mut broker) = Broker::prepared()? else {
            return Ok(None);
        };
        broker.run()?;
        Ok(Some(broker))
    }

    /// A broker with a store, not started yet. Its port is chosen when it
    /// starts, unless [`Broker::reserve_port`] chose one before.
    pub fn prepared() -> io::Result<Option<Broker>> {
        let Some(binary) = nats_server_binary()? else {
            return Ok(None);
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let store = std::env::temp_dir().join(format!(
            "chat-server-nats-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&store)?;
        Ok(Some(Broker {
            binary,
            port: 0,
            store,
            child: None,
            log: None,
            extra: Vec::new(),
        }))
    }

    /// Starts a broker with more arguments, such as `--user U --pass P`.
    pub fn start_with(extra: &[&str]) -> io::Result<Option<Broker>> {
        let Some(mut broker) = Broker::prepared()? else {
            return Ok(None);
        };
        broker.extra = extra.iter().map(|arg| arg.to_string()).collect();
        broker.run()?;
        Ok(Some(broker))
    }

    /// Chooses the port now, for nodes that must be told the broker's
    /// address before it runs ([`unused_port`]: no connection can take it
    /// in between).
    pub fn reserve_port(&mut self) -> io::Result<u16> {
        self.port = unused_port()?;
        Ok(self.port)
    }

    /// The running process's pid (`None` while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client address, for a [`crate::relay::Relay`] in front of it.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts (or restarts) the process on the same port and store, and
    /// waits until it says it is ready. A broker without a port yet gets
    /// one from [`unused_port`], outside the ports the kernel hands to
    /// connections, so that it can be restarted on it; one that a program
    /// asking for ports by number took first is replaced by another.
    pub fn run(&mut self) -> io::Result<()> {
        if self.port != 0 {
            return self.run_on(self.port);
        }
        let mut failure = io::Error::other("no port tried");
        for _ in 0..PORT_ATTEMPTS {
            let port = unused_port()?;
            match self.run_on(port) {
                Err(err) if err.to_string().contains("address already in use") => failure = err,
                ran => return ran,
            }
        }
        Err(failure)
    }

    fn run_on(&mut self, port: u16) -> io::Result<()> {
        let store = self.store.to_string_lossy().into_owned();
        let mut command = Command::new(self.binary);
        command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-js",
                "-sd",
                &store,
            ])
            .args(&self.extra);
        let (child, log) = spawn_logged(command)?;
        self.child = Some(child);
        let ready = wait_until_ready(&log, Instant::now() + START_TIMEOUT);
        // Kept for the broker's whole life: see `LogTail`.
        self.log = Some(log);
        if ready.is_err() {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.port = ready?.client_port;
        Ok(())
    }

    /// Restarts the broker on its port with an empty store, as a broker in
    /// a container without a volume comes back: every stream and bucket is
    /// gone. A running broker is killed first (`SIGKILL`: a lost container
    /// says goodbye to no one).
    pub fn restart_empty(&mut self) -> io::Result<()> {
        self.stop("KILL")?;
        wipe(&self.store)?;
        self.run()
    }

    /// Stops the process with `signal` ("TERM" for a clean stop, "KILL" for
    /// a crash) and waits for it; the store stays.
    pub fn stop(&mut self, signal: &str) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()?;
        let deadline = Instant::now() + START_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// `command` (a `nats-server`) started with its log drained into a
/// [`LogTail`].
pub(crate) fn spawn_logged(mut command: Command) -> io::Result<(Child, LogTail)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let Some(stderr) = child.stderr.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(io::Error::other("nats-server: no stderr"));
    };
    Ok((child, LogTail::of(stderr)))
}

/// The ports a started `nats-server` reported in its log.
pub(crate) struct Ready {
    pub client_port: u16,
    /// 0 when it serves no monitoring endpoint.
    pub monitor_port: u16,
}

/// Reads a starting `nats-server`'s log until it says it is ready, and
/// the ports it chose. The error carries its log, which says why it did
/// not start (a port taken, a bad option).
pub(crate) fn wait_until_ready(log: &LogTail, deadline: Instant) -> io::Result<Ready> {
    let mut position = 0;
    let mut ready = Ready {
        client_port: 0,
        monitor_port: 0,
    };
    while let Some(line) = log.next_line(&mut position, deadline) {
        if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
            ready.client_port = port_of(addr, &line)?;
        }
        if let Some(addr) = line.split("Starting http monitor on ").nth(1) {
            ready.monitor_port = port_of(addr, &line)?;
        }
        if line.contains("Server is ready") {
            return Ok(ready);
        }
    }
    Err(io::Error::other(format!(
        "nats-server did not start; its log: {:#?}",
        log.last(40)
    )))
}

/// The port at the end of `addr` (`127.0.0.1:4222`), from log `line`.
fn port_of(addr: &str, line: &str) -> io::Result<u16> {
    addr.trim()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no port in {line:?}")))
}

/// Empties a broker's store directory (it must be stopped).
pub(crate) fn wipe(store: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(store) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    std::fs::create_dir_all(store)
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Waits until the chat servers at `addrs` are one room: a client on each
/// node says `ping` until every other client has heard it. The nodes join
/// the room a moment after they start listening (once they reach the
/// broker); a test that loads them before would lose the first lines.
pub fn wait_for_room(addrs: &[String]) -> io::Result<()> {
    use std::io::Write;
    use std::net::TcpStream;
    let mut clients = Vec::new();
    for addr in addrs {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let who = stream.local_addr()?.to_string();
        clients.push((
            who,
            BufReader::new(stream),
            std::collections::HashSet::new(),
        ));
    }
    let names: Vec<String> = clients.iter().map(|(who, _, _)| who.clone()).collect();
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        for (_, reader, _) in &mut clients {
            reader.get_mut().write_all(b"ping\n")?;
        }
        for (_, reader, heard) in &mut clients {
            let mut line = String::new();
            // Read what is there; a timeout ends the round for this client.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Some(from) = line.trim_end().strip_suffix(": ping") {
                    heard.insert(from.to_string());
                }
                line.clear();
            }
        }
        if clients
            .iter()
            .all(|(_, _, heard)| names.iter().all(|name| heard.contains(name)))
        {
            return Ok(());
        }
    }
    Err(io::Error::other("the nodes did not become one room"))
}
