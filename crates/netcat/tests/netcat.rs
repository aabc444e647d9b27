//! End to end with real processes: the `chat-server` binary, our `netcat`
//! and the system's `nc`, playing the seed's two-terminal session line for
//! line.

use std::io::{self, Read};
use std::process::{Command, Stdio};

use chat_testkit::ensure;
use chat_testkit::process::{
    nc_installed, our_netcat, system_nc, wait_or_kill, LineChild, ServerProcess, Signal,
};

/// Reads `You are IP:PORT` and returns `IP:PORT`.
fn greeted(client: &mut LineChild) -> io::Result<String> {
    let line = client.line()?;
    chat_wire::greeted(&line)
        .map(str::to_string)
        .ok_or_else(|| io::Error::other(format!("expected a greeting, got {line:?}")))
}

/// The session from the seed text, with `connect` opening each terminal.
fn seed_session(
    server: &ServerProcess,
    mut connect: impl FnMut() -> io::Result<LineChild>,
) -> io::Result<()> {
    let mut first = connect()?;
    let a = greeted(&mut first)?;
    let mut second = connect()?;
    let b = greeted(&mut second)?;
    first.expect(&format!("{b} has arrived"))?;

    first.type_line("Hi!")?;
    first.expect(&format!("{a}: Hi!"))?;
    second.expect(&format!("{a}: Hi!"))?;

    second.type_line("Hi yourself.")?;
    first.expect(&format!("{b}: Hi yourself."))?;
    second.expect(&format!("{b}: Hi yourself."))?;

    first.close_stdin();
    let rest = first.rest()?;
    ensure(rest.is_empty(), || {
        format!("first got {rest:?} after leaving")
    })?;
    ensure(first.wait()?.success(), || "first client failed".into())?;
    second.expect(&format!("{a} has left"))?;

    let mut third = connect()?;
    let c = greeted(&mut third)?;
    second.expect(&format!("{c} has arrived"))?;

    second.type_line("Welcome.")?;
    second.expect(&format!("{b}: Welcome."))?;
    third.expect(&format!("{b}: Welcome."))?;

    second.close_stdin();
    ensure(second.rest()?.is_empty(), || "second got more lines".into())?;
    ensure(second.wait()?.success(), || "second client failed".into())?;
    third.expect(&format!("{b} has left"))?;
    let _ = server;
    Ok(())
}

#[test]
fn seed_session_with_our_netcat() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    seed_session(&server, || our_netcat(&server.addr))
}

#[test]
fn seed_session_with_system_nc() -> io::Result<()> {
    if !nc_installed()? {
        return Ok(());
    }
    let server = ServerProcess::start(&[])?;
    seed_session(&server, || {
        system_nc(server.port())?.ok_or_else(|| io::Error::other("nc vanished"))
    })
}

#[test]
fn seed_session_in_every_model_mixing_clients() -> io::Result<()> {
    for model in ["broadcaster", "locked", "broadcast"] {
        let server = ServerProcess::start(&["--model", model])?;
        let mut turn = 0;
        seed_session(&server, || {
            turn += 1;
            if turn % 2 == 0 {
                if let Some(nc) = system_nc(server.port())? {
                    return Ok(nc);
                }
            }
            our_netcat(&server.addr)
        })
        .map_err(|err| io::Error::other(format!("--model {model}: {err}")))?;
    }
    Ok(())
}

/// The last line typed before end of input, without a newline, is still
/// delivered and echoed before netcat exits.
#[test]
fn netcat_waits_for_the_echo_of_its_last_line() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let mut client = our_netcat(&server.addr)?;
    let me = greeted(&mut client)?;
    client.type_raw(b"first\nlast words")?;
    client.close_stdin();
    let rest = client.rest()?;
    ensure(
        rest == [format!("{me}: first"), format!("{me}: last words")],
        || format!("got {rest:?}"),
    )?;
    ensure(client.wait()?.success(), || "netcat failed".into())
}

