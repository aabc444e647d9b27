//! The browsers' door (`--web-addr`): the page and its assets, and the
//! WebSocket at `/ws` as one more participant in the same room, under the
//! same rules, against a real WebSocket client (tokio-websockets, an
//! independent implementation of RFC 6455) and, for what a well-behaved
//! client cannot send, hand-made frames on a raw socket.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer, LINE_TIMEOUT};
use chat_server::{server, Config, Model, Password};
use common::ensure;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_websockets::{ClientBuilder, Message, WebSocketStream};

for_each_model!(
    greeting_and_echo,
    both_doors_share_one_room,
    names_and_presence,
    the_password_is_asked_first,
    a_slow_browser_is_treated_like_a_slow_terminal,
    a_flooding_browser_is_cut_off,
);

#[cfg(feature = "cluster")]
for_each_model!(a_browser_and_a_terminal_chat_across_nodes);

fn web(model: Model) -> Config {
    Config::with_model(model).with(|c| c.web_addr = Some("127.0.0.1:0".into()))
}

fn web_addr(server: &TestServer) -> io::Result<SocketAddr> {
    server
        .web_addr()
        .ok_or_else(|| io::Error::other("the server has no web address"))
}

fn other(err: impl std::fmt::Display) -> io::Error {
    io::Error::other(err.to_string())
}

/// A chat client on `/ws`, with a timeout on every read.
struct WsClient<S> {
    /// `IP:PORT` as the server names this client.
    who: String,
    socket: WebSocketStream<S>,
}

impl WsClient<TcpStream> {
    /// Connects without reading anything.
    async fn connect_raw(addr: SocketAddr) -> io::Result<WsClient<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        WsClient::handshake(tcp, addr, "ws").await
    }

    /// Connects and reads the greeting.
    async fn connect(addr: SocketAddr) -> io::Result<WsClient<TcpStream>> {
        let mut client = WsClient::connect_raw(addr).await?;
        client.expect(&chat_wire::greeting(&client.who)).await?;
        Ok(client)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    async fn handshake(stream: S, addr: SocketAddr, scheme: &str) -> io::Result<WsClient<S>>
    where
        S: LocalAddr,
    {
        let who = stream.local()?.to_string();
        let uri = format!("{scheme}://{addr}/ws");
        let (socket, _response) = timeout(
            LINE_TIMEOUT,
            ClientBuilder::new()
                .uri(&uri)
                .map_err(other)?
                .connect_on(stream),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "WebSocket handshake timed out"))?
        .map_err(other)?;
        Ok(WsClient { who, socket })
    }

    async fn send(&mut self, text: &str) -> io::Result<()> {
        self.socket
            .send(Message::text(text.to_string()))
            .await
            .map_err(other)
    }

    /// The next text message; an error on a close, the end, or a timeout.
    async fn line(&mut self) -> io::Result<String> {
        loop {
            let next = timeout(LINE_TIMEOUT, self.socket.next())
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no message in time"))?;
            let message = match next {
                Some(message) => message.map_err(other)?,
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            };
            if let Some(text) = message.as_text() {
                return Ok(text.to_string());
            }
            if let Some((code, reason)) = message.as_close() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("closed: {} {reason}", u16::from(code)),
                ));
            }
        }
    }

    async fn expect(&mut self, expected: &str) -> io::Result<()> {
        let line = self.line().await?;
        ensure(line == expected, || {
            format!("expected {expected:?}, got {line:?}")
        })
    }

    /// Every text message until the server closes; and its close code.
    async fn lines_until_closed(&mut self) -> io::Result<(Vec<String>, Option<u16>)> {
        let mut lines = Vec::new();
        loop {
            let next = timeout(LINE_TIMEOUT, self.socket.next())
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "not closed in time"))?;
            match next {
                None | Some(Err(_)) => return Ok((lines, None)),
                Some(Ok(message)) => {
                    if let Some(text) = message.as_text() {
                        lines.push(text.to_string());
                    } else if let Some((code, _)) = message.as_close() {
                        return Ok((lines, Some(code.into())));
                    }
                }
            }
        }
    }
}

trait LocalAddr {
    fn local(&self) -> io::Result<SocketAddr>;
}

