//! `--history N`, in every model: a newcomer's history block followed by
//! its live lines is the room's sequence of chat lines from the oldest one
//! shown, with no gap and no duplicate, each sender's lines in order, while
//! senders flood the room and newcomers join at arbitrary moments. Also the
//! bounds (lines, bytes, lines at `--max-line`), what history is not
//! (arrivals, departures), its combination with `--names`,
//! `--announce-present`, `--password-file`, TLS and the metrics, and what a
//! flooder can do to it.

use crate::common;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, Password, TlsFiles};
use chat_testkit::tls::{TestPki, TlsTestClient};
use common::ensure;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

for_each_model!(
    the_block_and_live_lines_hand_off_exactly,
    the_block_and_live_lines_hand_off_exactly_with_presence,
    shows_the_last_n_lines_and_fewer,
    keeps_at_most_the_bytes,
    keeps_lines_at_max_line,
    off_is_the_seed,
    combines_with_names_presence_and_password,
    combines_with_tls,
    counts_in_the_metrics,
);
for_each_model_at_once!(a_flooder_displaces_at_most_its_budget);

fn with_history(model: Model, lines: usize) -> Config {
    Config::with_model(model).with(|c| c.history = lines)
}

/// Reads a history block (header, lines, end) and returns its lines.
async fn read_block(who: &str, mut next: impl AsyncLines) -> io::Result<Vec<String>> {
    let header = next.line().await?;
    let count = chat_wire::history_of(&header).ok_or_else(|| {
        io::Error::other(format!("{who}: expected a history header, got {header:?}"))
    })?;
    let mut lines = Vec::with_capacity(count);
    for _ in 0..count {
        lines.push(next.line().await?);
    }
    let end = next.line().await?;
    ensure(end == chat_wire::HISTORY_END, || {
        format!("{who}: the block of {count} lines ended with {end:?}")
    })?;
    Ok(lines)
}

/// What `read_block` needs of a client, plain or TLS.
trait AsyncLines {
    async fn line(&mut self) -> io::Result<String>;
}

impl AsyncLines for &mut TestClient {
    async fn line(&mut self) -> io::Result<String> {
        TestClient::line(self).await
    }
}

impl AsyncLines for &mut TlsTestClient {
    async fn line(&mut self) -> io::Result<String> {
        TlsTestClient::line(self).await
    }
}

/// Connects, reads the greeting (and the `present` line if `present`) and
/// the history block.
async fn enter(addr: SocketAddr, present: bool) -> io::Result<(TestClient, Vec<String>)> {
    let mut client = TestClient::connect(addr).await?;
    if present {
        let line = client.line().await?;
        ensure(chat_wire::present_of(&line).is_some(), || {
            format!("{}: expected a present line, got {line:?}", client.who)
        })?;
    }
    let who = client.who.clone();
    let block = read_block(&who, &mut client).await?;
    Ok((client, block))
}

/// A small deterministic generator, so that a failing interleaving of
/// join moments is the same on every run of a model.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// How the hand-off test's room is busy.
const SENDERS: usize = 4;
/// Each sender sends at least this many lines, and goes on until every
/// newcomer has entered, so that every join falls inside the flood.
const MIN_LINES_PER_SENDER: usize = 400;
const JOINERS: usize = 32;
const HISTORY: usize = 64;
/// Every reader must have read everything by then.
const WITHIN: Duration = Duration::from_secs(60);

/// What the observer says once it has every sender's last line: the room's
/// last line, which every newcomer reads up to.
const THE_END: &str = "the end";

/// `(sender index, sequence number)` of a line `WHO: s{i} {q}` (or
/// `WHO: s{i} {q} last`), and whether it is the sender's last.
fn numbered(line: &str) -> Option<((usize, usize), bool)> {
    let (_, text) = line.split_once(": ")?;
    let mut words = text.strip_prefix('s')?.split(' ');
    let sender = words.next()?.parse().ok()?;
    let seq = words.next()?.parse().ok()?;
    let last = words.next() == Some("last");
    Some(((sender, seq), last))
}

async fn the_block_and_live_lines_hand_off_exactly(model: Model) -> io::Result<()> {
    hand_off(model, false).await
}

async fn the_block_and_live_lines_hand_off_exactly_with_presence(model: Model) -> io::Result<()> {
    hand_off(model, true).await
}

