//! `--names` (gopl exercise 8.14), in every model: a client's first line is
//! its name, unique in the room; until it has one it is not in the room;
//! afterwards the name stands wherever the seed says `IP:PORT`. (The idle
//! timeout before naming is in `tests/it/timers.rs`, on paused time.)

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};
use chat_wire::{BAD_NAME, NAME_PROMPT, NAME_TAKEN};
use common::{ensure, expect_tasks};
use tokio::sync::Barrier;

for_each_model!(
    seed_transcript_with_names,
    bad_and_taken_names_get_another_try,
    text_after_the_name_is_chat,
    exactly_one_of_many_wins_a_name,
    unnamed_clients_are_not_in_the_room,
    unnamed_client_with_a_long_line_is_disconnected,
    unnamed_client_is_told_of_shutdown,
);

fn named(model: Model) -> Config {
    Config::with_model(model).with(|c| c.names = true)
}

/// Connects and reads the prompt, without naming itself yet.
async fn unnamed(addr: SocketAddr) -> io::Result<TestClient> {
    let mut client = TestClient::connect_raw(addr).await?;
    client.expect(NAME_PROMPT).await?;
    Ok(client)
}

/// Connects as `name`, which must be free.
async fn join(addr: SocketAddr, name: &str) -> io::Result<TestClient> {
    let mut client = unnamed(addr).await?;
    client.send(name).await?;
    client.who = name.to_string();
    client.expect(&format!("You are {name}")).await?;
    Ok(client)
}

/// The seed's two-terminal session, with names where it has addresses.
async fn seed_transcript_with_names(model: Model) -> io::Result<()> {
    let server = TestServer::start(named(model))?;
    let mut ann = join(server.addr(), "ann").await?;
    let mut bob = join(server.addr(), "bob").await?;
    ann.expect("bob has arrived").await?;
    ann.send("Hi!").await?;
    ann.expect("ann: Hi!").await?;
    bob.expect("ann: Hi!").await?;
    bob.send("Hi yourself.").await?;
    ann.expect("bob: Hi yourself.").await?;
    bob.expect("bob: Hi yourself.").await?;
    ann.finish().await?;
    let rest = ann.lines_until_closed().await?;
    ensure(rest.is_empty(), || format!("leaver got {rest:?}"))?;
    bob.expect("ann has left").await?;
    let mut cat = join(server.addr(), "cat").await?;
    bob.expect("cat has arrived").await?;
    bob.send("Welcome.").await?;
    bob.expect("bob: Welcome.").await?;
    cat.expect("bob: Welcome.").await
}

async fn bad_and_taken_names_get_another_try(model: Model) -> io::Result<()> {
    let server = TestServer::start(named(model))?;
    let mut watcher = join(server.addr(), "watcher").await?;
    let mut newbie = unnamed(server.addr()).await?;
    let too_long = "x".repeat(33);
    let bad: [&[u8]; 8] = [
        b"\n",
        b"two words\n",
        too_long.as_bytes(),
        b"bob:\n",
        b"a,b\n",
        "caf\u{e9}\n".as_bytes(),
        b"esc\x1b[2J\n",
        b"tab\there\n",
    ];
    for name in bad {
        let mut line = name.to_vec();
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        newbie.send_raw(&line).await?;
        newbie.expect(BAD_NAME).await?;
    }
    newbie.send("watcher").await?;
    newbie.expect(NAME_TAKEN).await?;
    // Not in the room yet: the watcher's line does not reach it, and no
    // one heard of it.
    watcher.send("anyone there?").await?;
    watcher.expect("watcher: anyone there?").await?;
    // An unnamed connection is one task, its reader.
    let expected = model.expected_tasks(1) + 1;
    server
        .wait_for_tasks(expected, common::TASKS_SETTLE)
        .await
        .map_err(|alive| {
            io::Error::other(format!(
                "{model}: {alive} tasks with a named and an unnamed client, expected {expected}"
            ))
        })?;
    newbie.send("newbie").await?;
    newbie.who = "newbie".into();
    newbie.expect("You are newbie").await?;
    watcher.expect("newbie has arrived").await?;
    expect_tasks(&server, model, 2, "with two named clients").await?;
    newbie.send("hi").await?;
    newbie.expect("newbie: hi").await?;
    watcher.expect("newbie: hi").await?;
    newbie.finish().await?;
    newbie.lines_until_closed().await?;
    watcher.expect("newbie has left").await?;
    watcher.finish().await?;
    watcher.lines_until_closed().await?;
    expect_tasks(&server, model, 0, "after all left").await
}

/// The name and the first lines in one write: nothing after the name's
/// newline is lost or taken as a name.
async fn text_after_the_name_is_chat(model: Model) -> io::Result<()> {
    let server = TestServer::start(named(model))?;
    let mut carol = unnamed(server.addr()).await?;
    carol.send_raw(b"carol\r\nhello\nworld\n").await?;
    carol.who = "carol".into();
    carol.expect("You are carol").await?;
    carol.expect("carol: hello").await?;
    carol.expect("carol: world").await
}