#[test]
fn netcat_reports_a_refused_connection() -> io::Result<()> {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_netcat"))
        .arg(format!("127.0.0.1:{port}"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure(!output.status.success(), || "netcat succeeded".into())?;
    ensure(stderr.contains("cannot connect to 127.0.0.1:"), || {
        format!("unclear error: {stderr:?}")
    })
}

/// When the server closes the connection, netcat exits without waiting for
/// more input.
#[test]
fn netcat_exits_when_the_server_closes() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let mut client = our_netcat(&server.addr)?;
    greeted(&mut client)?;
    server.process.signal(Signal::SIGTERM)?;
    client.expect("server shutting down")?;
    ensure(client.rest()?.is_empty(), || "more output".into())?;
    ensure(client.wait()?.success(), || "netcat failed".into())
}

/// `nc`'s form, host and port as two arguments, reaches the same server.
#[test]
fn netcat_takes_host_and_port_as_nc_does() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_netcat"));
    command.args(["127.0.0.1", server.port()]);
    let mut client = LineChild::spawn("netcat", command)?;
    let me = greeted(&mut client)?;
    client.type_line("two args")?;
    client.expect(&format!("{me}: two args"))?;
    client.close_stdin();
    ensure(client.rest()?.is_empty(), || "more output".into())?;
    ensure(client.wait()?.success(), || "netcat failed".into())
}

fn netcat_output(args: &[&str]) -> io::Result<(std::process::ExitStatus, String, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_netcat"))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn help_explains_ctrl_d_and_version_prints_the_version() -> io::Result<()> {
    let (status, help, _) = netcat_output(&["--help"])?;
    ensure(status.success(), || "--help failed".into())?;
    for needle in [
        "Ctrl-D",
        "half-closes",
        "HOST:PORT",
        "--tls",
        "--ca",
        "--insecure",
    ] {
        ensure(help.contains(needle), || {
            format!("--help lacks {needle:?}:\n{help}")
        })?;
    }
    let (status, version, _) = netcat_output(&["--version"])?;
    ensure(status.success(), || "--version failed".into())?;
    ensure(
        version.trim() == format!("netcat {}", env!("CARGO_PKG_VERSION")),
        || format!("--version printed {version:?}"),
    )
}

#[test]
fn a_bad_address_says_what_was_expected() -> io::Result<()> {
    for args in [
        &["localhost"][..],
        &["localhost:http"],
        &["localhost", "99999"],
    ] {
        let (status, _, stderr) = netcat_output(args)?;
        ensure(status.code() == Some(2), || {
            format!("{args:?}: exit {status}")
        })?;
        ensure(stderr.contains("expected HOST PORT or HOST:PORT"), || {
            format!("{args:?}: unclear error {stderr:?}")
        })?;
    }
    Ok(())
}

/// `netcat ... | head -1`: once stdout is gone, the next chat line ends
/// netcat quietly and successfully, with no panic about a broken pipe.
#[test]
fn a_closed_stdout_ends_netcat_cleanly() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_netcat"))
        .arg(&server.addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    // The greeting shows netcat is connected; then nobody reads any more.
    let mut greeting = [0u8; 8];
    stdout.read_exact(&mut greeting)?;
    drop(stdout);
    let mut talker = our_netcat(&server.addr)?;
    greeted(&mut talker)?;
    for _ in 0..50 {
        talker.type_line("anyone there?")?;
    }
    let status = wait_or_kill(&mut child, "netcat with its stdout closed")?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)?;
    }
    ensure(status.success(), || {
        format!("netcat exited {status}: {stderr}")
    })?;
    ensure(stderr.is_empty(), || format!("netcat complained: {stderr}"))
}

/// `netcat ADDR` with stdout and stderr both gone before it writes
/// anything: it ends, never with a panic (101), and never waits for a
/// stdin that may never end.
#[test]
fn closed_stdout_and_stderr_end_netcat_without_a_panic() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_netcat"))
        .arg(&server.addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = wait_or_kill(&mut child, "netcat with its stdout and stderr gone")?;
    ensure(status.code() != Some(101), || {
        format!("exit status {status}: a panic")
    })
}
