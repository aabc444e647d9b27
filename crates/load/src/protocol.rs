//! The client protocols chat-load speaks (`--protocol`): the chat's own
//! line protocol, NATS core and Redis pub/sub. The latter two exist so that
//! the anchors (a NATS cluster, a Redis pub/sub room) are measured with the
//! same tool, payloads and accounting as our servers.
//!
//! What this module owns: connecting and subscribing ([`connect`]), framing
//! a payload as a publication ([`Framing`]), and telling the receive path
//! which lines are protocol frames rather than chat ([`Protocol::is_frame`]).
//! The receive path itself stays the one of `client.rs`: both NATS's
//! `MSG subject sid size\r\n<body>\r\n` and RESP's bulk strings put the body
//! on a line of its own, so the line splitter hands the body to the same
//! payload decoder and the frames around it to [`Protocol::is_frame`].
//! Every published body is `IP:PORT: payload`, the client's own address as
//! the chat server would prefix it, so the bytes per delivery match.
//!
//! Both brokers deliver a subscriber's own publications back to it (NATS
//! by default, `echo` on; Redis to every subscriber of the channel), so
//! "everyone receives everything, own echo included" holds as for the chat.
//! A subscribed Redis connection cannot publish, so a Redis client has two
//! connections: the subscriber and a publisher with `CLIENT REPLY OFF`, so
//! that nobody has to drain a reply per publication.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::client::{self, Conn, LineReader, GREETING_TIMEOUT};
use crate::payload::{Codec, Payload};
use crate::tls::{Stream, TlsClient};

/// The subject (NATS) or channel (Redis) the clients share by default.
pub const DEFAULT_SUBJECT: &str = "chat-load";

/// Lines a handshake may read before it gives up on a server that talks
/// but never says what we wait for.
const HANDSHAKE_LINES: usize = 64;

/// A client protocol.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The gopl.io chat's line protocol.
    #[default]
    Line,
    /// NATS core: PUB and SUB on one subject.
    Nats,
    /// Redis pub/sub: PUBLISH and SUBSCRIBE on one channel.
    Redis,
    /// The chat's line protocol through its browser door (`chat-server
    /// --web-addr`): one WebSocket text message per line.
    Ws,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Line => "line",
            Protocol::Nats => "nats",
            Protocol::Redis => "redis",
            Protocol::Ws => "ws",
        }
    }

    /// Whether this is the chat itself (announcements, names, greetings),
    /// whichever door it comes through.
    #[inline]
    pub fn is_chat(self) -> bool {
        matches!(self, Protocol::Line | Protocol::Ws)
    }

    /// Whether a line that is not one of our payloads is the protocol's
    /// framing (a NATS `MSG` header, `PONG`, `+OK`; RESP's array and bulk
    /// headers, the `message` kind and the channel name). Errors (`-ERR`,
    /// RESP's `-`) are not frames: they count as "other" lines.
    #[inline]
    pub fn is_frame(self, line: &[u8]) -> bool {
        match self {
            Protocol::Line | Protocol::Ws => false,
            Protocol::Nats => !line.starts_with(b"-ERR"),
            Protocol::Redis => !line.starts_with(b"-"),
        }
    }
}

/// How one client frames a payload as a message on the wire.
#[derive(Debug, Clone)]
pub struct Framing {
    protocol: Protocol,
    /// Everything before the payload: the protocol's header and `IP:PORT: `.
    head: Vec<u8>,
}

impl Framing {
    /// The chat's line protocol: the payload and a newline, nothing else
    /// (the server adds the sender's name).
    pub fn line() -> Framing {
        Framing {
            protocol: Protocol::Line,
            head: Vec::new(),
        }
    }

    /// Publications on `subject` by the client known as `who`, of payloads
    /// `codec` makes.
    pub fn new(protocol: Protocol, who: &str, subject: &str, codec: &Codec) -> Framing {
        let body = who.len() + 2 + codec.size();
        let mut head = match protocol {
            Protocol::Line => return Framing::line(),
            Protocol::Ws => {
                return Framing {
                    protocol,
                    head: Vec::new(),
                }
            }
            Protocol::Nats => format!("PUB {subject} {body}\r\n"),
            Protocol::Redis => format!(
                "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{subject}\r\n${body}\r\n",
                subject.len()
            ),
        }
        .into_bytes();
        head.extend_from_slice(who.as_bytes());
        head.extend_from_slice(b": ");
        Framing { protocol, head }
    }

