//! A real 3-server `nats-server` JetStream cluster per test, for the
//! fault-tolerance tests of the clustered room: servers killed, stopped,
//! restarted on their store or on an empty one, and the question "which
//! server leads this stream?" answered from the servers' own monitoring
//! endpoints, so a test can kill exactly the server that matters.
//!
//! Ports. Every server's client, monitoring and route ports are chosen
//! before the first start ([`unused_port`]: outside the range the kernel
//! hands to connections, so no connection takes one while its server is
//! stopped) and kept across restarts. The route ports cannot be left to
//! the servers: a JetStream server in a cluster refuses to start without
//! configured routes ("JetStream cluster requires configured routes"), so
//! every server must be told the others' route ports before any of them
//! runs. If a program asking for ports by number takes one first, the
//! server reports it in its log and the whole cluster is started again on
//! fresh ports, a few times at most. Every
//! server gets explicit routes to both others, so any one of them can be
//! restarted and the mesh re-forms whichever others are up. The cluster
//! name is unique per cluster, so a server of another test that ever came
//! up on a port released here would be refused as a route, never merged.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::nats::{nats_server_binary, spawn_logged, wait_until_ready, wipe, START_TIMEOUT};
use crate::ports::unused_port;
use crate::process::LogTail;

/// How many servers a cluster has: the smallest that survives losing one
/// (a JetStream quorum of 2).
pub const CLUSTER_SIZE: usize = 3;

/// How long a cluster may take to elect a JetStream (meta or stream)
/// leader. Elections take a few seconds; this is a bound, not a wait.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the monitoring endpoints are asked while waiting for a leader:
/// there is no notification to wait on.
const POLL: Duration = Duration::from_millis(50);

/// How many times [`BrokerCluster::start`] tries fresh route ports.
const START_ATTEMPTS: usize = 3;

/// One server of the cluster.
struct Member {
    name: String,
    client_port: u16,
    route_port: u16,
    monitor_port: u16,
    store: PathBuf,
    child: Option<Child>,
    /// Kept for the process's whole life (see [`LogTail`]).
    log: Option<LogTail>,
}

/// Three `nats-server` processes with JetStream, routed into one cluster,
/// each with a store of its own. All of them end, and their stores are
/// removed, when it is dropped.
///
/// The methods block (processes, HTTP to the monitoring endpoint): from
/// async tests call them in `tokio::task::block_in_place` or
/// `spawn_blocking`.
pub struct BrokerCluster {
    binary: &'static str,
    cluster_name: String,
    dir: PathBuf,
    members: Vec<Member>,
}

impl BrokerCluster {
    /// Starts the three servers and waits until each is ready and the
    /// JetStream meta group has a leader (so that streams can be created at
    /// once). `Ok(None)` if nats-server is not installed (see
    /// [`nats_server_binary`]).
    pub fn start() -> io::Result<Option<BrokerCluster>> {
        let Some(binary) = nats_server_binary()? else {
            return Ok(None);
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("chat-server-nats-cluster-{unique}"));
        let mut cluster = BrokerCluster {
            binary,
            cluster_name: format!("chat-test-{unique}"),
            members: (0..CLUSTER_SIZE)
                .map(|i| Member {
                    name: format!("n{i}"),
                    client_port: 0,
                    route_port: 0,
                    monitor_port: 0,
                    store: dir.join(format!("n{i}")),
                    child: None,
                    log: None,
                })
                .collect(),
            dir,
        };
        let mut failure = io::Error::other("the cluster was not started");
        for _ in 0..START_ATTEMPTS {
            match cluster.start_all() {
                Ok(()) => {
                    cluster.wait_for_meta_leader()?;
                    return Ok(Some(cluster));
                }
                Err(err) => failure = err,
            }
            cluster.kill_all();
        }
        Err(failure)
    }

    /// One attempt: fresh ports and empty stores for all three.
    fn start_all(&mut self) -> io::Result<()> {
        for member in &mut self.members {
            member.route_port = unused_port()?;
            member.client_port = unused_port()?;
            member.monitor_port = unused_port()?;
            wipe(&member.store)?;
        }
        for i in 0..CLUSTER_SIZE {
            self.spawn(i)?;
        }
        for i in 0..CLUSTER_SIZE {
            self.wait_ready(i)?;
        }
        Ok(())
    }

