//! Surviving the open internet, in every model: one address at its
//! `--max-clients-per-ip` while another still chats; a flooder told
//! `error: flooding` and disconnected while the room goes on; the
//! `--max-client-memory` budget evicting the largest holder while the others
//! chat; SIGINT with stderr gone still exiting 0 after `server shutting
//! down`; and the open-file limit raised or warned about at start.
//!
//! Flood fairness under load is `tests/fairness.rs`; a black-holed peer is
//! `tests/it/vanished.rs`.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};
use common::process::{binary, LineChild, ServerProcess, Signal};
use common::{ensure, flood_until_cut_off};
use tokio::io::BufReader;
use tokio::net::TcpSocket;
use tokio::time::Instant;

for_each_model!(
    one_address_at_its_limit_while_another_chats,
    a_flooder_is_cut_off_while_the_room_goes_on,
    memory_budget_evicts_the_largest_holder,
    sigint_with_stderr_gone_exits_cleanly,
);

/// A client connecting from `local` (any 127.0.0.0/8 address is loopback
/// on Linux), greeted or not.
async fn connect_from(local: &str, server: SocketAddr) -> io::Result<TestClient> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse().map_err(io::Error::other)?)?;
    let stream = socket.connect(server).await?;
    let who = stream.local_addr()?.to_string();
    let (reader, writer) = stream.into_split();
    Ok(TestClient::from_parts(who, BufReader::new(reader), writer))
}

/// Reads until `who` says `text`, failing on anything that ends the wait.
async fn hear(client: &mut TestClient, who: &str, text: &str) -> io::Result<Vec<String>> {
    let wanted = format!("{who}: {text}");
    let mut before = Vec::new();
    loop {
        let line = client.line().await?;
        if line == wanted {
            return Ok(before);
        }
        before.push(line);
    }
}

async fn one_address_at_its_limit_while_another_chats(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).with(|c| c.max_clients_per_ip = 3))?;
    let addr = server.addr();
    let mut crowd = Vec::new();
    for _ in 0..3 {
        let mut client = connect_from("127.0.0.1", addr).await?;
        client.line().await?;
        crowd.push(client);
    }
    // Refused at once, told why, closed; and again (one log line covers both).
    for _ in 0..2 {
        let mut refused = connect_from("127.0.0.1", addr).await?;
        let lines = refused.lines_until_closed().await?;
        ensure(lines == [chat_wire::TOO_MANY_FROM_ADDRESS], || {
            format!("{model}: the fourth from one address got {lines:?}")
        })?;
    }
    // Another address gets in and chats with the crowd.
    let mut other = connect_from("127.0.0.2", addr).await?;
    ensure(
        other.line().await? == chat_wire::greeting(&other.who),
        || "no greeting for another address".into(),
    )?;
    other.send("hello from elsewhere").await?;
    let other_who = other.who.clone();
    hear(&mut other, &other_who, "hello from elsewhere").await?;
    for client in &mut crowd {
        hear(client, &other_who, "hello from elsewhere").await?;
    }
    // Its place frees when one of the crowd leaves (asynchronously: retry
    // for a bounded time).
    drop(crowd.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = connect_from("127.0.0.1", addr).await?;
        let line = client.line().await?;
        if line == chat_wire::greeting(&client.who) {
            return Ok(());
        }
        ensure(Instant::now() < deadline, || {
            format!("{model}: no place freed: {line:?}")
        })?;
        tokio::task::yield_now().await;
    }
}

async fn a_flooder_is_cut_off_while_the_room_goes_on(model: Model) -> io::Result<()> {
    let server = TestServer::start(
        Config::with_model(model).with(|c| c.flood_grace = Some(Duration::from_millis(500))),
    )?;
    let mut flooder = TestClient::connect(server.addr()).await?;
    let mut chatter = TestClient::connect(server.addr()).await?;
    flooder.line().await?;
    let flooder_who = flooder.who.clone();
    let started = Instant::now();
    let last = flood_until_cut_off(flooder).await?;
    let lasted = started.elapsed();
    ensure(last.trim_end() == chat_wire::FLOODING, || {
        format!("{model}: the flooder's last line was {last:?}")
    })?;
    println!(
        "{model}: flooder cut off after {lasted:?} (a 64 KiB burst, then held back; grace 0.5 s)"
    );
    // The room goes on: the chatter hears the flooder leave, then itself.
    let left = chat_wire::left(&flooder_who);
    while chatter.line().await? != left {}
    chatter.send("still here").await?;
    let chatter_who = chatter.who.clone();
    hear(&mut chatter, &chatter_who, "still here").await?;
    Ok(())
}

