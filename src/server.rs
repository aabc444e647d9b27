//! The accept loop: admitting connections, limiting them, and shutting down.
//!
//! [`run`] serves a bound listener until the `shutdown` future completes,
//! with the hub the configuration names. Taking the listener and the
//! shutdown signal as arguments (as mini-redis does) lets tests run a real
//! server on an ephemeral port and stop it without signals.
//!
//! - **Limits.** At most `--max-clients` connections are served, and at most
//!   `--max-clients-per-ip` from one address; one more is told
//!   `error: server full` or `error: too many connections from your address`
//!   and closed at once, without a task, so a flood of connections cannot
//!   grow the server. Every accepted socket gets TCP keepalive and a user
//!   timeout ([`limits::tune_socket`]).
//! - **Memory.** The accept loop's housekeeping tick (every 250 ms) also
//!   enforces `--max-client-memory` ([`limits::MemoryGuard`]).
//! - **Accept errors** (out of file descriptors, aborted handshakes) are
//!   logged once per burst and retried after a growing pause: never a hot
//!   loop, never an exit.
//! - **Shutdown** stops accepting, ends every connection with
//!   `server shutting down` after what is already queued for it, waits up to
//!   `--shutdown-grace` for the queues to flush, then abandons whatever is
//!   still stuck.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::client::{Client, ClientId};
use crate::config::{Config, ConfigError, Model};
use crate::flood::FloodLimits;
use crate::hub::{BroadcastHub, BroadcasterHub, Hub, LockedHub, ShardedHub};
use crate::limits::{self, AddressLimits, Admission, MemoryGuard};
use crate::memory::{self, Trimmer};
use crate::protocol::Message;
use crate::session::{self, ServerContext};

/// Connections the kernel may hold for us before `accept`. The usual
/// defaults (128 for std, 1,024 for tokio) make a burst of thousands of
/// simultaneous connects wait on SYN retransmissions; the kernel caps this
/// at `net.core.somaxconn` anyway.
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds a listener on `addr` with a deep accept backlog. Must be called
/// inside a tokio runtime.
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    let mut last_err = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Restarting the server must not wait out TIME_WAIT connections.
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(ACCEPT_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
}

/// Serves `listener` with `config` until `shutdown` completes, then shuts
/// down gracefully. Fails only if the configuration is invalid.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConfigError> {
    config.validate()?;
    #[cfg(feature = "cluster")]
    if config.cluster.is_some() {
        match config.model {
            Model::Sharded => serve_clustered::<ShardedHub>(listener, config, shutdown).await,
            Model::Broadcaster => {
                serve_clustered::<BroadcasterHub>(listener, config, shutdown).await
            }
            Model::Locked => serve_clustered::<LockedHub>(listener, config, shutdown).await,
            Model::Broadcast => serve_clustered::<BroadcastHub>(listener, config, shutdown).await,
        }
        return Ok(());
    }
    match config.model {
        Model::Sharded => drop(serve::<ShardedHub>(listener, config, shutdown).await),
        Model::Broadcaster => drop(serve::<BroadcasterHub>(listener, config, shutdown).await),
        Model::Locked => drop(serve::<LockedHub>(listener, config, shutdown).await),
        Model::Broadcast => drop(serve::<BroadcastHub>(listener, config, shutdown).await),
    };
    Ok(())
}

/// [`serve`] with the model joined to a room on a broker; after the local
/// clients are gone, their departures get up to `--shutdown-grace` more to
/// reach the broker.
#[cfg(feature = "cluster")]
async fn serve_clustered<H: Hub>(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) {
    let grace = config.shutdown_grace;
    let hub = serve::<crate::cluster::Clustered<H>>(listener, config, shutdown).await;
    hub.close(grace).await;
}

