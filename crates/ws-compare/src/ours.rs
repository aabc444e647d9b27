//! `--impl ours`: the server's own framing (`src/web/ws.rs`, through
//! `chat_server::ws_framing`), in the shape the server uses it: the reader
//! decodes straight into a line buffer, the writer hands a batch of lines
//! over at once and each becomes a text frame.

use std::sync::Arc;

use bytes::Bytes;
use chat_server::ws_framing::{self, Reader, Writer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::room::{Room, MAX_MESSAGE};
use crate::{handshake, BATCH_BYTES};

/// A line with its newline, as the writer hands it over.
pub fn message(mut line: String) -> Bytes {
    line.push('\n');
    Bytes::from(line)
}

/// Serves one connection.
pub async fn serve(mut stream: TcpStream, who: String, room: Arc<Room<Bytes>>) {
    if handshake::accept(&mut stream).await.is_err() {
        return;
    }
    let (reader, writer) = ws_framing::split(stream, Vec::new(), MAX_MESSAGE);
    let (member, queue) = room.join(who);
    tokio::spawn(write(writer, queue));
    read(reader, |line| member.say(line)).await;
}

async fn read(mut reader: Reader, say: impl Fn(&str)) {
    let mut lines = Vec::new();
    loop {
        match reader.read(&mut lines).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut start = 0;
        while let Some(end) = memchr::memchr(b'\n', &lines[start..]) {
            // The framing has checked that text messages are UTF-8.
            say(&String::from_utf8_lossy(&lines[start..start + end]));
            start += end + 1;
        }
        lines.drain(..start);
        if lines.is_empty() {
            // An idle connection holds no buffer.
            lines = Vec::new();
        }
    }
}

async fn write(mut writer: Writer, mut queue: mpsc::Receiver<Bytes>) {
    while let Some(first) = queue.recv().await {
        let mut batch = first.to_vec();
        while batch.len() < BATCH_BYTES {
            match queue.try_recv() {
                Ok(line) => batch.extend_from_slice(&line),
                Err(_) => break,
            }
        }
        if writer.write_lines(&batch).await.is_err() {
            return;
        }
    }
    writer.close();
}
