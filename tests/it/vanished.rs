//! A peer that vanishes without a FIN or an RST (a laptop lid closed, a NAT
//! that forgot the flow, a cable pulled) is freed in a silent room, in every
//! model, by TCP keepalive (`--keepalive`) and `TCP_USER_TIMEOUT`.
//!
//! **How the peer vanishes.** Not an approximation: a real black hole. Each
//! test moves a thread of its own into a fresh network namespace
//! (`unshare(CLONE_NEWNET)`), brings its loopback up, and creates the
//! listener and the clients' sockets there; the server runs on its own
//! runtime as usual (a socket belongs to the namespace it was created in,
//! whichever thread uses it). Once the doomed peer, on 127.0.0.2, has its
//! greeting, an nftables rule in that namespace drops every packet from or
//! to 127.0.0.2: the server's keepalive probes go unanswered, and nothing
//! else on the machine is touched. An observer on 127.0.0.1 says nothing
//! throughout and must hear the peer leave.
//!
//! This needs root (CAP_NET_ADMIN) and `nft`. Without them each test prints
//! loudly that it did not run and passes, unless `CHAT_REQUIRE_NETNS` is set:
//! CI runs as root, and `.ci/run` installs nftables and sets it.

use crate::common;

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use chat_server::{Config, Model};
use common::ensure;
use common::in_process::InProcess;

for_each_model_at_once!(a_black_holed_peer_is_freed_in_a_silent_room);

/// Keepalive as short as the kernel allows and still meaningful: the first
/// probe after 1 s of silence, then one a second.
const KEEPALIVE: Duration = Duration::from_secs(3);
/// Also the `TCP_USER_TIMEOUT`: the peer is dropped at the first unanswered
/// probe once this much time has passed since it was last heard.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Far longer than detection should take (about 2 s), far shorter than
/// the kernel's own give-up without keepalive (hours).
const FREED_WITHIN: Duration = Duration::from_secs(15);

/// A thread living in a private network namespace, running commands there.
struct Namespace {
    commands: mpsc::Sender<(Vec<String>, mpsc::Sender<io::Result<()>>)>,
}

/// What the namespace's thread created for a test.
struct Sockets {
    listener: TcpListener,
    observer: TcpStream,
    peer: TcpStream,
}

impl Namespace {
    /// Enters a fresh namespace on a new thread and creates the sockets
    /// there. `Err` with the reason if this machine cannot.
    fn create() -> Result<(Namespace, Sockets), String> {
        let (reply, created) = mpsc::channel();
        let (commands, incoming) = mpsc::channel::<(Vec<String>, mpsc::Sender<io::Result<()>>)>();
        thread::spawn(move || {
            let sockets = enter_and_connect();
            let ok = sockets.is_ok();
            let _ = reply.send(sockets);
            if !ok {
                return;
            }
            // Serve commands until the test drops its end; the namespace
            // goes with its last thread and socket.
            for (argv, done) in incoming {
                let _ = done.send(run(&argv));
            }
        });
        let sockets = created
            .recv()
            .map_err(|_| "the namespace thread died".to_string())??;
        Ok((Namespace { commands }, sockets))
    }

    fn run(&self, argv: &[&str]) -> io::Result<()> {
        let (done, result) = mpsc::channel();
        self.commands
            .send((argv.iter().map(|s| s.to_string()).collect(), done))
            .map_err(|_| io::Error::other("namespace thread gone"))?;
        result
            .recv()
            .map_err(|_| io::Error::other("namespace thread gone"))?
    }

    /// Drops every packet from or to 127.0.0.2, silently.
    fn black_hole_peer(&self) -> io::Result<()> {
        self.run(&["nft", "add", "table", "inet", "blackhole"])?;
        self.run(&[
            "nft",
            "add chain inet blackhole input { type filter hook input priority 0; policy accept; }",
        ])?;
        self.run(&[
            "nft",
            "add rule inet blackhole input ip saddr 127.0.0.2 drop",
        ])?;
        self.run(&[
            "nft",
            "add rule inet blackhole input ip daddr 127.0.0.2 drop",
        ])
    }
}

fn run(argv: &[String]) -> io::Result<()> {
    let output = Command::new(&argv[0]).args(&argv[1..]).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{argv:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// On the calling thread: a new network namespace with loopback up, a
/// listener, an observer on 127.0.0.1 and the peer on 127.0.0.2.
fn enter_and_connect() -> Result<Sockets, String> {
    // SAFETY: unshare only changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (needs root)",
            io::Error::last_os_error()
        ));
    }
    run(&["ip", "link", "set", "lo", "up"].map(String::from)).map_err(|err| err.to_string())?;
    run(&["nft", "list", "tables"].map(String::from)).map_err(|err| format!("nft: {err}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|err| err.to_string())?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let observer = TcpStream::connect(addr).map_err(|err| err.to_string())?;
    let peer = connect_from("127.0.0.2:0", addr).map_err(|err| err.to_string())?;
    Ok(Sockets {
        listener,
        observer,
        peer,
    })
}

fn connect_from(local: &str, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(
        &local
            .parse::<SocketAddr>()
            .map_err(io::Error::other)?
            .into(),
    )?;
    socket.connect(&to.into())?;
    Ok(socket.into())
}

fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end().to_string())
}

