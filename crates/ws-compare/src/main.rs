//! `ws-compare`: one minimal chat room served over WebSocket through one of
//! four framing implementations (`--impl`), so that `chat-load --protocol
//! ws` can measure them against each other (docs/websocket-crates.md).
//!
//! What this crate owns: the shared room ([`room`]), the shared opening
//! handshake ([`handshake`]) and one module per implementation, each
//! written the way that crate is meant to be used, with the same task
//! layout (a reader task and a writer task per connection), the same
//! bounded queue per client and the same write batching, so that the
//! framing is the only difference. It is not the server: no lobby, no
//! limits beyond the message size and the queue bound, no keepalive.

mod fast;
mod handshake;
mod ours;
mod room;
mod tungstenite;
mod websockets;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::net::{TcpListener, TcpStream};

use room::Room;

/// A writer hands at most this many bytes of lines to `--impl ours` at once
/// (the server's writer batches up to 64 KiB too).
pub const BATCH_BYTES: usize = 64 * 1024;

/// The crates' writers feed at most this many messages before a flush (a
/// count, since a sink takes messages: 64 KiB of 64-byte lines).
pub const BATCH_MESSAGES: usize = 1024;

/// The framing implementations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Impl {
    /// The server's own (src/web/ws.rs).
    Ours,
    /// tokio-tungstenite with its default configuration.
    Tungstenite,
    /// tokio-tungstenite with a 4 KiB read buffer instead of 128 KiB.
    #[value(name = "tungstenite-4k")]
    Tungstenite4k,
    /// tokio-websockets.
    TokioWebsockets,
    /// fastwebsockets.
    Fastwebsockets,
}

