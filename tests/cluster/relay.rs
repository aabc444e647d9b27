//! The relay forwards, partitions (bytes stop, sockets stay open), heals
//! (cut-off connections reset, new ones pass) and resets, against a plain
//! echo server on blocking sockets: the relay runs on its own runtime, so
//! these tests need none.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use chat_testkit::{ensure, Relay};

/// Bound on anything that should happen (a line echoed, a reset seen).
const TIMEOUT: Duration = Duration::from_secs(10);

/// How long nothing must happen for a test to call it stopped. A
/// partitioned path never delivers; this only bounds how long we look.
const QUIET: Duration = Duration::from_millis(500);

/// An echo server; each connection's end (EOF or error) is reported on
/// the channel, so a test can tell an open connection from a closed one.
fn echo_server() -> io::Result<(SocketAddr, mpsc::Receiver<io::Result<()>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (ended, ends) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let ended = ended.clone();
            thread::spawn(move || {
                let mut buffer = [0; 4096];
                let end = loop {
                    match stream.read(&mut buffer) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            if let Err(err) = stream.write_all(&buffer[..n]) {
                                break Err(err);
                            }
                        }
                        Err(err) => break Err(err),
                    }
                };
                let _ = ended.send(end);
            });
        }
    });
    Ok((addr, ends))
}

fn connect(relay: &Relay) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(relay.addr())?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Sends `text` and reads its echo.
fn echo(stream: &mut TcpStream, text: &str) -> io::Result<()> {
    stream.write_all(text.as_bytes())?;
    let mut back = vec![0; text.len()];
    stream.read_exact(&mut back)?;
    ensure(back == text.as_bytes(), || {
        format!("sent {text:?}, got {:?}", String::from_utf8_lossy(&back))
    })
}

/// Reading `stream` stays without data, and without end of stream or
/// error, for [`QUIET`].
fn stays_silent_and_open(stream: &mut TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(QUIET))?;
    let mut byte = [0];
    let read = stream.read(&mut byte);
    stream.set_read_timeout(Some(TIMEOUT))?;
    match read {
        Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(()),
        Ok(0) => Err(io::Error::other("the connection was closed")),
        Ok(_) => Err(io::Error::other("bytes came through")),
        Err(err) => Err(io::Error::other(format!("the connection failed: {err}"))),
    }
}

/// `stream` ends (end of stream or reset) within [`TIMEOUT`].
fn is_closed(stream: &mut TcpStream) -> io::Result<()> {
    let mut buffer = [0; 64];
    match stream.read(&mut buffer) {
        Ok(0) => Ok(()),
        Err(err) if err.kind() == ErrorKind::ConnectionReset => Ok(()),
        Ok(_) => Err(io::Error::other("data instead of the end")),
        Err(err) => Err(io::Error::other(format!("not closed: {err}"))),
    }
}

#[test]
fn forwards_both_ways_on_many_connections() -> io::Result<()> {
    let (server, _ends) = echo_server()?;
    let relay = Relay::start(server)?;
    ensure(relay.target() == server, || "target".into())?;
    ensure(
        relay.nats_url() == format!("nats://{}", relay.addr()),
        || "nats_url".into(),
    )?;
    let mut clients = (0..3)
        .map(|_| connect(&relay))
        .collect::<io::Result<Vec<_>>>()?;
    for round in 0..3 {
        for (i, client) in clients.iter_mut().enumerate() {
            echo(client, &format!("client {i} round {round}\n"))?;
        }
    }
    // More than one buffer's worth in one go.
    let big = "x".repeat(200_000);
    echo(&mut clients[0], &big)?;
    ensure(relay.accepted() == 3, || {
        format!("accepted {}", relay.accepted())
    })?;
    ensure(relay.open() == 3, || format!("open {}", relay.open()))
}