/// Whether the test may pass without running; if not, why it must fail.
fn cannot_run(why: &str) -> io::Result<()> {
    if std::env::var_os("CHAT_REQUIRE_NETNS").is_some() {
        return Err(io::Error::other(format!(
            "cannot black-hole a peer here ({why}) but CHAT_REQUIRE_NETNS is set"
        )));
    }
    eprintln!(
        "\n*** NOT RUN: the black-holed-peer test needs root and nft ({why}).\n\
         *** It passed without testing anything; CI runs it (.ci/run).\n"
    );
    Ok(())
}

async fn a_black_holed_peer_is_freed_in_a_silent_room(model: Model) -> io::Result<()> {
    // The test body is blocking (std sockets, a runtime of the server's
    // own whose tasks it counts); keep it off the test's runtime.
    tokio::task::spawn_blocking(move || black_hole(model, Some(KEEPALIVE)))
        .await
        .map_err(io::Error::other)?
}

/// Without keepalive the same peer is still there long after the others
/// were freed: the setting is what frees it. One model is enough to show it.
#[test]
fn without_keepalive_a_black_holed_peer_stays() -> io::Result<()> {
    black_hole(Model::Sharded, None)
}

fn black_hole(model: Model, keepalive: Option<Duration>) -> io::Result<()> {
    let (namespace, sockets) = match Namespace::create() {
        Ok(created) => created,
        Err(why) => return cannot_run(&why),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    sockets.listener.set_nonblocking(true)?;
    let config = Config::with_model(model).with(|c| {
        c.keepalive = keepalive;
        c.write_timeout = WRITE_TIMEOUT;
    });
    let server = {
        let _entered = runtime.enter();
        InProcess::serve(tokio::net::TcpListener::from_std(sockets.listener)?, config)?
    };
    let tasks = || runtime.metrics().num_alive_tasks();
    let wait_for = |expected: usize, within: Duration| {
        let deadline = Instant::now() + within;
        while tasks() != expected && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        tasks() == expected
    };

    for stream in [&sockets.observer, &sockets.peer] {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    }
    let peer_who = sockets.peer.local_addr()?.to_string();
    let mut observer = BufReader::new(sockets.observer);
    let mut peer = BufReader::new(sockets.peer);
    read_line(&mut observer)?;
    ensure(
        read_line(&mut peer)? == chat_wire::greeting(&peer_who),
        || "the peer was not greeted".into(),
    )?;
    ensure(
        wait_for(model.expected_tasks(2), Duration::from_secs(10)),
        || format!("{model}: {} tasks with two clients", tasks()),
    )?;

    namespace.black_hole_peer()?;
    let vanished = Instant::now();
    let outcome = match keepalive {
        Some(_) => {
            // The room is silent; only keepalive can notice. (The server
            // may have accepted either first: skip the peer's arrival.)
            let arrived = chat_wire::arrived(&peer_who);
            let left = loop {
                match read_line(&mut observer) {
                    Ok(line) if line == arrived => continue,
                    other => break other,
                }
            };
            let took = vanished.elapsed();
            println!(
                "{model}: black-holed peer freed after {took:?} (--keepalive 3, --write-timeout 1)"
            );
            ensure(
                left.as_ref().ok() == Some(&chat_wire::left(&peer_who)),
                || format!("{model}: the observer heard {left:?} after {took:?}"),
            )
            .and_then(|()| {
                ensure(took < FREED_WITHIN, || {
                    format!("{model}: freed only after {took:?}")
                })
            })
            .and_then(|()| {
                ensure(
                    wait_for(model.expected_tasks(1), Duration::from_secs(10)),
                    || format!("{model}: {} tasks after the peer was freed", tasks()),
                )
            })
        }
        None => {
            // Half as long again as detection takes with keepalive on
            // (about 2 s, kernel timers: a second of silence, one probe,
            // the user timeout), and long enough that a peer freed by
            // keepalive would be gone.
            thread::sleep(Duration::from_secs(3));
            ensure(tasks() == model.expected_tasks(2), || {
                format!(
                    "{model}: without keepalive the peer was freed anyway ({} tasks)",
                    tasks()
                )
            })
        }
    };
    let _ = runtime.block_on(server.stop());
    outcome
}
