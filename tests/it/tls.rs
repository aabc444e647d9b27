//! TLS end to end: chat over TLS in every model, a plaintext client on the
//! TLS port, a handshake that never comes (on paused time), and a
//! certificate reloaded on SIGHUP by the real binary. Certificates are
//! made at run time (`chat_testkit::tls`); no key is committed.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, TlsFiles};
use chat_testkit::process::{ServerProcess, Signal, PROCESS_TIMEOUT};
use chat_testkit::tls::{TestPki, TlsTestClient};
use common::ensure;
use common::in_process::InProcess;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

for_each_model!(
    chat_over_tls,
    a_plaintext_client_is_closed_and_counted,
    names_over_tls
);

fn tls_config(model: Model, pki: &TestPki) -> Config {
    Config::with_model(model).with(|c| c.tls = Some(TlsFiles::new(&pki.cert, &pki.key)))
}

/// The seed's exchange over TLS, ending with a half-close (`close_notify`)
/// after which the leaver still gets the echo of its last line.
async fn chat_over_tls(model: Model) -> io::Result<()> {
    let pki = TestPki::generate(&format!("chat-{model}"))?;
    let server = TestServer::start(tls_config(model, &pki))?;
    let mut first = TlsTestClient::connect(server.addr(), &pki.ca).await?;
    let mut second = TlsTestClient::connect(server.addr(), &pki.ca).await?;
    first.expect(&chat_wire::arrived(&second.who)).await?;

    second.send("Hi over TLS").await?;
    let hi = chat_wire::chat(&second.who, "Hi over TLS");
    first.expect(&hi).await?;
    second.expect(&hi).await?;

    // Many lines at once: the writer's coalescing must still deliver all.
    for n in 0..200 {
        first.send(&format!("burst {n}")).await?;
    }
    first.send("last words").await?;
    first.finish().await?;
    let mut heard = first.lines_until_closed().await?;
    ensure(heard.len() == 201, || {
        format!("{model}: the leaver got {} lines", heard.len())
    })?;
    ensure(
        heard.pop() == Some(chat_wire::chat(&first.who, "last words")),
        || format!("{model}: no echo of the last line before the close"),
    )?;
    for n in 0..200 {
        second
            .expect(&chat_wire::chat(&first.who, &format!("burst {n}")))
            .await?;
    }
    second
        .expect(&chat_wire::chat(&first.who, "last words"))
        .await?;
    second.expect(&chat_wire::left(&first.who)).await
}

/// `--names` over TLS: the name and the first chat line in one record; the
/// lobby takes only the name, the line after it is chat.
async fn names_over_tls(model: Model) -> io::Result<()> {
    let pki = TestPki::generate(&format!("names-{model}"))?;
    let server = TestServer::start(tls_config(model, &pki).with(|c| c.names = true))?;
    let mut alice = TlsTestClient::connect_raw(server.addr(), &pki.ca).await?;
    alice.expect(chat_wire::NAME_PROMPT).await?;
    alice.send("alice\nhello from alice").await?;
    alice.expect(&chat_wire::greeting("alice")).await?;
    alice
        .expect(&chat_wire::chat("alice", "hello from alice"))
        .await?;
    let mut bob = TlsTestClient::connect_raw(server.addr(), &pki.ca).await?;
    bob.expect(chat_wire::NAME_PROMPT).await?;
    bob.send("alice").await?;
    bob.expect(chat_wire::NAME_TAKEN).await?;
    bob.send("bob").await?;
    bob.expect(&chat_wire::greeting("bob")).await?;
    alice.expect(&chat_wire::arrived("bob")).await
}