    /// Appends one message carrying `payload` to `out`.
    #[inline]
    pub fn encode_into(&self, codec: &Codec, out: &mut Vec<u8>, payload: Payload) {
        if self.protocol == Protocol::Ws {
            // A text frame whose payload is the line without its newline.
            crate::ws::encode_header(out, codec.size());
            codec.encode_into(out, payload);
            out.pop();
            return;
        }
        out.extend_from_slice(&self.head);
        codec.encode_into(out, payload);
        if self.protocol != Protocol::Line {
            // Both protocols end a message with CRLF, not the line's LF.
            out.pop();
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Connects one client speaking `protocol` to `addr` and, for the brokers,
/// subscribes it to `subject`; returns once the subscription is in place
/// (NATS: the `PONG` after `SUB`; Redis: the `subscribe` confirmation), so
/// nothing published afterwards by a client of the same server is missed.
/// `tls` is for the chat's protocols only (the brokers are spoken in plain
/// TCP).
pub async fn connect(
    protocol: Protocol,
    addr: SocketAddr,
    buffer: usize,
    subject: &str,
    tls: Option<&TlsClient>,
) -> anyhow::Result<Conn> {
    if tls.is_some() && !protocol.is_chat() {
        bail!("--tls is for --protocol line and ws only");
    }
    match protocol {
        Protocol::Line => client::connect(addr, buffer, tls).await,
        Protocol::Ws => {
            let conn = timeout(GREETING_TIMEOUT, crate::ws::open(addr, buffer, tls))
                .await
                .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))??;
            client::greet(conn, addr).await
        }
        Protocol::Nats => {
            let mut conn = open(addr, buffer).await?;
            let info = read_line(&mut conn.stream, &mut conn.reader).await?;
            if !info.starts_with("INFO ") {
                bail!("{addr} greeted with {info:?}: not a NATS server");
            }
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":true,\"name\":\"chat-load\"}}\r\n\
                 SUB {subject} 1\r\nPING\r\n"
            );
            send(&mut conn.stream, hello.as_bytes()).await?;
            wait_for(&mut conn, addr, |line| line == "PONG").await?;
            Ok(conn)
        }
        Protocol::Redis => {
            let mut conn = open(addr, buffer).await?;
            let subscribe = format!(
                "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{subject}\r\n",
                subject.len()
            );
            send(&mut conn.stream, subscribe.as_bytes()).await?;
            // The confirmation ends with the subscription count, `:1`.
            wait_for(&mut conn, addr, |line| line.starts_with(':')).await?;
            let mut publisher = open(addr, 256).await?;
            send(
                &mut publisher.stream,
                b"*1\r\n$4\r\nPING\r\n*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n",
            )
            .await?;
            wait_for(&mut publisher, addr, |line| line == "+PONG").await?;
            let Stream::Tcp(tcp) = publisher.stream else {
                bail!("a Redis publisher over TLS");
            };
            conn.publisher = Some(tcp);
            Ok(conn)
        }
    }
}

/// A bare connection named after its own address, as a chat server would name it.
async fn open(addr: SocketAddr, buffer: usize) -> anyhow::Result<Conn> {
    let stream = timeout(GREETING_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let who = stream.local_addr().context("local address")?.to_string();
    Ok(Conn {
        stream: Stream::Tcp(stream),
        who,
        reader: LineReader::new(buffer),
        publisher: None,
        ws: None,
    })
}

async fn send(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> anyhow::Result<()> {
    timeout(GREETING_TIMEOUT, stream.write_all(bytes))
        .await
        .map_err(|_| anyhow::anyhow!("sending the handshake timed out"))?
        .context("sending the handshake")
}

/// Reads lines until `done` accepts one; a broker's error line ends it.
async fn wait_for(
    conn: &mut Conn,
    addr: SocketAddr,
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    for _ in 0..HANDSHAKE_LINES {
        let line = read_line(&mut conn.stream, &mut conn.reader).await?;
        if done(&line) {
            return Ok(());
        }
        if line.starts_with('-') {
            bail!("{addr} refused the subscription: {line}");
        }
    }
    bail!("{addr} never confirmed the subscription")
}

/// One line, within [`GREETING_TIMEOUT`].
async fn read_line(
    stream: &mut (impl AsyncRead + Unpin),
    reader: &mut LineReader,
) -> anyhow::Result<String> {
    timeout(GREETING_TIMEOUT, async {
        loop {
            if let Some(line) = reader.next_line() {
                return Ok(String::from_utf8_lossy(line).into_owned());
            }
            if reader.is_full() {
                bail!("handshake line longer than the read buffer");
            }
            let read = stream
                .read(reader.spare())
                .await
                .context("reading the handshake")?;
            if read == 0 {
                bail!("connection closed during the handshake");
            }
            reader.filled(read);
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no handshake reply within {GREETING_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Payload {
        Payload {
            sender: 7,
            seq: 3,
            sent_ns: 99,
        }
    }

    #[test]
    fn frames_carry_the_payload_on_a_line_of_its_own() {
        let codec = Codec::new(1, 50).unwrap();
        let mut body = b"127.0.0.1:5: ".to_vec();
        codec.encode_into(&mut body, payload());
        body.pop();
        let len = body.len();

        let mut nats = Vec::new();
        Framing::new(Protocol::Nats, "127.0.0.1:5", "room", &codec).encode_into(
            &codec,
            &mut nats,
            payload(),
        );
        let mut expected = format!("PUB room {len}\r\n").into_bytes();
        expected.extend_from_slice(&body);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(nats, expected);

        let mut redis = Vec::new();
        Framing::new(Protocol::Redis, "127.0.0.1:5", "room", &codec).encode_into(
            &codec,
            &mut redis,
            payload(),
        );
        let mut expected = format!("*3\r\n$7\r\nPUBLISH\r\n$4\r\nroom\r\n${len}\r\n").into_bytes();
        expected.extend_from_slice(&body);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(redis, expected);

        let mut line = Vec::new();
        Framing::line().encode_into(&codec, &mut line, payload());
        assert_eq!(line.len(), codec.size() + 1);
        assert_eq!(codec.decode(&body), Some(payload()));
    }

    #[test]
    fn errors_are_not_frames() {
        assert!(Protocol::Nats.is_frame(b"MSG room 1 80"));
        assert!(!Protocol::Nats.is_frame(b"-ERR 'Slow Consumer'"));
        assert!(Protocol::Redis.is_frame(b"$7"));
        assert!(!Protocol::Redis.is_frame(b"-ERR unknown command"));
        assert!(!Protocol::Line.is_frame(b"MSG"));
    }
}
