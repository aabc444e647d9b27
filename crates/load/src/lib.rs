//! `chat-load`: a load generator for any server speaking the gopl.io chat
//! line protocol (this crate's server in any model, the Go seed, anything
//! compatible), and `compare`, which runs the same load against several.
//!
//! The tool is a client of the protocol and nothing more: it connects over
//! loopback, reads greetings and announcements, and sends chat lines whose
//! text ([`payload`]) carries the sender's id, a sequence number and the send
//! time. Because every client lives in this one process, one monotonic clock
//! times both ends of every delivery. From what the clients receive it
//! reports deliveries per second (one message received by one client),
//! latency percentiles (HDR histograms), lost messages, per-sender order
//! violations and, given the server's pid, the server's CPU time and memory
//! read from `/proc` ([`proc`]).
//!
//! The modules, in the order a run uses them:
//!
//! - [`scenario`]: the six scenarios (`fanout`, `rate`, `churn`, `slow`,
//!   `idle`, `flood`, a file each) and the coordinator that connects,
//!   settles, starts, watches and stops the clients, always within bounds of
//!   count and time;
//! - `client`: one simulated user, its connection and its receive path;
//! - [`protocol`]: `--protocol line|nats|redis|ws`, the chat's protocol or a
//!   broker's pub/sub on one subject, with the same payloads and accounting;
//! - [`ws`]: the chat through its browser door (`--protocol ws`): the
//!   WebSocket handshake and framing around the same lines;
//! - [`tls`]: `--tls`, the line protocol or the WebSocket over TLS;
//! - [`payload`]: the chat line's text, its decoder, the clock and order checking;
//! - [`proc`]: CPU time, memory and limits from `/proc`;
//! - [`report`]: one run's results, as a table or JSON;
//! - [`compare`]: starts servers (each model of ours, and peers such as the
//!   Go seed), runs the scenarios against each and writes the side-by-side
//!   table (Markdown, JSON) and a plot (SVG).
//!
//! # How fast the tool itself is
//!
//! The numbers are only worth quoting if the tool is not the bottleneck, so
//! the receive path is built for it (see `client.rs`): 64 KiB reads, `memchr`
//! line splitting, a payload found at a fixed offset from the line's end and
//! decoded eight hex digits at a time, per-sender state in plain arrays, one
//! histogram per client, shared counters touched once per read. Every
//! report gives the tool's own CPU time (`tool_cpu_s`), so its cost per
//! delivery can be checked in any run. Measured on the 2-core development
//! machine (shared with other work, so these are upper bounds):
//!
//! - the receive path alone, in memory: 22–30 ns per line on one core, 35–45
//!   M lines/s (`cargo test --release -p chat-load --lib receive_path_speed
//!   -- --ignored --nocapture`);
//! - against our server, `fanout` at n = 100 and 1000: 40–55 ns of tool CPU
//!   per delivery, sends and the kernel's receive path included, so about
//!   20 M deliveries/s per core and 40 M/s on 2 cores; at n = 10 (smaller
//!   writes from the server) about 100–200 ns;
//! - when each read returns a single line (the Go seed writes every line on
//!   its own; open-loop runs at low rates) a delivery costs 1.5–3 µs, almost
//!   all of it the kernel's TCP receive path and the wake-up, which is why
//!   the tool's CPU is reported beside the server's.

/// `eprintln!` that cannot panic: progress and notes on stderr are dropped
/// if stderr is gone (a closed pipe), rather than ending a run mid-way.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod client;
pub mod compare;
pub mod protocol;
pub mod report;
pub mod scenario;
pub mod tls;
pub mod ws;

pub use chat_testkit::{payload, proc};

pub use report::Report;
pub use scenario::{run, Options, Scenario};
