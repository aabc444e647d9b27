//! `--announce-present` (gopl exercise 8.12), in every model: the list a
//! newcomer gets, plus the arrivals it later hears, minus the departures it
//! later hears, is exactly the room, however many clients join and leave
//! around it.
//!
//! Every client in these tests keeps such a view and checks each
//! announcement against it as it comes: an arrival of someone it already
//! has, or a departure of someone it does not have, fails at once. Clients
//! that stay until a storm is over then compare their view with who is
//! really connected.

use crate::common;

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, SlowClientPolicy};
use common::{ensure, expect_tasks};
use tokio::sync::watch;
use tokio::task::JoinHandle;

for_each_model!(
    lists_who_is_present,
    a_client_that_misses_an_announcement_is_disconnected,
    presence_holds_through_a_storm,
    presence_holds_through_a_storm_with_names,
);

/// Storm rounds per test; in each, `CHURNERS` tasks join and leave `CHURNS`
/// times each while `OBSERVERS` clients join at spread-out points of it.
const ROUNDS: usize = 20;
const CHURNERS: usize = 12;
const CHURNS: usize = 20;
const OBSERVERS: usize = 4;

fn start(model: Model, names: bool) -> io::Result<TestServer> {
    TestServer::start(Config::with_model(model).with(|c| {
        c.names = names;
        c.announce_present = true;
    }))
}

/// What one client believes is in the room.
#[derive(Debug)]
struct View {
    who: String,
    room: HashSet<String>,
}

impl View {
    /// Parses `present (N): A, B` (or `present (0): nobody`).
    fn parse(who: &str, line: &str) -> io::Result<View> {
        let names = chat_wire::present_of(line)
            .ok_or_else(|| io::Error::other(format!("{who}: bad present line {line:?}")))?;
        let room: HashSet<String> = names.iter().map(|name| name.to_string()).collect();
        ensure(room.len() == names.len(), || {
            format!("{who}: a name twice in {line:?}")
        })?;
        ensure(!room.contains(who), || format!("{who}: listed itself"))?;
        Ok(View {
            who: who.to_string(),
            room,
        })
    }

    /// Applies one received line; chat lines (`WHO: text`) change nothing.
    fn apply(&mut self, line: &str) -> io::Result<()> {
        if line.contains(": ") {
            return Ok(());
        }
        let who = &self.who;
        if let Some(name) = line.strip_suffix(" has arrived") {
            ensure(name != who, || format!("{who}: heard its own arrival"))?;
            ensure(self.room.insert(name.to_string()), || {
                format!("{who}: {name} announced arriving, but was already listed or announced")
            })
        } else if let Some(name) = line.strip_suffix(" has left") {
            ensure(self.room.remove(name), || {
                format!("{who}: {name} announced leaving, but was never listed or announced")
            })
        } else {
            Err(io::Error::other(format!("{who}: unexpected line {line:?}")))
        }
    }
}

/// Connects, names itself if `name` is given, and reads its greeting and list.
async fn join(addr: SocketAddr, name: Option<&str>) -> io::Result<(TestClient, View)> {
    let mut client = TestClient::connect_raw(addr).await?;
    if let Some(name) = name {
        client.expect(chat_wire::NAME_PROMPT).await?;
        client.send(name).await?;
        client.who = name.to_string();
    }
    client.expect(&format!("You are {}", client.who)).await?;
    let present = client.line().await?;
    let view = View::parse(&client.who, &present)?;
    Ok((client, view))
}

async fn lists_who_is_present(model: Model) -> io::Result<()> {
    let server = start(model, false)?;
    let (mut first, view) = join(server.addr(), None).await?;
    ensure(view.room.is_empty(), || format!("{model}: {view:?}"))?;
    let (mut second, view) = join(server.addr(), None).await?;
    ensure(view.room == HashSet::from([first.who.clone()]), || {
        format!("{model}: {view:?}")
    })?;
    first.expect(&format!("{} has arrived", second.who)).await?;
    let mut third = TestClient::connect_raw(server.addr()).await?;
    third.expect(&format!("You are {}", third.who)).await?;
    let present = third.line().await?;
    let expected = [
        format!("present (2): {}, {}", first.who, second.who),
        format!("present (2): {}, {}", second.who, first.who),
    ];
    ensure(expected.contains(&present), || {
        format!("{model}: got {present:?}")
    })?;
    // Chat is unchanged.
    third.send("hi").await?;
    let line = format!("{}: hi", third.who);
    second.expect(&format!("{} has arrived", third.who)).await?;
    second.expect(&line).await?;
    third.expect(&line).await?;
    Ok(())
}

