//! `netcat [HOST PORT | HOST:PORT]`: a port of the seed's netcat.go, over
//! TCP or TLS.
//!
//! Copies stdin to the server and the server to stdout. At the end of stdin
//! it half-closes the connection (over TLS: `close_notify`, then FIN) and
//! keeps printing until the server closes its side, so the server's last
//! lines (the echo of our own last line, say) are never cut off. When the
//! server closes first, it exits at once rather than waiting for more
//! input, as the seed's netcat would. When stdout goes away (`netcat ... |
//! head -1`) it exits quietly: nobody is left to read the room.
//!
//! One thread of tokio: the TLS stream cannot be shared by two blocking
//! threads, and `tokio::io::split` serves plain TCP and TLS alike.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A message on stderr, dropped if stderr is gone (`eprintln!` would
/// panic): netcat's own complaints must never cost the user a crash.
macro_rules! complain {
    ($($arg:tt)*) => {{
        let mut err = io::stderr().lock();
        let _ = writeln!(err, $($arg)*).and_then(|()| err.flush());
    }};
}

const DEFAULT_HOST: &str = "localhost";
const DEFAULT_PORT: u16 = 8000;

/// Connects stdin and stdout to a chat server, like `nc HOST PORT`.
///
/// Lines typed are sent to the server; everything the server sends is
/// printed. Ctrl-D (end of input) half-closes the connection: netcat stops
/// sending, then keeps printing until the server closes its side, so the
/// server's last lines (the echo of your own last line, `has left`
/// notices) still arrive. Ctrl-C quits at once.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Server host (name or IP), or HOST:PORT in one argument [default: localhost:8000].
    host: Option<String>,

    /// Server port, when HOST is given alone (as `nc HOST PORT` takes it).
    port: Option<String>,

    /// Speak TLS, verifying the server's certificate against the system's
    /// trusted roots (or --ca).
    #[arg(long)]
    tls: bool,

    /// Trust the certificates in this PEM file instead of the system's roots (implies --tls).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,

    /// Do not verify the server's certificate at all (implies --tls). Anyone
    /// on the path can then read and change the conversation.
    #[arg(long)]
    insecure: bool,
}

/// Where to connect, as the user gave it.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
}

const EXPECTED: &str = "expected HOST PORT or HOST:PORT (for example `localhost 8000`, \
                        `127.0.0.1:8000` or `[::1]:8000`)";

fn parse_port(port: &str) -> Result<u16, String> {
    port.parse::<u16>()
        .map_err(|_| format!("`{port}` is not a port number (0-65535); {EXPECTED}"))
}

/// Strips the brackets of an IPv6 literal: `[::1]` names the host `::1`.
fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(host)
}