impl LocalAddr for TcpStream {
    fn local(&self) -> io::Result<SocketAddr> {
        self.local_addr()
    }
}

impl LocalAddr for tokio_rustls::client::TlsStream<TcpStream> {
    fn local(&self) -> io::Result<SocketAddr> {
        self.get_ref().0.local_addr()
    }
}

async fn greeting_and_echo(model: Model) -> io::Result<()> {
    let server = TestServer::start(web(model))?;
    let mut browser = WsClient::connect(web_addr(&server)?).await?;
    browser.send("hello from a browser").await?;
    browser
        .expect(&chat_wire::chat(&browser.who, "hello from a browser"))
        .await?;
    // An empty message is an empty line, which the room ignores as it does
    // for netcat; the next one still arrives.
    browser.send("").await?;
    browser.expect(&chat_wire::chat(&browser.who, "")).await?;
    browser.send("second").await?;
    browser
        .expect(&chat_wire::chat(&browser.who, "second"))
        .await
}

async fn both_doors_share_one_room(model: Model) -> io::Result<()> {
    let server = TestServer::start(web(model))?;
    let mut terminal = TestClient::connect(server.addr()).await?;
    let mut browser = WsClient::connect(web_addr(&server)?).await?;
    terminal.expect(&chat_wire::arrived(&browser.who)).await?;

    terminal.send("hi browser").await?;
    let from_terminal = chat_wire::chat(&terminal.who, "hi browser");
    browser.expect(&from_terminal).await?;
    terminal.expect(&from_terminal).await?;

    browser.send("hi terminal").await?;
    let from_browser = chat_wire::chat(&browser.who, "hi terminal");
    terminal.expect(&from_browser).await?;
    browser.expect(&from_browser).await?;

    // A terminal's invalid UTF-8 reaches the browser as valid text.
    terminal.send_raw(b"caf\xe9\n").await?;
    let sanitized = chat_wire::chat(&terminal.who, "caf\u{fffd}");
    browser.expect(&sanitized).await?;
    terminal.expect(&sanitized).await?;

    let browser_who = browser.who.clone();
    drop(browser);
    terminal.expect(&chat_wire::left(&browser_who)).await
}

async fn names_and_presence(model: Model) -> io::Result<()> {
    let server = TestServer::start(web(model).with(|c| {
        c.names = true;
        c.announce_present = true;
    }))?;
    let mut terminal = TestClient::connect_raw(server.addr()).await?;
    terminal.expect(chat_wire::NAME_PROMPT).await?;
    terminal.send("bob").await?;
    terminal.expect(&chat_wire::greeting("bob")).await?;
    terminal.expect(&chat_wire::present::<&str>(&[])).await?;

    let mut browser = WsClient::connect_raw(web_addr(&server)?).await?;
    browser.expect(chat_wire::NAME_PROMPT).await?;
    browser.send("bob").await?;
    browser.expect(chat_wire::NAME_TAKEN).await?;
    browser.send("alice").await?;
    browser.expect(&chat_wire::greeting("alice")).await?;
    browser.expect(&chat_wire::present(&["bob"])).await?;
    terminal.expect(&chat_wire::arrived("alice")).await?;

    browser.send("hello bob").await?;
    terminal
        .expect(&chat_wire::chat("alice", "hello bob"))
        .await?;
    drop(browser);
    terminal.expect(&chat_wire::left("alice")).await
}

async fn the_password_is_asked_first(model: Model) -> io::Result<()> {
    let server =
        TestServer::start(web(model).with(|c| c.password = Some(Password::new("open sesame"))))?;
    let mut browser = WsClient::connect_raw(web_addr(&server)?).await?;
    browser.send("open sesame").await?;
    browser.expect(&chat_wire::greeting(&browser.who)).await?;

    let mut guesser = WsClient::connect_raw(web_addr(&server)?).await?;
    guesser.send("guess").await?;
    guesser.expect(chat_wire::WRONG_PASSWORD).await?;
    let (after, _) = guesser.lines_until_closed().await?;
    ensure(after.is_empty(), || format!("{model}: then got {after:?}"))?;
    // Nobody heard of the guesser.
    browser.send("anyone?").await?;
    browser
        .expect(&chat_wire::chat(&browser.who, "anyone?"))
        .await
}

