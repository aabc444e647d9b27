//! The guard on memory per idle connection (issue 21): every model, with
//! the default configuration, holds 1,000 idle connections in at most
//! [`BUDGET`] bytes of live heap each.
//!
//! A test binary of its own, because it counts every allocation of the
//! process with a `#[global_allocator]`: the other tests must not pay for
//! the counting, nor disturb the count. For the same reason this file has
//! one test, which runs the models one after another, and the clients are
//! blocking `std` sockets, which allocate nothing per connection: what the
//! count grows by is the server's.
//!
//! The figure is live heap (the bytes the server asked for, and glibc's
//! usable size of those blocks), not RSS: it is exact, the same on every
//! run and in debug and release builds, so a few hundred bytes of creep
//! fail here rather than hiding in the noise of an RSS figure. RSS adds
//! what the allocator keeps around them; `chat-load idle
//! --max-kib-per-connection` guards that, on a release build
//! (docs/results.md, "Memory per idle connection").

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use chat_server::harness::TestServer;
use chat_server::{Config, Model};

/// Idle connections per model.
const CONNECTIONS: usize = 1000;

/// Live heap bytes one idle connection may hold (requested sizes), in
/// every model. What each model measured when this was set is in
/// docs/results.md; the budget is a little above the largest.
const BUDGET: usize = 1792;

/// How long the server may take to free what the arrivals' fan-out grew,
/// once every client has read all of it. Generous: a loaded machine.
const SETTLE: Duration = Duration::from_secs(20);

/// Counts the process's live heap: bytes requested, bytes usable (glibc's
/// rounding), and blocks, with a histogram of block sizes for diagnosis.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_USABLE: AtomicIsize = AtomicIsize::new(0);
static LIVE_BLOCKS: AtomicIsize = AtomicIsize::new(0);

/// Live blocks by requested size, in 16-byte classes; the last counts
/// everything larger.
const CLASSES: usize = 129;
static BY_SIZE: [AtomicIsize; CLASSES] = [const { AtomicIsize::new(0) }; CLASSES];

fn class(size: usize) -> usize {
    (size / 16).min(CLASSES - 1)
}

fn usable(ptr: *mut u8) -> isize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `ptr` is a live block from the system allocator (glibc's malloc).
    unsafe {
        libc::malloc_usable_size(ptr.cast()) as isize
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = ptr;
        0
    }
}

fn counted(ptr: *mut u8, layout: Layout) {
    if !ptr.is_null() {
        LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
        LIVE_USABLE.fetch_add(usable(ptr), Relaxed);
        LIVE_BLOCKS.fetch_add(1, Relaxed);
        BY_SIZE[class(layout.size())].fetch_add(1, Relaxed);
    }
}

fn uncounted(ptr: *mut u8, layout: Layout) {
    LIVE_BYTES.fetch_sub(layout.size() as isize, Relaxed);
    LIVE_USABLE.fetch_sub(usable(ptr), Relaxed);
    LIVE_BLOCKS.fetch_sub(1, Relaxed);
    BY_SIZE[class(layout.size())].fetch_sub(1, Relaxed);
}

// SAFETY: every call is passed to `System` unchanged; the counting only
// reads the blocks' sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        counted(ptr, layout);
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        counted(ptr, layout);
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        uncounted(ptr, layout);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        uncounted(ptr, layout);
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if moved.is_null() {
            // The old block is still there.
            counted(ptr, layout);
        } else {
            // SAFETY: `new_size` was valid for `layout`'s alignment (the caller's contract).
            counted(moved, unsafe {
                Layout::from_size_align_unchecked(new_size, layout.align())
            });
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The live heap at one instant.
#[derive(Debug, Clone, Copy)]
struct Heap {
    bytes: isize,
    usable: isize,
    blocks: isize,
    by_size: [isize; CLASSES],
}

impl Heap {
    fn now() -> Heap {
        Heap {
            bytes: LIVE_BYTES.load(Relaxed),
            usable: LIVE_USABLE.load(Relaxed),
            blocks: LIVE_BLOCKS.load(Relaxed),
            by_size: std::array::from_fn(|class| BY_SIZE[class].load(Relaxed)),
        }
    }
}

/// What `CONNECTIONS` idle connections added, per connection.
#[derive(Debug, Clone, Copy)]
struct PerConnection {
    bytes: f64,
    usable: f64,
    blocks: f64,
}

impl PerConnection {
    fn between(before: &Heap, after: &Heap) -> PerConnection {
        let per = |before: isize, after: isize| (after - before) as f64 / CONNECTIONS as f64;
        PerConnection {
            bytes: per(before.bytes, after.bytes),
            usable: per(before.usable, after.usable),
            blocks: per(before.blocks, after.blocks),
        }
    }
}

/// Block sizes that grew by at least a tenth of a block per connection.
fn growth(before: &Heap, after: &Heap) -> String {
    let mut lines = Vec::new();
    for class in 0..CLASSES {
        let grew = after.by_size[class] - before.by_size[class];
        if grew * 10 >= CONNECTIONS as isize {
            let size = if class == CLASSES - 1 {
                format!(">= {}", class * 16)
            } else {
                format!("{}-{}", class * 16, class * 16 + 15)
            };
            lines.push(format!(
                "  {size:>9} bytes: {:.2} blocks per connection",
                grew as f64 / CONNECTIONS as f64
            ));
        }
    }
    lines.join("\n")
}

/// Reads until `lines` newlines have arrived on `stream`.
fn read_lines(stream: &mut TcpStream, mut lines: usize) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while lines > 0 {
        let read = stream.read(&mut buf)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed with {lines} lines still to come"),
            ));
        }
        let seen = buf[..read].iter().filter(|&&byte| byte == b'\n').count();
        if seen > lines {
            return Err(io::Error::other("more lines than expected"));
        }
        lines -= seen;
    }
    Ok(())
}

