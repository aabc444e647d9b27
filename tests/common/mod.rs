//! What the integration tests share: running one test body against every model.

#![allow(dead_code)] // each test binary uses a different part

use std::io;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};

/// For each `name`, a module `name` with one `#[tokio::test]` per model that
/// calls `name(model)`, so a failure names the model it failed in.
#[macro_export]
macro_rules! for_each_model {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            use chat_server::Model;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sharded() -> std::io::Result<()> {
                super::$test(Model::Sharded).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn broadcaster() -> std::io::Result<()> {
                super::$test(Model::Broadcaster).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn locked() -> std::io::Result<()> {
                super::$test(Model::Locked).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn broadcast() -> std::io::Result<()> {
                super::$test(Model::Broadcast).await
            }
        }
    )*};
}

/// A default server running `model`.
pub fn server(model: Model) -> io::Result<TestServer> {
    TestServer::start(Config::with_model(model))
}

/// Connects `n` clients one after another; each has read its greeting, and
/// every earlier client has been told of each later one's arrival (those
/// lines are still unread).
pub async fn connect_all(server: &TestServer, n: usize) -> io::Result<Vec<TestClient>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(TestClient::connect(server.addr()).await?);
    }
    Ok(clients)
}

/// Turns an assertion into a test error with a message, for `?` in tests.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> io::Result<()> {
    if condition {
        Ok(())
    } else {
        Err(io::Error::other(message()))
    }
}
