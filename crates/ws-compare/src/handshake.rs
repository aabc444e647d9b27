//! The opening handshake, the same for every implementation so that only
//! the framing differs: read the request up to its blank line, check that
//! it asks for a version-13 WebSocket, answer `101` with the accept key.
//!
//! RFC 6455 (4.1) has the client wait for the `101` before it sends a
//! frame, so nothing may follow the request; a client that sends more is
//! refused rather than handed to a framing that could not take it.

use std::io;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest request taken.
const MAX_REQUEST: usize = 8 * 1024;

/// RFC 6455's GUID, appended to the client's key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65";

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Reads the upgrade request from `stream` and answers it.
pub async fn accept(stream: &mut TcpStream) -> io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let end = loop {
        if request.len() >= MAX_REQUEST {
            return Err(invalid("request too long"));
        }
        request.reserve(1024);
        if stream.read_buf(&mut request).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(end) = memchr::memmem::find(&request, b"\r\n\r\n") {
            break end + 4;
        }
    };
    if end != request.len() {
        return Err(invalid("data sent before the 101"));
    }
    let head = std::str::from_utf8(&request[..end]).map_err(|_| invalid("request not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    if !first.starts_with("GET /ws ") {
        return Err(invalid("not GET /ws"));
    }
    let mut key = None;
    let mut version_13 = false;
    let mut upgrade = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version_13 = value == "13";
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        }
    }
    let key = key.ok_or_else(|| invalid("no Sec-WebSocket-Key"))?;
    if !version_13 || !upgrade {
        return Err(invalid("not a version-13 WebSocket upgrade"));
    }
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key.as_bytes());
    sha1.update(GUID);
    let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finish());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(answer.as_bytes()).await
}