/// Opens `CONNECTIONS` idle connections to a fresh `model` server, lets
/// every arrival announcement be read, and returns what they hold once the
/// server has settled (or the lowest figure seen within [`SETTLE`]).
fn measure(model: Model) -> io::Result<(PerConnection, String)> {
    // The defaults, but every client comes from 127.0.0.1.
    let server = TestServer::start(Config::with_model(model).with(|c| c.max_clients_per_ip = 0))?;
    let addr: SocketAddr = server.addr();
    let connect = || -> io::Result<TcpStream> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(stream)
    };
    // One connection served and gone first, so that what the server builds
    // once (its first task's worker state, the first I/O registrations) is
    // in the baseline.
    let mut first = connect()?;
    read_lines(&mut first, 1)?;
    drop(first);
    wait_for_tasks(&server, model.expected_tasks(0))?;

    let mut streams = Vec::with_capacity(CONNECTIONS);
    let before = Heap::now();
    for _ in 0..CONNECTIONS {
        let mut stream = connect()?;
        // Its greeting comes after its join, and so after its arrival went
        // out: one join at a time, so each client hears exactly the
        // arrivals after its own.
        read_lines(&mut stream, 1)?;
        streams.push(stream);
    }
    for (joined, stream) in streams.iter_mut().enumerate() {
        read_lines(stream, CONNECTIONS - 1 - joined)?;
    }
    // Every announcement has been read; the writers free their batches and
    // the queues their buffers on their way back to waiting.
    let deadline = Instant::now() + SETTLE;
    let mut lowest = Heap::now();
    loop {
        let now = Heap::now();
        if now.bytes < lowest.bytes {
            lowest = now;
        }
        let per = PerConnection::between(&before, &lowest);
        if per.bytes <= BUDGET as f64 || Instant::now() >= deadline {
            let detail = growth(&before, &lowest);
            drop(streams);
            server.stop();
            return Ok((per, detail));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (bounded by [`SETTLE`]) until the server runs exactly `expected`
/// tasks: the harness's wait, on a runtime of its own that is gone before
/// the baseline is taken.
fn wait_for_tasks(server: &TestServer, expected: usize) -> io::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?
        .block_on(server.wait_for_tasks(expected, SETTLE))
        .map_err(|alive| io::Error::other(format!("{alive} tasks alive, expected {expected}")))
}

#[test]
fn idle_connections_stay_within_budget() -> io::Result<()> {
    // The server and the clients share this process: two descriptors each.
    chat_testkit::proc::ensure_open_files(2 * CONNECTIONS as u64 + 256)
        .map_err(io::Error::other)?;
    let mut over = Vec::new();
    for model in Model::ALL {
        let (per, detail) = measure(model)?;
        println!(
            "{model}: {:.0} bytes requested, {:.0} usable, {:.1} blocks per idle connection\n{detail}",
            per.bytes, per.usable, per.blocks
        );
        if per.bytes > BUDGET as f64 {
            over.push(format!("{model}: {:.0} bytes", per.bytes));
        }
    }
    assert!(
        over.is_empty(),
        "over the budget of {BUDGET} bytes per idle connection: {}",
        over.join(", ")
    );
    Ok(())
}