/// Senders flood numbered lines (1 to 4 a write); newcomers join when the
/// senders have written a pseudo-random number of lines. An observer
/// present from the start reads every sender's last line, then says
/// [`THE_END`]: the room's last line. Each newcomer reads its block and
/// then live lines up to that one; its sequence must hold each sender's
/// lines from the first it shows, each once, in order, through the last.
/// In the models with one total order (broadcaster, broadcast) it must
/// moreover be exactly the tail of what the observer received.
async fn hand_off(model: Model, present: bool) -> io::Result<()> {
    let server = TestServer::start(
        with_history(model, HISTORY)
            .without_abuse_limits()
            .with(|c| c.announce_present = present),
    )?;
    let addr = server.addr();
    let deadline = Instant::now() + WITHIN;
    let (mut observer, block) = enter(addr, present).await?;
    ensure(block.is_empty(), || {
        format!("{model}: history before anyone spoke: {block:?}")
    })?;
    let the_end = chat_wire::chat(&observer.who, THE_END);
    let observing = tokio::spawn(async move {
        let seen = read_until(
            &mut observer,
            Vec::new(),
            [false; SENDERS],
            deadline,
            |_, _, finished| finished.iter().all(|done| *done),
        )
        .await?;
        observer.send(THE_END).await?;
        io::Result::Ok((observer, seen))
    });

    let (progress, progressed) = watch::channel(0usize);
    let progress = Arc::new(progress);
    let entered = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let (client, _) = enter(addr, present).await?;
        senders.push((sender, client));
    }
    let mut joiners = Vec::new();
    let mut rng = Lcg(0x5eed ^ model as u64);
    for _ in 0..JOINERS {
        let at = HISTORY / 2 + rng.below((SENDERS * MIN_LINES_PER_SENDER) as u64) as usize;
        let mut progressed = progressed.clone();
        let the_end = the_end.clone();
        let entered = Arc::clone(&entered);
        joiners.push(tokio::spawn(async move {
            timeout(WITHIN, progressed.wait_for(|sent| *sent >= at))
                .await
                .map_err(|_| io::Error::other(format!("the senders never wrote {at} lines")))?
                .map_err(io::Error::other)?;
            let (mut client, block) = enter(addr, present).await?;
            entered.fetch_add(1, Ordering::Relaxed);
            ensure(block.len() <= HISTORY, || {
                format!("a block of {} lines, over --history {HISTORY}", block.len())
            })?;
            let who = client.who.clone();
            let shown = block.len();
            let mut seen = Vec::new();
            let mut finished = [false; SENDERS];
            let mut ended = false;
            for line in &block {
                if *line == the_end {
                    ended = true;
                    continue;
                }
                let (entry, last) = numbered(line)
                    .ok_or_else(|| io::Error::other(format!("{who}: history line {line:?}")))?;
                finished[entry.0] |= last;
                seen.push(entry);
            }
            // In `sharded` and `locked` the end may overtake a sender's
            // last lines (no total order): read on until every sender this
            // newcomer has seen has finished.
            seen = read_until(
                &mut client,
                seen,
                finished,
                deadline,
                |line, seen, finished| {
                    ended |= line == the_end;
                    ended
                        && seen
                            .iter()
                            .all(|(sender, _): &(usize, usize)| finished[*sender])
                },
            )
            .await?;
            io::Result::Ok((who, shown, seen))
        }));
    }
    let mut sending = Vec::new();
    for (sender, mut client) in senders {
        let progress = Arc::clone(&progress);
        let entered = Arc::clone(&entered);
        let mut rng = Lcg(sender as u64 + 7);
        sending.push(tokio::spawn(async move {
            let mut seq = 0;
            loop {
                let last =
                    seq >= MIN_LINES_PER_SENDER && entered.load(Ordering::Relaxed) == JOINERS;
                if last || Instant::now() >= deadline {
                    client.send(&format!("s{sender} {seq} last")).await?;
                    break;
                }
                let lines = 1 + rng.below(4) as usize;
                let mut burst = String::new();
                for q in seq..seq + lines {
                    burst.push_str(&format!("s{sender} {q}\n"));
                }
                client.send_raw(burst.as_bytes()).await?;
                seq += lines;
                progress.send_modify(|sent| *sent += lines);
                // Let the joiners in between bursts on a busy runtime.
                tokio::task::yield_now().await;
            }
            // Kept open until the readers are done, so that no departure
            // races the last lines (departures are not history anyway).
            io::Result::Ok((client, seq))
        }));
    }
    let mut keep = Vec::new();
    let mut lasts = [0; SENDERS];
    for (sender, task) in sending.into_iter().enumerate() {
        let (client, last) = task.await.map_err(io::Error::other)??;
        keep.push(client);
        lasts[sender] = last;
    }
    let (observer, observed) = observing.await.map_err(io::Error::other)??;
    check_senders("observer", &observed, &lasts, true)?;
    let total_order = matches!(model, Model::Broadcaster | Model::Broadcast);
    for joiner in joiners {
        let (who, shown, seen) = joiner.await.map_err(io::Error::other)??;
        check_senders(&who, &seen, &lasts, false).map_err(|err| {
            io::Error::other(format!("{model}: {err} (history block of {shown} lines)"))
        })?;
        if total_order {
            let tail = &observed[observed.len().saturating_sub(seen.len())..];
            ensure(tail == &seen[..], || {
                format!(
                    "{model}: {who}'s block of {shown} and live lines are not the room's last {} lines",
                    seen.len()
                )
            })?;
        }
    }
    drop((keep, observer));
    Ok(())
}