    /// Starts server `i` on its ports and its store, with routes to both
    /// others.
    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let routes = self
            .members
            .iter()
            .enumerate()
            .filter(|&(other, _)| other != i)
            .map(|(_, member)| format!("nats://127.0.0.1:{}", member.route_port))
            .collect::<Vec<_>>()
            .join(",");
        let member = &self.members[i];
        let mut command = Command::new(self.binary);
        command
            .args(["-a", "127.0.0.1", "-p", &member.client_port.to_string()])
            .args(["-m", &member.monitor_port.to_string()])
            .args(["-js", "-sd", &member.store.to_string_lossy()])
            .args(["--server_name", &member.name])
            .args(["--cluster_name", &self.cluster_name])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", member.route_port),
            ])
            .args(["--routes", &routes]);
        let (child, log) = spawn_logged(command)?;
        let member = &mut self.members[i];
        member.child = Some(child);
        member.log = Some(log);
        Ok(())
    }

    /// Waits until server `i` says it is ready, and learns its ports.
    fn wait_ready(&mut self, i: usize) -> io::Result<()> {
        let member = &mut self.members[i];
        let log = member
            .log
            .as_ref()
            .ok_or_else(|| io::Error::other(format!("{} is not running", member.name)))?;
        let ready = wait_until_ready(log, Instant::now() + START_TIMEOUT)
            .map_err(|err| io::Error::other(format!("{}: {err}", member.name)))?;
        member.client_port = ready.client_port;
        member.monitor_port = ready.monitor_port;
        Ok(())
    }

    fn member(&self, i: usize) -> io::Result<&Member> {
        self.members.get(i).ok_or_else(|| no_such_server(i))
    }

    fn member_mut(&mut self, i: usize) -> io::Result<&mut Member> {
        self.members.get_mut(i).ok_or_else(|| no_such_server(i))
    }

    /// Server `i`'s client URL, `nats://127.0.0.1:PORT` (it stays the same
    /// across restarts). Panics if `i` is not below [`CLUSTER_SIZE`]: a
    /// test's own mistake.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every server's client URL, comma-separated, as the chat server's
    /// `--cluster` takes several.
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// Every server's client URL, in server order, as `async_nats::connect`
    /// takes several (it does not split a comma-separated string).
    pub fn url_list(&self) -> Vec<String> {
        (0..CLUSTER_SIZE).map(|i| self.url(i)).collect()
    }

    /// Server `i`'s client address, for a [`crate::relay::Relay`] in front
    /// of it.
    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port))
    }

    /// Server `i`'s `--server_name` (`n0`, `n1`, `n2`), as the monitoring
    /// endpoints and the servers' logs name it.
    pub fn server_name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Server `i`'s pid, `None` while it is down.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.pid(i).is_some()
    }

    /// Kills server `i` (`SIGKILL`: a crash, nothing flushed, no goodbye to
    /// its routes or clients) and waits for it to exit. Its store stays.
    pub fn kill(&mut self, i: usize) -> io::Result<()> {
        self.signal_and_wait(i, Signal::SIGKILL)
    }

    /// Stops server `i` cleanly (`SIGTERM`, as an operator's restart does)
    /// and waits for it to exit. Its store stays.
    pub fn stop(&mut self, i: usize) -> io::Result<()> {
        self.signal_and_wait(i, Signal::SIGTERM)
    }

    fn signal_and_wait(&mut self, i: usize, signal: Signal) -> io::Result<()> {
        let member = self.member_mut(i)?;
        let Some(mut child) = member.child.take() else {
            return Ok(());
        };
        member.log = None;
        let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
        kill(Pid::from_raw(pid), signal).map_err(io::Error::from)?;
        crate::process::wait_or_kill(&mut child, &member.name).map(drop)
    }

    /// Starts server `i` again on the same ports and store (stopping it
    /// first with `SIGTERM` if it runs), as a restarted broker comes back.
    /// Waits until it is ready and, when a quorum of the cluster runs with
    /// it, until it sees a JetStream meta leader, so that it serves
    /// JetStream requests when this returns. With two servers down it can
    /// have no leader: then it waits only for it to be ready (see
    /// [`BrokerCluster::wait_for_meta_leader`]).
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.stop(i)?;
        self.spawn(i)?;
        self.wait_ready(i)?;
        let running = (0..CLUSTER_SIZE).filter(|&j| self.is_running(j)).count();
        if running > CLUSTER_SIZE / 2 {
            self.wait_for_meta_leader()?;
        }
        Ok(())
    }

    /// Server `i` restarted on its ports with an EMPTY store, as a broker in
    /// a container without a volume comes back: it rejoins under the same
    /// name and gets the cluster's state (streams, their messages) only
    /// from the other servers. Killed first (`SIGKILL`) if it runs. Waits
    /// as [`BrokerCluster::restart`] does.
    pub fn restart_empty(&mut self, i: usize) -> io::Result<()> {
        self.kill(i)?;
        wipe(&self.member(i)?.store)?;
        self.restart(i)
    }

    /// Server `i`'s monitoring endpoint `path_and_query` (such as
    /// `/jsz?accounts=true&streams=true`) as JSON.
    pub fn monitor(&self, i: usize, path_and_query: &str) -> io::Result<Value> {
        let member = self.member(i)?;
        if member.child.is_none() {
            return Err(io::Error::other(format!("{} is not running", member.name)));
        }
        http_get_json(
            SocketAddr::from(([127, 0, 0, 1], member.monitor_port)),
            path_and_query,
        )
    }

    /// The server that leads the JetStream meta group (which places streams
    /// and answers stream management), as a running server reports it about
    /// itself; `None` during an election.
    pub fn meta_leader(&self) -> Option<usize> {
        (0..CLUSTER_SIZE).find(|&i| {
            self.monitor(i, "/jsz").is_ok_and(|jsz| {
                jsz.pointer("/meta_cluster/leader").and_then(Value::as_str)
                    == Some(self.server_name(i))
            })
        })
    }

    /// Waits (within [`LEADER_TIMEOUT`]) until every running server knows a
    /// JetStream meta leader, and returns the leader.
    pub fn wait_for_meta_leader(&self) -> io::Result<usize> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            let everyone_knows = (0..CLUSTER_SIZE).filter(|&i| self.is_running(i)).all(|i| {
                self.monitor(i, "/jsz").is_ok_and(|jsz| {
                    jsz.pointer("/meta_cluster/leader")
                        .and_then(Value::as_str)
                        .is_some_and(|leader| !leader.is_empty())
                })
            });
            if everyone_knows {
                if let Some(leader) = self.meta_leader() {
                    return Ok(leader);
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "no JetStream meta leader within {LEADER_TIMEOUT:?}"
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// `stream`'s entry (`stream_detail`) in server `i`'s
    /// `/jsz?accounts=true&streams=true`, if the server holds a replica of
    /// it: its `cluster` (leader, replicas) and `state` (messages,
    /// first_seq, last_seq).
    pub fn stream_on(&self, i: usize, stream: &str) -> io::Result<Option<Value>> {
        let jsz = self.monitor(i, "/jsz?accounts=true&streams=true")?;
        let accounts = jsz.get("account_details").and_then(Value::as_array);
        Ok(accounts
            .into_iter()
            .flatten()
            .filter_map(|account| account.get("stream_detail").and_then(Value::as_array))
            .flatten()
            .find(|detail| detail.get("name").and_then(Value::as_str) == Some(stream))
            .cloned())
    }

    /// How many messages server `i`'s replica of `stream` holds (`None` if
    /// it holds none): whether a restarted server has caught up.
    pub fn stream_messages(&self, i: usize, stream: &str) -> io::Result<Option<u64>> {
        Ok(self
            .stream_on(i, stream)?
            .and_then(|detail| detail.pointer("/state/messages").and_then(Value::as_u64)))
    }

    /// Waits (within [`LEADER_TIMEOUT`]) until server `i`'s replica of
    /// `stream` holds exactly `messages`: a restarted server has caught up.
    /// The error says what it holds and shows its log.
    pub fn wait_for_stream_messages(
        &self,
        i: usize,
        stream: &str,
        messages: u64,
    ) -> io::Result<()> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            let held = self.stream_messages(i, stream).ok().flatten();
            if held == Some(messages) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "server {i}'s replica of {stream:?} holds {held:?} of {messages} messages \
                     after {LEADER_TIMEOUT:?}; its log: {:#?}",
                    self.log_tail(i, 20)
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// The server that leads `stream` (takes its writes; the one to kill
    /// to test failover), as it reports about itself; `None` if no running
    /// server does (an election, or the stream does not exist).
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        (0..CLUSTER_SIZE).find(|&i| {
            self.stream_on(i, stream).is_ok_and(|detail| {
                detail
                    .and_then(|detail| {
                        detail
                            .pointer("/cluster/leader")
                            .and_then(Value::as_str)
                            .map(|leader| leader == self.server_name(i))
                    })
                    .unwrap_or(false)
            })
        })
    }

    /// Waits (within [`LEADER_TIMEOUT`]) until `stream` has a leader, and
    /// returns it: after a leader was killed, the newly elected one.
    pub fn wait_for_stream_leader(&self, stream: &str) -> io::Result<usize> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            if let Some(leader) = self.stream_leader(stream) {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "stream {stream:?} has no leader within {LEADER_TIMEOUT:?}"
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// The last lines of server `i`'s log (empty while it is down), for a
    /// failing test's message.
    pub fn log_tail(&self, i: usize, lines: usize) -> Vec<String> {
        self.members
            .get(i)
            .and_then(|member| member.log.as_ref())
            .map(|log| log.last(lines))
            .unwrap_or_default()
    }

    fn kill_all(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            member.log = None;
        }
    }
}

impl Drop for BrokerCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn no_such_server(i: usize) -> io::Error {
    io::Error::other(format!(
        "no server {i}: a cluster has {CLUSTER_SIZE} (0 to {})",
        CLUSTER_SIZE - 1
    ))
}

/// How long one monitoring request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// The most a monitoring response may be: a test's `/jsz` is a few KB.
const HTTP_LIMIT: u64 = 16 << 20;

/// A plain HTTP/1.0 GET of `path_and_query` at `addr`, its body parsed as
/// JSON. HTTP/1.0 so that the server closes the connection after the
/// body: no chunked encoding or content length to follow, and no HTTP
/// client crate for one loopback request.
pub fn http_get_json(addr: SocketAddr, path_and_query: &str) -> io::Result<Value> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(HTTP_LIMIT).read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP header end from {addr}")))?;
    let (head, body) = response.split_at(split + 4);
    let status = String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default())
        .into_owned();
    if !status.contains(" 200 ") {
        return Err(io::Error::other(format!(
            "GET {path_and_query} from {addr}: {status}"
        )));
    }
    serde_json::from_slice(body).map_err(io::Error::other)
}