/// A browser that stops reading gets the slow-client policy: disconnected
/// after `--write-timeout` without progress, and the room is told.
async fn a_slow_browser_is_treated_like_a_slow_terminal(model: Model) -> io::Result<()> {
    let server = TestServer::start(web(model).without_abuse_limits().with(|c| {
        c.write_timeout = Duration::from_millis(300);
        c.max_pending = 256 * 1024;
    }))?;
    let mut talker = TestClient::connect(server.addr()).await?;
    let browser = WsClient::connect(web_addr(&server)?).await?;
    let browser_who = browser.who.clone();
    talker.expect(&chat_wire::arrived(&browser_who)).await?;
    // The browser never reads again. The talker sends rounds of 64 KB and
    // reads each round's echo before the next, so it is never behind; the
    // browser's kernel buffers (a few MB on loopback) and then its queue
    // fill, and the write timeout drops it.
    let line = "x".repeat(1000);
    let echo = chat_wire::chat(&talker.who, &line);
    let left = chat_wire::left(&browser_who);
    let mut batch = Vec::new();
    for _ in 0..64 {
        batch.extend_from_slice(line.as_bytes());
        batch.push(b'\n');
    }
    // The broadcast model notices only when the browser's writer gives up
    // waiting (--write-timeout), so the rounds are bounded in time too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for _round in 0..20_000 {
        if tokio::time::Instant::now() > deadline {
            break;
        }
        talker.send_raw(&batch).await?;
        let mut echoes = 0;
        while echoes < 64 {
            let got = talker.line().await?;
            if got == left {
                drop(browser);
                return Ok(());
            }
            ensure(got == echo, || format!("{model}: unexpected {got:?}"))?;
            echoes += 1;
        }
    }
    Err(io::Error::other(format!(
        "{model}: the browser that never reads was never dropped"
    )))
}

/// Flood control counts a browser's messages as lines.
async fn a_flooding_browser_is_cut_off(model: Model) -> io::Result<()> {
    let server = TestServer::start(web(model).with(|c| {
        c.flood_lines = 50;
        c.flood_bytes = 0;
        c.flood_burst = Duration::from_millis(100);
        c.flood_grace = Some(Duration::from_millis(300));
    }))?;
    let mut browser = WsClient::connect(web_addr(&server)?).await?;
    let mut cut_off = false;
    // Sending blocks while the server holds the browser back; it fails
    // once the server has closed.
    let _ = timeout(Duration::from_secs(30), async {
        for i in 0..20_000 {
            if browser.send(&format!("flood {i}")).await.is_err() {
                cut_off = true;
                break;
            }
        }
    })
    .await;
    let (lines, _) = browser.lines_until_closed().await?;
    ensure(lines.iter().any(|line| line == chat_wire::FLOODING), || {
        format!(
            "{model}: no flooding notice (send failed early: {cut_off}); last lines {:?}",
            lines.iter().rev().take(3).collect::<Vec<_>>()
        )
    })
}

/// `--max-clients-per-ip` is one budget for both doors.
#[tokio::test]
async fn one_address_budget_for_both_doors() -> io::Result<()> {
    let server = TestServer::start(web(Model::Sharded).with(|c| c.max_clients_per_ip = 1))?;
    let _terminal = TestClient::connect(server.addr()).await?;
    let mut tcp = TcpStream::connect(web_addr(&server)?).await?;
    let mut answer = String::new();
    timeout(LINE_TIMEOUT, tcp.read_to_string(&mut answer)).await??;
    ensure(
        answer.starts_with("HTTP/1.1 503")
            && answer
                .trim_end()
                .ends_with(chat_wire::TOO_MANY_FROM_ADDRESS),
        || format!("expected a 503 with the line, got {answer:?}"),
    )
}

