//! Keeps the room's stream and the names bucket at the copies wanted
//! while the node runs: a stream made with fewer (a broker server down, or
//! the cluster's gossip not yet complete, when it was made) gets the rest
//! once the broker can place them, without waiting for some node to open
//! it again.
//!
//! **Wanted.** `--cluster-replicas`, else min(3, servers of the broker's
//! cluster now) ([`connection::wanted_replicas`]). The client's own list
//! of the servers is the one it got at its last (re)connect: async-nats
//! 0.46 reads the INFO a server sends when another joins or leaves, but
//! keeps nothing of it. So while that list says fewer than three, each
//! check reads a server's INFO afresh on a connection of its own, closed
//! at once (a server sends it before authentication; not done with TLS,
//! where the server would log the unfinished handshake as an error).
//!
//! **When.** Every [`LOOK`] it reads the client's state (no broker
//! traffic): a reconnect, or another server, is news, and the streams are
//! checked at once. Otherwise every [`GROWING`] while the default may still
//! grow (fewer than three servers seen), every [`SETTLED`] once not; and
//! while a stream is short of copies and the broker refuses more, after
//! [`SHORT_FIRST`], doubling up to [`SHORT_MAX`]; the first check is a
//! [`LOOK`] after the node joins. A check is one stream-info request per
//! stream, plus an update for one found short.
//!
//! **Shown.** The copies each check finds (or raised to) are the gauges
//! `chat_cluster_stream_copies` and `chat_cluster_names_copies`, so that
//! an operator can alert on a room one server's death from stopping; 0
//! until the first check (and the second without `--names`).
//!
//! **Only up.** Copies are raised, never lowered: a cluster seen smaller
//! (a server down) is no reason to give copies up. Every node does this,
//! at once: an update to the copies already there changes nothing. A
//! refused raise is reported once at `warn` (losing a server that holds
//! a copy may stop the room), then at `debug` until the stream has its
//! copies; the raise itself at `info`.
//!
//! **Consumers.** The room's consumers are ephemeral, one copy each,
//! made again when lost with their server (`consumer`); nats-server 2.9.10
//! leaves them at one copy when their stream is raised (seen in its
//! `/jsz?consumers=true`). The names bucket has none. A durable consumer
//! made without a replica count would follow its stream from two copies
//! to three on 2.9.10 (one made with two stays at two); we make none.

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::{ServerAddr, ServerInfo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use super::connection::{self, wait_for_connection, Connection, Subjects};
use super::{names, Shared};
use crate::config::ClusterCounters;

/// How often the client's view of the broker is read: a local read, so
/// often enough that a reconnect is acted on within about a second.
const LOOK: Duration = Duration::from_secs(1);

/// How often the copies are checked without news once the cluster has
/// its three servers (or `--cluster-replicas` is given): a stream-info
/// request a stream every 30 s a node is nothing to the broker, and a
/// stream reduced behind the node's back (made again by another node,
/// lowered by hand) is unusual enough for half a minute to do.
const SETTLED: Duration = Duration::from_secs(30);

/// How often while the default may still grow (fewer than three servers
/// seen: a cluster still forming, or one server down): each check also
/// reads a server's INFO afresh (`wanted_now`), a connection opened and
/// closed, so that a returning server is noticed within this much. That
/// state is a transient one (a JetStream cluster of two has no quorum
/// after a loss, and is not one to run), and a short connection every
/// 5 s a node is little to a broker while it lasts.
const GROWING: Duration = Duration::from_secs(5);

/// The first pause after a check left a stream short (its raise refused,
/// or no answer): a server that has just come back may take a moment
/// before the broker places copies on it...
const SHORT_FIRST: Duration = Duration::from_secs(1);

/// ... and the longest: while a stream is short the room is one server's
/// death from stopping, so it is asked about often, but a server away for
/// long costs a refused request every few seconds, no more.
const SHORT_MAX: Duration = Duration::from_secs(8);

/// What to do with a stream found with `found` copies when `wanted` are
/// wanted.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// As many or more: left as it is (never lowered).
    Enough,
    /// Fewer: updated to this many.
    Raise(usize),
}

