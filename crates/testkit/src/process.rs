//! Real processes for end-to-end tests: the `chat-server` binary on an
//! ephemeral port, and line-oriented children (our `netcat`, the system's
//! `nc`) whose output is read with a timeout.
//!
//! The binaries are found beside the running test (`target/PROFILE/`), where
//! `cargo test` at the workspace root builds every member's binaries before
//! running any test ([`binary`]).

use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::proc::Proc;
use nix::sys::signal::kill;
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The workspace binary `name`, from the directory the running test or
/// tool was built into. Fails with what to run if it is not built.
pub fn binary(name: &str) -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| io::Error::other("the running executable has no directory"))?;
    // Test executables live in target/PROFILE/deps, binaries in target/PROFILE.
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.exists() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not built: run `cargo test` at the workspace root, or `cargo build --bin {name}` first",
                path.display()
            ),
        ))
    }
}

/// The first of `candidates` that runs (`--version` succeeds). When none
/// does, the `what` tests say so loudly and pass, unless `CI` or `require`
/// is set: then a missing `package` is an error, so that CI cannot pass
/// without running them.
pub fn installed_or_skip(
    candidates: &[&'static str],
    require: &str,
    package: &str,
    what: &str,
) -> io::Result<Option<&'static str>> {
    for &candidate in candidates {
        let runs = Command::new(candidate)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if runs {
            return Ok(Some(candidate));
        }
    }
    if std::env::var_os("CI").is_some() || std::env::var_os(require).is_some() {
        return Err(io::Error::other(format!(
            "{package} is not installed, and CI (or {require}) is set: \
             the {what} tests must run (apt-get install {package})"
        )));
    }
    let stars = "*".repeat(64);
    eprintln!(
        "\n{stars}\n* {package} is not installed: this {what} test did NOT run.\n\
         * Install it (apt-get install {package}) to run it.\n{stars}\n"
    );
    Ok(None)
}

/// How long a test waits for one line or one exit before failing.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);

/// The lines of a child's `output`, read by a thread of their own for as
/// long as anyone receives them, so the child never blocks on a full pipe
/// and a reader can wait for a line with a timeout.
pub fn lines_of<R: std::io::Read + Send + 'static>(
    output: R,
) -> mpsc::Receiver<io::Result<String>> {
    let (send, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    lines
}

/// How many of a child's last log lines a [`LogTail`] keeps.
pub const TAIL_LINES: usize = 1000;

/// A child's log (stderr, usually), drained by a thread for the child's
/// whole life and kept as its last [`TAIL_LINES`] lines.
///
/// Why not [`lines_of`]: a receiver dropped once the child is ready ends the
/// draining thread and closes the pipe, and a Go program such as
/// `nats-server` then dies of `SIGPIPE` at its next log line (a route
/// reconnecting, a client refused). Keeping the tail bounded instead of
/// queueing every line keeps a long-lived, chatty child (a cluster whose
/// peer is down logs every second) at constant memory, and the tail is
/// what an error message shows when a start fails.
pub struct LogTail {
    shared: std::sync::Arc<(std::sync::Mutex<Tail>, std::sync::Condvar)>,
}

#[derive(Default)]
struct Tail {
    lines: std::collections::VecDeque<String>,
    /// Lines read so far, kept or not: a reader's position.
    total: u64,
    ended: bool,
}

impl LogTail {
    /// Starts draining `output`.
    pub fn of<R: std::io::Read + Send + 'static>(output: R) -> LogTail {
        let shared = std::sync::Arc::new((
            std::sync::Mutex::new(Tail::default()),
            std::sync::Condvar::new(),
        ));
        let writer = std::sync::Arc::clone(&shared);
        thread::spawn(move || {
            let (tail, changed) = &*writer;
            let mut reader = BufReader::new(output);
            let mut line = Vec::new();
            // Bytes, not `lines()`: a log line that is not UTF-8 must not
            // end the draining.
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                line.clear();
                let Ok(mut tail) = tail.lock() else { return };
                if tail.lines.len() == TAIL_LINES {
                    tail.lines.pop_front();
                }
                tail.lines.push_back(text);
                tail.total += 1;
                changed.notify_all();
            }
            if let Ok(mut tail) = tail.lock() {
                tail.ended = true;
            }
            changed.notify_all();
        });
        LogTail { shared }
    }

    /// The line at `*position` (0 for the first), waiting for it until
    /// `deadline`, and moves `position` past it. `None` at the deadline or
    /// when the output ended first. A reader that fell more than
    /// [`TAIL_LINES`] behind continues at the oldest line kept.
    pub fn next_line(&self, position: &mut u64, deadline: Instant) -> Option<String> {
        let (tail, changed) = &*self.shared;
        let mut tail = tail.lock().ok()?;
        loop {
            let oldest = tail.total - tail.lines.len() as u64;
            *position = (*position).max(oldest);
            if *position < tail.total {
                let index = usize::try_from(*position - oldest).ok()?;
                *position += 1;
                return tail.lines.get(index).cloned();
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if tail.ended || left.is_zero() {
                return None;
            }
            tail = changed.wait_timeout(tail, left).ok()?.0;
        }
    }

    /// How many lines were read so far: the position of the next one.
    pub fn position(&self) -> u64 {
        self.shared.0.lock().map_or(0, |tail| tail.total)
    }

    /// The last `count` lines kept, oldest first, for error messages.
    pub fn last(&self, count: usize) -> Vec<String> {
        self.shared.0.lock().map_or_else(
            |_| Vec::new(),
            |tail| {
                let skip = tail.lines.len().saturating_sub(count);
                tail.lines.iter().skip(skip).cloned().collect()
            },
        )
    }
}

