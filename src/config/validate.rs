//! Which combinations of settings the server refuses to start with, and
//! the message that tells the operator why.

use std::time::Duration;

use super::{longest_message, Config, Model, SlowClientPolicy, MAX_PASSWORD};

/// A combination of settings the server refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "model `{model}` cannot support --slow-client {policy}: {why}; \
         choose --slow-client disconnect or drop, or another --model"
    )]
    UnsupportedPolicy {
        model: Model,
        policy: SlowClientPolicy,
        why: &'static str,
    },
    #[error("--{flag} must be at least {min}")]
    TooSmall { flag: &'static str, min: u64 },
    #[error("--{flag}: {why}")]
    Invalid { flag: &'static str, why: String },
    #[error("--{flag} must be at least {min} seconds")]
    TooShort {
        flag: &'static str,
        min: &'static str,
    },
    #[error("--metrics-addr: this server was built without the `metrics` feature")]
    MetricsNotBuilt,
    #[error("--metrics-addr {addr}: cannot listen: {cause}")]
    MetricsListen { addr: String, cause: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("--web-addr: this server was built without the `web` feature")]
    WebNotBuilt,
    #[error("--web-addr {addr}: cannot listen: {cause}")]
    WebListen { addr: String, cause: String },
    #[error("--password-file: the first line is empty")]
    EmptyPassword,
    #[error("--password-file: the first line is longer than {max} bytes")]
    LongPassword { max: usize },
}

impl Config {
    /// Checks the settings fit together, with a message for the operator if not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model == Model::Broadcast && self.slow_client == SlowClientPolicy::Block {
            return Err(ConfigError::UnsupportedPolicy {
                model: self.model,
                policy: self.slow_client,
                why: "a tokio broadcast channel never makes its sender wait, \
                      it overwrites the oldest message instead",
            });
        }
        if self.max_line == 0 {
            return Err(ConfigError::TooSmall {
                flag: "max-line",
                min: 1,
            });
        }
        if self.max_clients == 0 {
            return Err(ConfigError::TooSmall {
                flag: "max-clients",
                min: 1,
            });
        }
        // A queue must hold at least one message of the longest kind, or a
        // long line would count as "too slow" for every recipient.
        let min_pending = longest_message(self.max_line) as u64;
        if (self.max_pending as u64) < min_pending {
            return Err(ConfigError::TooSmall {
                flag: "max-pending",
                min: min_pending,
            });
        }
        if self.write_timeout.is_zero() {
            return Err(ConfigError::TooSmall {
                flag: "write-timeout",
                min: 1,
            });
        }
        if self.metrics_addr.is_some() && !cfg!(feature = "metrics") {
            return Err(ConfigError::MetricsNotBuilt);
        }
        if self.web_addr.is_some() && !cfg!(feature = "web") {
            return Err(ConfigError::WebNotBuilt);
        }
        for origin in &self.web_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/').matches('/').count() != 2
            {
                return Err(ConfigError::Invalid {
                    flag: "web-origin",
                    why: format!(
                        "`{origin}` is not an origin (scheme://host[:port], as a browser sends it, e.g. https://chat.example.org)"
                    ),
                });
            }
        }
        if let Some(password) = &self.password {
            if password.len() == 0 {
                return Err(ConfigError::EmptyPassword);
            }
            if password.len() > MAX_PASSWORD {
                return Err(ConfigError::LongPassword { max: MAX_PASSWORD });
            }
        }
        if let Some(files) = &self.tls {
            if self.tls_handshake_timeout.is_zero() {
                return Err(ConfigError::TooSmall {
                    flag: "tls-handshake-timeout",
                    min: 1,
                });
            }
            // Read now, so that a bad file stops the start with its reason.
            files.load().map_err(ConfigError::Tls)?;
        }
        if let Some(cluster) = &self.cluster {
            // --names and --announce-present work across nodes
            // (src/cluster/names.rs, `Clustered::join`).
            cluster.validate(self.max_line)?;
        }
        // A bucket must hold at least one millisecond of budget, or no read
        // would ever fit in it.
        if self.flood_enabled() && self.flood_burst < Duration::from_millis(1) {
            return Err(ConfigError::TooShort {
                flag: "flood-burst",
                min: "0.001",
            });
        }
        // The kernel counts keepalive times in whole seconds.
        if self
            .keepalive
            .is_some_and(|every| every < Duration::from_secs(1))
        {
            return Err(ConfigError::TooShort {
                flag: "keepalive",
                min: "1",
            });
        }
        // The history must hold the longest line, or a long line would
        // silently empty it.
        if self.history > 0 && (self.history_bytes as u64) < min_pending {
            return Err(ConfigError::TooSmall {
                flag: "history-bytes",
                min: min_pending,
            });
        }
        // The budget must fit one client's longest line, or a client would
        // be evicted for an ordinary long line while alone; the room's
        // history counts against it too, so it must fit both.
        let history_bytes = if self.history > 0 {
            self.history_bytes as u64
        } else {
            0
        };
        let min_memory = min_pending.saturating_add(history_bytes);
        if self.max_client_memory != 0 && (self.max_client_memory as u64) < min_memory {
            return Err(ConfigError::TooSmall {
                flag: "max-client-memory",
                min: min_memory,
            });
        }
        Ok(())
    }
}