#[test]
fn a_partition_stops_bytes_both_ways_and_keeps_the_sockets_open() -> io::Result<()> {
    let (server, ends) = echo_server()?;
    let relay = Relay::start(server)?;
    let mut client = connect(&relay)?;
    echo(&mut client, "before\n")?;

    relay.partition();
    ensure(relay.is_partitioned(), || "not partitioned".into())?;
    // The write succeeds (the kernel takes it), nothing comes back, and
    // neither end hears of a failure.
    client.write_all(b"during\n")?;
    stays_silent_and_open(&mut client)?;
    ensure(ends.try_recv().is_err(), || {
        "the server's end of the connection ended".into()
    })?;
    ensure(relay.open() == 1, || format!("open {}", relay.open()))?;

    // A new connection hangs: at most the kernel completes its handshake.
    if let Ok(mut late) = connect(&relay) {
        late.write_all(b"late\n")?;
        stays_silent_and_open(&mut late)?;
    }
    ensure(relay.accepted() == 1, || {
        format!("accepted {} during a partition", relay.accepted())
    })
}

#[test]
fn a_partition_buffers_a_bounded_amount() -> io::Result<()> {
    let (server, _ends) = echo_server()?;
    let relay = Relay::start(server)?;
    let mut client = connect(&relay)?;
    echo(&mut client, "before\n")?;
    relay.partition();
    // Write until the path pushes back: what it took is the kernel's
    // buffers plus the relay's one buffer, not everything sent.
    client.set_write_timeout(Some(QUIET))?;
    let chunk = vec![b'x'; 1 << 20];
    let mut taken = 0usize;
    let limit = 256 << 20;
    while taken < limit {
        match client.write(&chunk) {
            Ok(n) => taken += n,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(err) => return Err(err),
        }
    }
    ensure(taken < limit, || {
        format!("the partitioned relay took {taken} bytes without pushing back")
    })
}

#[test]
fn heal_resets_the_cut_off_connections_and_lets_new_ones_through() -> io::Result<()> {
    let (server, ends) = echo_server()?;
    let relay = Relay::start(server)?;
    let mut client = connect(&relay)?;
    echo(&mut client, "before\n")?;
    relay.partition();
    stays_silent_and_open(&mut client)?;

    relay.heal();
    ensure(!relay.is_partitioned(), || "still partitioned".into())?;
    is_closed(&mut client)?;
    // Its end may be a reset or an end of stream; either is not silence.
    let _ = ends
        .recv_timeout(TIMEOUT)
        .map_err(|_| io::Error::other("the server's end stayed open after heal"))?;
    let mut again = connect(&relay)?;
    echo(&mut again, "after\n")?;
    ensure(relay.accepted() == 2, || {
        format!("accepted {}", relay.accepted())
    })
}

#[test]
fn reset_closes_every_connection_at_once_and_accepts_new_ones() -> io::Result<()> {
    let (server, ends) = echo_server()?;
    let relay = Relay::start(server)?;
    let mut first = connect(&relay)?;
    let mut second = connect(&relay)?;
    echo(&mut first, "one\n")?;
    echo(&mut second, "two\n")?;

    relay.reset();
    is_closed(&mut first)?;
    is_closed(&mut second)?;
    for _ in 0..2 {
        // The server's ends see a reset (or an end), not silence.
        let _ = ends
            .recv_timeout(TIMEOUT)
            .map_err(|_| io::Error::other("a server end stayed open after reset"))?;
    }
    let mut third = connect(&relay)?;
    echo(&mut third, "three\n")?;
    ensure(relay.open() == 1, || format!("open {}", relay.open()))
}

#[test]
fn drop_closes_the_port_and_every_connection() -> io::Result<()> {
    let (server, _ends) = echo_server()?;
    let relay = Relay::start(server)?;
    let addr = relay.addr();
    let mut client = connect(&relay)?;
    echo(&mut client, "hello\n")?;
    drop(relay);
    is_closed(&mut client)?;
    match TcpStream::connect(addr) {
        Err(err) if err.kind() == ErrorKind::ConnectionRefused => Ok(()),
        other => Err(io::Error::other(format!(
            "connecting after drop: {other:?}"
        ))),
    }
}

#[test]
fn an_unreachable_target_closes_the_client() -> io::Result<()> {
    // A port that was free a moment ago: nothing listens there.
    let target = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let relay = Relay::start(target)?;
    let mut client = connect(&relay)?;
    is_closed(&mut client)
}
