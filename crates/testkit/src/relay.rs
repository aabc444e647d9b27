//! A TCP relay between a client and a server that a test can cut off and
//! reconnect: a network partition without root, nftables or namespaces.
//!
//! Put one between a chat-server node and its broker (the node's cluster
//! URL names the relay) and the test decides when the network fails:
//!
//! - [`Relay::partition`] black-holes every connection both ways WITHOUT
//!   closing anything: bytes stop, sockets stay open, as when a cable is
//!   pulled or a switch drops a host. Neither end hears an error; each must
//!   notice by its own timeouts (NATS: missed pings). New connections hang
//!   (the relay stops accepting, so a connect completes in the kernel's
//!   backlog at most and then sees no reply, or waits for the handshake).
//! - [`Relay::heal`] lets new connections through again and resets the
//!   ones that were cut off, as a client finds after a real partition that
//!   outlived its peer's patience: it reconnects.
//! - [`Relay::reset`] resets every current connection at once (a broker's
//!   load balancer restarting, say), without a partition.
//!
//! The relay runs on a thread and a tokio runtime of its own, so a test's
//! runtime (paused time, a blocked worker) never slows or stops it. Each
//! connection holds one fixed buffer per direction and, while cut off,
//! reads nothing: memory stays bounded and the kernel's flow control pushes
//! back on the sender, as on a real stalled path.

use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes one direction of one connection holds at most.
const BUFFER: usize = 16 * 1024;

/// How long the relay waits for the target to accept a connection before
/// giving up on it (and closing the client's side).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the test asked for, as every connection task sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Control {
    partitioned: bool,
    /// Raised by `heal` and `reset`: a connection accepted under an earlier
    /// generation is reset.
    generation: u64,
    shutdown: bool,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicUsize,
}