impl Target {
    fn parse(host: Option<&str>, port: Option<&str>) -> Result<Target, String> {
        let (host, port) = match (host, port) {
            (None, _) => (DEFAULT_HOST, DEFAULT_PORT),
            (Some(host), Some(port)) => (host, parse_port(port)?),
            (Some(addr), None) => {
                // The last colon splits HOST:PORT; a bare IPv6 address has
                // several and no brackets, so it is not taken as one.
                let Some((host, port)) = addr.rsplit_once(':') else {
                    return Err(format!("`{addr}` has no port; {EXPECTED}"));
                };
                if host.contains(':') && !host.starts_with('[') {
                    return Err(format!("`{addr}` is ambiguous; {EXPECTED}"));
                }
                (host, parse_port(port)?)
            }
        };
        let host = bare_host(host);
        if host.is_empty() {
            return Err(format!("the host is empty; {EXPECTED}"));
        }
        Ok(Target {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let target = match Target::parse(args.host.as_deref(), args.port.as_deref()) {
        Ok(target) => target,
        Err(err) => {
            complain!("netcat: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            complain!("netcat: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(&args, &target));
    // Stdin is read on a blocking thread that may wait for input forever;
    // the conversation is over, so do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            complain!("netcat: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args, target: &Target) -> Result<(), String> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|err| format!("cannot connect to {target}: {err}"))?;
    // Lines are typed one at a time; Nagle would only delay them.
    let _ = tcp.set_nodelay(true);
    if args.tls || args.ca.is_some() || args.insecure {
        let connector = TlsConnector::from(Arc::new(tls_config(args)?));
        let name = ServerName::try_from(target.host.clone())
            .map_err(|err| format!("`{}` cannot name a TLS server: {err}", target.host))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|err| format!("TLS handshake with {target} failed: {err}"))?;
        chat(tls).await
    } else {
        chat(tcp).await
    }
    .map_err(|err| format!("{target}: {err}"))
}

fn tls_config(args: &Args) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| format!("TLS setup: {err}"))?;
    if args.insecure {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::AcceptAnything::new()))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match &args.ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|err| format!("--ca {}: {err}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "--ca {}: no certificate in it (expected PEM `BEGIN CERTIFICATE` blocks)",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no trusted root certificates found on this system; pass --ca FILE".into(),
                );
            }
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Runs the two pumps until the server closes its side.
async fn chat<S: AsyncRead + AsyncWrite>(stream: S) -> io::Result<()> {
    let (mut from_server, mut to_server) = tokio::io::split(stream);
    let send = async {
        let mut stdin = tokio::io::stdin();
        let sent = tokio::io::copy(&mut stdin, &mut to_server).await;
        // Half-close whatever happened to stdin: the server then finishes
        // with us and closes, which ends the printing side.
        let _ = to_server.shutdown().await;
        if let Err(err) = sent {
            // A server that is already gone is reported by the reading side.
            if err.kind() != io::ErrorKind::BrokenPipe
                && err.kind() != io::ErrorKind::ConnectionReset
            {
                complain!("netcat: {err}");
            }
        }
        // Sending is over; the printing side decides when we exit.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        printed = print_all(&mut from_server) => printed,
        () = send => Ok(()),
    }
}

/// Copies the server's bytes to stdout until the server closes.
async fn print_all<R: AsyncRead + Unpin>(from_server: &mut R) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let stdout = io::stdout();
    loop {
        let n = match from_server.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                // A TLS peer that closed without close_notify: the
                // conversation is over all the same.
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        // A blocking write: stdout is a terminal or a pipe, and when it is
        // full, reading more from the server could only pile up here.
        let mut out = stdout.lock();
        match out.write_all(&buf[..n]).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(err) => return Err(io::Error::new(err.kind(), format!("stdout: {err}"))),
        }
    }
}

/// `--insecure`: a verifier that accepts any certificate but still checks
/// the handshake signatures, so the connection is at least to whoever holds
/// the key the certificate names.
mod insecure {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};

    #[derive(Debug)]
    pub struct AcceptAnything(CryptoProvider);

    impl AcceptAnything {
        pub fn new() -> AcceptAnything {
            AcceptAnything(rustls::crypto::ring::default_provider())
        }
    }

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Target;

    fn target(host: &str, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn addresses_are_taken_as_nc_and_as_the_seed_take_them() {
        assert_eq!(Target::parse(None, None), Ok(target("localhost", 8000)));
        assert_eq!(
            Target::parse(Some("example.org"), Some("6697")),
            Ok(target("example.org", 6697))
        );
        assert_eq!(
            Target::parse(Some("127.0.0.1:8000"), None),
            Ok(target("127.0.0.1", 8000))
        );
        assert_eq!(Target::parse(Some("[::1]:9"), None), Ok(target("::1", 9)));
        assert_eq!(Target::parse(Some("::1"), Some("9")), Ok(target("::1", 9)));
        assert_eq!(target("::1", 9).to_string(), "[::1]:9");
    }

    #[test]
    fn a_bad_address_says_what_was_expected() {
        for (host, port) in [
            (Some("localhost"), None),
            (Some("localhost:http"), None),
            (Some("localhost"), Some("70000")),
            (Some("::1"), None),
            (Some(":8000"), None),
        ] {
            let err = Target::parse(host, port).expect_err("accepted a bad address");
            assert!(err.contains("expected HOST PORT or HOST:PORT"), "{err}");
        }
    }
}
