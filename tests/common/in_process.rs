//! A server on the test's own runtime (`server::run` spawned as a task),
//! for the tests that need what `TestServer`, on a runtime of its own,
//! cannot give: paused time (the server's timers must run on the clock the
//! test pauses) or a listener made elsewhere (in a network namespace).

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use chat_server::{server, Config, ConfigError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running as a task of the current runtime, and the switch that
/// stops it.
pub struct InProcess {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), ConfigError>>,
}

impl InProcess {
    /// Serves `config` on a fresh loopback port.
    pub async fn start(config: Config) -> io::Result<InProcess> {
        InProcess::serve(server::bind("127.0.0.1:0").await?, config)
    }

    /// Serves `config` on `listener`. Must be called within a runtime
    /// (`Runtime::enter` will do), whose task the server becomes.
    pub fn serve(listener: TcpListener, config: Config) -> io::Result<InProcess> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let serving = tokio::spawn(server::run(listener, config, shutdown));
        Ok(InProcess {
            addr,
            stop: Some(stop),
            serving,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the shutdown at once (so a test can time it from here) and
    /// returns a future that resolves when `run` has returned.
    pub fn stop(mut self) -> impl Future<Output = io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        async move {
            self.serving
                .await
                .map_err(io::Error::other)?
                .map_err(io::Error::other)
        }
    }
}