/// A child process with line-by-line access to its stdout.
pub struct LineChild {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<io::Result<String>>,
    name: String,
}

impl LineChild {
    /// Spawns `command` with piped stdin/stdout (stderr inherited, so it
    /// shows in the test output on failure).
    pub fn spawn(name: &str, command: Command) -> io::Result<LineChild> {
        LineChild::spawn_with_stderr(name, command, Stdio::inherit())
    }

    /// [`LineChild::spawn`] with stderr going to `stderr`.
    pub fn spawn_with_stderr(
        name: &str,
        mut command: Command,
        stderr: Stdio,
    ) -> io::Result<LineChild> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|err| io::Error::new(err.kind(), format!("cannot start {name}: {err}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        Ok(LineChild {
            stdin: child.stdin.take(),
            lines: lines_of(stdout),
            child,
            name: name.to_string(),
        })
    }

    /// The next line of output, or an error after [`PROCESS_TIMEOUT`] or at EOF.
    pub fn line(&mut self) -> io::Result<String> {
        match self.lines.recv_timeout(PROCESS_TIMEOUT) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{}: no line within {PROCESS_TIMEOUT:?}", self.name),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: output ended", self.name),
            )),
        }
    }

    pub fn expect(&mut self, expected: &str) -> io::Result<()> {
        let line = self.line()?;
        if line == expected {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{}: expected {expected:?}, got {line:?}",
                self.name
            )))
        }
    }

    /// Lines until the output ends.
    pub fn rest(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            match self.line() {
                Ok(line) => lines.push(line),
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(lines),
                Err(err) => return Err(err),
            }
        }
    }

    pub fn type_line(&mut self, text: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("stdin already closed"))?;
        stdin.write_all(text.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()
    }

    pub fn type_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("stdin already closed"))?;
        stdin.write_all(bytes)?;
        stdin.flush()
    }

    /// Ends stdin, as Ctrl-D does at a terminal.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the process to exit, killing it after [`PROCESS_TIMEOUT`].
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        wait_or_kill(&mut self.child, &self.name)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let pid = i32::try_from(self.child.id()).map_err(io::Error::other)?;
        kill(Pid::from_raw(pid), signal).map_err(io::Error::from)
    }
}