/// Reads numbered lines after those `seen` already (a history block, in
/// which the senders `finished` said their last) until `done` says so,
/// given the line, what was seen and which senders' last lines were seen;
/// ignores everything else (arrivals, departures).
async fn read_until(
    client: &mut TestClient,
    mut seen: Vec<(usize, usize)>,
    mut finished: [bool; SENDERS],
    deadline: Instant,
    mut done: impl FnMut(&str, &[(usize, usize)], &[bool; SENDERS]) -> bool,
) -> io::Result<Vec<(usize, usize)>> {
    if done("", &seen, &finished) {
        return Ok(seen);
    }
    loop {
        let line = tokio::time::timeout_at(deadline, client.line())
            .await
            .map_err(|_| {
                io::Error::other(format!(
                    "{}: stalled after {} lines",
                    client.who,
                    seen.len()
                ))
            })?
            .map_err(|err| {
                io::Error::other(format!(
                    "{}: {err} after {} lines, senders finished: {finished:?}",
                    client.who,
                    seen.len()
                ))
            })?;
        if let Some(((sender, seq), last)) = numbered(&line) {
            finished[sender] |= last;
            seen.push((sender, seq));
        }
        if done(&line, &seen, &finished) {
            return Ok(seen);
        }
    }
}

/// Each sender's lines in `seen` run from its first one shown to its last
/// sent, each once, in order; from 0 if `from_start`.
fn check_senders(
    who: &str,
    seen: &[(usize, usize)],
    lasts: &[usize; SENDERS],
    from_start: bool,
) -> io::Result<()> {
    let mut next: HashMap<usize, usize> = HashMap::new();
    for &(sender, seq) in seen {
        let expected = *next
            .entry(sender)
            .or_insert(if from_start { 0 } else { seq });
        ensure(seq == expected, || {
            let what = if seq < expected {
                "a duplicate or a step back"
            } else {
                "a gap"
            };
            format!("{who}: sender {sender}: line {seq} where {expected} was due ({what})")
        })?;
        next.insert(sender, seq + 1);
    }
    for (sender, last) in lasts.iter().enumerate() {
        // A newcomer may have come after a sender's last line left its
        // history: then it shows none of that sender's.
        let ended = next.get(&sender).is_none_or(|next| *next == last + 1);
        ensure(ended && (!from_start || next.contains_key(&sender)), || {
            format!("{who}: sender {sender} ended at {:?}", next.get(&sender))
        })?;
    }
    Ok(())
}

async fn shows_the_last_n_lines_and_fewer(model: Model) -> io::Result<()> {
    let server = TestServer::start(with_history(model, 5))?;
    let (mut ann, _) = enter(server.addr(), false).await?;
    for text in ["one", "two", "three"] {
        ann.send(text).await?;
        ann.expect(&chat_wire::chat(&ann.who, text)).await?;
    }
    // Fewer than N: all of them.
    let (mut bob, block) = enter(server.addr(), false).await?;
    let ann_who = ann.who.clone();
    let said = |texts: &[&str]| -> Vec<String> {
        texts
            .iter()
            .map(|text| chat_wire::chat(&ann_who, text))
            .collect()
    };
    ensure(block == said(&["one", "two", "three"]), || {
        format!("{model}: {block:?}")
    })?;
    ann.expect(&chat_wire::arrived(&bob.who)).await?;
    // One read of four lines is one message; the bound cuts into it.
    ann.send_raw(b"four\nfive\nsix\nseven\n").await?;
    for text in ["four", "five", "six", "seven"] {
        let line = chat_wire::chat(&ann.who, text);
        ann.expect(&line).await?;
        bob.expect(&line).await?;
    }
    bob.finish().await?;
    bob.lines_until_closed().await?;
    ann.expect(&chat_wire::left(&bob.who)).await?;
    // Exactly N, the newest, with no arrival or departure among them.
    let (_carol, block) = enter(server.addr(), false).await?;
    ensure(
        block == said(&["three", "four", "five", "six", "seven"]),
        || format!("{model}: {block:?}"),
    )?;
    Ok(())
}