/// The page, its script and style, with the security headers.
#[tokio::test]
async fn the_page_and_its_assets() -> io::Result<()> {
    let server = TestServer::start(web(Model::Sharded))?;
    let addr = web_addr(&server)?;
    for (path, content_type, needle) in [
        ("/", "text/html", "<script src=\"/app.js\""),
        ("/app.js", "text/javascript", "textContent"),
        ("/style.css", "text/css", "#lines"),
        ("/settings.json", "application/json", "\"password\":false"),
    ] {
        let (status, headers, body) = http_get(addr, path, &[]).await?;
        ensure(status == 200, || format!("{path}: status {status}"))?;
        ensure(
            headers.contains(&format!("content-type: {content_type}")),
            || format!("{path}: headers {headers}"),
        )?;
        ensure(
            headers.contains("content-security-policy: default-src 'none'; script-src 'self';"),
            || format!("{path}: no strict CSP in {headers}"),
        )?;
        ensure(body.contains(needle), || {
            format!("{path}: body lacks {needle:?}")
        })?;
    }
    // No inline script anywhere in the page.
    let (_, _, page) = http_get(addr, "/", &[]).await?;
    ensure(
        !page.contains("<script>") && !page.contains("onclick"),
        || "the page has inline script".to_string(),
    )?;
    let (status, _, _) = http_get(addr, "/nope", &[]).await?;
    ensure(status == 404, || format!("/nope: {status}"))?;
    let (status, _, _) = http_get(addr, "/ws", &[]).await?;
    ensure(status == 426, || format!("plain GET /ws: {status}"))
}

/// Cross-site WebSocket hijacking: another origin's page is refused; the
/// page's own origin and the `--web-origin` ones are let in.
#[tokio::test]
async fn foreign_origins_are_refused() -> io::Result<()> {
    let server = TestServer::start(
        web(Model::Sharded).with(|c| c.web_origins = vec!["https://chat.example.org".into()]),
    )?;
    let addr = web_addr(&server)?;
    let own = format!("http://{addr}");
    for (origin, expected) in [
        ("http://evil.example", 403),
        ("null", 403),
        (own.as_str(), 101),
        ("https://chat.example.org", 101),
        ("https://chat.example.org.evil.example", 403),
    ] {
        let (_, status) = raw_handshake(addr, Some(origin)).await?;
        ensure(status == expected, || {
            format!("Origin {origin}: expected {expected}, got {status}")
        })?;
    }
    Ok(())
}

/// What a well-behaved client cannot send: each gets its close code, and
/// the room goes on.
#[tokio::test]
async fn hostile_frames_are_refused() -> io::Result<()> {
    let server = TestServer::start(web(Model::Sharded).with(|c| c.max_line = 100))?;
    let addr = web_addr(&server)?;
    let mut witness = TestClient::connect(server.addr()).await?;

    // Exactly --max-line is fine.
    let (mut socket, _) = raw_handshake(addr, None).await?;
    let greeting = read_frame(&mut socket).await?;
    ensure(greeting.0 == 0x1, || format!("greeting frame {greeting:?}"))?;
    let who = String::from_utf8_lossy(&greeting.1)
        .trim_start_matches(chat_wire::GREETING_PREFIX)
        .to_string();
    witness.expect(&chat_wire::arrived(&who)).await?;
    let longest = "y".repeat(100);
    socket
        .write_all(&client_frame(0x1, true, longest.as_bytes()))
        .await?;
    witness.expect(&chat_wire::chat(&who, &longest)).await?;

    // One byte over, announced in a header whose payload never comes:
    // refused from the header alone.
    socket.write_all(&client_header(0x1, true, 101)).await?;
    expect_close(&mut socket, 1009).await?;
    witness.expect(&chat_wire::left(&who)).await?;

    // A huge frame announced: the same, nothing buffered.
    let (mut socket, _) = raw_handshake(addr, None).await?;
    read_frame(&mut socket).await?;
    socket.write_all(&client_header(0x1, true, 1 << 40)).await?;
    expect_close(&mut socket, 1009).await?;

    // Fragments that add up to more than --max-line.
    let (mut socket, _) = raw_handshake(addr, None).await?;
    read_frame(&mut socket).await?;
    socket
        .write_all(&client_frame(0x1, false, &[b'a'; 60]))
        .await?;
    socket
        .write_all(&client_frame(0x0, true, &[b'b'; 60]))
        .await?;
    expect_close(&mut socket, 1009).await?;

    // Binary.
    let (mut socket, _) = raw_handshake(addr, None).await?;
    read_frame(&mut socket).await?;
    socket
        .write_all(&client_frame(0x2, true, b"\x00\x01"))
        .await?;
    expect_close(&mut socket, 1003).await?;

    // Invalid UTF-8, split over two fragments.
    let (mut socket, _) = raw_handshake(addr, None).await?;
    read_frame(&mut socket).await?;
    socket
        .write_all(&client_frame(0x1, false, b"ok \xe2"))
        .await?;
    socket
        .write_all(&client_frame(0x0, true, b"\x28\xa1"))
        .await?;
    expect_close(&mut socket, 1007).await?;

    // An unmasked frame.
    let (mut socket, _) = raw_handshake(addr, None).await?;
    read_frame(&mut socket).await?;
    socket.write_all(b"\x81\x02hi").await?;
    expect_close(&mut socket, 1002).await?;

    // A ping is answered, fragments are joined, and a message holding a
    // newline is two lines.
    let (mut socket, _) = raw_handshake(addr, None).await?;
    let greeting = read_frame(&mut socket).await?;
    let who = String::from_utf8_lossy(&greeting.1)
        .trim_start_matches(chat_wire::GREETING_PREFIX)
        .to_string();
    // Its arrival, after the departures of the ones before.
    let arrived = chat_wire::arrived(&who);
    while witness.line().await? != arrived {}
    socket
        .write_all(&client_frame(0x9, true, b"are you there"))
        .await?;
    let pong = read_frame(&mut socket).await?;
    ensure(pong == (0xA, b"are you there".to_vec()), || {
        format!("pong {pong:?}")
    })?;
    socket
        .write_all(&client_frame(0x1, false, "caf".as_bytes()))
        .await?;
    socket
        .write_all(&client_frame(0x0, true, "é\nnext".as_bytes()))
        .await?;
    witness.expect(&chat_wire::chat(&who, "café")).await?;
    witness.expect(&chat_wire::chat(&who, "next")).await?;
    // A close is answered with a close, and the room hears it left.
    socket
        .write_all(&client_frame(0x8, true, &1000u16.to_be_bytes()))
        .await?;
    expect_close(&mut socket, 1000).await?;
    witness.expect(&chat_wire::left(&who)).await
}