async fn memory_budget_evicts_the_largest_holder(model: Model) -> io::Result<()> {
    // The smallest budget a 16 KiB --max-line allows is about 49 KiB.
    let server = TestServer::start(Config::with_model(model).with(|c| {
        c.max_line = 16 * 1024;
        c.max_client_memory = 50_000;
    }))?;
    let addr = server.addr();
    // A chatter, and two clients that each hold a 1 KiB partial line (a
    // 16 KiB read buffer): 32 KiB held, under the budget.
    let mut others = Vec::new();
    for index in 0..3 {
        let mut client = TestClient::connect(addr).await?;
        if index > 0 {
            client.send_raw(&[b's'; 1024]).await?;
        }
        others.push(client);
    }
    let mut hog = TestClient::connect(addr).await?;
    let hog_who = hog.who.clone();
    for (index, client) in others.iter_mut().enumerate() {
        for _ in index + 1..4 {
            client.line().await?;
        }
    }
    // 15 KiB of one unfinished line: a 32 KiB buffer, the largest holding,
    // and 64 KiB in all.
    hog.send_raw(&[b'h'; 15 * 1024]).await?;
    // The chatter talks meanwhile.
    let chatter_who = others[0].who.clone();
    others[0].send("talking meanwhile").await?;
    let mut heard = Vec::new();
    for client in &mut others {
        heard.push(hear(client, &chatter_who, "talking meanwhile").await?);
    }
    let lines = hog.lines_until_closed().await?;
    ensure(
        lines.last().map(String::as_str) == Some(chat_wire::TOO_MUCH_MEMORY),
        || format!("{model}: the largest holder got {lines:?}"),
    )?;
    // The others finish their lines and chat on, unharmed.
    let left = chat_wire::left(&hog_who);
    for client in &mut others {
        client.send(" done").await?;
    }
    for (client, mut seen) in others.iter_mut().zip(heard) {
        let done = |seen: &[String]| seen.iter().filter(|line| line.ends_with(" done")).count();
        while !(seen.contains(&left) && done(&seen) == 3) {
            seen.push(
                client
                    .line()
                    .await
                    .map_err(|err| io::Error::other(format!("{model}: {err} after {seen:?}")))?,
            );
        }
    }
    Ok(())
}

for_models_at_once!(
    [Sharded, Broadcaster, Locked]
    memory_budget_evicts_a_client_whose_queue_grows,
);

/// Queued bytes count too (in the models with a queue per client; the
/// `broadcast` ring is shared and bounded by `--max-pending`): a client that
/// never reads while another talks is evicted once its queue, behind the
/// kernel's buffers, takes the total over the budget, long before its own
/// `--max-pending` or `--write-timeout` would end it.
async fn memory_budget_evicts_a_client_whose_queue_grows(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).without_abuse_limits().with(|c| {
        c.max_line = 16 * 1024;
        c.max_client_memory = 256 * 1024;
        // Far above what the budget allows, so that only the budget can end
        // the stuck client (within the test's deadline).
        c.max_pending = 1 << 30;
        // The talker bursts on purpose.
    }))?;
    let stuck = TestClient::connect(server.addr()).await?;
    let stuck_who = stuck.who.clone();
    let mut talker = TestClient::connect(server.addr()).await?;
    let talker_who = talker.who.clone();
    let left = chat_wire::left(&stuck_who);
    let burst = format!("{}\n", "q".repeat(199)).repeat(100);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut sent = 0usize;
    'talking: loop {
        ensure(Instant::now() < deadline, || {
            format!("{model}: the stuck client was not evicted after {sent} bursts")
        })?;
        talker.send_raw(burst.as_bytes()).await?;
        sent += 1;
        // Paced at about 4 MB/s, so that the budget's 250 ms check sees the
        // queue grow rather than a queue already past anything.
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Read this burst's echoes (the talker must not be the one queueing).
        let mut echoes = 0;
        while echoes < 100 {
            let line = talker.line().await?;
            if line == left {
                break 'talking;
            }
            if line.starts_with(&talker_who) {
                echoes += 1;
            }
        }
    }
    // The kernel's buffers take about 4 MB first; then a quarter of a
    // second of the pace at most, beyond the budget.
    println!("{model}: evicted after {} KB sent", sent * 20);
    ensure(sent * 20 < 16_000, || {
        format!("{model}: evicted only after {} KB", sent * 20)
    })?;
    talker.send("after the eviction").await?;
    hear(&mut talker, &talker_who, "after the eviction").await?;
    drop(stuck);
    Ok(())
}

