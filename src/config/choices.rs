//! The closed choices among the settings: the concurrency model, what
//! happens to a slow client, and the per-client queue. Each has the name
//! the command line, the banner and the load tool use.

use std::fmt;

/// The concurrency model that owns the set of connected clients.
///
/// Each is one file under `src/room/hub/`; see ARCHITECTURE.md for the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Model {
    /// Senders in a DashMap; each reader fans its lines out directly (no broadcaster task)
    Sharded,
    /// The seed's design: one task owns the client map; entering/leaving/messages channels
    Broadcaster,
    /// Senders in one parking_lot `RwLock<HashMap>`; each reader fans out under the read lock
    #[cfg_attr(
        feature = "cli",
        value(
            help = "Senders in one parking_lot RwLock<HashMap>; each reader fans out under the read lock"
        )
    )]
    Locked,
    /// One tokio::sync::broadcast channel; every writer holds a receiver
    Broadcast,
}

impl Model {
    /// Every model, in the order the tables in ARCHITECTURE.md use.
    pub const ALL: [Model; 4] = [
        Model::Sharded,
        Model::Broadcaster,
        Model::Locked,
        Model::Broadcast,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Model::Sharded => "sharded",
            Model::Broadcaster => "broadcaster",
            Model::Locked => "locked",
            Model::Broadcast => "broadcast",
        }
    }

    /// Whether each client has a queue of its own (`--queue` chooses which);
    /// `broadcast`'s clients share one ring instead.
    pub fn has_client_queues(self) -> bool {
        self != Model::Broadcast
    }

    /// Live tasks the model runs for `clients` connected clients, the accept
    /// loop included. The seed's broadcaster design is the 2n+2 baseline.
    pub fn expected_tasks(self, clients: usize) -> usize {
        match self {
            Model::Broadcaster => 2 * clients + 2,
            Model::Sharded | Model::Locked | Model::Broadcast => 2 * clients + 1,
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a client whose outbound queue is over `max_pending`
/// bytes, or which accepted no byte for `write_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum SlowClientPolicy {
    /// Drop that client (it gets `error: disconnected: too slow`); nobody waits for it
    Disconnect,
    /// Skip the message for that client only; the count is logged when it leaves
    Drop,
    /// Make the sender wait for room, as the seed does (one stuck reader stalls everyone)
    Block,
}

impl SlowClientPolicy {
    /// Every policy.
    pub const ALL: [SlowClientPolicy; 3] = [
        SlowClientPolicy::Disconnect,
        SlowClientPolicy::Drop,
        SlowClientPolicy::Block,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SlowClientPolicy::Disconnect => "disconnect",
            SlowClientPolicy::Drop => "drop",
            SlowClientPolicy::Block => "block",
        }
    }
}

impl fmt::Display for SlowClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The per-client queue of the models that have one (`sharded`,
/// `broadcaster`, `locked`; `broadcast` has a shared ring instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum QueueKind {
    /// A mutex-guarded buffer the writer swaps out whole; frees its buffers when drained
    Swap,
    /// tokio's unbounded mpsc channel; keeps the blocks a burst grew
    Mpsc,
}

impl QueueKind {
    /// Every queue.
    pub const ALL: [QueueKind; 2] = [QueueKind::Swap, QueueKind::Mpsc];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            QueueKind::Swap => "swap",
            QueueKind::Mpsc => "mpsc",
        }
    }
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The models' names are the ones the load tool and the banner use.
    #[test]
    fn model_names_match_the_banner() {
        let names: Vec<&str> = Model::ALL.iter().map(|model| model.name()).collect();
        assert_eq!(names, chat_wire::banner::MODELS);
    }

    /// The flag values clap derives are the names the library prints.
    #[cfg(feature = "cli")]
    #[test]
    fn flag_values_are_the_names() {
        use clap::ValueEnum;
        fn flag(value: impl ValueEnum) -> Option<String> {
            value
                .to_possible_value()
                .map(|possible| possible.get_name().to_owned())
        }
        for model in Model::ALL {
            assert_eq!(flag(model).as_deref(), Some(model.name()));
        }
        for policy in SlowClientPolicy::ALL {
            assert_eq!(flag(policy).as_deref(), Some(policy.name()));
        }
        for queue in QueueKind::ALL {
            assert_eq!(flag(queue).as_deref(), Some(queue.name()));
        }
        assert_eq!(Model::from_str("locked", false), Ok(Model::Locked));
    }
}
