//! Ordering under concurrent senders, in every model: nothing is lost and
//! every receiver sees each sender's lines in the order sent. The models
//! with one sequencing point (`broadcaster`'s task, `broadcast`'s ring) also
//! give every receiver the same total order; the others need not, and this
//! test prints how many different orders the receivers saw
//! (`cargo test --test ordering -- --nocapture`).

mod common;

use std::collections::HashSet;
use std::io;

use chat_server::Model;
use common::{connect_settled, ensure, exchange, server, BUSY_ROOM};

for_each_model!(per_sender_order_and_no_loss);

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