async fn keeps_at_most_the_bytes(model: Model) -> io::Result<()> {
    let max_line = 100;
    // The smallest byte bound the configuration accepts for this --max-line.
    let bound = max_line * 3 + 128;
    let server = TestServer::start(with_history(model, 1000).with(|c| {
        c.max_line = max_line;
        c.history_bytes = bound;
    }))?;
    let (mut ann, _) = enter(server.addr(), false).await?;
    let mut sent = Vec::new();
    for n in 0..10 {
        let text = format!("{n:02}{}", "x".repeat(88));
        ann.send(&text).await?;
        let line = chat_wire::chat(&ann.who, &text);
        ann.expect(&line).await?;
        sent.push(line);
    }
    let (_bob, block) = enter(server.addr(), false).await?;
    let fit = bound / (sent[0].len() + 1);
    ensure(block[..] == sent[sent.len() - fit..], || {
        format!("{model}: expected the last {fit} lines, got {block:?}")
    })?;
    Ok(())
}

async fn keeps_lines_at_max_line(model: Model) -> io::Result<()> {
    let max_line = 1000;
    let server = TestServer::start(with_history(model, 3).with(|c| c.max_line = max_line))?;
    let (mut ann, _) = enter(server.addr(), false).await?;
    let mut sent = Vec::new();
    for n in 0..4 {
        let text = format!("{n}").repeat(max_line);
        ann.send(&text).await?;
        let line = chat_wire::chat(&ann.who, &text);
        ann.expect(&line).await?;
        sent.push(line);
    }
    let (_bob, block) = enter(server.addr(), false).await?;
    ensure(block[..] == sent[1..], || {
        format!("{model}: {} lines", block.len())
    })?;
    Ok(())
}

async fn off_is_the_seed(model: Model) -> io::Result<()> {
    let server = common::server(model)?;
    let mut ann = TestClient::connect(server.addr()).await?;
    ann.send("before").await?;
    ann.expect(&chat_wire::chat(&ann.who, "before")).await?;
    let mut bob = TestClient::connect(server.addr()).await?;
    ann.expect(&chat_wire::arrived(&bob.who)).await?;
    ann.send("after").await?;
    // The greeting, then straight to live lines.
    bob.expect(&chat_wire::chat(&ann.who, "after")).await?;
    Ok(())
}

async fn combines_with_names_presence_and_password(model: Model) -> io::Result<()> {
    let server = TestServer::start(with_history(model, 10).with(|c| {
        c.names = true;
        c.announce_present = true;
        c.password = Some(Password::new("sesame"));
    }))?;
    let addr = server.addr();
    let enter_as = |name: &'static str| async move {
        let mut client = TestClient::connect_raw(addr).await?;
        client.send("sesame").await?;
        client.expect(chat_wire::NAME_PROMPT).await?;
        client.send(name).await?;
        client.expect(&chat_wire::greeting(name)).await?;
        client.who = name.to_string();
        let present = client.line().await?;
        let block = read_block(name, &mut client).await?;
        io::Result::Ok((client, present, block))
    };
    let (mut ann, present, block) = enter_as("ann").await?;
    ensure(present == "present (0): nobody" && block.is_empty(), || {
        format!("{model}: {present:?} {block:?}")
    })?;
    // Shown as sanitised when said: the bell in caret notation.
    ann.send_raw(b"ring\x07\n").await?;
    ann.expect("ann: ring^G").await?;
    let (_bob, present, block) = enter_as("bob").await?;
    ensure(
        present == "present (1): ann" && block == ["ann: ring^G"],
        || format!("{model}: {present:?} {block:?}"),
    )?;
    Ok(())
}

async fn combines_with_tls(model: Model) -> io::Result<()> {
    let pki = TestPki::generate(&format!("history-{model}"))?;
    let server = TestServer::start(
        with_history(model, 10).with(|c| c.tls = Some(TlsFiles::new(&pki.cert, &pki.key))),
    )?;
    let mut ann = TlsTestClient::connect(server.addr(), &pki.ca).await?;
    let who = ann.who.clone();
    ensure(read_block(&who, &mut ann).await?.is_empty(), || {
        format!("{model}: history in an empty room")
    })?;
    ann.send("over TLS").await?;
    let line = chat_wire::chat(&ann.who, "over TLS");
    ann.expect(&line).await?;
    let mut bob = TlsTestClient::connect(server.addr(), &pki.ca).await?;
    let who = bob.who.clone();
    let block = read_block(&who, &mut bob).await?;
    ensure(block == [line], || format!("{model}: {block:?}"))?;
    Ok(())
}