/// WSS: the same certificate as the line port.
#[tokio::test]
async fn wss_with_the_same_certificate() -> io::Result<()> {
    let pki = chat_testkit::tls::TestPki::generate("web")?;
    let server = TestServer::start(
        web(Model::Broadcaster)
            .with(|c| c.tls = Some(chat_server::TlsFiles::new(&pki.cert, &pki.key))),
    )?;
    let addr = web_addr(&server)?;
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(chat_testkit::tls::client_config(&pki.ca)?)
        .connect(name, tcp)
        .await?;
    let mut browser = WsClient::handshake(tls, addr, "wss").await?;
    browser.expect(&chat_wire::greeting(&browser.who)).await?;
    let mut terminal = chat_testkit::tls::TlsTestClient::connect(server.addr(), &pki.ca).await?;
    browser.expect(&chat_wire::arrived(&terminal.who)).await?;
    terminal.send("over TLS").await?;
    browser
        .expect(&chat_wire::chat(&terminal.who, "over TLS"))
        .await
}

/// A handshake that never finishes is closed; a client that never answers
/// pings is dropped. On paused time: the waits are virtual.
#[tokio::test(start_paused = true)]
async fn unfinished_handshakes_and_silent_clients_time_out() -> io::Result<()> {
    // Bound by the server later: a port no connection can take meanwhile.
    let web_port =
        std::net::SocketAddr::from(([127, 0, 0, 1], chat_testkit::ports::unused_port()?));
    let listener = server::bind("127.0.0.1:0").await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config::with_model(Model::Locked).with(|c| {
        c.web_addr = Some(web_port.to_string());
        c.keepalive = Some(Duration::from_secs(5));
    });
    let serving = tokio::spawn(server::run(listener, config, async move {
        let _ = stopped.await;
    }));
    // Until the server listens (a refused connect is retried).
    let mut half = loop {
        match TcpStream::connect(web_port).await {
            Ok(stream) => break stream,
            Err(_) => tokio::task::yield_now().await,
        }
    };
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await?;
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    timeout(Duration::from_secs(60), half.read_to_end(&mut rest)).await??;
    let waited = started.elapsed();
    ensure(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        || format!("closed after {waited:?}"),
    )?;

    // A client that answers nothing: pinged, then dropped.
    let (mut socket, _) = raw_handshake(web_port, None).await?;
    read_frame(&mut socket).await?; // greeting
    let ping = read_frame(&mut socket).await?;
    ensure(ping.0 == 0x9, || format!("expected a ping, got {ping:?}"))?;
    let mut rest = Vec::new();
    timeout(Duration::from_secs(60), socket.read_to_end(&mut rest)).await??;

    // One that answers stays.
    let (mut socket, _) = raw_handshake(web_port, None).await?;
    read_frame(&mut socket).await?;
    for _ in 0..3 {
        let ping = read_frame(&mut socket).await?;
        ensure(ping.0 == 0x9, || format!("expected a ping, got {ping:?}"))?;
        socket.write_all(&client_frame(0xA, true, &ping.1)).await?;
    }
    let _ = stop.send(());
    let _ = serving.await;
    Ok(())
}