/// `--slow-client drop` skips lines for a client that cannot keep up, but
/// an arrival or departure cannot be skipped without falsifying its view of
/// the room: with `--announce-present` the client gets it or is
/// disconnected. Here a client stops reading during a flood and someone
/// joins. In the queue models the arrival usually still fits the room the
/// skipped chat left, so the sleeper, once it reads, finds it after a gap
/// (or, if not, is disconnected); in `broadcast` the ring has overwritten
/// what the sleeper missed (it cannot know whether an arrival was among
/// it), so it is always disconnected.
async fn a_client_that_misses_an_announcement_is_disconnected(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).without_abuse_limits().with(|c| {
        c.slow_client = SlowClientPolicy::Drop;
        c.max_pending = 1024 * 1024;
        c.announce_present = true;
        // The talker's 40 MB is a flood by the default input budget; what
        // is tested is the sleeper, so flood control is off.
    }))?;
    let (mut sleeper, _) = join(server.addr(), None).await?;
    let (mut talker, _) = join(server.addr(), None).await?;
    sleeper
        .expect(&format!("{} has arrived", talker.who))
        .await?;
    // Far more than the sockets' buffers, the queue and the ring hold, in
    // bursts well under the talker's own queue limit, whose echoes it reads
    // as it goes: only the sleeper falls behind.
    let line = "z".repeat(1000);
    let burst: String = (0..100).map(|_| format!("{line}\n")).collect();
    let bursts = 400;
    for _ in 0..bursts {
        talker.send_raw(burst.as_bytes()).await?;
        let mut echoes = 0;
        while echoes < 100 {
            if talker.line().await?.ends_with(&line) {
                echoes += 1;
            }
        }
    }
    let (newcomer, _) = join(server.addr(), None).await?;
    let arrival = format!("{} has arrived", newcomer.who);
    talker.expect(&arrival).await?;
    let mut chat = 0;
    let heard = loop {
        match sleeper.line().await {
            Ok(got) if got == arrival => break true,
            Ok(got) if got.ends_with(&line) => chat += 1,
            Ok(got) if got == "error: disconnected: too slow" => {}
            Ok(got) => return Err(io::Error::other(format!("{model}: sleeper got {got:?}"))),
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break false,
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => break false,
            Err(err) => return Err(err),
        }
    };
    ensure(chat < bursts * 100, || {
        format!("{model}: the sleeper missed nothing; the flood was too small")
    })?;
    // Had the arrival been skipped with the sleeper kept, the loop above
    // would have failed waiting for it.
    if model == Model::Broadcast {
        ensure(!heard, || format!("{model}: a lagging reader was kept"))?;
    }
    if !heard {
        talker.expect(&format!("{} has left", sleeper.who)).await?;
    }
    Ok(())
}

async fn presence_holds_through_a_storm(model: Model) -> io::Result<()> {
    storm(model, false).await
}

async fn presence_holds_through_a_storm_with_names(model: Model) -> io::Result<()> {
    storm(model, true).await
}

async fn storm(model: Model, names: bool) -> io::Result<()> {
    let server = start(model, names)?;
    for round in 0..ROUNDS {
        storm_round(&server, model, names)
            .await
            .map_err(|err| io::Error::other(format!("{model}, round {round}: {err}")))?;
    }
    expect_tasks(&server, model, 0, "after the storm").await
}

async fn storm_round(server: &TestServer, model: Model, names: bool) -> io::Result<()> {
    let addr = server.addr();
    let name = |name: String| names.then_some(name);
    // The herald is present throughout; its line, sent when the storm is
    // over, tells everyone that every announcement of the storm is in.
    let (mut herald, herald_view) = join(addr, name("herald".into()).as_deref()).await?;
    let marker = format!("{}: storm over", herald.who);
    let (progress, churned) = watch::channel(0usize);
    let progress = Arc::new(progress);
    let churners: Vec<JoinHandle<io::Result<()>>> = (0..CHURNERS)
        .map(|id| tokio::spawn(churn(addr, names, id, Arc::clone(&progress))))
        .collect();
    let mut observers = Vec::new();
    for k in 0..OBSERVERS {
        let mut churned = churned.clone();
        let due = (k + 1) * CHURNERS * CHURNS / (OBSERVERS + 1);
        let _ = churned.wait_for(|done| *done >= due).await;
        let (client, view) = join(addr, name(format!("observer{k}")).as_deref()).await?;
        observers.push(tokio::spawn(observe(client, view, marker.clone())));
    }
    for churner in churners {
        churner.await.map_err(io::Error::other)??;
    }
    // A churner that vanished does not know when the server noticed; once
    // only the herald's and the observers' tasks are left, every churner
    // has left the hub and its departure is queued.
    expect_tasks(server, model, 1 + OBSERVERS, "after the churners").await?;
    herald.send("storm over").await?;
    let mut everyone = vec![observe(herald, herald_view, marker.clone()).await?];
    for observer in observers {
        everyone.push(observer.await.map_err(io::Error::other)??);
    }
    let room: HashSet<String> = everyone
        .iter()
        .map(|(client, _)| client.who.clone())
        .collect();
    for (client, view) in &everyone {
        let mut expected = room.clone();
        expected.remove(&client.who);
        ensure(view.room == expected, || {
            format!(
                "{} believes the room is {:?}; it is {expected:?}",
                client.who, view.room
            )
        })?;
    }
    for (mut client, _) in everyone {
        client.finish().await?;
        client.lines_until_closed().await?;
    }
    Ok(())
}

/// Reads and checks announcements until `marker`.
async fn observe(
    mut client: TestClient,
    mut view: View,
    marker: String,
) -> io::Result<(TestClient, View)> {
    loop {
        let line = client.line().await?;
        if line == marker {
            return Ok((client, view));
        }
        view.apply(&line)?;
    }
}

/// Joins and leaves `CHURNS` times, checking what it hears while present.
/// Every third time it vanishes without a word (closes without reading);
/// otherwise it ends its input and reads until the server closes.
async fn churn(
    addr: SocketAddr,
    names: bool,
    id: usize,
    progress: Arc<watch::Sender<usize>>,
) -> io::Result<()> {
    for j in 0..CHURNS {
        let vanish = j % 3 == 2;
        // A polite leaver's name is free once it sees the close, so it is
        // used again at once; a vanished one's may not be yet.
        let name = match (names, vanish) {
            (false, _) => None,
            (true, false) => Some(format!("churner{id}")),
            (true, true) => Some(format!("churner{id}.{j}")),
        };
        let (mut client, mut view) = join(addr, name.as_deref()).await?;
        if !vanish {
            client.finish().await?;
            for line in client.lines_until_closed().await? {
                view.apply(&line)?;
            }
        }
        drop(client);
        progress.send_modify(|done| *done += 1);
    }
    Ok(())
}