/// Serves until shutdown is over; returns the hub, for whatever outlives the clients.
async fn serve<H: Hub>(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Arc<H> {
    let hub = Arc::new(H::new(&config));
    let stop = CancellationToken::new();
    let server = Arc::new(ServerContext {
        stopping: AtomicBool::new(false),
        force: CancellationToken::new(),
        tracker: TaskTracker::new(),
        flood: FloodLimits::from_config(&config),
        config,
    });
    let slots = Arc::new(Semaphore::new(server.config.max_clients));
    let addresses = AddressLimits::new(&server.config);
    let memory_guard = MemoryGuard::new(&server.config);
    let next_id = AtomicU64::new(0);
    let mut backoff = AcceptBackoff::default();
    let mut refusals = Refusals::default();
    let mut trimmer = Trimmer::default();
    // The accept loop doubles as the memory housekeeper, so that no model
    // needs a task for it.
    let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            _ = housekeeping.tick() => {
                let connections = server.config.max_clients - slots.available_permits();
                let started = std::time::Instant::now();
                if let Some(guard) = &memory_guard {
                    let eviction = guard.enforce();
                    if eviction.evicted > 0 {
                        warn!(
                            held_bytes = eviction.held,
                            budget = server.config.max_client_memory,
                            evicted = eviction.evicted,
                            freed_bytes = eviction.freed,
                            "clients over --max-client-memory; disconnected the largest holders"
                        );
                    }
                }
                if let Some(why) = trimmer.observe(connections, memory::take_released()) {
                    let took = started.elapsed();
                    debug!(?why, connections, ?took, "returned freed memory to the system");
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = backoff.pause(&err) => continue,
                }
            }
        };
        backoff.succeeded();
        let place = match &addresses {
            Some(addresses) => match addresses.admit(peer.ip()) {
                Some(place) => Some(place),
                None => {
                    refusals.refuse(&stream, peer, Refusal::TooManyFromAddress);
                    continue;
                }
            },
            None => None,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refusals.refuse(&stream, peer, Refusal::ServerFull);
            continue;
        };
        refusals.admitted();
        // We coalesce writes ourselves; Nagle would only add latency.
        let _ = stream.set_nodelay(true);
        if let Err(err) = limits::tune_socket(&stream, &server.config) {
            debug!(%peer, cause = %err, "cannot set keepalive or user timeout");
        }
        let id = ClientId(next_id.fetch_add(1, Ordering::Relaxed));
        let client = Arc::new(Client::new(
            id,
            peer.to_string().into(),
            &server.config,
            &stop,
            Some(Admission::new(slot, place)),
        ));
        let session = session::serve(
            Arc::clone(&hub),
            stream,
            Arc::clone(&client),
            Arc::clone(&server),
        );
        match &memory_guard {
            Some(guard) => {
                guard.watch(&client);
                let guard = Arc::clone(guard);
                server.tracker.spawn(async move {
                    session.await;
                    guard.forget(id);
                });
            }
            None => {
                server.tracker.spawn(session);
            }
        }
    }

    drop(listener);
    let clients = server.config.max_clients - slots.available_permits();
    info!(clients, "shutting down");
    server.stopping.store(true, Ordering::Relaxed);
    stop.cancel();
    server.tracker.close();
    let grace = server.config.shutdown_grace;
    if tokio::time::timeout(grace, server.tracker.wait())
        .await
        .is_err()
    {
        warn!(?grace, "grace period over; abandoning unflushed clients");
        server.force.cancel();
        server.tracker.wait().await;
    }
    info!("shut down");
    hub
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    ServerFull,
    TooManyFromAddress,
}

/// Turns away connections over `--max-clients` or `--max-clients-per-ip`.
/// Like accept errors, a flood of them is logged once per reason (its first,
/// then a count when the server admits again), so that a flood of
/// connections cannot become a flood of log lines.
#[derive(Debug)]
struct Refusals {
    full: u64,
    per_address: u64,
    /// The refusal lines, formatted once.
    server_full: Message,
    too_many_from_address: Message,
}

impl Default for Refusals {
    fn default() -> Refusals {
        Refusals {
            full: 0,
            per_address: 0,
            server_full: Message::notice(chat_wire::SERVER_FULL),
            too_many_from_address: Message::notice(chat_wire::TOO_MANY_FROM_ADDRESS),
        }
    }
}

impl Refusals {
    /// Tells the connection why, without waiting for it, and closes it.
    fn refuse(&mut self, stream: &TcpStream, peer: SocketAddr, why: Refusal) {
        let (in_burst, line) = match why {
            Refusal::ServerFull => (&mut self.full, &self.server_full),
            Refusal::TooManyFromAddress => (&mut self.per_address, &self.too_many_from_address),
        };
        if *in_burst == 0 {
            match why {
                Refusal::ServerFull => warn!(%peer, "refused: server full"),
                Refusal::TooManyFromAddress => {
                    warn!(%peer, "refused: too many connections from this address")
                }
            }
        }
        *in_burst += 1;
        // A fresh socket's send buffer is empty, so one non-blocking write
        // carries the line; if it does not, the client gets a plain close.
        let _ = stream.try_write(line.as_bytes());
    }

    fn admitted(&mut self) {
        if self.full + self.per_address > 0 {
            info!(
                refused_server_full = self.full,
                refused_per_address = self.per_address,
                "admitting again after refusing connections"
            );
            self.full = 0;
            self.per_address = 0;
        }
    }
}

/// Pauses after accept errors: 5 ms, doubling to 1 s while errors persist.
/// Only the first error of a burst is logged, with a count when it ends.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u64,
}

impl AcceptBackoff {
    async fn pause(&mut self, err: &io::Error) {
        if self.failures == 0 {
            warn!(cause = %err, "accept failed; retrying with backoff");
        }
        let pause = Duration::from_millis(5) * 2u32.saturating_pow(self.failures.min(8) as u32);
        self.failures += 1;
        tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "accepting again");
            self.failures = 0;
        }
    }
}
