//! The log formats of the real binary: every line about a client carries
//! its address, in text (`conn{peer=...}`) and in JSON (the `conn` span's
//! `peer` field), so that a log shipper can group a client's lines.

use crate::common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;

use chat_testkit::process::{ServerProcess, Signal, PROCESS_TIMEOUT};
use common::ensure;

/// A log file of this test process, removed on drop.
struct LogFile(PathBuf);

impl LogFile {
    fn new(name: &str) -> LogFile {
        LogFile(std::env::temp_dir().join(format!("chat-server-{name}-{}.log", std::process::id())))
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One client arrives, says a line, and leaves; then the server stops.
/// Returns the client's address and the server's whole log.
fn one_visit(args: &[&str], log: &LogFile) -> io::Result<(String, String)> {
    let mut server = ServerProcess::start_with_log(args, &log.0)?;
    let mut conn = TcpStream::connect(&server.addr)?;
    conn.set_read_timeout(Some(PROCESS_TIMEOUT))?;
    let me = conn.local_addr()?.to_string();
    conn.write_all(b"hello\n")?;
    conn.shutdown(Shutdown::Write)?;
    let mut received = String::new();
    BufReader::new(&conn).read_to_string(&mut received)?;
    ensure(received.contains(&format!("{me}: hello")), || {
        format!("no echo: {received:?}")
    })?;
    server.process.signal(Signal::SIGTERM)?;
    ensure(server.process.wait()?.success(), || "server failed".into())?;
    Ok((me, std::fs::read_to_string(&log.0)?))
}

#[test]
fn json_logs_carry_the_clients_address_and_the_text_fields() -> io::Result<()> {
    let log = LogFile::new("json");
    let (me, text) = one_visit(&["--log-format", "json"], &log)?;
    let mut about_client = Vec::new();
    for line in BufReader::new(text.as_bytes()).lines() {
        let line = line?;
        let entry: serde_json::Value = serde_json::from_str(&line)
            .map_err(|err| io::Error::other(format!("not JSON ({err}): {line}")))?;
        for field in ["timestamp", "level", "target"] {
            ensure(entry.get(field).is_some(), || format!("no {field}: {line}"))?;
        }
        let message = entry["fields"]["message"].as_str().unwrap_or_default();
        if ["arrived", "left"].contains(&message) {
            ensure(entry["span"]["name"] == "conn", || {
                format!("no conn span: {line}")
            })?;
            ensure(entry["span"]["peer"] == me.as_str(), || {
                format!("peer is not {me}: {line}")
            })?;
            ensure(entry["spans"][0]["peer"] == me.as_str(), || {
                format!("the span list lacks the peer: {line}")
            })?;
            about_client.push(message.to_string());
        }
    }
    ensure(about_client == ["arrived", "left"], || {
        format!("expected arrived and left about {me}, got {about_client:?} in\n{text}")
    })
}

#[test]
fn text_logs_stay_the_default_and_carry_the_clients_address() -> io::Result<()> {
    let log = LogFile::new("text");
    let (me, text) = one_visit(&[], &log)?;
    let span = format!("conn{{peer={me}}}");
    for message in ["arrived", "left"] {
        ensure(
            text.lines().any(|line| {
                line.contains(&span) && line.contains(&format!("chat_server::session: {message}"))
            }),
            || format!("no {message:?} line in {span}:\n{text}"),
        )?;
    }
    ensure(!text.trim_start().starts_with('{'), || {
        format!("the default is not text:\n{text}")
    })
}
