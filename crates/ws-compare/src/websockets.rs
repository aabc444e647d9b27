//! `--impl tokio-websockets`: tokio-websockets' server stream (strict by
//! default: UTF-8 checked, limits enforced), split into a sink and a
//! stream (futures' `split`), batches fed and flushed once.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_websockets::{Limits, Message, ServerBuilder, WebSocketStream};

use crate::room::{Room, MAX_MESSAGE};
use crate::{handshake, BATCH_MESSAGES};

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
    tokio::spawn(write(sink, queue));
    while let Some(Ok(message)) = source.next().await {
        if let Some(text) = message.as_text() {
            text.split('\n').for_each(|line| member.say(line));
        } else if message.is_binary() || message.is_close() {
            break;
        }
    }
}

async fn write(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
    mut queue: mpsc::Receiver<Message>,
) {
    while let Some(first) = queue.recv().await {
        if sink.feed(first).await.is_err() {
            return;
        }
        for _ in 1..BATCH_MESSAGES {
            let Ok(message) = queue.try_recv() else {
                break;
            };
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