/// Many clients ask for one name at once; exactly one gets it, the others
/// are told it is taken and can choose again. Once the winner has left,
/// the name is free.
async fn exactly_one_of_many_wins_a_name(model: Model) -> io::Result<()> {
    const CONTENDERS: usize = 8;
    const ROUNDS: usize = 25;
    let server = TestServer::start(named(model).with(|c| c.announce_present = true))?;
    for round in 0..ROUNDS {
        let name = format!("prize{round}");
        let start = Arc::new(Barrier::new(CONTENDERS));
        let mut tasks = Vec::new();
        for _ in 0..CONTENDERS {
            let (start, name) = (Arc::clone(&start), name.clone());
            let addr = server.addr();
            tasks.push(tokio::spawn(async move {
                let mut client = unnamed(addr).await?;
                start.wait().await;
                client.send(&name).await?;
                let answer = client.line().await?;
                Ok::<_, io::Error>((client, answer))
            }));
        }
        let mut winners = 0;
        let mut losers = Vec::new();
        for task in tasks {
            let (client, answer) = task.await.map_err(io::Error::other)??;
            if answer == format!("You are {name}") {
                winners += 1;
                let mut winner = client;
                winner.who = name.clone();
                winner.line().await?; // its present line
                losers.push((winner, true));
            } else {
                ensure(answer == NAME_TAKEN, || {
                    format!("{model}, round {round}: got {answer:?}")
                })?;
                losers.push((client, false));
            }
        }
        ensure(winners == 1, || {
            format!("{model}, round {round}: {winners} clients won {name}")
        })?;
        // The losers choose again; then the winner leaves and one of them
        // takes the name as soon as it has seen the winner's connection close.
        let mut room = Vec::new();
        let mut winner = None;
        for (i, (mut client, won)) in losers.into_iter().enumerate() {
            if won {
                winner = Some(client);
                continue;
            }
            let other = format!("{name}.{i}");
            client.send(&other).await?;
            client.who = other.clone();
            client.expect(&format!("You are {other}")).await?;
            client.line().await?; // its present line
            room.push(client);
        }
        let mut winner = winner
            .ok_or_else(|| io::Error::other(format!("{model}: no winner in round {round}")))?;
        winner.finish().await?;
        winner.lines_until_closed().await?;
        let mut heir = join(server.addr(), &name).await?;
        heir.line().await?; // its present line
        room.push(heir);
        for mut client in room {
            client.finish().await?;
            client.lines_until_closed().await?;
        }
    }
    expect_tasks(&server, model, 0, "after the races").await
}

/// A client that goes before naming itself was never in the room: nobody
/// hears of it leaving, and it leaves no task behind.
async fn unnamed_clients_are_not_in_the_room(model: Model) -> io::Result<()> {
    let server = TestServer::start(named(model).with(|c| c.announce_present = true))?;
    let mut watcher = join(server.addr(), "watcher").await?;
    watcher.expect("present (0): nobody").await?;
    let ghost = unnamed(server.addr()).await?;
    let mut half_named = unnamed(server.addr()).await?;
    half_named.send_raw(b"half").await?;
    drop(ghost);
    drop(half_named);
    expect_tasks(&server, model, 1, "after the unnamed left").await?;
    watcher.send("still alone").await?;
    watcher.expect("watcher: still alone").await?;
    let mut late = join(server.addr(), "late").await?;
    late.expect("present (1): watcher").await?;
    watcher.expect("late has arrived").await
}

async fn unnamed_client_with_a_long_line_is_disconnected(model: Model) -> io::Result<()> {
    let server = TestServer::start(named(model).with(|c| c.max_line = 64))?;
    let mut long = unnamed(server.addr()).await?;
    long.send_raw(&[b'x'; 100]).await?;
    long.expect("error: line too long (max 64 bytes)").await?;
    long.finish().await?;
    let rest = long.lines_until_closed().await?;
    ensure(rest.is_empty(), || format!("{model}: then got {rest:?}"))?;
    // A name line at the limit is still just a bad name.
    let mut exact = unnamed(server.addr()).await?;
    exact.send(&"y".repeat(64)).await?;
    exact.expect(BAD_NAME).await?;
    Ok(())
}

async fn unnamed_client_is_told_of_shutdown(model: Model) -> io::Result<()> {
    let server = TestServer::start(named(model))?;
    let mut named_one = join(server.addr(), "named").await?;
    let mut waiting = unnamed(server.addr()).await?;
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .map_err(io::Error::other)?;
    named_one.expect("server shutting down").await?;
    waiting.expect("server shutting down").await?;
    let rest = waiting.lines_until_closed().await?;
    ensure(rest.is_empty(), || format!("{model}: then got {rest:?}"))
}
