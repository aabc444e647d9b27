//! `--impl tungstenite` and `tungstenite-4k`: tokio-tungstenite, its
//! `WebSocketStream` split into a sink and a stream (futures' `split`, a
//! lock shared by the halves), batches fed and flushed once.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::handshake;
use crate::room::{self, Room, MAX_MESSAGE};

/// A text message (its `Utf8Bytes` takes the `String` without a copy).
pub fn message(line: String) -> Message {
    Message::Text(line.into())
}

/// The configuration: the crate's defaults (a 128 KiB read buffer,
/// allocated when the connection starts), or with a 4 KiB read buffer;
/// messages limited as the others are.
pub fn config(small_read_buffer: bool) -> WebSocketConfig {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    if small_read_buffer {
        config.read_buffer_size(4 * 1024)
    } else {
        config
    }
}

/// Serves one connection.
pub async fn serve(
    mut stream: TcpStream,
    who: String,
    room: Arc<Room<Message>>,
    config: WebSocketConfig,
) {
    if handshake::accept(&mut stream).await.is_err() {
        return;
    }
    let socket = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
    let (sink, mut source) = socket.split();
    let (member, queue) = room.join(who);
    tokio::spawn(room::write_batches(sink, queue));
    while let Some(Ok(message)) = source.next().await {
        match message {
            Message::Text(text) => text.split('\n').for_each(|line| member.say(line)),
            Message::Binary(_) | Message::Close(_) => break,
            // Pongs to pings are queued and sent by the crate.
            _ => {}
        }
    }
}
