//! The broker connection: the NATS client (credentials from the URL or a
//! creds file, reconnecting forever), the room's subjects and stream, and
//! the waits the tasks make for a connection.
//!
//! **Failover.** `--cluster` may name several servers of one NATS cluster;
//! the client tries them in turn, learns the others from the servers'
//! gossip (`connect_urls`), and after losing its server reconnects to any
//! of them.
//!
//! **Replicas.** The room's stream and the names bucket are made with
//! [`replicas`] copies: `--cluster-replicas`, else min(3, servers in the
//! cluster). A 2.9 server tells a client no JetStream cluster size, but its
//! INFO names its cluster and lists every server's client URL
//! (`connect_urls`, itself included); a server that is not clustered names
//! none. Where that overcounts (servers without JetStream, a server down at
//! creation) the broker refuses the create as "insufficient resources" and
//! [`create_replicated`] asks again with one copy fewer. A stream found
//! or made with fewer copies than wanted (an older version, a server
//! down, the cluster still forming: the client's `connect_urls` are those
//! of its last connect) is raised while the node runs, a second after it
//! joins and whenever the broker can place more: `super::replicas`, the one
//! place that raises copies (2.9 scales a clustered stream's replicas in
//! place), which also reads a server's INFO afresh while fewer than three
//! servers are known. Copies are never lowered automatically.
//!
//! Every call here is one a NATS 2.9 server understands (the client is
//! built without its `server_2_10`+ features); tests/cluster/cluster.rs runs them
//! against the real server.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, stream};
use async_nats::{Client as NatsClient, ConnectOptions, Event, ServerAddr};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::backoff::Backoff;
use super::Shared;
use crate::config::{ClusterConfig, ClusterCounters};

/// A connected (or reconnecting) client and its JetStream context.
#[derive(Clone)]
pub(crate) struct Connection {
    pub client: NatsClient,
    pub jetstream: jetstream::Context,
}

/// The room's names on the broker.
pub(super) struct Subjects {
    pub(super) stream: String,
    pub(super) events: String,
    pub(super) heartbeats: String,
    /// The broker's advisory that the room's stream has a new leader.
    pub(super) leader_elected: String,
}

impl Subjects {
    pub(super) fn new(room: &str) -> Subjects {
        let stream = format!("CHAT_{room}");
        Subjects {
            leader_elected: format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}"),
            stream,
            events: format!("chat.{room}.events"),
            heartbeats: format!("chat.{room}.heartbeat"),
        }
    }
}

/// News that the room's stream elected a leader, from the broker's own
/// advisory (`$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.<stream>`, sent by
/// a 2.9 server in a JetStream cluster; never by a single server).
///
/// **Why.** When the server leading the stream dies, every request to the
/// stream (a publish, its info, making a consumer) goes unanswered until
/// the others elect a new leader, and a call sent before the election
/// waits out its whole `--cluster-ack-timeout` after it; a consumer that
/// lived on the dead server is noticed only after two missed pull
/// heartbeats. With this news the publisher sends its batch again and the
/// consumer makes a new consumer as soon as there is a leader, so that a
/// client's silence is about the broker's election and no more. Without it
/// (a subscription refused) both fall back on their timeouts.
pub(super) struct Elections {
    news: Option<async_nats::Subscriber>,
}

impl Elections {
    pub(super) async fn subscribe(connection: &Connection, names: &Subjects) -> Elections {
        let news = match connection
            .client
            .subscribe(names.leader_elected.clone())
            .await
        {
            Ok(news) => Some(news),
            Err(err) => {
                warn!(cause = %err, "cannot follow the stream's leader elections; a failover waits for timeouts");
                None
            }
        };
        Elections { news }
    }

    /// Forgets the news heard so far: a call about to start reaches
    /// whatever leader there is now.
    pub(super) fn forget(&mut self) {
        use futures_util::{FutureExt, StreamExt};
        if let Some(news) = &mut self.news {
            while let Some(Some(_)) = news.next().now_or_never() {}
        }
    }

    /// The next election; never, without the subscription.
    pub(super) async fn next(&mut self) {
        use futures_util::StreamExt;
        if let Some(news) = &mut self.news {
            if news.next().await.is_some() {
                return;
            }
            self.news = None;
        }
        std::future::pending().await
    }
}