/// A GET with `headers`; status, lower-cased headers, body.
async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<(u16, String, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    timeout(LINE_TIMEOUT, tcp.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// A WebSocket handshake by hand; the socket and the status.
async fn raw_handshake(addr: SocketAddr, origin: Option<&str>) -> io::Result<(TcpStream, u16)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    if let Some(origin) = origin {
        request.push_str(&format!("Origin: {origin}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    // The response head, byte by byte so that no frame is read with it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = timeout(LINE_TIMEOUT, tcp.read(&mut byte)).await??;
        if read == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    if status == 101 {
        ensure(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                || head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            || format!("wrong accept key in {head}"),
        )?;
    }
    Ok((tcp, status))
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked client frame header announcing `len` bytes.
fn client_header(opcode: u8, fin: bool, len: u64) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&len.to_be_bytes());
    }
    frame.extend_from_slice(&MASK);
    frame
}

fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = client_header(opcode, fin, payload.len() as u64);
    frame.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, byte)| byte ^ MASK[i % 4]),
    );
    frame
}

/// The next server frame: opcode and payload.
async fn read_frame(socket: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    timeout(LINE_TIMEOUT, socket.read_exact(&mut head))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no frame in time"))??;
    ensure(head[1] & 0x80 == 0, || "a masked server frame".to_string())?;
    let len = match head[1] & 0x7F {
        126 => {
            let mut len = [0u8; 2];
            socket.read_exact(&mut len).await?;
            u64::from(u16::from_be_bytes(len))
        }
        127 => {
            let mut len = [0u8; 8];
            socket.read_exact(&mut len).await?;
            u64::from_be_bytes(len)
        }
        len => u64::from(len),
    };
    let mut payload = vec![0u8; len as usize];
    socket.read_exact(&mut payload).await?;
    Ok((head[0] & 0x0F, payload))
}

/// Reads frames until a close, which must carry `code`; then the end.
async fn expect_close(socket: &mut TcpStream, code: u16) -> io::Result<()> {
    loop {
        let (opcode, payload) = read_frame(socket).await?;
        if opcode == 0x8 {
            let got = payload
                .get(..2)
                .map(|code| u16::from_be_bytes([code[0], code[1]]));
            ensure(got == Some(code), || {
                format!(
                    "expected close {code}, got {got:?} ({:?})",
                    String::from_utf8_lossy(payload.get(2..).unwrap_or_default())
                )
            })?;
            let mut rest = Vec::new();
            timeout(LINE_TIMEOUT, socket.read_to_end(&mut rest))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "not closed after the close frame")
                })?
                .or_else(|err| {
                    if err.kind() == io::ErrorKind::ConnectionReset {
                        Ok(0)
                    } else {
                        Err(err)
                    }
                })?;
            return Ok(());
        }
    }
}

