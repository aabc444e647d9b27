//! TLS for tests (feature `tls`): certificates made at run time, so that no
//! private key is ever committed, and a line client over TLS.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::LINE_TIMEOUT;

/// A certificate authority and a server certificate it signed for
/// `localhost` and `127.0.0.1`, as PEM files in a directory of their own
/// (removed on drop).
#[derive(Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA certificate, for `--ca`.
    pub ca: PathBuf,
    /// The server's certificate chain, for `--tls-cert`.
    pub cert: PathBuf,
    /// The server's private key, for `--tls-key`.
    pub key: PathBuf,
}

fn other(err: impl std::fmt::Display) -> io::Error {
    io::Error::other(err.to_string())
}

impl TestPki {
    /// Generates a fresh CA and server certificate under the temporary
    /// directory, in a directory named after `name` and this process.
    pub fn generate(name: &str) -> io::Result<TestPki> {
        let dir = std::env::temp_dir().join(format!("chat-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("chat test CA {name}"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(other)?)
            .map_err(other)?;
        let server_key = KeyPair::generate().map_err(other)?;
        let server_cert =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(other)?
                .signed_by(&server_key, &ca)
                .map_err(other)?;
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        std::fs::write(&pki.ca, ca.pem())?;
        std::fs::write(&pki.cert, server_cert.pem())?;
        std::fs::write(&pki.key, server_key.serialize_pem())?;
        Ok(pki)
    }

    /// The server's files as `chat-server` flags.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client configuration trusting only the CA in `ca`.
pub fn client_config(ca: &Path) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(other)? {
        roots.add(cert.map_err(other)?).map_err(other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A chat client over TLS, with a timeout on every read.
pub struct TlsTestClient {
    /// `IP:PORT` as the server names this client.
    pub who: String,
    reader: BufReader<ReadHalf<TlsStream<TcpStream>>>,
    writer: WriteHalf<TlsStream<TcpStream>>,
}

impl TlsTestClient {
    /// Connects, verifying the server against `ca` as `127.0.0.1`, and reads
    /// the greeting.
    pub async fn connect(addr: SocketAddr, ca: &Path) -> io::Result<TlsTestClient> {
        let mut client = TlsTestClient::connect_raw(addr, ca).await?;
        let greeting = client.line().await?;
        if greeting != crate::chat_wire_greeting(&client.who) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected greeting {greeting:?}"),
            ));
        }
        Ok(client)
    }

    /// Connects and completes the handshake, reading nothing.
    pub async fn connect_raw(addr: SocketAddr, ca: &Path) -> io::Result<TlsTestClient> {
        let tcp = TcpStream::connect(addr).await?;
        let who = tcp.local_addr()?.to_string();
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = timeout(
            LINE_TIMEOUT,
            TlsConnector::from(client_config(ca)?).connect(name, tcp),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let (reader, writer) = tokio::io::split(tls);
        Ok(TlsTestClient {
            who,
            reader: BufReader::new(reader),
            writer,
        })
    }

    /// Sends `text` followed by a newline.
    pub async fn send(&mut self, text: &str) -> io::Result<()> {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .await?;
        self.writer.flush().await
    }

    /// Ends this client's input: `close_notify`, then FIN.
    pub async fn finish(&mut self) -> io::Result<()> {
        self.writer.shutdown().await
    }

    /// The next line, without its newline; `UnexpectedEof` at the end.
    pub async fn line(&mut self) -> io::Result<String> {
        crate::client::next_line(&mut self.reader, LINE_TIMEOUT).await
    }

    pub async fn expect(&mut self, expected: &str) -> io::Result<()> {
        let line = self.line().await?;
        if line == expected {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{}: expected {expected:?}, got {line:?}",
                self.who
            )))
        }
    }

    /// Reads until the server closes the connection; returns the lines read.
    pub async fn lines_until_closed(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            match self.line().await {
                Ok(line) => lines.push(line),
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(lines),
                Err(err) => return Err(err),
            }
        }
    }
}