/// One chat room on `GET /ws`, through the chosen WebSocket implementation.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The WebSocket implementation.
    #[arg(long = "impl", value_enum)]
    implementation: Impl,
    /// Where to listen (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    runtime
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("listening on {}", args.addr))?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ws-compare {:?} listening on {addr}",
        args.implementation
    )?;
    out.flush()?;
    drop(out);
    tokio::select! {
        served = serve_with(listener, args.implementation) => served,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Serves the room on `listener` through `implementation`.
async fn serve_with(listener: TcpListener, implementation: Impl) -> anyhow::Result<()> {
    match implementation {
        Impl::Ours => {
            let room = Arc::new(Room::new(ours::message));
            serve(listener, room, |stream, who, room| {
                tokio::spawn(ours::serve(stream, who, room));
            })
            .await
        }
        Impl::Tungstenite | Impl::Tungstenite4k => {
            let config = tungstenite::config(implementation == Impl::Tungstenite4k);
            let room = Arc::new(Room::new(tungstenite::message));
            serve(listener, room, move |stream, who, room| {
                tokio::spawn(tungstenite::serve(stream, who, room, config));
            })
            .await
        }
        Impl::TokioWebsockets => {
            let room = Arc::new(Room::new(websockets::message));
            serve(listener, room, |stream, who, room| {
                tokio::spawn(websockets::serve(stream, who, room));
            })
            .await
        }
        Impl::Fastwebsockets => {
            let room = Arc::new(Room::new(fast::message));
            serve(listener, room, |stream, who, room| {
                tokio::spawn(fast::serve(stream, who, room));
            })
            .await
        }
    }
}

/// Accepts connections, handing each to `spawn` (a task per
/// implementation, so that each task is the size of its own future), and
/// trims the heap after bursts.
async fn serve<M: Clone + Send + Sync + 'static>(
    listener: TcpListener,
    room: Arc<Room<M>>,
    spawn: impl Fn(TcpStream, String, Arc<Room<M>>),
) -> anyhow::Result<()> {
    tokio::spawn(housekeeper(Arc::clone(&room)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, a connection reset before accept: the
            // next accept may work.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        spawn(stream, peer.to_string(), Arc::clone(&room));
    }
}

/// Gives the heap's free pages back once a burst (arrivals, a fanout) is
/// over, as the server does (`src/memory.rs`): idle memory is then
/// measured alike here and there.
async fn housekeeper<M: Clone>(room: Arc<Room<M>>) {
    let mut seen = room.broadcasts.load(Relaxed);
    let mut busy = false;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = room.broadcasts.load(Relaxed);
        if now != seen {
            busy = true;
            seen = now;
        } else if busy {
            busy = false;
            chat_server::ws_framing::release_free_memory();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each implementation serves the room as chat-load expects it: the
    //! greeting, arrivals, everyone's lines to everyone (with chat-load's own
    //! WebSocket client code).

    use std::time::Duration;

    use chat_load::ws::{encode_text, handshake, Deframer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;

    use super::{serve_with, Impl};

    const WAIT: Duration = Duration::from_secs(10);

    struct Client {
        stream: TcpStream,
        deframer: Deframer,
        /// Lines received and not yet taken.
        lines: Vec<u8>,
    }

    impl Client {
        async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Client> {
            let mut stream = TcpStream::connect(addr).await?;
            let preread = handshake(&mut stream, addr).await?;
            let mut client = Client {
                stream,
                deframer: Deframer::default(),
                lines: Vec::new(),
            };
            client.take(&preread);
            Ok(client)
        }

        fn take(&mut self, frames: &[u8]) {
            let mut out = vec![0; frames.len() + 1];
            let n = self.deframer.deframe(frames, &mut out);
            self.lines.extend_from_slice(&out[..n]);
        }

        async fn line(&mut self) -> anyhow::Result<String> {
            loop {
                if let Some(end) = self.lines.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.lines.drain(..=end).collect();
                    return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
                }
                let mut chunk = [0; 4096];
                let n = timeout(WAIT, self.stream.read(&mut chunk)).await??;
                anyhow::ensure!(n > 0, "closed");
                self.take(&chunk[..n]);
            }
        }

        async fn send(&mut self, line: &str) -> anyhow::Result<()> {
            let mut frame = Vec::new();
            encode_text(&mut frame, line.as_bytes());
            Ok(self.stream.write_all(&frame).await?)
        }
    }

    #[tokio::test]
    async fn every_implementation_serves_the_room() -> anyhow::Result<()> {
        for implementation in [
            Impl::Ours,
            Impl::Tungstenite,
            Impl::Tungstenite4k,
            Impl::TokioWebsockets,
            Impl::Fastwebsockets,
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let server = tokio::spawn(serve_with(listener, implementation));
            let mut a = Client::connect(addr).await?;
            let greeting = a.line().await?;
            let a_who = chat_wire::greeted(&greeting).unwrap_or_default().to_owned();
            assert!(!a_who.is_empty(), "{implementation:?}: {greeting:?}");
            let mut b = Client::connect(addr).await?;
            let b_who = chat_wire::greeted(&b.line().await?)
                .unwrap_or_default()
                .to_owned();
            assert_eq!(
                a.line().await?,
                chat_wire::arrived(&b_who),
                "{implementation:?}"
            );
            b.send("hello").await?;
            a.send("two\nlines").await?;
            for client in [&mut a, &mut b] {
                let mut got = vec![
                    client.line().await?,
                    client.line().await?,
                    client.line().await?,
                ];
                got.sort();
                let mut want = vec![
                    chat_wire::chat(&b_who, "hello"),
                    chat_wire::chat(&a_who, "two"),
                    chat_wire::chat(&a_who, "lines"),
                ];
                want.sort();
                assert_eq!(got, want, "{implementation:?}");
            }
            drop(b);
            assert_eq!(
                a.line().await?,
                chat_wire::left(&b_who),
                "{implementation:?}"
            );
            server.abort();
        }
        Ok(())
    }

    /// Not a fuzzer: random bytes after the handshake, from a fixed seed,
    /// must end in a closed connection, never a panic, and the room must
    /// go on serving.
    #[tokio::test]
    async fn random_bytes_after_the_handshake_never_panic() -> anyhow::Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        static PANICS: AtomicUsize = AtomicUsize::new(0);
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Relaxed);
            default_hook(info);
        }));
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // xorshift64: reproducible without a crate.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for implementation in [
            Impl::Ours,
            Impl::Tungstenite,
            Impl::TokioWebsockets,
            Impl::Fastwebsockets,
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let server = tokio::spawn(serve_with(listener, implementation));
            for _ in 0..100 {
                let mut client = Client::connect(addr).await?;
                let len = (next() % 512) as usize;
                let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                // Half the time a plausible first byte (FIN + text).
                if next() % 2 == 0 {
                    if let Some(first) = junk.first_mut() {
                        *first = 0x81;
                    }
                }
                client.stream.write_all(&junk).await?;
                client.stream.shutdown().await?;
                // Whatever the server answers, it must end the connection.
                let mut answer = Vec::new();
                timeout(WAIT, client.stream.read_to_end(&mut answer)).await??;
            }
            let mut fresh = Client::connect(addr).await?;
            let greeting = fresh.line().await?;
            assert!(
                chat_wire::greeted(&greeting).is_some(),
                "{implementation:?}: {greeting:?}"
            );
            server.abort();
        }
        assert_eq!(PANICS.load(Relaxed), 0, "a task panicked on random input");
        Ok(())
    }
}