/// A relay from a loopback port of its own to one target address. Dropping
/// it closes its port and every connection through it.
pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    control: watch::Sender<Control>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> io::Result<Relay> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (control, watcher) = watch::channel(Control::default());
        let counters = Arc::new(Counters::default());
        let served = Arc::clone(&counters);
        let (started, start) = std::sync::mpsc::sync_channel(1);
        // The runtime is made, used and dropped on the relay's thread: a
        // runtime dropped inside a test's async context would panic.
        let thread = std::thread::Builder::new()
            .name(format!("relay-{addr}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build();
                let listener = runtime.and_then(|runtime| {
                    // Registering the socket needs the runtime's reactor.
                    let listener = runtime.block_on(async { TcpListener::from_std(listener) })?;
                    Ok((runtime, listener))
                });
                let (runtime, listener) = match listener {
                    Ok(ready) => {
                        let _ = started.send(Ok(()));
                        ready
                    }
                    Err(err) => {
                        let _ = started.send(Err(err));
                        return;
                    }
                };
                runtime.block_on(serve(listener, target, watcher, served));
                // Dropping the runtime drops every connection task, which
                // closes their sockets.
            })?;
        let relay = Relay {
            addr,
            target,
            control,
            counters,
            thread: Some(thread),
        };
        start
            .recv()
            .map_err(|_| io::Error::other("the relay's thread ended before it started"))??;
        Ok(relay)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://` and [`Relay::addr`]: the broker URL to give a node whose
    /// broker connection goes through the relay.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Where the relay forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Cuts every current connection off both ways, leaving them open, and
    /// stops accepting new ones until [`Relay::heal`].
    pub fn partition(&self) {
        self.control
            .send_modify(|control| control.partitioned = true);
    }

    /// Ends a partition: new connections go through again, and the
    /// connections that were cut off are reset (a client learns at once
    /// and reconnects, as it would after a real partition that outlived
    /// its timeouts). Without a partition it does nothing.
    pub fn heal(&self) {
        self.control.send_modify(|control| {
            if control.partitioned {
                control.partitioned = false;
                control.generation += 1;
            }
        });
    }

    /// Resets (RST) every current connection at once, both ways; new ones
    /// are accepted as before (or not, during a partition).
    pub fn reset(&self) {
        self.control.send_modify(|control| control.generation += 1);
    }

    /// Whether the relay is partitioned now.
    pub fn is_partitioned(&self) -> bool {
        self.control.borrow().partitioned
    }

    /// Connections accepted so far: a test waits for this to grow to see a
    /// client reconnect.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections open through the relay now (stalled ones included).
    pub fn open(&self) -> usize {
        self.counters.open.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.control.send_modify(|control| control.shutdown = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until shutdown, none while partitioned.
async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    mut control: watch::Receiver<Control>,
    counters: Arc<Counters>,
) {
    loop {
        let now = *control.borrow_and_update();
        if now.shutdown {
            return;
        }
        if now.partitioned {
            if control.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Biased, the change first: a connection that arrives after a
        // reset or a partition was asked for must not be taken under the
        // generation read before it (reset at once, as CI once saw) or
        // counted as accepted while partitioned. Both can be ready in one
        // poll, and an unbiased select picks either.
        tokio::select! {
            biased;
            changed = control.changed() => if changed.is_err() {
                return;
            },
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    let open = OpenGuard::new(Arc::clone(&counters));
                    tokio::spawn(connection(client, target, control.clone(), now.generation, open));
                }
                // Out of file descriptors, say: try again shortly rather
                // than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// Counts a connection as open for as long as its task lives.
struct OpenGuard(Arc<Counters>);

impl OpenGuard {
    fn new(counters: Arc<Counters>) -> OpenGuard {
        counters.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(counters)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client connection: connects to the target, then pumps both ways
/// until both ends finish, one fails, or the test resets it.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    control: watch::Receiver<Control>,
    generation: u64,
    _open: OpenGuard,
) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target));
    let mut server = tokio::select! {
        connected = connect => match connected {
            Ok(Ok(server)) => server,
            _ => return reset_on_close(&client),
        },
        () = reset_asked(control.clone(), generation) => return reset_on_close(&client),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reset = {
        let (client_in, client_out) = client.split();
        let (server_in, server_out) = server.split();
        let both_ways = async {
            tokio::try_join!(
                pump(client_in, server_out, control.clone()),
                pump(server_in, client_out, control.clone()),
            )
        };
        let reset = reset_asked(control.clone(), generation);
        tokio::select! {
            finished = both_ways => finished.is_err(),
            () = reset => true,
        }
    };
    if reset {
        reset_on_close(&client);
        reset_on_close(&server);
    }
}

/// Makes closing `stream` send RST instead of FIN: the peer sees
/// "connection reset", as after a failure, not an orderly goodbye.
fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Resolves once the test resets connections of `generation` (by `reset`
/// or `heal`) or the relay shuts down.
async fn reset_asked(mut control: watch::Receiver<Control>, generation: u64) {
    loop {
        let now = *control.borrow_and_update();
        if now.generation != generation || now.shutdown {
            return;
        }
        if control.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves once data may flow; never while partitioned.
async fn flowing(control: &mut watch::Receiver<Control>) {
    loop {
        if !control.borrow_and_update().partitioned {
            return;
        }
        if control.changed().await.is_err() {
            // The relay is gone; its runtime ends this task.
            pending::<()>().await;
        }
    }
}

/// Copies `from` to `to` through one fixed buffer, reading nothing while
/// partitioned. Ends at `from`'s end of stream (passing it on as a
/// half-close) or at the first error.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut control: watch::Receiver<Control>,
) -> io::Result<()> {
    let mut buffer = vec![0; BUFFER];
    loop {
        flowing(&mut control).await;
        // A read is cancel-safe: one interrupted by a partition loses no
        // bytes, they stay in the kernel.
        let read = tokio::select! {
            read = from.read(&mut buffer) => read?,
            _ = control.changed() => continue,
        };
        if read == 0 {
            return to.shutdown().await;
        }
        // A write cut off by a partition is abandoned with what it holds:
        // the connection never flows again (heal resets it).
        tokio::select! {
            written = to.write_all(&buffer[..read]) => written?,
            () = partitioned(&mut control) => pending::<()>().await,
        }
    }
}

/// Resolves once a partition begins.
async fn partitioned(control: &mut watch::Receiver<Control>) {
    loop {
        if control.borrow_and_update().partitioned {
            return;
        }
        if control.changed().await.is_err() {
            pending::<()>().await;
        }
    }
}
