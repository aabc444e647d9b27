//! A randomised fault run of the clustered room (issue 18), `#[ignore]`d:
//! run it with
//!
//! ```text
//! cargo test --test cluster cluster_chaos:: -- --ignored --nocapture
//! ```
//!
//! (`CHAT_CHAOS_SEED=N` replays a run, `CHAT_CHAOS_SECS=S` sets its
//! length, 60 by default.) On a 3-server JetStream cluster, three nodes in
//! this process (each through relays to all three servers, with
//! `--announce-present`, models chosen by the seed) and one `chat-server`
//! process, while every node's clients chat, one fault at a time, chosen
//! by the seed: a node partitioned from every server (relays black-hole
//! it) and healed, a server killed (`SIGKILL`) and restarted on its store,
//! a server killed and restarted on an EMPTY store (it catches up from the
//! others), and the process node killed (`SIGKILL`) and started again with
//! a new client. At the end everything is healed and the senders stop;
//! then every transcript is checked:
//!
//! - each sender's lines heard by each client are consecutive (nothing
//!   twice, nothing out of order, no gap) and, between clients that lived
//!   through the run, complete; a killed node's client's lines are a
//!   prefix of what it wrote;
//! - nothing is excused: the nodes' `dropped` and `missed` counters are
//!   printed with any gap;
//! - the membership invariant (`common::transcript::membership_violations`).
//!
//! Everything is on loopback; the run is bounded by its length plus the
//! bounded waits of the end.

use crate::common;

use std::io;
use std::time::Duration;

use chat_server::{ClusterConfig, ClusterStats, Config, Model};
use chat_testkit::process::{ServerProcess, Signal};
use chat_testkit::{BrokerCluster, Relay};
use common::cluster::Node;
use common::transcript::{membership_violations, numbered, Recorded};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// SplitMix64: a reproducible sequence from the printed seed (no crate
/// for twenty lines).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

fn env_u64(name: &str, default: u64) -> io::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|_| io::Error::other(format!("{name}={value:?} is not a number"))),
        Err(_) => Ok(default),
    }
}

/// The tag of the chat lines (see `common::transcript`).
const TAG: &str = "c";

/// How long a client waits between lines.
const SEND_GAP: Duration = Duration::from_millis(40);

/// The bound on the final deliveries once every fault is healed.
const SETTLE: Duration = Duration::from_secs(60);

/// A client and its sender.
struct Chatter {
    client: Recorded,
    sending: Option<JoinHandle<(usize, Option<tokio::net::tcp::OwnedWriteHalf>)>>,
    /// Lines written, once its sender ended.
    sent: usize,
    /// Connected to the process node, which may be killed.
    mortal: bool,
    /// Its node was killed: it hears nothing more.
    dead: bool,
}

impl Chatter {
    /// Connects; [`Chatter::start`] starts its sender.
    async fn connect(
        addr: std::net::SocketAddr,
        mortal: bool,
        others: &[Chatter],
    ) -> io::Result<Chatter> {
        let taken = others.iter().map(|other| other.client.who.as_str());
        Ok(Chatter {
            client: Recorded::connect_unlike(addr, taken).await?,
            sending: None,
            sent: 0,
            mortal,
            dead: false,
        })
    }

    fn start(&mut self, stop: &CancellationToken) {
        self.sending = Some(self.client.send_until(TAG, SEND_GAP, stop.clone()));
    }

    async fn finish(&mut self) -> io::Result<()> {
        if let Some(sending) = self.sending.take() {
            let (sent, writer) = sending.await.map_err(io::Error::other)?;
            self.sent = sent;
            self.client.keep(writer);
        }
        Ok(())
    }
}

