//! A real server on an ephemeral loopback port, and a line-oriented client,
//! for tests and benchmarks.
//!
//! [`TestServer`] runs the server in a runtime of its own, on its own
//! threads, so that the runtime's task count is the server's alone: tests
//! assert each model's exact count with [`TestServer::alive_tasks`], and
//! benchmark clients do not share worker threads with the server they load.
//! [`TestClient`] speaks the protocol over a real socket with a timeout on
//! every read, so a broken server fails a test instead of hanging it.

use std::io;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use tokio::runtime::{self, Handle};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::Config;
use crate::server;

pub use chat_testkit::{TestClient, LINE_TIMEOUT};

/// A server running in its own two-worker runtime; stopped (gracefully) on drop.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    web_addr: Option<SocketAddr>,
    runtime: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with `config` on `127.0.0.1:0`. If the configuration
    /// asks for metrics, their listener is bound here too (give it port 0)
    /// and [`TestServer::metrics_addr`] tells where it is.
    pub fn start(config: Config) -> io::Result<TestServer> {
        config
            .validate()
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let runtime = runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chat-server")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (listening, started) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name("chat-server-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let bound = async {
                        let listener = server::bind("127.0.0.1:0").await?;
                        let metrics = match &config.metrics_addr {
                            Some(addr) => Some(server::bind(addr).await?),
                            None => None,
                        };
                        let metrics_addr = metrics
                            .as_ref()
                            .map(|metrics| metrics.local_addr())
                            .transpose()?;
                        let web = match &config.web_addr {
                            Some(addr) => Some(server::bind(addr).await?),
                            None => None,
                        };
                        let web_addr = web.as_ref().map(|web| web.local_addr()).transpose()?;
                        io::Result::Ok((
                            (listener.local_addr()?, metrics_addr, web_addr),
                            listener,
                            metrics,
                            web,
                        ))
                    }
                    .await;
                    let (listener, metrics, web) = match bound {
                        Ok((addrs, listener, metrics, web)) => {
                            let _ = listening.send(Ok(addrs));
                            (listener, metrics, web)
                        }
                        Err(err) => {
                            let _ = listening.send(Err(err));
                            return;
                        }
                    };
                    // Spawned, not run in place, so the accept loop is a task
                    // of the runtime like in the binary.
                    let server = tokio::spawn(server::run_with_listeners(
                        listener,
                        metrics,
                        web,
                        config,
                        Box::pin(async move {
                            let _ = stopped.await;
                        }),
                    ));
                    let _ = server.await;
                });
            })?;
        let (addr, metrics_addr, web_addr) = started
            .recv()
            .map_err(|_| io::Error::other("server thread exited early"))??;
        Ok(TestServer {
            addr,
            metrics_addr,
            web_addr,
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served, if the configuration asked for it.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the chat page and `/ws` are served, if the configuration asked
    /// for them (`web_addr`; give it port 0, or an address to take again
    /// after a restart).
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// Tasks alive in the server's runtime: the accept loop, any model task,
    /// and the connections' tasks.
    pub fn alive_tasks(&self) -> usize {
        self.runtime.metrics().num_alive_tasks()
    }

    /// Waits until exactly `expected` tasks are alive, polling the runtime
    /// metrics (they have no change notification). Returns the last count
    /// seen if `within` passes first.
    pub async fn wait_for_tasks(&self, expected: usize, within: Duration) -> Result<(), usize> {
        let deadline = Instant::now() + within;
        loop {
            let alive = self.alive_tasks();
            if alive == expected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(alive);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Asks the server to shut down, as SIGTERM does in the binary, and waits
    /// for it to finish.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
