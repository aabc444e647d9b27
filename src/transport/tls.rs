//! TLS for the accept loop: the server's identity read from PEM files (and
//! read again on SIGHUP), and the handshake each connection must finish
//! in time before its session starts.
//!
//! rustls with the `ring` provider: no OpenSSL, and a fraction of
//! aws-lc-rs's build time. The accept loop owns the [`TlsListener`], so a
//! reload needs no lock: it swaps the acceptor that later connections are
//! handed, and connections already up keep the configuration they started
//! with.
//!
//! A handshake runs in the connection's own task (the one that becomes its
//! reader), holding its `max_clients` slot, so a flood of half-open
//! handshakes is bounded like any other connections, and each is bounded in
//! time. Failed handshakes (a plaintext client on the TLS port, garbage
//! instead of a ClientHello, a client that rejects the certificate) are
//! closed and logged once per burst, with a count of the rest.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::TlsFiles;
use crate::metrics::{Metrics, Refusal};

/// The accept loop's TLS state; see the module documentation.
pub(crate) struct TlsListener {
    files: TlsFiles,
    acceptor: TlsAcceptor,
    timeout: Duration,
    failures: Arc<FailureLog>,
}

impl TlsListener {
    pub(crate) fn new(files: TlsFiles, timeout: Duration) -> Result<TlsListener, String> {
        let config = files.load()?;
        Ok(TlsListener {
            files,
            acceptor: TlsAcceptor::from(config),
            timeout,
            failures: Arc::default(),
        })
    }

    /// Reads the files again; on failure keeps serving the old identity.
    pub(crate) fn reload(&mut self) {
        match self.files.load() {
            Ok(config) => {
                self.acceptor = TlsAcceptor::from(config);
                info!(cert = %self.files.cert.display(), "reloaded the TLS certificate");
            }
            Err(err) => {
                warn!(%err, "TLS reload failed; keeping the previous certificate");
            }
        }
    }

    /// The handshake for one connection, to run in its task. `None` if it
    /// failed or timed out; the connection is then closed and counted.
    pub(crate) fn handshake(
        &self,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        metrics: Arc<Metrics>,
    ) -> impl std::future::Future<Output = Option<TlsStream<TcpStream>>> + Send + 'static {
        let accept = self.acceptor.accept(stream).into_fallible();
        let timeout = self.timeout;
        let failures = Arc::clone(&self.failures);
        async move {
            match tokio::time::timeout(timeout, accept).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err((err, mut stream))) => {
                    metrics.refused(Refusal::TlsHandshake);
                    failures.note(peer, &err.to_string());
                    // Our FIN rather than nothing; rustls has already tried
                    // to send its alert.
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                    None
                }
                Err(_elapsed) => {
                    metrics.refused(Refusal::TlsTimeout);
                    failures.note(peer, "handshake timed out");
                    None
                }
            }
        }
    }
}

/// Failed handshakes come in bursts (a scanner, a misconfigured client
/// retrying); this logs the first of each and counts the others.
#[derive(Debug, Default)]
struct FailureLog {
    state: Mutex<FailureState>,
}

#[derive(Debug, Default)]
struct FailureState {
    last_logged: Option<Instant>,
    unlogged: u64,
}

/// Failures closer together than this belong to one burst.
const BURST: Duration = Duration::from_secs(10);

impl FailureLog {
    fn note(&self, peer: std::net::SocketAddr, cause: &str) {
        let now = Instant::now();
        let mut state = self.state.lock();
        match state.last_logged {
            Some(last) if now.duration_since(last) < BURST => state.unlogged += 1,
            _ => {
                let earlier = std::mem::take(&mut state.unlogged);
                state.last_logged = Some(now);
                drop(state);
                if earlier == 0 {
                    warn!(%peer, cause, "TLS handshake failed; closed");
                } else {
                    warn!(%peer, cause, unlogged_before = earlier, "TLS handshake failed; closed");
                }
            }
        }
    }
}
