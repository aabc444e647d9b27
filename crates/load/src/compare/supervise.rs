//! The servers `compare` runs: each started in a process group of its own
//! (ours on a fresh port, the address read from its banner; a peer under
//! `sh -c`, found by the socket it listens on), its output in a log file,
//! and stopped with SIGTERM to the whole group, then SIGKILL, whenever its
//! [`Running`] guard is dropped.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::spec::{Model, PeerSpec};
use super::CompareOptions;
use crate::proc::{self, Proc};
use crate::scenario::resolve_loopback;

/// A running server, stopped when dropped.
#[derive(Debug)]
pub(super) struct Running {
    pub(super) name: String,
    pub(super) child: Child,
    pub(super) addr: SocketAddr,
    /// The process to measure (the listener, which may be the child's child).
    pub(super) pid: u32,
    pub(super) log: PathBuf,
}

impl Running {
    /// SIGTERM to the whole process group, SIGKILL after a grace period.
    fn stop(&mut self) {
        let exited = |r: &mut Running| {
            matches!(r.child.try_wait(), Ok(Some(_))) && !Proc::Pid(r.pid).alive()
        };
        if exited(self) {
            return;
        }
        // The group, not just the child: a peer's shell may have children.
        // Each server leads its own group (`process_group(0)` at spawn).
        let group = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if exited(self) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// SIGKILL to the whole process group, as a crash: nothing is flushed.
    pub(super) fn kill(&mut self) {
        let group = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_file(out: &Path, name: &str) -> anyhow::Result<(File, PathBuf)> {
    let path = out.join(format!("{name}.log"));
    // Appended to: every scenario restarts the server, and its earlier
    // runs' output is worth keeping.
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok((file, path))
}

/// Servers log at warn unless the user chose a level.
fn quiet_logs(command: &mut Command) {
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
}

/// Starts our server in `model` on a fresh port.
pub(super) fn start_ours(opts: &CompareOptions, model: Model) -> anyhow::Result<Running> {
    start_node(opts, model, model.name(), &[])
}

/// Starts our server in `model` on a fresh port as `name`, with `extra`
/// arguments after the user's (a cluster node's `--cluster URL`).
pub(super) fn start_node(
    opts: &CompareOptions,
    model: Model,
    name: &str,
    extra: &[String],
) -> anyhow::Result<Running> {
    let name = name.to_owned();
    let (log, log_path) = log_file(&opts.out, &name)?;
    let mut command = Command::new(&opts.server_bin);
    command
        .args(super::spec::our_server_args(
            model,
            opts.server_threads,
            &opts.server_args,
        ))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    quiet_logs(&mut command);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", opts.server_bin.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout from the server")?;
    // Read the first line in a thread (std has no read timeout on pipes),
    // and keep draining so the server can never block writing to us.
    let (first_line, line) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = first_line.send(lines.next());
        for _ in lines {}
    });
    let mut running = Running {
        name: name.clone(),
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        pid,
        log: log_path,
    };
    let first = match line.recv_timeout(opts.startup_timeout) {
        Ok(Some(Ok(first))) => first,
        _ => bail!(
            "{name}: the server printed no address within {:?}; see {}",
            opts.startup_timeout,
            running.log.display()
        ),
    };
    running.addr = parse_listening_line(&first)
        .with_context(|| format!("{name}: unexpected first line {first:?}"))?;
    Ok(running)
}

/// The address in our server's banner (see [`chat_wire::banner`]).
fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    chat_wire::banner::parse(line)?.0.parse().ok()
}

/// Starts a peer under `sh -c` and waits until it accepts connections.
pub(super) fn start_peer(opts: &CompareOptions, peer: &PeerSpec) -> anyhow::Result<Running> {
    let (addr, command) = match &peer.addr {
        Some(addr) => {
            let addr = resolve_loopback(addr).with_context(|| format!("peer {}", peer.name))?;
            // Allow the previous instance (stopped a moment ago) to let go.
            let deadline = Instant::now() + Duration::from_secs(3);
            while TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(50));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
                let holder = proc::listener_pid(addr.port())
                    .map_or(String::new(), |pid| format!(" (pid {pid})"));
                bail!(
                    "peer {}: {addr} is already in use{holder}; stop whatever listens there first, \
                     or the tool would measure it instead",
                    peer.name
                );
            }
            (addr, peer.command.clone())
        }
        None => {
            let port = TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .context("cannot find a free port")?
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let command = peer
                .command
                .replace("{port}", &port.to_string())
                .replace("{addr}", &addr.to_string());
            (addr, command)
        }
    };
    let (log, log_path) = log_file(&opts.out, &peer.name)?;
    let log_err = log.try_clone().context("duplicating a log file")?;
    let mut sh = Command::new("sh");
    sh.args(["-c", &command])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    quiet_logs(&mut sh);
    let child = sh
        .spawn()
        .with_context(|| format!("peer {}: cannot run sh -c {command:?}", peer.name))?;
    let shell = child.id();
    let mut running = Running {
        name: peer.name.clone(),
        child,
        addr,
        pid: shell,
        log: log_path,
    };
    let deadline = Instant::now() + opts.startup_timeout;
    loop {
        if let Ok(Some(status)) = running.child.try_wait() {
            bail!(
                "peer {}: `{command}` exited ({status}) before accepting connections on {addr}; see {}",
                peer.name,
                running.log.display()
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "peer {}: nothing accepted connections on {addr} within {:?}; see {}",
                peer.name,
                opts.startup_timeout,
                running.log.display()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    match proc::listener_pid(addr.port()) {
        Some(pid) if proc::descends_from(pid, shell) => running.pid = pid,
        Some(pid) => bail!(
            "peer {}: {addr} is held by pid {pid}, which is not the peer we started",
            peer.name
        ),
        None => crate::note!(
            "chat-load: peer {}: cannot see which process listens on {addr}; measuring the shell's pid {shell}",
            peer.name
        ),
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_servers_address_line() {
        assert_eq!(
            parse_listening_line("chat-server listening on 127.0.0.1:4242 (model sharded)"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4242)))
        );
        assert_eq!(parse_listening_line("hello"), None);
    }
}
