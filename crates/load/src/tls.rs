//! `--tls`: the clients speak TLS (rustls with ring, as the server does) to
//! the line port or, with `--protocol ws`, to the web port (`wss://`).
//!
//! What this module owns: the client configuration built from `--tls-ca`
//! ([`TlsClient`]), the connection a client holds whichever it speaks
//! ([`Stream`]), and the non-blocking sends the hot path needs from either
//! ([`SendHalf`]).
//!
//! Trust: `--tls-ca FILE` is a PEM file of certificates. The server is
//! accepted if its chain leads to one of them (its address, not a host
//! name, is what is checked: the tool only speaks to loopback), or if the
//! certificate it presents is byte for byte one of them, so that a
//! server's self-signed certificate can be given as its own CA. Nothing
//! else is accepted; there is no "insecure" switch.
//!
//! Sending: a plain client writes with `try_write` and waits on the
//! socket's write readiness, so a batch is one system call. A TLS stream
//! has no readiness of its own: [`SendHalf::try_send`] polls its write
//! once with a waker that does nothing (the select that follows polls
//! again with the task's own), and because rustls may keep records it
//! could not yet write, the half says when it still [needs a
//! flush](SendHalf::needs_flush).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use anyhow::{bail, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The clients' TLS configuration: cheap to clone, shared by every client.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    /// The `--tls-ca` file, for messages.
    ca: String,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient").field("ca", &self.ca).finish()
    }
}

impl TlsClient {
    /// Trusts the certificates in the PEM file `ca` (see the module's doc).
    pub fn from_ca_file(ca: &Path) -> anyhow::Result<TlsClient> {
        let certs = CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("--tls-ca {}: cannot read it", ca.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--tls-ca {}: not PEM certificates", ca.display()))?;
        if certs.is_empty() {
            bail!("--tls-ca {}: no certificate in it", ca.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        // A certificate that cannot be an anchor (rare) can still be pinned.
        let (_added, _ignored) = roots.add_parsable_certificates(certs.iter().cloned());
        let chain = if roots.is_empty() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .with_context(|| format!("--tls-ca {}", ca.display()))?,
            )
        };
        let verifier = PinnedOrChain {
            pinned: certs,
            chain,
            provider: provider.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("rustls has no protocol version")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            ca: ca.display().to_string(),
        })
    }

    /// The TLS handshake over `tcp`, checking the server as `addr`'s IP.
    pub async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> anyhow::Result<Stream> {
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = self.connector.connect(name, tcp).await.with_context(|| {
            format!(
                "TLS handshake with {addr} (trusting --tls-ca {}; is the port TLS?)",
                self.ca
            )
        })?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// Accepts a server whose certificate is one of `pinned`, or whose chain
/// `chain` accepts.
#[derive(Debug)]
struct PinnedOrChain {
    pinned: Vec<CertificateDer<'static>>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedOrChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|cert| cert.as_ref() == end_entity.as_ref())
        {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.chain {
            Some(chain) => {
                chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::General(
                "the server's certificate is not in --tls-ca".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client's connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The sending side of a client, as its loop uses it.
pub trait SendHalf {
    /// Writes what the connection takes now; `WouldBlock` if nothing.
    fn try_send(&mut self, buf: &[u8]) -> io::Result<usize>;

    /// Whether bytes accepted earlier still wait to go out ([`SendHalf::ready`]
    /// pushes them).
    fn needs_flush(&self) -> bool {
        false
    }

    /// Completes when [`SendHalf::try_send`] may succeed again, having
    /// pushed out whatever waited.
    fn ready(&mut self) -> impl std::future::Future<Output = io::Result<()>>;
}

impl SendHalf for &TcpStream {
    #[inline]
    fn try_send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_write(buf)
    }

    async fn ready(&mut self) -> io::Result<()> {
        self.writable().await
    }
}

/// The write half of a TLS stream, with what rustls still holds.
pub struct TlsSend<W> {
    half: W,
    unflushed: bool,
}

impl<W> TlsSend<W> {
    pub fn new(half: W) -> TlsSend<W> {
        TlsSend {
            half,
            unflushed: false,
        }
    }
}

/// The half a client keeps after `tokio::io::split` of its TLS stream.
pub type TlsWriteHalf = TlsSend<WriteHalf<TlsStream<TcpStream>>>;

/// A waker that does nothing, for polls whose `Pending` is followed by a
/// real wait on the same object.
fn idle_waker() -> &'static Waker {
    struct Idle;
    impl Wake for Idle {
        fn wake(self: Arc<Self>) {}
    }
    static WAKER: OnceLock<Waker> = OnceLock::new();
    WAKER.get_or_init(|| Waker::from(Arc::new(Idle)))
}

impl<W: AsyncWrite + Unpin> SendHalf for TlsSend<W> {
    fn try_send(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut cx = Context::from_waker(idle_waker());
        let sent = match Pin::new(&mut self.half).poll_write(&mut cx, buf) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
        };
        self.unflushed = true;
        match Pin::new(&mut self.half).poll_flush(&mut cx) {
            Poll::Ready(Ok(())) => self.unflushed = false,
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => {}
        }
        Ok(sent)
    }

    fn needs_flush(&self) -> bool {
        self.unflushed
    }

    async fn ready(&mut self) -> io::Result<()> {
        self.half.flush().await?;
        self.unflushed = false;
        Ok(())
    }
}

/// Connects to `addr`, with TLS if `tls` is given.
pub async fn dial(addr: SocketAddr, tls: Option<&TlsClient>) -> anyhow::Result<Stream> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    // The server sets TCP_NODELAY on its side; our sends are batched by the
    // window already, and Nagle would add delay to single lines.
    tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
    match tls {
        None => Ok(Stream::Tcp(tcp)),
        Some(tls) => tls.handshake(tcp, addr).await,
    }
}
