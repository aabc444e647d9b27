//! Clients whose every line is recorded as it arrives, for the fault tests
//! of the clustered room: a test lets them chat while it breaks things,
//! waits (bounded) for what must arrive, then checks the whole transcript:
//! each sender's numbered lines exactly once and in order, and the
//! membership lines consistent with the lines (the invariant of
//! ARCHITECTURE.md, "Membership and liveness").
//!
//! A chat line is `WHO: TAG-N`: `TAG` names a phase of the test, `N`
//! counts from 0 per sender and phase.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::TestClient;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How many connects [`Recorded::connect_unlike`] tries.
const DISTINCT_TRIES: usize = 10;

/// What one client heard, with when.
pub type Heard = Arc<Mutex<Vec<(Instant, String)>>>;

/// A connected client whose lines are recorded by a task of its own.
pub struct Recorded {
    pub who: String,
    pub heard: Heard,
    writer: Option<OwnedWriteHalf>,
    reader: JoinHandle<()>,
}

impl Recorded {
    /// Connects to `addr` and starts recording (the greeting is checked).
    pub async fn connect(addr: SocketAddr) -> io::Result<Recorded> {
        let client = TestClient::connect(addr).await?;
        let who = client.who.clone();
        let (mut reader, writer) = client.into_parts();
        let heard: Heard = Arc::default();
        let sink = Arc::clone(&heard);
        let reader = tokio::spawn(async move {
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw).await {
                    Ok(n) if n > 0 => {
                        let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                        sink.lock().push((Instant::now(), line));
                    }
                    _ => return,
                }
            }
        });
        Ok(Recorded {
            who,
            heard,
            writer: Some(writer),
            reader,
        })
    }

    /// [`Recorded::connect`], again while the client's address is one of
    /// `taken`: the kernel gives connections to two different nodes the same
    /// local port as readily as two different ones (252 of 2,000 pairs
    /// shared one, tried on this machine), and the seed names a client by
    /// its address, so the room would hear two clients as one sender
    /// (`killing_the_stream_leader_loses_nothing` once failed with "150
    /// duplicated" so).
    pub async fn connect_unlike<'a>(
        addr: SocketAddr,
        taken: impl IntoIterator<Item = &'a str> + Clone,
    ) -> io::Result<Recorded> {
        for _ in 0..DISTINCT_TRIES {
            let client = Recorded::connect(addr).await?;
            if !taken.clone().into_iter().any(|who| who == client.who) {
                return Ok(client);
            }
        }
        Err(io::Error::other(format!(
            "no address unlike the others' in {DISTINCT_TRIES} connects to {addr}"
        )))
    }

    /// Sends `TAG-0` .. `TAG-(count-1)`, one a write, `gap` apart.
    pub fn send_numbered(&mut self, tag: &str, count: usize, gap: Duration) -> Sending {
        let writer = self.writer.take();
        let tag = tag.to_string();
        tokio::spawn(async move {
            let Some(mut writer) = writer else {
                return Err(io::Error::other("already sending"));
            };
            for n in 0..count {
                writer.write_all(format!("{tag}-{n}\n").as_bytes()).await?;
                if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
            }
            Ok(writer)
        })
    }

    /// Sends `TAG-0`, `TAG-1`, ... one a write, `gap` apart, until `stop`
    /// or a failed write (its node died); returns how many were written,
    /// and the writer, still open: dropping it would end the client's
    /// input, and the node would take it as leaving.
    pub fn send_until(
        &mut self,
        tag: &str,
        gap: Duration,
        stop: CancellationToken,
    ) -> JoinHandle<(usize, Option<OwnedWriteHalf>)> {
        let writer = self.writer.take();
        let tag = tag.to_string();
        tokio::spawn(async move {
            let Some(mut writer) = writer else {
                return (0, None);
            };
            let mut sent = 0;
            while !stop.is_cancelled() {
                if writer
                    .write_all(format!("{tag}-{sent}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(gap) => {}
                }
            }
            (sent, Some(writer))
        })
    }

    /// Keeps `writer` (from a finished [`Recorded::send_until`]) open.
    pub fn keep(&mut self, writer: Option<OwnedWriteHalf>) {
        self.writer = writer;
    }

    /// Gives back the writer a finished [`Recorded::send_numbered`] took.
    pub async fn sent(&mut self, sending: Sending) -> io::Result<()> {
        self.writer = Some(sending.await.map_err(io::Error::other)??);
        Ok(())
    }

    /// Lines heard so far.
    pub fn lines(&self) -> Vec<String> {
        self.heard
            .lock()
            .iter()
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// How many `TAG-N` lines from `sender` were heard.
    pub fn count_from(&self, sender: &str, tag: &str) -> usize {
        numbered(&self.lines(), sender, tag).len()
    }

    /// Waits (within `within`) until `count` `TAG-N` lines from each of
    /// `senders` were heard.
    pub async fn wait_for(
        &self,
        senders: &[&str],
        tag: &str,
        count: usize,
        within: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.lines();
            let short: Vec<(&str, usize)> = senders
                .iter()
                .map(|&sender| (sender, numbered(&lines, sender, tag).len()))
                .filter(|&(_, heard)| heard < count)
                .collect();
            if short.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} heard too few {tag} lines within {within:?} (of {count} each): {short:?}",
                    self.who
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Checks that `sender`'s `TAG-N` lines were heard exactly once each,
    /// in order, `0..count`.
    pub fn check_complete(&self, sender: &str, tag: &str, count: usize) -> io::Result<()> {
        let numbers = numbered(&self.lines(), sender, tag);
        if numbers == (0..count).collect::<Vec<_>>() {
            return Ok(());
        }
        let unique: BTreeSet<usize> = numbers.iter().copied().collect();
        Err(io::Error::other(format!(
            "{} heard {} {tag} lines from {sender}: {} lost, {} duplicated, in order: {}",
            self.who,
            numbers.len(),
            count.saturating_sub(unique.len()),
            numbers.len() - unique.len(),
            numbers.windows(2).all(|pair| pair[0] < pair[1])
        )))
    }

    /// The longest wait between two consecutive lines from any one sender.
    pub fn longest_silence(&self) -> Duration {
        let mut last: HashMap<String, Instant> = HashMap::new();
        let mut longest = Duration::ZERO;
        for (at, line) in self.heard.lock().iter() {
            if let Some((sender, _)) = line.rsplit_once(": ") {
                if let Some(before) = last.insert(sender.to_string(), *at) {
                    longest = longest.max(*at - before);
                }
            }
        }
        longest
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A [`Recorded::send_numbered`] under way.
pub type Sending = JoinHandle<io::Result<OwnedWriteHalf>>;

/// The numbers of `sender`'s `TAG-N` lines in `lines`, in order heard.
pub fn numbered(lines: &[String], sender: &str, tag: &str) -> Vec<usize> {
    lines
        .iter()
        .filter_map(|line| {
            let (from, text) = line.split_once(": ")?;
            let (line_tag, number) = text.rsplit_once('-')?;
            (from == sender && line_tag == tag).then(|| number.parse().ok())?
        })
        .collect()
}

/// Checks the membership invariant over one client's transcript: the
/// sender of every chat line it hears is, at that moment, in its view (the
/// `present` list it was given, if any, plus arrivals, minus departures;
/// itself always), and it never hears the arrival of someone in its view
/// or the departure of someone not in it. Returns every violation.
pub fn membership_violations(me: &str, lines: &[String]) -> Vec<String> {
    let mut view: BTreeSet<String> = BTreeSet::new();
    view.insert(me.to_string());
    let mut violations = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        if let Some(who) = line.strip_suffix(" has arrived") {
            if !view.insert(who.to_string()) {
                violations.push(format!("line {index}: arrival of {who}, already here"));
            }
        } else if let Some(who) = line.strip_suffix(" has left") {
            if !view.remove(who) {
                violations.push(format!("line {index}: departure of {who}, not here"));
            }
        } else if let Some(names) = chat_wire::present_of(line) {
            view.extend(names.into_iter().map(str::to_string));
        } else if let Some((from, _)) = line.split_once(": ") {
            if !view.contains(from) {
                violations.push(format!("line {index}: {line:?} from {from}, not here"));
            }
        }
    }
    violations
}
