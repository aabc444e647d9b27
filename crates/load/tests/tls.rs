//! `--tls`: `fanout` and `idle` against a server with `--tls-cert`, over
//! its line port and over its web port (`wss://`), trusting the test CA or
//! the server's own certificate; a server the CA did not sign is refused
//! with a message that says so.
//!
//! Loads are tiny: these check that the tool speaks TLS and counts right,
//! not how fast anything is.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use chat_load::protocol::Protocol;
use chat_load::tls::TlsClient;
use chat_load::{Options, Scenario};
use chat_server::harness::TestServer;
use chat_server::{Config, TlsFiles};
use chat_testkit::ensure;
use chat_testkit::tls::TestPki;

/// A server with TLS on its line port and its web port.
fn tls_server(pki: &TestPki) -> io::Result<TestServer> {
    TestServer::start(Config::default().with(|c| {
        c.tls = Some(TlsFiles::new(pki.cert.clone(), pki.key.clone()));
        c.web_addr = Some("127.0.0.1:0".into());
    }))
}

/// Three quiet clients speaking `protocol` over TLS to `addr`, trusting `ca`.
fn options(
    scenario: Scenario,
    addr: SocketAddr,
    protocol: Protocol,
    ca: &Path,
) -> io::Result<Options> {
    let mut opts = Options::new(scenario, addr);
    opts.clients = 3;
    opts.messages = 40;
    opts.progress = false;
    opts.duration = Duration::from_secs(20);
    opts.hold = Duration::from_millis(100);
    opts.protocol = protocol;
    opts.tls =
        Some(TlsClient::from_ca_file(ca).map_err(|err| io::Error::other(format!("{err:#}")))?);
    Ok(opts)
}

async fn run(scenario: Scenario, opts: &Options) -> io::Result<chat_load::Report> {
    chat_load::run(scenario, opts)
        .await
        .map_err(|err| io::Error::other(format!("{err:#}")))
}

/// Everyone hears everyone, its own echo included: 3 × 40 sent, 3 × 120
/// delivered, none lost or out of order.
async fn fanout_over_tls(protocol: Protocol, trust_the_leaf: bool) -> io::Result<()> {
    let pki = TestPki::generate(&format!("load-fanout-{}-{trust_the_leaf}", protocol.name()))?;
    let server = tls_server(&pki)?;
    let addr = match protocol {
        Protocol::Ws => server
            .web_addr()
            .ok_or_else(|| io::Error::other("no web address"))?,
        _ => server.addr(),
    };
    let ca = if trust_the_leaf { &pki.cert } else { &pki.ca };
    let opts = options(Scenario::Fanout, addr, protocol, ca)?;
    let report = run(Scenario::Fanout, &opts).await?;
    let d = report
        .deliveries
        .as_ref()
        .ok_or_else(|| io::Error::other("no deliveries"))?;
    ensure(report.complete, || report.to_table())?;
    ensure(
        (d.sent, d.delivered, d.lost, d.order_violations) == (120, 360, 0, 0),
        || report.to_table(),
    )?;
    ensure(report.notes.is_empty(), || format!("{:?}", report.notes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_tls_on_the_line_port() -> io::Result<()> {
    fanout_over_tls(Protocol::Line, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_wss_on_the_web_port() -> io::Result<()> {
    fanout_over_tls(Protocol::Ws, false).await
}

/// A server's own certificate given as `--tls-ca` is trusted as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_certificate_can_be_the_ca() -> io::Result<()> {
    fanout_over_tls(Protocol::Line, true).await
}

/// n idle TLS connections, line and wss: every arrival announced to
/// everyone already there, none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_over_tls_and_wss() -> io::Result<()> {
    let pki = TestPki::generate("load-idle")?;
    let server = tls_server(&pki)?;
    let web = server
        .web_addr()
        .ok_or_else(|| io::Error::other("no web address"))?;
    for (protocol, addr) in [(Protocol::Line, server.addr()), (Protocol::Ws, web)] {
        let mut opts = options(Scenario::Idle, addr, protocol, &pki.ca)?;
        opts.clients = 20;
        let report = run(Scenario::Idle, &opts).await?;
        let idle = report
            .idle
            .as_ref()
            .ok_or_else(|| io::Error::other("no idle figures"))?;
        ensure(report.complete, || report.to_table())?;
        ensure(
            (idle.connections, idle.announcements, idle.dropped) == (20, 190, 0),
            || format!("{}: {}", protocol.name(), report.to_table()),
        )?;
    }
    Ok(())
}

/// A CA that did not sign the server's certificate: the run fails with
/// the handshake named, before any load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_ca_did_not_sign_is_refused() -> io::Result<()> {
    let pki = TestPki::generate("load-ours")?;
    let stranger = TestPki::generate("load-stranger")?;
    let server = tls_server(&pki)?;
    let opts = options(
        Scenario::Fanout,
        server.addr(),
        Protocol::Line,
        &stranger.ca,
    )?;
    let err = match run(Scenario::Fanout, &opts).await {
        Ok(report) => return Err(io::Error::other(format!("ran: {}", report.to_table()))),
        Err(err) => err.to_string(),
    };
    ensure(err.contains("TLS handshake"), || err.clone())
}

/// `--tls` refuses what it cannot run rather than running it in plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_the_scenarios_it_does_not_run() -> io::Result<()> {
    let pki = TestPki::generate("load-refuse")?;
    let server = tls_server(&pki)?;
    let opts = options(Scenario::Rate, server.addr(), Protocol::Line, &pki.ca)?;
    let err = match run(Scenario::Rate, &opts).await {
        Ok(report) => return Err(io::Error::other(format!("ran: {}", report.to_table()))),
        Err(err) => err.to_string(),
    };
    ensure(
        err.contains("--tls runs fanout, slow and idle only"),
        || err.clone(),
    )
}
