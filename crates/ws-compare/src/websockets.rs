//! `--impl tokio-websockets`: tokio-websockets' server stream (strict by
//! default: UTF-8 checked, limits enforced), split into a sink and a
//! stream (futures' `split`), batches fed and flushed once.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_websockets::{Limits, Message, ServerBuilder};

use crate::handshake;
use crate::room::{self, Room, MAX_MESSAGE};

/// A text message (its payload takes the `String` without a copy).
pub fn message(line: String) -> Message {
    Message::text(line)
}

/// Serves one connection.
pub async fn serve(mut stream: TcpStream, who: String, room: Arc<Room<Message>>) {
    if handshake::accept(&mut stream).await.is_err() {
        return;
    }
    let socket = ServerBuilder::new()
        .limits(Limits::default().max_payload_len(Some(MAX_MESSAGE)))
        .serve(stream);
    let (sink, mut source) = socket.split();
    let (member, queue) = room.join(who);
    tokio::spawn(room::write_batches(sink, queue));
    while let Some(Ok(message)) = source.next().await {
        if let Some(text) = message.as_text() {
            text.split('\n').for_each(|line| member.say(line));
        } else if message.is_binary() || message.is_close() {
            break;
        }
    }
}