/// The process node: started with every server's URL and default timers.
fn process_node(brokers: &BrokerCluster, model: Model) -> io::Result<ServerProcess> {
    ServerProcess::start(&[
        "--cluster",
        &brokers.urls(),
        "--announce-present",
        "--model",
        &model.to_string(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a 60-second randomised fault run: cargo test --test cluster cluster_chaos:: -- --ignored --nocapture"]
async fn randomised_faults_lose_nothing() -> io::Result<()> {
    let seed = env_u64("CHAT_CHAOS_SEED", 18)?;
    let length = Duration::from_secs(env_u64("CHAT_CHAOS_SECS", 60)?);
    eprintln!("chaos: seed {seed} (CHAT_CHAOS_SEED), {length:?} (CHAT_CHAOS_SECS)");
    let mut rng = Rng(seed);
    let Some(mut brokers) = tokio::task::block_in_place(BrokerCluster::start)? else {
        return Ok(());
    };
    // Relays[node][server]: a node reaches every server through its own.
    let relays = (0..3)
        .map(|_| {
            (0..3)
                .map(|server| Relay::start(brokers.addr(server)))
                .collect::<io::Result<Vec<_>>>()
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut nodes = Vec::new();
    for (index, node_relays) in relays.iter().enumerate() {
        let urls: Vec<String> = node_relays.iter().map(Relay::nats_url).collect();
        let model = Model::ALL[(seed as usize + index) % Model::ALL.len()];
        let config = ClusterConfig::new(&urls.join(",")).with(|c| {
            // Quick reconnects: a healed relay is used at once.
            c.reconnect_max = Duration::from_millis(500);
        });
        nodes.push(Node::start_with(
            config,
            Config::with_model(model).with(|c| c.announce_present = true),
        )?);
        eprintln!("chaos: node {index} runs {model}");
    }
    for node in &nodes {
        node.joined(1).await?;
    }
    let process_model = Model::ALL[(seed as usize + 3) % Model::ALL.len()];
    let mut process = Some(process_node(&brokers, process_model)?);
    let stop = CancellationToken::new();
    let mut chatters = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let chatter = Chatter::connect(node.addr(), false, &chatters).await?;
            chatters.push(chatter);
        }
    }
    if let Some(process) = &process {
        let addr = process.addr.parse().map_err(io::Error::other)?;
        let chatter = Chatter::connect(addr, true, &chatters).await?;
        chatters.push(chatter);
    }
    // Nobody speaks before everyone has heard everyone who came later
    // arrive: then every client hears every line from the first.
    let deadline = Instant::now() + SETTLE;
    for (index, chatter) in chatters.iter().enumerate() {
        for later in &chatters[index + 1..] {
            let arrival = format!("{} has arrived", later.client.who);
            while !chatter.client.lines().contains(&arrival) {
                if Instant::now() >= deadline {
                    return Err(io::Error::other(format!(
                        "{} never heard {arrival:?}",
                        chatter.client.who
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    for chatter in &mut chatters {
        chatter.start(&stop);
    }

    let started = Instant::now();
    let mut log = Vec::new();
    while started.elapsed() < length {
        tokio::time::sleep(rng.millis(1_000, 3_000)).await;
        let hold = rng.millis(1_500, 5_000);
        let at = started.elapsed().as_secs_f64();
        match rng.below(4) {
            0 => {
                let node = rng.below(3) as usize;
                log.push(format!("{at:5.1}s partition node {node} for {hold:?}"));
                relays[node].iter().for_each(Relay::partition);
                tokio::time::sleep(hold).await;
                relays[node].iter().for_each(Relay::heal);
            }
            1 => {
                let server = rng.below(3) as usize;
                log.push(format!(
                    "{at:5.1}s kill -9 server n{server}, restart after {hold:?}"
                ));
                tokio::task::block_in_place(|| brokers.kill(server))?;
                tokio::time::sleep(hold).await;
                tokio::task::block_in_place(|| brokers.restart(server))?;
            }
            2 => {
                let server = rng.below(3) as usize;
                log.push(format!(
                    "{at:5.1}s kill -9 server n{server}, restart on an EMPTY store after {hold:?}"
                ));
                tokio::task::block_in_place(|| brokers.kill(server))?;
                tokio::time::sleep(hold).await;
                tokio::task::block_in_place(|| brokers.restart_empty(server))?;
            }
            _ => {
                log.push(format!(
                    "{at:5.1}s kill -9 the process node, restart after {hold:?}"
                ));
                if let Some(dying) = process.take() {
                    dying.process.signal(Signal::SIGKILL)?;
                    for chatter in chatters.iter_mut().filter(|c| c.mortal && !c.dead) {
                        chatter.dead = true;
                    }
                    drop(dying);
                }
                tokio::time::sleep(hold).await;
                let fresh = process_node(&brokers, process_model)?;
                let addr = fresh.addr.parse().map_err(io::Error::other)?;
                let mut chatter = Chatter::connect(addr, true, &chatters).await?;
                chatter.start(&stop);
                chatters.push(chatter);
                process = Some(fresh);
            }
        }
        eprintln!("chaos: {}", log.last().map_or("", String::as_str));
    }
    // Everything is up and healed (each fault was undone before the next);
    // the room talks a little longer, then the senders stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for chatter in &mut chatters {
        chatter.finish().await?;
    }
    let ran = started.elapsed();

    // Wait (bounded) until every live client heard every live sender's
    // last line.
    let live: Vec<usize> = (0..chatters.len()).filter(|&i| !chatters[i].dead).collect();
    let deadline = Instant::now() + SETTLE;
    for &listener in &live {
        for &sender in &live {
            let who = chatters[sender].client.who.clone();
            let last = chatters[sender].sent;
            loop {
                let heard = numbered(&chatters[listener].client.lines(), &who, TAG);
                if last == 0 || heard.last() == Some(&(last - 1)) || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    let mut problems = Vec::new();
    let mut membership = Vec::new();
    for listener in &chatters {
        let lines = listener.client.lines();
        for sender in &chatters {
            let heard = numbered(&lines, &sender.client.who, TAG);
            if let Some(pair) = heard.windows(2).find(|pair| pair[1] != pair[0] + 1) {
                problems.push(format!(
                    "{} heard {} go from {} to {} ({} lines heard, {} written)",
                    listener.client.who,
                    sender.client.who,
                    pair[0],
                    pair[1],
                    heard.len(),
                    sender.sent
                ));
            }
            let lived_through = !listener.mortal && !sender.mortal;
            if lived_through && heard.len() != sender.sent {
                problems.push(format!(
                    "{} heard {} of {} lines {} wrote",
                    listener.client.who,
                    heard.len(),
                    sender.sent,
                    sender.client.who
                ));
            }
            if !sender.dead
                && !listener.dead
                && heard.last().map(|n| n + 1) != Some(sender.sent)
                && sender.sent > 0
            {
                problems.push(format!(
                    "{} did not hear {}'s last line ({} written, last heard {:?})",
                    listener.client.who,
                    sender.client.who,
                    sender.sent,
                    heard.last()
                ));
            }
            if sender.dead && heard.first().is_some_and(|&first| first != 0) && !listener.mortal {
                problems.push(format!(
                    "{} heard the killed node's {} from line {:?}, not 0",
                    listener.client.who,
                    sender.client.who,
                    heard.first()
                ));
            }
        }
        for violation in membership_violations(&listener.client.who, &lines) {
            membership.push(format!("{}: {violation}", listener.client.who));
        }
    }
    let sum = |counter: fn(&ClusterStats) -> u64| -> u64 {
        nodes
            .iter()
            .map(|node| counter(&node.counters.snapshot()))
            .sum()
    };
    let written: usize = chatters.iter().map(|chatter| chatter.sent).sum();
    let silence = chatters
        .iter()
        .filter(|chatter| !chatter.mortal)
        .map(|chatter| chatter.client.longest_silence())
        .max()
        .unwrap_or_default();
    eprintln!(
        "chaos: seed {seed}: {} faults in {ran:?}; {} clients wrote {written} lines; \
         in-process nodes: dropped {}, missed {}, dead nodes declared {}, streams remade {}, \
         consumers opened {}; longest silence a surviving client saw between two lines \
         of one sender {silence:?}",
        log.len(),
        chatters.len(),
        sum(|c| c.dropped),
        sum(|c| c.missed),
        sum(|c| c.dead_nodes),
        sum(|c| c.streams_remade),
        sum(|c| c.streams_opened),
    );
    eprintln!(
        "chaos: {} line problems, {} membership violations",
        problems.len(),
        membership.len()
    );
    for problem in problems.iter().take(30) {
        eprintln!("chaos: LINES {problem}");
    }
    for violation in membership.iter().take(30) {
        eprintln!("chaos: MEMBERSHIP {violation}");
    }
    if problems.is_empty() && membership.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "seed {seed}: {} line problems, {} membership violations (see above)",
            problems.len(),
            membership.len()
        )))
    }
}
