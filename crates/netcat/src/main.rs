//! `netcat [ADDR]`: a port of the seed's netcat.go.
//!
//! Copies stdin to the server and the server to stdout. At the end of stdin
//! it half-closes the connection and keeps printing until the server
//! closes its side, so the server's last lines (the echo of our own last
//! line, say) are never cut off. When the server closes first, it exits at
//! once rather than waiting for more input, as the seed's netcat would.
//!
//! Plain threads and blocking sockets: two byte pumps need nothing more.
//!
//! Nothing here panics when our own stdout or stderr is gone (`netcat |
//! head -1`, a closed terminal): messages to a closed stderr are dropped,
//! and a closed stdout ends the program, as a closed pipe ends `cat`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::ExitCode;
use std::thread;

const USAGE: &str = "usage: netcat [HOST:PORT]   (default localhost:8000)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let addr = match (args.next(), args.next()) {
        (Some(flag), None) if flag == "-h" || flag == "--help" => {
            say(io::stdout(), format_args!("{USAGE}"));
            return ExitCode::SUCCESS;
        }
        (Some(addr), None) => addr,
        (None, None) => "localhost:8000".to_string(),
        _ => {
            say(io::stderr(), format_args!("{USAGE}"));
            return ExitCode::from(2);
        }
    };
    let conn = match TcpStream::connect(&addr) {
        Ok(conn) => conn,
        Err(err) => {
            say(
                io::stderr(),
                format_args!("netcat: cannot connect to {addr}: {err}"),
            );
            return ExitCode::FAILURE;
        }
    };
    let from_server = match conn.try_clone() {
        Ok(from_server) => from_server,
        Err(err) => {
            say(io::stderr(), format_args!("netcat: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let printer = thread::spawn(move || copy_to_stdout(from_server));

    let mut to_server = &conn;
    let sent = io::copy(&mut io::stdin().lock(), &mut to_server);
    if let Err(err) = sent {
        // Stdin failed, or the server is gone; either way stop sending.
        if err.kind() != io::ErrorKind::BrokenPipe {
            say(io::stderr(), format_args!("netcat: {err}"));
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
    match printer.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) => {
            say(io::stderr(), format_args!("netcat: {err}"));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// Writes one line to `out`, dropping it if `out` is gone.
fn say(mut out: impl Write, line: std::fmt::Arguments<'_>) {
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Prints everything the server sends. When the server closes, the process
/// exits from here: the main thread may be blocked reading stdin forever.
fn copy_to_stdout(mut conn: TcpStream) -> io::Result<()> {
    let stdout = io::stdout();
    let mut buf = [0u8; 16 * 1024];
    let result = loop {
        match conn.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                let mut out = stdout.lock();
                if let Err(err) = out.write_all(&buf[..n]).and_then(|()| out.flush()) {
                    break Err(err);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => break Err(err),
        }
    };
    let _ = stdout.lock().flush();
    match result {
        // The server closed: nothing more can happen, whatever stdin does.
        Ok(()) => std::process::exit(0),
        // Nobody reads what the server sends any more: stop, whatever
        // stdin does, as a closed pipe stops `cat`.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
            say(io::stderr(), format_args!("netcat: stdout: {err}"));
            std::process::exit(1)
        }
        Err(err) => Err(err),
    }
}
