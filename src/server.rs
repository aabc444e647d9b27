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
//!   timeout (`limits::tune_socket`).
//! - **Memory.** The accept loop's housekeeping tick (every 250 ms) also
//!   enforces `--max-client-memory` (`limits::MemoryGuard`).
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
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::client::admission::{AddressLimits, Admission};
use crate::client::{Client, ClientId};
use crate::config::{Config, ConfigError, Model};
use crate::guard::flood::FloodLimits;
use crate::guard::limits::{self, MemoryGuard};
use crate::memory::{self, Trimmer};
use crate::metrics::{Metrics, Refusal};
use crate::protocol::Message;
use crate::room::hub::{BroadcastHub, BroadcasterHub, Hub, LockedHub, ShardedHub};
use crate::session::{self, ServerContext};
use crate::transport::tls::TlsListener;

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

/// The future whose completion starts a graceful shutdown, boxed: the
/// server below [`run`] is generic over the model only, so it is compiled
/// once, in this crate, rather than again in every crate that calls `run`
/// with a shutdown future of its own type (each test binary did: boxing
/// made `tests/it`'s LLVM IR 45% smaller).
pub(crate) type Shutdown<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Serves `listener` with `config` until `shutdown` completes, then shuts
/// down gracefully. Fails only if the configuration is invalid.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ConfigError> {
    bind_and_run(listener, config, Box::pin(shutdown)).await
}

/// [`run`] past the shutdown future's type.
async fn bind_and_run(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown<'_>,
) -> Result<(), ConfigError> {
    config.validate()?;
    let metrics_listener = match &config.metrics_addr {
        Some(addr) => Some(bind(addr).await.map_err(|err| ConfigError::MetricsListen {
            addr: addr.clone(),
            cause: err.to_string(),
        })?),
        None => None,
    };
    let web_listener = match &config.web_addr {
        Some(addr) => Some(bind(addr).await.map_err(|err| ConfigError::WebListen {
            addr: addr.clone(),
            cause: err.to_string(),
        })?),
        None => None,
    };
    run_with_listeners(listener, metrics_listener, web_listener, config, shutdown).await
}

/// [`run`] with the metrics and web listeners already bound (the test
/// harness binds port 0 and needs to know which port it got).
pub(crate) async fn run_with_listeners(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    web_listener: Option<TcpListener>,
    config: Config,
    shutdown: Shutdown<'_>,
) -> Result<(), ConfigError> {
    config.validate()?;
    let tls = match &config.tls {
        Some(files) => Some(
            TlsListener::new(files.clone(), config.tls_handshake_timeout)
                .map_err(ConfigError::Tls)?,
        ),
        None => None,
    };
    let listeners = Listeners {
        chat: listener,
        metrics: metrics_listener,
        web: web_listener,
        tls,
    };
    #[cfg(feature = "cluster")]
    if config.cluster.is_some() {
        match config.model {
            Model::Sharded => serve_clustered::<ShardedHub>(listeners, config, shutdown).await,
            Model::Broadcaster => {
                serve_clustered::<BroadcasterHub>(listeners, config, shutdown).await
            }
            Model::Locked => serve_clustered::<LockedHub>(listeners, config, shutdown).await,
            Model::Broadcast => serve_clustered::<BroadcastHub>(listeners, config, shutdown).await,
        }
        return Ok(());
    }
    match config.model {
        Model::Sharded => drop(serve::<ShardedHub>(listeners, config, shutdown).await),
        Model::Broadcaster => drop(serve::<BroadcasterHub>(listeners, config, shutdown).await),
        Model::Locked => drop(serve::<LockedHub>(listeners, config, shutdown).await),
        Model::Broadcast => drop(serve::<BroadcastHub>(listeners, config, shutdown).await),
    };
    Ok(())
}

/// What the accept loop serves.
struct Listeners {
    chat: TcpListener,
    metrics: Option<TcpListener>,
    /// `--web-addr`: the browsers' door.
    web: Option<TcpListener>,
    tls: Option<TlsListener>,
}

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    Line,
    Web,
}

/// The next connection on the web port; never, without one.
async fn accept_web(web: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match web {
        Some(web) => web.accept().await,
        None => std::future::pending().await,
    }
}

/// [`serve`] with the model joined to a room on a broker; after the local
/// clients are gone, their departures get up to `--shutdown-grace` more to
/// reach the broker.
#[cfg(feature = "cluster")]
async fn serve_clustered<H: Hub>(listeners: Listeners, config: Config, shutdown: Shutdown<'_>) {
    let grace = config.shutdown_grace;
    let hub = serve::<crate::cluster::Clustered<H>>(listeners, config, shutdown).await;
    hub.close(grace).await;
}