/// Someone types at the TLS port in plaintext: the handshake fails at once,
/// the connection closes, it is counted, and TLS clients are unaffected.
async fn a_plaintext_client_is_closed_and_counted(model: Model) -> io::Result<()> {
    let pki = TestPki::generate(&format!("plain-{model}"))?;
    let server = TestServer::start(
        tls_config(model, &pki).with(|c| c.metrics_addr = Some("127.0.0.1:0".into())),
    )?;
    let mut tls = TlsTestClient::connect(server.addr(), &pki.ca).await?;
    let mut plain = TestClient::connect_raw(server.addr()).await?;
    plain.send("hello?").await?;
    let got = plain.lines_until_closed().await?;
    ensure(got.is_empty(), || {
        format!("{model}: the plaintext client got {got:?}")
    })?;

    tls.send("still fine").await?;
    tls.expect(&chat_wire::chat(&tls.who, "still fine")).await?;

    let metrics = server
        .metrics_addr()
        .ok_or_else(|| io::Error::other("no metrics"))?;
    let mut scrape = TcpStream::connect(metrics).await?;
    tokio::io::AsyncWriteExt::write_all(
        &mut scrape,
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let mut body = String::new();
    tokio::time::timeout(PROCESS_TIMEOUT, scrape.read_to_string(&mut body))
        .await
        .map_err(|_| io::Error::other("no scrape"))??;
    let failed = "chat_connections_refused_total{reason=\"tls_handshake_failed\"} 1";
    ensure(body.contains(failed), || {
        format!("{model}: expected {failed:?} in\n{body}")
    })?;
    ensure(body.contains("chat_clients_connected 1"), || {
        format!("{model}: the failed handshake counts as connected:\n{body}")
    })
}

/// A client that connects and never says hello is closed exactly
/// `--tls-handshake-timeout` later (paused time: the clock jumps to the
/// timer), and holds a `--max-clients` slot until then.
#[tokio::test(start_paused = true)]
async fn a_handshake_that_never_comes_times_out() -> io::Result<()> {
    let pki = TestPki::generate("timeout")?;
    let handshake_timeout = Duration::from_secs(3);
    for model in Model::ALL {
        let server = InProcess::start(tls_config(model, &pki).with(|c| {
            c.tls_handshake_timeout = handshake_timeout;
            c.max_clients = 1;
        }))
        .await?;
        let addr = server.addr();
        let connected = Instant::now();
        let mut silent = TcpStream::connect(addr).await?;
        // The silent one holds the only slot: the next is told so.
        let mut next = TestClient::connect_raw(addr).await?;
        next.expect(chat_wire::SERVER_FULL).await?;

        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(handshake_timeout * 2, silent.read(&mut buf))
            .await
            .map_err(|_| {
                io::Error::other(format!("{model}: the silent client was never closed"))
            })?;
        ensure(matches!(read, Ok(0)) || read.is_err(), || {
            format!("{model}: the silent client got {read:?}")
        })?;
        let after = connected.elapsed();
        ensure(after == handshake_timeout, || {
            format!("{model}: closed after {after:?}, not {handshake_timeout:?}")
        })?;
        // The slot is free again.
        let tls = TlsTestClient::connect(addr, &pki.ca).await?;
        drop(tls);
        server.stop().await?;
    }
    Ok(())
}

/// Waits for `needle` in the log file at `path`.
fn wait_for_log(path: &std::path::Path, needle: &str) -> io::Result<()> {
    let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
    loop {
        if std::fs::read_to_string(path)?.contains(needle) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!("no {needle:?} in the log")));
        }
        // A log file has no change notification to wait on.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGHUP rereads the certificate: new connections get the new one,
/// connections already up keep chatting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() -> io::Result<()> {
    let old = TestPki::generate("reload-old")?;
    let new = TestPki::generate("reload-new")?;
    // The server's files, overwritten below as a renewal would.
    let served = TestPki::generate("reload-served")?;
    std::fs::copy(&old.cert, &served.cert)?;
    std::fs::copy(&old.key, &served.key)?;
    let log = served.dir.join("server.log");
    let args = served.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start_with_log(&args, &log)?;
    let addr: SocketAddr = server.addr.parse().map_err(io::Error::other)?;

    let mut before = TlsTestClient::connect(addr, &old.ca).await?;
    std::fs::copy(&new.cert, &served.cert)?;
    std::fs::copy(&new.key, &served.key)?;
    server.process.signal(Signal::SIGHUP)?;
    wait_for_log(&log, "reloaded the TLS certificate")?;

    let after = TlsTestClient::connect(addr, &new.ca).await?;
    before.expect(&chat_wire::arrived(&after.who)).await?;
    ensure(
        TlsTestClient::connect_raw(addr, &old.ca).await.is_err(),
        || "a new connection still got the old certificate".into(),
    )?;
    before.send("still here").await?;
    before
        .expect(&chat_wire::chat(&before.who, "still here"))
        .await
}