async fn counts_in_the_metrics(model: Model) -> io::Result<()> {
    let server = TestServer::start(
        with_history(model, 10).with(|c| c.metrics_addr = Some("127.0.0.1:0".into())),
    )?;
    let metrics = server
        .metrics_addr()
        .ok_or_else(|| io::Error::other("no metrics address"))?;
    let (mut ann, _) = enter(server.addr(), false).await?;
    let mut bytes = 0;
    for text in ["one", "two"] {
        ann.send(text).await?;
        let line = chat_wire::chat(&ann.who, text);
        ann.expect(&line).await?;
        bytes += line.len() + 1;
    }
    let samples = common::scrape::scrape(metrics).await?;
    ensure(samples.get("chat_history_lines") == Some(&2.0), || {
        format!("{model}: {:?}", samples.get("chat_history_lines"))
    })?;
    ensure(
        samples.get("chat_history_bytes") == Some(&(bytes as f64)),
        || {
            format!(
                "{model}: {:?} for {bytes}",
                samples.get("chat_history_bytes")
            )
        },
    )?;
    Ok(())
}

/// The flood budget for [`a_flooder_displaces_at_most_its_budget`]: lines
/// per second, and a burst of one second of them.
const FLOOD_LINES: u32 = 20;

/// A flooder's lines enter the history only as fast as its input budget
/// lets the server read them: in `t` seconds at most one burst, `t`
/// seconds of the rate and the one read that goes over (the reader charges
/// after the read). So a history of N keeps an ordinary user's line for at
/// least (N - burst - one read) / rate seconds of flood.
async fn a_flooder_displaces_at_most_its_budget(model: Model) -> io::Result<()> {
    let history = 200;
    let server = TestServer::start(with_history(model, history).with(|c| {
        c.flood_lines = FLOOD_LINES;
        c.flood_bytes = 0;
        c.flood_burst = Duration::from_secs(1);
        c.flood_grace = None;
    }))?;
    let (mut victim, _) = enter(server.addr(), false).await?;
    victim.send("remember me").await?;
    let remembered = chat_wire::chat(&victim.who, "remember me");
    victim.expect(&remembered).await?;
    let (flooder, _) = enter(server.addr(), false).await?;
    let flooder_who = flooder.who.clone();
    let (_reader, mut writer) = flooder.into_parts();
    let started = Instant::now();
    let flood_for = Duration::from_millis(1500);
    // 100-byte lines: one read (at least 8 KiB, here at most 16) holds at
    // most 164 of them.
    let line = format!("{}\n", "f".repeat(99));
    let chunk = line.repeat(80);
    let flooding = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while started.elapsed() < flood_for {
            let left = flood_for.saturating_sub(started.elapsed());
            match timeout(left, writer.write_all(chunk.as_bytes())).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        writer
    });
    let _writer = flooding.await.map_err(io::Error::other)?;
    let (_newcomer, block) = enter(server.addr(), false).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let flooded = block
        .iter()
        .filter(|line| line.starts_with(&format!("{flooder_who}: ")))
        .count();
    let one_read = 16 * 1024 / line.len() + 1;
    let allowed = f64::from(FLOOD_LINES) * (1.0 + elapsed) + one_read as f64;
    ensure(flooded as f64 <= allowed, || {
        format!("{model}: {flooded} flood lines in history after {elapsed:.2} s; the budget allows {allowed:.0}")
    })?;
    if flooded < history {
        ensure(block.contains(&remembered), || {
            format!("{model}: only {flooded} flood lines, yet the victim's line is gone")
        })?;
    }
    Ok(())
}

#[test]
fn the_bounds_must_fit_the_other_limits() {
    let longest = 64 * 1024 * 3 + 128;
    let config = |history_bytes: usize, max_client_memory: usize| {
        Config::default().with(|c| {
            c.history = 10;
            c.history_bytes = history_bytes;
            c.max_client_memory = max_client_memory;
        })
    };
    assert!(config(longest, 0).validate().is_ok());
    assert!(
        config(longest - 1, 0).validate().is_err(),
        "a line at --max-line must fit"
    );
    assert!(config(longest, 2 * longest).validate().is_ok());
    assert!(
        config(longest, 2 * longest - 1).validate().is_err(),
        "the history counts against --max-client-memory"
    );
}