/// Serves until shutdown is over; returns the hub, for whatever outlives the clients.
async fn serve<H: Hub>(listeners: Listeners, config: Config, shutdown: Shutdown<'_>) -> Arc<H> {
    let Listeners {
        chat: listener,
        metrics: metrics_listener,
        web: web_listener,
        mut tls,
    } = listeners;
    let history = crate::room::history::History::new(&config).map(Arc::new);
    let hub = Arc::new(H::new(&config, history.clone()));
    let stop = CancellationToken::new();
    let gate = config
        .password
        .clone()
        .map(crate::guard::password::Gate::new);
    let server = Arc::new(ServerContext {
        stopping: AtomicBool::new(false),
        force: CancellationToken::new(),
        tracker: TaskTracker::new(),
        flood: FloodLimits::from_config(&config),
        metrics: Arc::new(Metrics::new(metrics_listener.is_some(), history.clone())),
        gate,
        config,
    });
    #[cfg(feature = "metrics")]
    if let Some(metrics_listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(
            metrics_listener,
            Arc::clone(&server.metrics),
            server.config.model,
            server
                .config
                .cluster
                .as_ref()
                .map(|cluster| Arc::clone(&cluster.counters)),
            stop.clone(),
        ));
    }
    #[cfg(not(feature = "metrics"))]
    drop(metrics_listener);
    #[cfg(feature = "web")]
    let web = Arc::new(crate::web::Web::new(&server.config));
    if let Some(addr) = web_listener.as_ref().and_then(|web| web.local_addr().ok()) {
        let scheme = if tls.is_some() { "https" } else { "http" };
        info!(%addr, "serving the chat page at {scheme}://{addr}/");
    }
    // SIGHUP rereads the TLS certificate. Watched here, in the accept loop
    // that owns the acceptor, rather than by a task of its own.
    let mut hangups = match &tls {
        Some(_) => hangup_signals(),
        None => None,
    };
    let slots = Arc::new(Semaphore::new(server.config.max_clients));
    let addresses = AddressLimits::new(&server.config);
    let memory_guard = MemoryGuard::new(&server.config, history);
    let next_id = AtomicU64::new(0);
    let mut backoff = AcceptBackoff::default();
    let mut refusals = Refusals::default();
    let mut trimmer = Trimmer::default();
    // The accept loop doubles as the memory housekeeper, so that no model
    // needs a task for it.
    let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = shutdown;

    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted.map(|(stream, peer)| (stream, peer, Door::Line)),
            accepted = accept_web(web_listener.as_ref()) => {
                accepted.map(|(stream, peer)| (stream, peer, Door::Web))
            }
            Some(()) = hangup(&mut hangups) => {
                if let Some(tls) = &mut tls {
                    tls.reload();
                }
                continue;
            }
            _ = housekeeping.tick() => {
                let connections = server.config.max_clients - slots.available_permits();
                let started = std::time::Instant::now();
                if let Some(guard) = &memory_guard {
                    let eviction = guard.enforce();
                    if eviction.evicted > 0 {
                        server.metrics.memory_evictions.add(eviction.evicted as u64);
                        server.metrics.memory_evicted_bytes.add(eviction.freed as u64);
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
                    // The queues' backlog slabs, all idle once the burst is over.
                    let unmapped = crate::room::backlog::trim();
                    let took = started.elapsed();
                    debug!(?why, connections, unmapped, ?took, "returned freed memory to the system");
                }
                continue;
            }
        };
        let (stream, peer, door) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                server.metrics.accept_errors.add(1);
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
                    refusals.refuse(&stream, peer, door, Limit::Address, &server.metrics);
                    continue;
                }
            },
            None => None,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refusals.refuse(&stream, peer, door, Limit::Server, &server.metrics);
            continue;
        };
        refusals.admitted();
        server.metrics.accepted.add(1);
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
        #[cfg(feature = "web")]
        if door == Door::Web {
            let session = web_session(&hub, stream, peer, tls.as_ref(), &client, &server, &web);
            spawn_session(&server, memory_guard.as_ref(), &client, session);
            continue;
        }
        match &tls {
            None => {
                let session = session::serve(
                    Arc::clone(&hub),
                    stream,
                    Arc::clone(&client),
                    Arc::clone(&server),
                );
                spawn_session(&server, memory_guard.as_ref(), &client, session);
            }
            Some(tls) => {
                let handshake = tls.handshake(stream, peer, Arc::clone(&server.metrics));
                let hub = Arc::clone(&hub);
                let task_client = Arc::clone(&client);
                let task_server = Arc::clone(&server);
                // The handshake runs in the task that becomes the reader,
                // holding the client's slot, so that it counts against
                // `max_clients` and adds no task.
                let session = async move {
                    let stream = tokio::select! {
                        stream = handshake => stream,
                        // Shutdown need not wait out a handshake.
                        () = task_client.ending() => None,
                    };
                    if let Some(stream) = stream {
                        session::serve(hub, stream, task_client, task_server).await;
                    }
                };
                spawn_session(&server, memory_guard.as_ref(), &client, session);
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

/// A connection of the web port, plain or after its TLS handshake; see
/// [`crate::web`]. Boxed as its own kind: one future type for both would
/// reserve the TLS stream's room in every plain connection's task.
#[cfg(feature = "web")]
fn web_session<H: Hub>(
    hub: &Arc<H>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<&TlsListener>,
    client: &Arc<Client>,
    server: &Arc<ServerContext>,
    web: &Arc<crate::web::Web>,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
    let (hub, client, server, web) = (
        Arc::clone(hub),
        Arc::clone(client),
        Arc::clone(server),
        Arc::clone(web),
    );
    match tls {
        Some(tls) => {
            // Boxed: the handshake's state is large and must not stay
            // reserved in the connection's task after it is over.
            let handshake = Box::pin(tls.handshake(stream, peer, Arc::clone(&server.metrics)));
            Box::pin(crate::web::serve(hub, handshake, client, server, web))
        }
        None => Box::pin(crate::web::serve(
            hub,
            std::future::ready(Some(stream)),
            client,
            server,
            web,
        )),
    }
}

#[cfg(unix)]
type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangups = ();

/// SIGHUP, if this platform has it and the handler can be installed.
fn hangup_signals() -> Option<Hangups> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(signals) => Some(signals),
            Err(err) => {
                warn!(cause = %err, "cannot watch SIGHUP; the TLS certificate will not be reloaded");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// The next SIGHUP; never, if they are not watched.
async fn hangup(hangups: &mut Option<Hangups>) -> Option<()> {
    match hangups {
        #[cfg(unix)]
        Some(signals) => signals.recv().await,
        _ => std::future::pending().await,
    }
}

/// Spawns a connection's reader task; under `--max-client-memory` the
/// memory guard watches the client for as long as the task runs.
fn spawn_session(
    server: &ServerContext,
    memory_guard: Option<&Arc<MemoryGuard>>,
    client: &Arc<Client>,
    session: impl Future<Output = ()> + Send + 'static,
) {
    match memory_guard {
        Some(guard) => {
            guard.watch(client);
            let forget = Forget {
                guard: Arc::clone(guard),
                id: client.id,
            };
            server.tracker.spawn(Watched { session, forget });
        }
        None => {
            server.tracker.spawn(session);
        }
    }
}

pin_project_lite::pin_project! {
    /// A session that takes its client off the memory guard's list when it
    /// ends. A struct rather than `async move { session.await; forget }`:
    /// such a block keeps the captured future and the awaited one in
    /// separate slots, and so held every connection's reader task twice
    /// (about 600 bytes per idle connection).
    struct Watched<F> {
        #[pin]
        session: F,
        forget: Forget,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.project().session.poll(cx)
    }
}

/// Forgets the client when the session is over, however it ends.
#[derive(Debug)]
struct Forget {
    guard: Arc<MemoryGuard>,
    id: ClientId,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.guard.forget(self.id);
    }
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

/// Which limit turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// `--max-clients`.
    Server,
    /// `--max-clients-per-ip`.
    Address,
}

impl Refusals {
    /// Tells the connection why, without waiting for it, and closes it.
    fn refuse(
        &mut self,
        stream: &TcpStream,
        peer: SocketAddr,
        door: Door,
        limit: Limit,
        metrics: &Metrics,
    ) {
        let (in_burst, line) = match limit {
            Limit::Server => {
                metrics.refused(Refusal::ServerFull);
                (&mut self.full, &self.server_full)
            }
            Limit::Address => {
                metrics.refused(Refusal::TooManyFromAddress);
                (&mut self.per_address, &self.too_many_from_address)
            }
        };
        if *in_burst == 0 {
            match limit {
                Limit::Server => warn!(%peer, "refused: server full"),
                Limit::Address => {
                    warn!(%peer, "refused: too many connections from this address")
                }
            }
        }
        *in_burst += 1;
        // A fresh socket's send buffer is empty, so one non-blocking write
        // carries the line; if it does not, the client gets a plain close.
        match door {
            Door::Line => drop(stream.try_write(line.as_bytes())),
            #[cfg(feature = "web")]
            Door::Web => drop(stream.try_write(&crate::web::refusal(line.as_bytes()))),
            #[cfg(not(feature = "web"))]
            Door::Web => {}
        }
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
        self.failures += 1;
        let failures = u32::try_from(self.failures).unwrap_or(u32::MAX);
        let pause =
            crate::backoff::doubling(Duration::from_millis(5), Duration::from_secs(1), failures);
        tokio::time::sleep(pause).await;
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "accepting again");
            self.failures = 0;
        }
    }
}
