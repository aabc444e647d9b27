//! `--queue mpsc`: tokio's unbounded channel as the per-client queue of
//! `sharded`, `broadcaster` and `locked` keeps the guarantees the default
//! swap queue does (every other test file runs the default): no loss,
//! per-sender order, a leaver's last echo, and no task left behind.

use crate::common;

use std::io;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, QueueKind};
use common::{connect_all, connect_settled, ensure, exchange, expect_tasks, BUSY_ROOM};

for_models!(
    [sharded: Sharded, broadcaster: Broadcaster, locked: Locked]
    mpsc_keeps_order_and_loses_nothing,
    mpsc_delivers_the_last_echo_and_frees_every_task
);

fn mpsc_server(model: Model) -> io::Result<TestServer> {
    TestServer::start(Config::with_model(model).with(|c| c.queue = QueueKind::Mpsc))
}

async fn mpsc_keeps_order_and_loses_nothing(model: Model) -> io::Result<()> {
    let server = mpsc_server(model)?;
    let clients = connect_settled(&server, 8).await?;
    exchange(clients, BUSY_ROOM).await?;
    Ok(())
}

async fn mpsc_delivers_the_last_echo_and_frees_every_task(model: Model) -> io::Result<()> {
    let server = mpsc_server(model)?;
    let mut clients: Vec<TestClient> = connect_all(&server, 10).await?;
    let alive = server.alive_tasks();
    let expected = model.expected_tasks(10);
    ensure(alive == expected, || {
        format!("{model}: {alive} tasks for 10 clients, expected {expected}")
    })?;
    for (i, mut client) in clients.drain(..).enumerate() {
        if i % 2 == 0 {
            // A polite leaver gets its own last line back before the close
            // (others' departures may still follow it).
            client.send("bye").await?;
            client.finish().await?;
            let tail = client.lines_until_closed().await?;
            let echo = format!("{}: bye", client.who);
            ensure(tail.contains(&echo), || {
                format!("{model}: last lines {tail:?}, expected {echo:?} among them")
            })?;
        }
    }
    expect_tasks(&server, model, 0, "after all left").await
}
