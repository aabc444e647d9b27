//! The settings of the NATS JetStream backplane (`--cluster`), what makes
//! them acceptable, and the counters the backplane keeps while it runs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::ConfigError;

/// Default bytes of events a node holds for the broker while it is away:
/// at the ~100 bytes of a typical batch, about 160,000 reads, minutes of a
/// busy room, and still a small fraction of one slow client's
/// `--max-pending` (32 MiB).
const DEFAULT_CLUSTER_BUFFER: usize = 16 * 1024 * 1024;

/// The most copies of a stream JetStream keeps (`--cluster-replicas`).
pub(super) const MAX_REPLICAS: usize = 5;

/// The settings of the NATS JetStream backplane. See ARCHITECTURE.md, "Many servers".
///
/// `#[non_exhaustive]` as [`Config`](super::Config) is: start from [`ClusterConfig::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// `nats://[user:password@|token@]host:port`, several separated by commas.
    pub url: String,
    /// A NATS `.creds` file (JWT and nkey seed), if the broker wants one.
    pub creds: Option<PathBuf>,
    /// Names the JetStream stream (`CHAT_<room>`) and the subjects
    /// (`chat.<room>.*`): rooms on one broker are independent.
    pub room: String,
    /// Bytes of events waiting for the broker; past it the oldest are
    /// dropped, counted and logged.
    pub buffer_bytes: usize,
    /// The stream keeps events this long, so a node that was away this
    /// long can still catch up...
    pub retention_age: Duration,
    /// ... and at most this many bytes of them.
    pub retention_bytes: u64,
    /// How often a node says it is alive.
    pub heartbeat: Duration,
    /// A node not heard from for this long is dead: its clients are
    /// announced as having left. Detection takes at most this plus a quarter
    /// `heartbeat`.
    pub node_timeout: Duration,
    /// The longest pause between attempts to reach the broker.
    pub reconnect_max: Duration,
    /// How long a publish may wait for the broker's acknowledgement before
    /// it is sent again (with the same message id, so never stored twice).
    pub ack_timeout: Duration,
    /// Copies the broker keeps of the room's stream and names bucket
    /// (`--cluster-replicas`); `None`: min(3, servers in the broker's
    /// cluster), 1 on a single server.
    pub replicas: Option<usize>,
    /// What the backplane counts, readable while it runs (tests read it).
    pub counters: Arc<ClusterCounters>,
}

impl ClusterConfig {
    /// Tasks a clustered node runs on top of its model's (2n+1+k, k = 7):
    /// the backplane's publisher, consumer and replica-keeper tasks, and
    /// the NATS client's connection, event-log, JetStream-acker and
    /// pull-request tasks. The
    /// liveness judge runs on a thread of its own, with its own runtime.
    pub const EXTRA_TASKS: usize = 7;

    /// The defaults for a broker at `url`, room `chat`.
    pub fn new(url: &str) -> ClusterConfig {
        ClusterConfig {
            url: url.to_string(),
            creds: None,
            room: "chat".to_string(),
            buffer_bytes: DEFAULT_CLUSTER_BUFFER,
            retention_age: Duration::from_secs(3600),
            retention_bytes: 1 << 30,
            heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(3),
            reconnect_max: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(2),
            replicas: None,
            counters: Arc::default(),
        }
    }

    /// These settings changed by `change`, in one expression (see
    /// [`Config::with`](super::Config::with)).
    pub fn with(mut self, change: impl FnOnce(&mut ClusterConfig)) -> ClusterConfig {
        change(&mut self);
        self
    }
}

