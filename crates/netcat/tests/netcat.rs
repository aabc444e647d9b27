//! End to end with real processes: the `chat-server` binary, our `netcat`
//! and the system's `nc`, playing the seed's two-terminal session line for
//! line.

use std::io;
use std::process::Command;

use chat_testkit::ensure;
use chat_testkit::process::{
    nc_installed, our_netcat, system_nc, LineChild, ServerProcess, Signal,
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

/// `netcat ADDR | head -0`: stdout and stderr both gone. The greeting
/// cannot be printed, so netcat stops with a failure status, never a panic
/// (101), and never waits for a stdin that may never end.
#[test]
fn closed_stdout_and_stderr_end_netcat_without_a_panic() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let mut child = Command::new(chat_testkit::process::binary("netcat")?)
        .arg(&server.addr)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The read ends go before netcat writes anything.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(io::Error::other("netcat kept running with stdout gone"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    ensure(status.code() == Some(1), || {
        format!("exit status {status}; 101 would be a panic")
    })
}
