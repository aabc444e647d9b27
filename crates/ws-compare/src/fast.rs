//! `--impl fastwebsockets`: fastwebsockets' split halves
//! (`unstable-split`) on the socket's own halves. Its writer sends every
//! frame with its own `write_all`, so the write half goes through a
//! `BufWriter` (8 KiB) flushed once per batch, as the others batch; the
//! reader collects fragments (`FragmentCollectorRead`, which checks UTF-8)
//! and passes the pongs and closes the crate owes to the writer's queue.

use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{
    after_handshake_split, FragmentCollectorRead, Frame, OpCode, Payload, Role, WebSocketWrite,
};
use tokio::io::BufWriter;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::room::{Room, MAX_MESSAGE};
use crate::{handshake, BATCH_MESSAGES};

/// What the writer sends: a chat line, or a control frame the reader owes.
#[derive(Clone)]
pub enum Out {
    Text(Bytes),
    Control(OpCode, Bytes),
}

/// A text message.
pub fn message(line: String) -> Out {
    Out::Text(Bytes::from(line))
}

/// Serves one connection.
pub async fn serve(mut stream: TcpStream, who: String, room: Arc<Room<Out>>) {
    if handshake::accept(&mut stream).await.is_err() {
        return;
    }
    let (read, write) = stream.into_split();
    let (mut reader, writer) = after_handshake_split(read, BufWriter::new(write), Role::Server);
    reader.set_max_message_size(MAX_MESSAGE);
    let mut reader = FragmentCollectorRead::new(reader);
    let (member, queue) = room.join(who);
    // Weak, so that a client dropped from the room still loses its writer.
    let Some(own) = member.own_queue().map(|own| own.downgrade()) else {
        return;
    };
    tokio::spawn(write_loop(writer, queue));
    let mut owed = |frame: Frame<'_>| {
        let sent = match own.upgrade() {
            Some(own) => own
                .try_send(Out::Control(
                    frame.opcode,
                    Bytes::copy_from_slice(&frame.payload),
                ))
                .map_err(|_| "the writer's queue is full or gone"),
            None => Err("the writer is gone"),
        };
        std::future::ready(sent)
    };
    while let Ok(frame) = reader.read_frame(&mut owed).await {
        match frame.opcode {
            OpCode::Text => match std::str::from_utf8(&frame.payload) {
                Ok(text) => text.split('\n').for_each(|line| member.say(line)),
                Err(_) => break,
            },
            OpCode::Binary | OpCode::Close => break,
            _ => {}
        }
    }
}

async fn write_loop(
    mut writer: WebSocketWrite<BufWriter<OwnedWriteHalf>>,
    mut queue: mpsc::Receiver<Out>,
) {
    while let Some(first) = queue.recv().await {
        if send(&mut writer, first).await.is_err() {
            return;
        }
        for _ in 1..BATCH_MESSAGES {
            let Ok(message) = queue.try_recv() else {
                break;
            };
            if send(&mut writer, message).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.write_frame(Frame::close(1000, b"")).await;
    let _ = writer.flush().await;
}

async fn send(
    writer: &mut WebSocketWrite<BufWriter<OwnedWriteHalf>>,
    message: Out,
) -> Result<(), fastwebsockets::WebSocketError> {
    let frame = match &message {
        Out::Text(text) => Frame::text(Payload::Borrowed(text)),
        Out::Control(opcode, payload) => {
            Frame::new(true, *opcode, None, Payload::Borrowed(payload))
        }
    };
    writer.write_frame(frame).await
}
