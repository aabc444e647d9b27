//! `netcat --tls` against the real `chat-server` with a certificate made at
//! run time: verified with `--ca`, refused without it, accepted with
//! `--insecure` only because it was asked for.

use std::io;
use std::process::Command;

use chat_testkit::ensure;
use chat_testkit::process::{LineChild, ServerProcess};
use chat_testkit::tls::TestPki;

fn netcat(args: &[&str]) -> io::Result<LineChild> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_netcat"));
    command.args(args);
    LineChild::spawn("netcat", command)
}

#[test]
fn chat_over_tls_verified_with_ca() -> io::Result<()> {
    let pki = TestPki::generate("netcat-ca")?;
    let args = pki.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&args)?;
    let ca = pki.ca.display().to_string();
    let mut first = netcat(&["--tls", "--ca", &ca, &server.addr])?;
    let a = first.line()?;
    let a = a
        .strip_prefix("You are ")
        .ok_or_else(|| io::Error::other(format!("no greeting: {a:?}")))?
        .to_string();
    // nc's argument form, over TLS too.
    let mut second = netcat(&["--tls", "--ca", &ca, "127.0.0.1", server.port()])?;
    let b = second.line()?;
    let b = b.strip_prefix("You are ").unwrap_or_default().to_string();
    first.expect(&format!("{b} has arrived"))?;
    first.type_line("Hi over TLS")?;
    first.expect(&format!("{a}: Hi over TLS"))?;
    second.expect(&format!("{a}: Hi over TLS"))?;
    // Ctrl-D: close_notify, then the echo of the last line still arrives.
    first.type_raw(b"bye")?;
    first.close_stdin();
    ensure(first.rest()? == [format!("{a}: bye")], || {
        "lost the last echo".into()
    })?;
    ensure(first.wait()?.success(), || "netcat failed".into())?;
    second.expect(&format!("{a}: bye"))?;
    second.expect(&format!("{a} has left"))
}

#[test]
fn an_unknown_certificate_is_refused_unless_insecure_is_asked_for() -> io::Result<()> {
    let pki = TestPki::generate("netcat-insecure")?;
    let args = pki.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&args)?;

    // The test CA is in no system store.
    let output = Command::new(env!("CARGO_BIN_EXE_netcat"))
        .args(["--tls", &server.addr])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure(!output.status.success(), || {
        "netcat trusted an unknown CA".into()
    })?;
    ensure(
        stderr.contains("TLS handshake with 127.0.0.1:") && stderr.contains("certificate"),
        || format!("unclear error: {stderr:?}"),
    )?;

    let mut insecure = netcat(&["--insecure", &server.addr])?;
    let greeting = insecure.line()?;
    ensure(greeting.starts_with("You are "), || {
        format!("--insecure got {greeting:?}")
    })?;
    insecure.close_stdin();
    ensure(insecure.rest()?.is_empty(), || "more output".into())?;
    ensure(insecure.wait()?.success(), || "netcat failed".into())
}