/// Counts the backplane keeps: atomics written by the backplane only,
/// read through [`ClusterCounters::snapshot`].
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Broker messages this node stored in the stream.
    pub(crate) published: AtomicU64,
    /// Events inside them (arrivals, reads' worth of lines, departures).
    pub(crate) events_published: AtomicU64,
    /// Broker messages from other nodes delivered to local clients.
    pub(crate) received: AtomicU64,
    /// Messages on our subjects that did not decode or failed validation.
    pub(crate) garbage: AtomicU64,
    /// Events dropped from a full `--cluster-buffer`.
    pub(crate) dropped: AtomicU64,
    /// Stream messages a resume could not get back: retention passed them,
    /// or a broker lost its store while this node had not read them yet
    /// (as far as it knew: what the old stream held for it when it last read).
    pub(crate) missed: AtomicU64,
    /// Times this node found a different room's stream from the one it was
    /// reading (a broker lost its store and a node made it again) and read
    /// the new one from its start.
    pub(crate) streams_remade: AtomicU64,
    /// Nodes declared dead for missing their heartbeats.
    pub(crate) dead_nodes: AtomicU64,
    /// Consumers this node made to read the room's stream: 1 once it has
    /// joined the room, one more after each error that cost it its consumer.
    /// A short broker restart with a file store may need none (the
    /// consumer survives and the client's pull loop resumes it).
    pub(crate) streams_opened: AtomicU64,

    // Gauges: the latest value, set where it changes (never per delivery).
    /// 1 while the NATS client is connected to the broker, else 0: the
    /// state the publisher and the consumer wait on before each try.
    pub(crate) connected: AtomicU64,
    /// Bytes of events not yet stored by the broker: those queued in the
    /// `--cluster-buffer` and the batch the publisher has in flight.
    pub(crate) buffered_bytes: AtomicU64,
    /// How many events those bytes are.
    pub(crate) buffered_events: AtomicU64,
    /// Stream messages the broker still holds for this node's consumer, as
    /// the last message read said (its metadata; no extra broker call).
    pub(crate) consumer_pending: AtomicU64,
    /// How long the last message read had been in the stream when this
    /// node read it, in nanoseconds (our clock against the broker's;
    /// 0 if the broker's is ahead).
    pub(crate) lag_nanos: AtomicU64,
    /// When the broker stored the last message this node read, in
    /// nanoseconds since the Unix epoch (0: none read yet).
    pub(crate) last_stored_nanos: AtomicU64,
    /// Copies of the room's stream, as this node last read them (0: not
    /// read yet).
    pub(crate) stream_copies: AtomicU64,
    /// Copies of the names bucket, the same way (0 without `--names`).
    pub(crate) names_copies: AtomicU64,
}

impl ClusterCounters {
    /// Every count as it is now (each read on its own: two counts may be
    /// a moment apart).
    pub fn snapshot(&self) -> ClusterStats {
        ClusterStats {
            published: ClusterCounters::get(&self.published),
            events_published: ClusterCounters::get(&self.events_published),
            received: ClusterCounters::get(&self.received),
            garbage: ClusterCounters::get(&self.garbage),
            dropped: ClusterCounters::get(&self.dropped),
            missed: ClusterCounters::get(&self.missed),
            streams_remade: ClusterCounters::get(&self.streams_remade),
            dead_nodes: ClusterCounters::get(&self.dead_nodes),
            streams_opened: ClusterCounters::get(&self.streams_opened),
            connected: ClusterCounters::get(&self.connected),
            buffered_bytes: ClusterCounters::get(&self.buffered_bytes),
            buffered_events: ClusterCounters::get(&self.buffered_events),
            consumer_pending: ClusterCounters::get(&self.consumer_pending),
            lag_nanos: ClusterCounters::get(&self.lag_nanos),
            last_stored_nanos: ClusterCounters::get(&self.last_stored_nanos),
            stream_copies: ClusterCounters::get(&self.stream_copies),
            names_copies: ClusterCounters::get(&self.names_copies),
        }
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }
}