fn verdict(found: usize, wanted: usize) -> Verdict {
    if found.max(1) < wanted {
        Verdict::Raise(wanted)
    } else {
        Verdict::Enough
    }
}

/// What the NATS client knows of the broker; a change is news.
#[derive(Debug, PartialEq, Eq)]
struct View {
    connected: bool,
    /// The server it talks to (a new id after a restart, too).
    server: String,
    /// The cluster's servers, as that server lists their client URLs
    /// (async-nats 0.46 changes them only at a reconnect).
    servers: BTreeSet<String>,
}

impl View {
    fn of(client: &async_nats::Client) -> View {
        let info = client.server_info();
        View {
            connected: client.connection_state() == State::Connected,
            server: info.server_id,
            servers: info.connect_urls.into_iter().collect(),
        }
    }
}

/// One stream kept at its copies, and whether it was last found short.
struct Kept {
    name: String,
    short: bool,
    /// The gauge that shows its copies.
    shown: fn(&ClusterCounters) -> &AtomicU64,
}

impl Kept {
    fn new(name: String, shown: fn(&ClusterCounters) -> &AtomicU64) -> Kept {
        Kept {
            name,
            short: false,
            shown,
        }
    }

    /// Reads the stream's copies and raises them to `wanted` if fewer; true
    /// if it is (or may be) still short, to be checked again soon. A stream
    /// not there yet is not short: whoever makes it asks for the copies.
    async fn check(
        &mut self,
        connection: &Connection,
        wanted: usize,
        bound: Duration,
        counters: &ClusterCounters,
    ) -> bool {
        let stream = &self.name;
        let info = match timeout(bound, connection.jetstream.get_stream(stream)).await {
            Ok(Ok(found)) => found.cached_info().clone(),
            Ok(Err(err)) if not_found(err.kind()) => return false,
            Ok(Err(err)) => {
                debug!(%stream, cause = %err, "cannot read the stream's copies; asking again soon");
                return true;
            }
            Err(_) => {
                debug!(%stream, "no answer about the stream's copies; asking again soon");
                return true;
            }
        };
        let found = info.config.num_replicas.max(1);
        let show = |copies: usize| ClusterCounters::set((self.shown)(counters), copies as u64);
        show(found);
        let Verdict::Raise(to) = verdict(found, wanted) else {
            if self.short {
                info!(%stream, replicas = found, "the stream has the copies wanted");
                self.short = false;
            }
            return false;
        };
        let mut config = info.config;
        config.num_replicas = to;
        let refused = match timeout(bound, connection.jetstream.update_stream(&config)).await {
            Ok(Ok(updated)) if updated.config.num_replicas >= to => {
                show(updated.config.num_replicas);
                info!(%stream, from = found, to, "raised the stream's copies");
                self.short = false;
                return false;
            }
            Ok(Ok(updated)) => format!("updated to {}", updated.config.num_replicas),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "no answer".to_string(),
        };
        if self.short {
            debug!(%stream, found, wanted, cause = %refused, "the stream's copies still cannot be raised");
        } else {
            warn!(
                %stream, found, wanted, cause = %refused,
                "the stream has fewer copies than wanted and the broker cannot place more yet: \
                 losing a broker server that holds one may stop the room; retrying"
            );
            self.short = true;
        }
        true
    }
}

