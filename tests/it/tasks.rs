//! Task counts from tokio's runtime metrics: each model runs exactly the
//! tasks ARCHITECTURE.md says it does (the seed's 2n+2 for `broadcaster`,
//! 2n+1 for the others), and every task goes away when its client does.

use crate::common;

use std::io;

use chat_server::harness::TestClient;
use chat_server::Model;
use common::{connect_all, ensure, expect_tasks, server};

for_each_model!(exact_task_counts, no_task_leaks_when_clients_vanish);

async fn exact_task_counts(model: Model) -> io::Result<()> {
    let server = server(model)?;
    expect_tasks(&server, model, 0, "idle").await?;

    let mut clients: Vec<TestClient> = Vec::new();
    for n in [1, 10, 100] {
        clients.extend(connect_all(&server, n - clients.len()).await?);
        // Each connected client has read its greeting, which its writer task
        // sends after the reader task has spawned it: both tasks exist now.
        let alive = server.alive_tasks();
        let expected = model.expected_tasks(n);
        ensure(alive == expected, || {
            format!("{model}: {alive} tasks for {n} clients, expected {expected}")
        })?;
    }

    // Half leave politely, half just close.
    for (i, mut client) in clients.drain(..).enumerate() {
        if i % 2 == 0 {
            client.finish().await?;
        }
    }
    expect_tasks(&server, model, 0, "after all left").await
}

/// Clients that reset mid-line, half-close and keep reading, or connect and
/// say nothing before vanishing: each is cleaned up and counted as left once.
async fn no_task_leaks_when_clients_vanish(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut watcher = TestClient::connect(server.addr()).await?;

    let mut silent = TestClient::connect_raw(server.addr()).await?;
    silent.line().await?;
    let mut half_closed = TestClient::connect(server.addr()).await?;
    half_closed.finish().await?;
    let resetter = TestClient::connect(server.addr()).await?;
    let resetter_who = resetter.who.clone();
    let (reader, mut writer) = resetter.into_parts();
    tokio::io::AsyncWriteExt::write_all(&mut writer, b"half a li").await?;
    // SO_LINGER 0 makes close send a reset instead of a FIN.
    let stream = reader
        .into_inner()
        .reunite(writer)
        .map_err(io::Error::other)?;
    stream.set_zero_linger()?;
    drop(stream);
    let silent_who = silent.who.clone();
    drop(silent);

    let half_who = half_closed.who.clone();
    let mut departures = Vec::new();
    let mut arrivals = 0;
    while departures.len() < 3 {
        let line = watcher.line().await?;
        if line.ends_with(" has arrived") {
            arrivals += 1;
        } else if let Some(who) = line.strip_suffix(" has left") {
            departures.push(who.to_string());
        }
    }
    ensure(arrivals == 3, || format!("{arrivals} arrivals"))?;
    departures.sort();
    let mut expected = vec![silent_who, half_who, resetter_who];
    expected.sort();
    ensure(departures == expected, || {
        format!("departures {departures:?}, expected {expected:?}")
    })?;
    // The half-closed client still gets its socket closed by the server.
    let rest = half_closed.lines_until_closed().await?;
    ensure(
        rest.iter()
            .all(|line| line.ends_with(" has left") || line.ends_with(" has arrived")),
        || format!("half-closed client got {rest:?}"),
    )?;
    expect_tasks(&server, model, 1, "after the odd leavers").await?;
    // Each counted once: nothing more arrives for the watcher.
    watcher.send("done").await?;
    watcher.expect(&format!("{}: done", watcher.who)).await
}