/// `--max-client-memory` counts a browser's unfinished message as it
/// counts a terminal's unfinished line: the largest holder is evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_message_counts_towards_the_memory_budget() -> io::Result<()> {
    // As in tests/it/limits.rs: two terminals hold 1 KiB partial lines (16 KiB
    // buffers), under the ~49 KiB budget a 16 KiB --max-line allows.
    let server = TestServer::start(web(Model::Sharded).with(|c| {
        c.max_line = 16 * 1024;
        c.max_client_memory = 50_000;
    }))?;
    let mut terminals = Vec::new();
    for _ in 0..2 {
        let mut terminal = TestClient::connect(server.addr()).await?;
        terminal.send_raw(&[b's'; 1024]).await?;
        terminals.push(terminal);
    }
    let (mut hog, _) = raw_handshake(web_addr(&server)?, None).await?;
    read_frame(&mut hog).await?; // greeting
                                 // 15 KiB of a message whose last fragment never comes.
    hog.write_all(&client_frame(0x1, false, &[b'h'; 15 * 1024]))
        .await?;
    loop {
        let (opcode, payload) = read_frame(&mut hog).await?;
        if opcode == 0x1 && payload == chat_wire::TOO_MUCH_MEMORY.as_bytes() {
            return Ok(());
        }
        ensure(opcode == 0x1, || {
            format!("closed without the memory notice: {opcode} {payload:?}")
        })?;
    }
}

/// Under `--cluster` a browser is one more participant on its node: a
/// WebSocket client on one node and a netcat-style client on another (two
/// nodes, a real `nats-server`), both named under `--names`, hear each
/// other's arrival, lines and departure, both ways. Without `nats-server`
/// the test says so and passes, unless `CI` or `CHAT_REQUIRE_NATS` is set.
#[cfg(feature = "cluster")]
async fn a_browser_and_a_terminal_chat_across_nodes(model: Model) -> io::Result<()> {
    use common::cluster::{test_cluster, wait_for, Node, JOIN_TIMEOUT};
    use tokio::time::Instant;

    let Some(broker) = common::nats::Broker::start()? else {
        return Ok(());
    };
    // A longer bound on each broker call: the room's first named join
    // makes the names bucket (as in tests/cluster/cluster_names.rs).
    let cluster = || test_cluster(&broker.url()).with(|c| c.ack_timeout = Duration::from_secs(3));
    let config = || web(model).with(|c| c.names = true);
    let nodes = [
        Node::start_with(cluster(), config())?,
        Node::start_with(cluster(), config())?,
    ];
    for node in &nodes {
        node.joined(1).await?;
    }

    // Names are refused while a node cannot reach the names bucket yet:
    // ask again, as a person would, within a bound.
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let heard_before = nodes[0].counters.snapshot().received;
    let mut terminal = TestClient::connect_raw(nodes[1].addr()).await?;
    terminal.expect(chat_wire::NAME_PROMPT).await?;
    loop {
        terminal.send("tess").await?;
        let answer = terminal.line().await?;
        if answer == chat_wire::greeting("tess") {
            terminal.who = "tess".into();
            break;
        }
        ensure(
            answer == chat_wire::NAMES_UNAVAILABLE && Instant::now() < deadline,
            || format!("the terminal asked for tess, got {answer:?}"),
        )?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The terminal's arrival reaches the browser's node before the browser
    // comes (as in one process, where it would not be told of it).
    wait_for(
        &nodes[0].counters,
        |c| c.received,
        heard_before + 1,
        "the terminal's arrival on node 0",
    )
    .await?;
    let mut browser = WsClient::connect_raw(web_addr(&nodes[0].server)?).await?;
    browser.expect(chat_wire::NAME_PROMPT).await?;
    loop {
        browser.send("bree").await?;
        let answer = browser.line().await?;
        if answer == chat_wire::greeting("bree") {
            browser.who = "bree".into();
            break;
        }
        ensure(
            answer == chat_wire::NAMES_UNAVAILABLE && Instant::now() < deadline,
            || format!("the browser asked for bree, got {answer:?}"),
        )?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminal.expect(&chat_wire::arrived("bree")).await?;

    browser.send("hello from a browser on node 0").await?;
    let from_browser = chat_wire::chat("bree", "hello from a browser on node 0");
    terminal.expect(&from_browser).await?;
    browser.expect(&from_browser).await?;

    terminal.send("hello from a terminal on node 1").await?;
    let from_terminal = chat_wire::chat("tess", "hello from a terminal on node 1");
    browser.expect(&from_terminal).await?;
    terminal.expect(&from_terminal).await?;

    drop(browser);
    terminal.expect(&chat_wire::left("bree")).await
}