fn not_found(kind: GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(err)
        if err.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// The keeper's task: checks the room's stream (and, under `--names`, the
/// names bucket's stream) as the module documentation says, until `stop`.
pub(super) async fn keep(shared: Arc<Shared>, mut connection: watch::Receiver<Option<Connection>>) {
    let Some(connection) = wait_for_connection(&mut connection, &shared.stop).await else {
        return;
    };
    let room = &shared.config.room;
    let mut kept = vec![Kept::new(Subjects::new(room).stream, |counters| {
        &counters.stream_copies
    })];
    if shared.names_on {
        kept.push(Kept::new(
            format!("KV_{}", names::bucket_of(room)),
            |counters| &counters.names_copies,
        ));
    }
    let mut seen = View::of(&connection.client);
    // The streams were just opened, with the copies the broker could place
    // (`connection::create_replicated`): the first check shows them.
    let mut due = Instant::now();
    let mut short_checks = 0;
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = tokio::time::sleep(LOOK) => {}
        }
        let view = View::of(&connection.client);
        if view != seen {
            debug!(
                ?view,
                "the broker connection changed: checking the streams' copies"
            );
            due = Instant::now();
            short_checks = 0;
            seen = view;
        }
        if !seen.connected || Instant::now() < due {
            continue;
        }
        // Each call is bounded by `--cluster-ack-timeout`, the whole by
        // `stop`: shutdown does not wait for a check.
        let checking = async {
            let (wanted, may_grow) = wanted_now(&shared, &connection).await;
            let mut short = false;
            for stream in &mut kept {
                short |= stream
                    .check(
                        &connection,
                        wanted,
                        shared.config.ack_timeout,
                        shared.counters(),
                    )
                    .await;
            }
            (short, may_grow)
        };
        let (short, may_grow) = tokio::select! {
            () = shared.stop.cancelled() => return,
            checked = checking => checked,
        };
        due = Instant::now()
            + if short {
                short_checks += 1;
                crate::backoff::doubling(SHORT_FIRST, SHORT_MAX, short_checks)
            } else {
                short_checks = 0;
                if may_grow {
                    GROWING
                } else {
                    SETTLED
                }
            };
    }
}

/// The copies wanted now ([`connection::wanted_replicas`]), and whether
/// that default may still grow (fewer than three servers seen). The
/// client's list of servers is refreshed from a server's INFO while it says
/// fewer than three (see the module documentation).
async fn wanted_now(shared: &Shared, connection: &Connection) -> (usize, bool) {
    let config = &shared.config;
    let mut info = connection.client.server_info();
    let clustered = info.cluster.as_deref().is_some_and(|name| !name.is_empty());
    let seen = |info: &ServerInfo| {
        connection::wanted_replicas(config.replicas, info.cluster.as_deref(), &info.connect_urls)
    };
    let may_grow = || config.replicas.is_none() && clustered;
    if may_grow() && seen(&info) < connection::MAX_DEFAULT_REPLICAS && !info.tls_required {
        let configured = config
            .url
            .split(',')
            .filter_map(|url| url.trim().parse::<ServerAddr>().ok())
            .filter(|server| !server.tls_required())
            .map(|server| match server.host() {
                host if host.contains(':') => format!("[{host}]:{}", server.port()),
                host => format!("{host}:{}", server.port()),
            });
        let addresses: Vec<String> = configured.chain(info.connect_urls.clone()).collect();
        if let Some(now) = server_info_now(&addresses, config.ack_timeout).await {
            info = now;
        }
    }
    let wanted = seen(&info);
    (
        wanted,
        may_grow() && wanted < connection::MAX_DEFAULT_REPLICAS,
    )
}

/// The INFO of the first of `addresses` that answers within `bound` each:
/// the line every NATS server sends a new connection before anything else
/// (before authentication too), which names its cluster and lists the
/// cluster's client URLs as they are now. The connection is closed after it.
async fn server_info_now(addresses: &[String], bound: Duration) -> Option<ServerInfo> {
    for address in addresses {
        match timeout(bound, read_server_info(address)).await {
            Ok(Ok(info)) => return Some(info),
            Ok(Err(err)) => debug!(%address, cause = %err, "cannot read the server's INFO"),
            Err(_) => debug!(%address, "no INFO from the server in time"),
        }
    }
    None
}

/// The most an INFO line may be: a cluster's URLs are a few KB.
const MAX_INFO: u64 = 64 * 1024;