/// A new leader was elected while a call to the stream was waiting: the
/// call is abandoned and made again at once, without a pause.
#[derive(Debug, thiserror::Error)]
#[error("the room's stream elected a new leader")]
pub(super) struct LeaderElected;

/// Credentials from the URL: `user:password@` or `token@`, percent-decoded.
fn connect_options(shared: &Shared, servers: &[ServerAddr]) -> ConnectOptions {
    let reconnect_max = shared.config.reconnect_max;
    let counters = Arc::clone(&shared.config.counters);
    let mut options = ConnectOptions::new()
        .name(format!("chat-server {}", shared.node))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        // JetStream's API calls (stream info, making a consumer) are
        // requests: bounded like a publish's acknowledgement, not by the
        // client's 10 s default. While a stream elects a new leader they
        // go unanswered, and 10 s a try made a failover last 20-30 s.
        .request_timeout(Some(shared.config.ack_timeout))
        // A silent broker (network cut, not a closed socket) is noticed
        // after two missed pings.
        .ping_interval(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempts| {
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            Backoff::delay(Duration::from_millis(50), reconnect_max, attempts)
        })
        // The client's event task (it runs anyway) keeps the gauge: the
        // same transitions as the state the publisher and consumer wait on.
        .event_callback(move |event| {
            let counters = Arc::clone(&counters);
            async move {
                match event {
                    Event::Connected => ClusterCounters::set(&counters.connected, 1),
                    Event::Disconnected | Event::Closed => {
                        ClusterCounters::set(&counters.connected, 0);
                    }
                    _ => {}
                }
            }
        });
    if let Some(server) = servers.iter().find(|server| server.username().is_some()) {
        let user = percent_decode(server.username().unwrap_or_default());
        options = match server.password() {
            Some(password) => options.user_and_password(user, percent_decode(password)),
            None => options.token(user),
        };
    }
    options
}

/// The URL's user and password as NATS users write them, `%40` for `@`.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// Makes the client. With `retry_on_initial_connect` this returns at once
/// and the client keeps trying in the background; only a bad URL or an
/// unreadable creds file fails, and those are retried here (the operator
/// may fix the file).
pub(super) async fn connect(shared: &Shared) -> Option<Connection> {
    let mut logged = false;
    loop {
        match try_connect(shared).await {
            Ok(client) => {
                let jetstream = jetstream::ContextBuilder::new()
                    .timeout(shared.config.ack_timeout)
                    .build(client.clone());
                return Some(Connection { client, jetstream });
            }
            Err(err) => {
                if !logged {
                    warn!(cause = %err, url = %shared.config.url, "cannot set up the broker connection; retrying");
                    logged = true;
                }
                tokio::select! {
                    () = shared.stop.cancelled() => return None,
                    () = tokio::time::sleep(shared.config.reconnect_max) => {}
                }
            }
        }
    }
}

