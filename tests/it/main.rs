//! The server's integration tests on one server (the cluster's are in
//! `tests/cluster/`), folded into one test binary with one module per
//! concern. Each module was a test binary of its own, and each linked the
//! server and all its dependencies again: most of a cold `cargo test`.
//!
//! Run one module with `cargo test --test it MODULE::`, for example
//! `cargo test --test it presence::`; docs/testing.md lists the modules.
//! Every test builds its own runtime and server on ephemeral ports, so the
//! modules share nothing but this process: nothing here sets environment
//! variables, installs a global subscriber or lowers a process-wide limit
//! (`floods` raises the open-file limit, which suits every other test).

// First, so that its `for_each_model!` macros are in scope in every module
// declared after it.
#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod browser;
mod cli;
mod docs_flags;
mod floods;
mod history;
mod hostile;
mod limits;
mod logs;
mod metrics;
mod names;
mod ordering;
mod password;
mod presence;
mod protocol;
mod queues;
mod shutdown;
mod slow_clients;
mod soak;
mod tasks;
mod timers;
mod tls;
mod vanished;
mod web;