async fn read_server_info(address: &str) -> io::Result<ServerInfo> {
    let stream = TcpStream::connect(address).await?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_INFO))
        .read_line(&mut line)
        .await?;
    let json = line
        .strip_prefix("INFO ")
        .ok_or_else(|| io::Error::other("the server's first line is not its INFO"))?;
    serde_json::from_str(json.trim_end()).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use connection::wanted_replicas;

    fn urls(count: usize) -> Vec<String> {
        (0..count)
            .map(|port| format!("127.0.0.1:{}", 4222 + port))
            .collect()
    }

    #[test]
    fn copies_are_raised_to_the_wanted_never_lowered() {
        assert_eq!(verdict(2, 3), Verdict::Raise(3));
        assert_eq!(verdict(1, 3), Verdict::Raise(3));
        assert_eq!(verdict(0, 2), Verdict::Raise(2));
        assert_eq!(verdict(3, 3), Verdict::Enough);
        // A cluster seen smaller (a server down) lowers nothing.
        assert_eq!(verdict(3, 2), Verdict::Enough);
        assert_eq!(verdict(5, 1), Verdict::Enough);
        // No copies reported means one: nothing to do for one.
        assert_eq!(verdict(0, 1), Verdict::Enough);
    }

    #[test]
    fn the_default_follows_the_servers_known_now_up_to_three() {
        let cluster = Some("brokers");
        assert_eq!(wanted_replicas(None, cluster, &urls(2)), 2);
        assert_eq!(wanted_replicas(None, cluster, &urls(3)), 3);
        assert_eq!(wanted_replicas(None, cluster, &urls(5)), 3);
        // One server listed twice is one server.
        let twice = [urls(1), urls(1)].concat();
        assert_eq!(wanted_replicas(None, cluster, &twice), 1);
        // A server that is not clustered: one copy, whatever it lists.
        assert_eq!(wanted_replicas(None, None, &urls(3)), 1);
        assert_eq!(wanted_replicas(None, Some(""), &urls(3)), 1);
        assert_eq!(wanted_replicas(None, cluster, &[]), 1);
    }

    /// A server that sends `first` to a new connection, once.
    async fn server_sending(first: &'static str) -> io::Result<String> {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(async move {
            if let Ok((mut connection, _)) = listener.accept().await {
                let _ = connection.write_all(first.as_bytes()).await;
            }
        });
        Ok(address)
    }

    #[tokio::test]
    async fn a_servers_info_is_read_from_a_new_connection() -> io::Result<()> {
        let address = server_sending(
            "INFO {\"server_id\":\"N1\",\"cluster\":\"brokers\",\"connect_urls\":\
             [\"127.0.0.1:4222\",\"127.0.0.1:4223\",\"127.0.0.1:4224\"]}\r\n",
        )
        .await?;
        let info = read_server_info(&address).await?;
        assert_eq!(info.cluster.as_deref(), Some("brokers"));
        assert_eq!(
            wanted_replicas(None, info.cluster.as_deref(), &info.connect_urls),
            3
        );
        let not_nats = server_sending("HTTP/1.1 400 Bad Request\r\n").await?;
        assert!(read_server_info(&not_nats).await.is_err());
        // The first that answers: a refused address is skipped.
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.local_addr()?.to_string()
        };
        let again = server_sending("INFO {\"server_id\":\"N2\"}\r\n").await?;
        let found = server_info_now(&[refused, again], Duration::from_secs(5)).await;
        assert_eq!(found.map(|info| info.server_id).as_deref(), Some("N2"));
        Ok(())
    }

    #[test]
    fn an_explicit_count_stays_the_target() {
        // Stepped down at creation or not, `--cluster-replicas` is wanted
        // whatever the servers known.
        assert_eq!(wanted_replicas(Some(3), Some("brokers"), &urls(2)), 3);
        assert_eq!(wanted_replicas(Some(5), Some("brokers"), &urls(3)), 5);
        assert_eq!(wanted_replicas(Some(2), None, &[]), 2);
        assert_eq!(
            verdict(2, wanted_replicas(Some(3), Some("b"), &urls(2))),
            Verdict::Raise(3)
        );
    }
}
