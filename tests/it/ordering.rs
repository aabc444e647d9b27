//! Ordering under concurrent senders, in every model: nothing is lost and
//! every receiver sees each sender's lines in the order sent. The models
//! with one sequencing point (`broadcaster`'s task, `broadcast`'s ring) also
//! give every receiver the same total order; the others need not, and this
//! test prints how many different orders the receivers saw
//! (`cargo test --test it ordering:: -- --nocapture`). In every model a
//! departure is announced before the leaver's connection closes, so that
//! cause comes before effect for whoever sees it close and speaks.

use crate::common;

use std::collections::HashSet;
use std::io;

use chat_server::harness::TestClient;
use chat_server::Model;
use common::{connect_settled, ensure, exchange, server, BUSY_ROOM};

for_each_model!(
    per_sender_order_and_no_loss,
    a_departure_is_heard_before_anything_said_after_the_close
);

/// Rounds of the departure race: it lost about one round in ten in
/// `broadcaster` when the connection could close before the announcement
/// was queued, so this many make a regression all but certain to show.
const DEPARTURE_ROUNDS: usize = 60;

async fn a_departure_is_heard_before_anything_said_after_the_close(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut watcher = TestClient::connect(server.addr()).await?;
    for round in 0..DEPARTURE_ROUNDS {
        let mut leaver = TestClient::connect(server.addr()).await?;
        watcher
            .expect(&format!("{} has arrived", leaver.who))
            .await?;
        leaver.finish().await?;
        leaver.lines_until_closed().await?;
        // The leaver's connection is closed: whatever the watcher says now
        // comes after the departure.
        let said = format!("after round {round}");
        watcher.send(&said).await?;
        let next = watcher.line().await?;
        let gone = format!("{} has left", leaver.who);
        ensure(next == gone, || {
            format!("{model}, round {round}: heard {next:?} before {gone:?}")
        })?;
        watcher.expect(&format!("{}: {said}", watcher.who)).await?;
    }
    Ok(())
}

async fn per_sender_order_and_no_loss(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let clients = connect_settled(&server, 8).await?;
    let spec = BUSY_ROOM;
    // `exchange` checks per-sender order and completeness for every client.
    let seen = exchange(clients, spec).await?;

    let orders: HashSet<&Vec<(String, usize)>> = seen.iter().map(|(s, _)| &s.lines).collect();
    println!(
        "{model}: {} receivers saw {} distinct total orders of {} lines from {} concurrent senders",
        seen.len(),
        orders.len(),
        spec.total_lines(),
        spec.senders,
    );
    if matches!(model, Model::Broadcaster | Model::Broadcast) {
        ensure(orders.len() == 1, || {
            format!(
                "{model} must give every receiver the same order; saw {} orders",
                orders.len()
            )
        })?;
    }
    Ok(())
}