async fn try_connect(shared: &Shared) -> anyhow::Result<NatsClient> {
    let servers = shared
        .config
        .url
        .split(',')
        .map(|url| url.trim().parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = connect_options(shared, &servers);
    if let Some(creds) = &shared.config.creds {
        options = options.credentials_file(creds).await?;
    }
    Ok(async_nats::connect_with_options(servers, options).await?)
}

/// Creates the room's stream if it does not exist (the first node to reach
/// the broker does; the others find it), replicated as [`replicas`] says.
pub(super) async fn ensure_stream(
    connection: &Connection,
    shared: &Shared,
    names: &Subjects,
) -> anyhow::Result<stream::Stream> {
    let config = &shared.config;
    let wanted = replicas(connection, config);
    create_replicated(
        connection,
        stream::Config {
            name: names.stream.clone(),
            subjects: vec![names.events.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: config.retention_age,
            max_bytes: i64::try_from(config.retention_bytes).unwrap_or(i64::MAX),
            duplicate_window: config.retention_age.min(Duration::from_secs(120)),
            num_replicas: wanted,
            // Only used if this node makes the stream: a stream found keeps
            // the epoch it was made with (see `epoch_of`).
            description: Some(format!("{EPOCH_PREFIX}{}", super::wire::new_node_id())),
            ..Default::default()
        },
    )
    .await
}

/// How the room's stream's description carries its epoch: a random id
/// chosen by the node that made it.
const EPOCH_PREFIX: &str = "chat-server room stream; epoch ";

/// Which stream this is: its epoch (in the description, part of the
/// stream's configuration: the same on every server of a JetStream cluster
/// and after any restart, and new when a node makes the stream again), or,
/// for a stream made without one, its creation time.
pub(super) fn epoch_of(info: &stream::Info) -> String {
    info.config
        .description
        .as_deref()
        .and_then(|description| description.strip_prefix(EPOCH_PREFIX))
        .map_or_else(
            || format!("created {}", info.created.unix_timestamp_nanos()),
            str::to_string,
        )
}

/// How many copies of the room's stream and names bucket to ask for:
/// `--cluster-replicas`, else min(3, servers in the broker's cluster) (see
/// the module documentation).
pub(super) fn replicas(connection: &Connection, config: &ClusterConfig) -> usize {
    let info = connection.client.server_info();
    wanted_replicas(config.replicas, info.cluster.as_deref(), &info.connect_urls)
}

/// [`replicas`] from what it reads: `--cluster-replicas` (`explicit`), the
/// server's cluster name and its list of the cluster's client URLs.
pub(super) fn wanted_replicas(
    explicit: Option<usize>,
    cluster: Option<&str>,
    connect_urls: &[String],
) -> usize {
    if let Some(replicas) = explicit {
        return replicas;
    }
    if cluster.is_none_or(str::is_empty) {
        return 1;
    }
    let servers: HashSet<&str> = connect_urls.iter().map(String::as_str).collect();
    servers.len().clamp(1, MAX_DEFAULT_REPLICAS)
}

/// Three copies survive the loss of any one server (a quorum of two);
/// more cost every write another round trip for little.
pub(super) const MAX_DEFAULT_REPLICAS: usize = 3;

/// Finds the stream `config` names, or makes it with `config.num_replicas`
/// copies, fewer if the broker cannot place that many (the replica keeper,
/// `super::replicas`, raises a stream found or made with fewer).
pub(super) async fn create_replicated(
    connection: &Connection,
    mut config: stream::Config,
) -> anyhow::Result<stream::Stream> {
    let mut attempts = 0;
    let stream = loop {
        match connection
            .jetstream
            .get_or_create_stream(config.clone())
            .await
        {
            Ok(stream) => break stream,
            // Another node made it between our look and our create (with
            // another epoch): look again.
            Err(err) if made_meanwhile(&err) && attempts < 3 => attempts += 1,
            Err(err) if config.num_replicas > 1 && too_many_replicas(&err) => {
                warn!(
                    stream = %config.name,
                    replicas = config.num_replicas,
                    cause = %err,
                    "the broker cannot place this many replicas; asking for one fewer"
                );
                config.num_replicas -= 1;
            }
            Err(err) => return Err(err.into()),
        }
    };
    Ok(stream)
}

/// The broker's answer to creating a stream that exists with another
/// configuration.
fn made_meanwhile(err: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    matches!(err.kind(), CreateStreamErrorKind::JetStream(err)
        if err.error_code() == ErrorCode::STREAM_NAME_EXIST)
}

/// The broker's answer to more replicas than it can place: a server that
/// is not clustered, or a cluster with too few servers up.
fn too_many_replicas(err: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    match err.kind() {
        CreateStreamErrorKind::JetStream(err) => [
            ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
            ErrorCode::INSUFFICIENT_RESOURCES,
            ErrorCode::CLUSTER_NO_PEERS,
        ]
        .contains(&err.error_code()),
        _ => false,
    }
}

/// Waits while the client is not connected, so that nothing is queued in
/// it during an outage (it would hold every retry until the broker is back).
pub(super) async fn until_connected(client: &NatsClient, stop: &CancellationToken) -> bool {
    while client.connection_state() != State::Connected {
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    true
}

pub(super) async fn wait_for_connection(
    connection: &mut watch::Receiver<Option<Connection>>,
    stop: &CancellationToken,
) -> Option<Connection> {
    tokio::select! {
        () = stop.cancelled() => None,
        found = connection.wait_for(Option::is_some) => found.ok().and_then(|found| found.clone()),
    }
}