/// `chat-server 2>&1 | tee log`, then Ctrl-C kills `tee` too: the server's
/// stderr is a pipe nobody reads. It must log nothing, panic never, tell its
/// clients `server shutting down` and exit 0.
async fn sigint_with_stderr_gone_exits_cleanly(model: Model) -> io::Result<()> {
    let mut command = Command::new(binary("chat-server")?);
    command
        .args(["--addr", "127.0.0.1:0", "--model", model.name()])
        // Every arrival and departure is logged.
        .env("RUST_LOG", "info");
    let mut server = LineChild::spawn_with_stderr("chat-server", command, Stdio::piped())?;
    // Close the read end: every later write to stderr fails with EPIPE.
    drop(server.child.stderr.take());
    let banner = server.line()?;
    let addr: SocketAddr = chat_wire::banner::parse(&banner)
        .ok_or_else(|| io::Error::other(format!("unexpected banner {banner:?}")))?
        .0
        .parse()
        .map_err(io::Error::other)?;
    let mut first = TestClient::connect(addr).await?;
    let mut second = TestClient::connect(addr).await?;
    first.line().await?;
    second.send("logged to nowhere").await?;
    let second_who = second.who.clone();
    hear(&mut first, &second_who, "logged to nowhere").await?;
    server.signal(Signal::SIGINT)?;
    for client in [&mut first, &mut second] {
        let lines = client.lines_until_closed().await?;
        ensure(
            lines.last().map(String::as_str) == Some(chat_wire::SHUTTING_DOWN),
            || format!("{model}: {lines:?}"),
        )?;
    }
    let status = server.wait()?;
    ensure(status.success(), || {
        format!("{model}: exit status {status} with stderr gone")
    })
}

/// The soft and hard open-file limits of `pid`, from /proc.
fn open_file_limits(pid: u32) -> io::Result<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .ok_or_else(|| io::Error::other("no open-file limit in /proc"))?;
    let mut fields = line.split_whitespace().skip(3);
    match (fields.next(), fields.next()) {
        (Some(soft), Some(hard)) => Ok((soft.to_string(), hard.to_string())),
        _ => Err(io::Error::other(format!("unparsable {line:?}"))),
    }
}

/// A hard limit too low for `--max-clients`: a clear warning at start.
#[test]
fn open_file_limit_too_low_is_warned_about() -> io::Result<()> {
    let log = std::env::temp_dir().join(format!("chat-server-nofile-{}.log", std::process::id()));
    let server =
        ServerProcess::start_with_ulimit("-n 256", &["--max-clients", "1000"], &log, "info")?;
    drop(server);
    let text = std::fs::read_to_string(&log)?;
    let _ = std::fs::remove_file(&log);
    println!("{text}");
    ensure(
        text.contains("the open-file limit is 256")
            && text.contains("room for about 192 clients")
            && text.contains("--max-clients is 1000"),
        || format!("no clear warning:\n{text}"),
    )
}

/// A soft limit below what `--max-clients` needs is raised to the hard one,
/// and then there is nothing to warn about.
#[test]
fn soft_open_file_limit_is_raised_to_the_hard_one() -> io::Result<()> {
    let log = std::env::temp_dir().join(format!(
        "chat-server-nofile-soft-{}.log",
        std::process::id()
    ));
    let server = ServerProcess::start_with_ulimit(
        "-Sn 256 && ulimit -Hn 4096",
        &["--max-clients", "1000"],
        &log,
        "info",
    )?;
    let limits = open_file_limits(server.pid());
    drop(server);
    let text = std::fs::read_to_string(&log)?;
    let _ = std::fs::remove_file(&log);
    let (soft, hard) = limits?;
    ensure(soft == "4096" && hard == "4096", || {
        format!("soft {soft}, hard {hard}: not raised\n{text}")
    })?;
    ensure(text.contains("raised the open-file limit"), || {
        format!("the raise was not logged:\n{text}")
    })?;
    ensure(!text.contains("WARN"), || {
        format!("warned although it fits:\n{text}")
    })
}