/// What [`ClusterCounters`] counted, at one moment: plain numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Broker messages this node stored in the stream.
    pub published: u64,
    /// Events inside them (arrivals, reads' worth of lines, departures).
    pub events_published: u64,
    /// Broker messages from other nodes delivered to local clients.
    pub received: u64,
    /// Messages on our subjects that did not decode or failed validation.
    pub garbage: u64,
    /// Events dropped from a full `--cluster-buffer`.
    pub dropped: u64,
    /// Stream messages a resume could not get back: retention passed them,
    /// or a broker lost its store while this node had not read them yet
    /// (as far as it knew: what the old stream held for it when it last read).
    pub missed: u64,
    /// Times this node found a different room's stream from the one it was
    /// reading (a broker lost its store and a node made it again) and read
    /// the new one from its start.
    pub streams_remade: u64,
    /// Nodes declared dead for missing their heartbeats.
    pub dead_nodes: u64,
    /// Consumers this node made to read the room's stream: 1 once it has
    /// joined the room, one more after each error that cost it its consumer.
    /// A short broker restart with a file store may need none (the
    /// consumer survives and the client's pull loop resumes it).
    pub streams_opened: u64,

    // Gauges: the latest value, set where it changes (never per delivery).
    /// 1 while the NATS client is connected to the broker, else 0: the
    /// state the publisher and the consumer wait on before each try.
    pub connected: u64,
    /// Bytes of events not yet stored by the broker: those queued in the
    /// `--cluster-buffer` and the batch the publisher has in flight.
    pub buffered_bytes: u64,
    /// How many events those bytes are.
    pub buffered_events: u64,
    /// Stream messages the broker still holds for this node's consumer, as
    /// the last message read said (its metadata; no extra broker call).
    pub consumer_pending: u64,
    /// How long the last message read had been in the stream when this
    /// node read it, in nanoseconds (our clock against the broker's;
    /// 0 if the broker's is ahead).
    pub lag_nanos: u64,
    /// When the broker stored the last message this node read, in
    /// nanoseconds since the Unix epoch (0: none read yet).
    pub last_stored_nanos: u64,
    /// Copies of the room's stream, as this node last read them (0: not
    /// read yet).
    pub stream_copies: u64,
    /// Copies of the names bucket, the same way (0 without `--names`).
    pub names_copies: u64,
}

impl ClusterConfig {
    pub(super) fn validate(&self, max_line: usize) -> Result<(), ConfigError> {
        if !cfg!(feature = "cluster") {
            return Err(ConfigError::Invalid {
                flag: "cluster",
                why: "this chat-server was built without the `cluster` feature".into(),
            });
        }
        // The room is part of a stream name and of subjects: no dots,
        // wildcards or spaces.
        let room_ok = !self.room.is_empty()
            && self.room.len() <= 64
            && self
                .room
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !room_ok {
            return Err(ConfigError::Invalid {
                flag: "room",
                why: format!("{:?}: use 1 to 64 letters, digits, '_' or '-'", self.room),
            });
        }
        if self.url.trim().is_empty() {
            return Err(ConfigError::Invalid {
                flag: "cluster",
                why: "no broker address".into(),
            });
        }
        // The buffer must hold at least one event of the longest kind.
        let min_buffer = 2 * max_line as u64 + 1024;
        if (self.buffer_bytes as u64) < min_buffer {
            return Err(ConfigError::TooSmall {
                flag: "cluster-buffer",
                min: min_buffer,
            });
        }
        // JetStream refuses a de-duplication window longer than the age.
        if self.retention_age < Duration::from_secs(1) {
            return Err(ConfigError::TooSmall {
                flag: "cluster-retention",
                min: 1,
            });
        }
        if self.retention_bytes < 1024 * 1024 {
            return Err(ConfigError::TooSmall {
                flag: "cluster-retention-bytes",
                min: 1024 * 1024,
            });
        }
        for (flag, value) in [
            ("cluster-heartbeat", self.heartbeat),
            ("cluster-reconnect-max", self.reconnect_max),
            ("cluster-ack-timeout", self.ack_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::TooSmall { flag, min: 1 });
            }
        }
        // JetStream keeps at most 5 copies of a stream.
        if let Some(replicas) = self.replicas {
            if !(1..=MAX_REPLICAS).contains(&replicas) {
                return Err(ConfigError::Invalid {
                    flag: "cluster-replicas",
                    why: format!("{replicas}: use 1 to {MAX_REPLICAS}"),
                });
            }
        }
        if self.node_timeout < self.heartbeat * 2 {
            return Err(ConfigError::Invalid {
                flag: "cluster-node-timeout",
                why: "must be at least two heartbeats".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Model};

    /// `--cluster-replicas` takes what JetStream keeps: 1 to 5 copies.
    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_replicas_are_one_to_five() {
        let with = |replicas| Config {
            cluster: Some(ClusterConfig {
                replicas,
                ..ClusterConfig::new("nats://127.0.0.1:4222")
            }),
            ..Config::with_model(Model::Sharded)
        };
        for ok in [None, Some(1), Some(3), Some(MAX_REPLICAS)] {
            assert_eq!(with(ok).validate(), Ok(()), "{ok:?}");
        }
        for bad in [Some(0), Some(MAX_REPLICAS + 1)] {
            assert!(
                matches!(
                    with(bad).validate(),
                    Err(ConfigError::Invalid {
                        flag: "cluster-replicas",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