/// Waits for `child` (called `name` in the error) to exit, killing it
/// after [`PROCESS_TIMEOUT`].
pub fn wait_or_kill(child: &mut Child, name: &str) -> io::Result<ExitStatus> {
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{name} did not exit"),
            ));
        }
        // Exit has no notification we can wait on with a timeout in std.
        thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `chat-server` binary, started on `127.0.0.1:0` with `args`.
pub struct ServerProcess {
    pub process: LineChild,
    pub addr: String,
}

impl ServerProcess {
    pub fn start(args: &[&str]) -> io::Result<ServerProcess> {
        let mut command = Command::new(binary("chat-server")?);
        command.args(["--addr", "127.0.0.1:0"]).args(args);
        ServerProcess::start_command(command, Stdio::inherit(), "warn")
    }

    /// The server with its log at `RUST_LOG=info` written to `log`, for tests
    /// that read what it logged.
    pub fn start_with_log(args: &[&str], log: &std::path::Path) -> io::Result<ServerProcess> {
        let mut command = Command::new(binary("chat-server")?);
        command.args(["--addr", "127.0.0.1:0"]).args(args);
        ServerProcess::start_command(command, Stdio::from(std::fs::File::create(log)?), "info")
    }

    /// The server started by `sh` after `ulimit ULIMIT` (the shell's
    /// arguments, e.g. `-n 256`, or `-Sn 256 && ulimit -Hn 4096`), logging
    /// at `log_level` into `log`.
    pub fn start_with_ulimit(
        ulimit: &str,
        args: &[&str],
        log: &std::path::Path,
        log_level: &str,
    ) -> io::Result<ServerProcess> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "ulimit {ulimit} && exec \"$0\" --addr 127.0.0.1:0 \"$@\""
            ))
            .arg(binary("chat-server")?)
            .args(args);
        ServerProcess::start_command(command, Stdio::from(std::fs::File::create(log)?), log_level)
    }

    fn start_command(
        mut command: Command,
        stderr: Stdio,
        log_level: &str,
    ) -> io::Result<ServerProcess> {
        command.env("RUST_LOG", log_level);
        let mut process = LineChild::spawn_with_stderr("chat-server", command, stderr)?;
        let banner = process.line()?;
        let addr = chat_wire::banner::parse(&banner)
            .ok_or_else(|| io::Error::other(format!("unexpected banner {banner:?}")))?
            .0
            .to_string();
        Ok(ServerProcess { process, addr })
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> io::Result<u64> {
        Proc::Pid(self.pid())
            .memory()
            .map(|memory| memory.rss_kib)
            .map_err(io::Error::other)
    }

    /// CPU time so far, in nanoseconds, from /proc.
    pub fn cpu_ns(&self) -> io::Result<u64> {
        Proc::Pid(self.pid()).cpu_ns().map_err(io::Error::other)
    }

    pub fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap_or_default()
    }
}

/// Our `netcat` connected to `addr`.
pub fn our_netcat(addr: &str) -> io::Result<LineChild> {
    let mut command = Command::new(binary("netcat")?);
    command.arg(addr);
    LineChild::spawn("netcat", command)
}

/// Whether the system's `nc` can be run. Without it the `nc` variants say
/// so and pass, unless `CHAT_REQUIRE_NC` is set (CI sets it).
pub fn nc_installed() -> io::Result<bool> {
    let installed = Command::new("nc")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !installed {
        if std::env::var_os("CHAT_REQUIRE_NC").is_some() {
            return Err(io::Error::other(
                "nc is not installed but CHAT_REQUIRE_NC is set",
            ));
        }
        eprintln!("nc is not installed: the nc variant of this test did not run (CI installs it)");
    }
    Ok(installed)
}

/// The system's OpenBSD `nc`, with `-N` so that end of stdin half-closes the
/// connection as our netcat does. `None` if it is not installed.
pub fn system_nc(port: &str) -> io::Result<Option<LineChild>> {
    if !nc_installed()? {
        return Ok(None);
    }
    let mut command = Command::new("nc");
    command.args(["-N", "127.0.0.1", port]);
    LineChild::spawn("nc", command).map(Some)
}
