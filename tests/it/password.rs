//! The room password (`--password-file`): the right first line enters the
//! room, a wrong one gets `error: wrong password` and a close without
//! anyone hearing of it, and guesses from one address are slowed down (on
//! paused time, asserting the virtual delays). Every model.

use crate::common;

use std::io;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, Password};
use common::ensure;
use common::in_process::InProcess;
use tokio::time::Instant;

for_each_model!(the_password_opens_the_room);
for_each_model_paused!(wrong_guesses_are_slowed_down);

fn with_password(model: Model) -> Config {
    Config::with_model(model).with(|c| c.password = Some(Password::new("open sesame")))
}

/// Connects and sends `password` as the first line, then expects the
/// greeting.
async fn enter(addr: std::net::SocketAddr, password: &str) -> io::Result<TestClient> {
    let mut client = TestClient::connect_raw(addr).await?;
    client.send(password).await?;
    let greeting = client.line().await?;
    ensure(greeting == chat_wire::greeting(&client.who), || {
        format!("expected the greeting, got {greeting:?}")
    })?;
    Ok(client)
}

async fn the_password_opens_the_room(model: Model) -> io::Result<()> {
    let server = TestServer::start(with_password(model))?;
    let mut inside = enter(server.addr(), "open sesame").await?;

    // A wrong password: told so, closed, and nobody hears of it.
    let mut guesser = TestClient::connect_raw(server.addr()).await?;
    guesser.send("open sesame!").await?;
    guesser.expect(chat_wire::WRONG_PASSWORD).await?;
    let after = guesser.lines_until_closed().await?;
    ensure(after.is_empty(), || format!("{model}: then got {after:?}"))?;

    // Nobody heard of the guesser: the next line inside is its own echo.
    inside.send("anyone?").await?;
    inside
        .expect(&chat_wire::chat(&inside.who, "anyone?"))
        .await?;

    // A line ending in \r\n (a Windows client) still matches; what follows
    // the password in the same write is chat.
    let mut windows = TestClient::connect_raw(server.addr()).await?;
    windows.send_raw(b"open sesame\r\nhello\r\n").await?;
    windows.expect(&chat_wire::greeting(&windows.who)).await?;
    inside.expect(&chat_wire::arrived(&windows.who)).await?;
    let hello = chat_wire::chat(&windows.who, "hello");
    inside.expect(&hello).await?;
    windows.expect(&hello).await
}

/// Each wrong guess from one address doubles the wait for the next
/// verdict: none, 250 ms, 500 ms; the right password after that waits too
/// (1 s), then resets the count.
async fn wrong_guesses_are_slowed_down(model: Model) -> io::Result<()> {
    let server = InProcess::start(with_password(model)).await?;
    let addr = server.addr();
    for expected in [0, 250, 500] {
        let mut guesser = TestClient::connect_raw(addr).await?;
        let sent = Instant::now();
        guesser.send("guess").await?;
        guesser.expect(chat_wire::WRONG_PASSWORD).await?;
        let waited = sent.elapsed();
        ensure(waited == Duration::from_millis(expected), || {
            format!("{model}: verdict after {waited:?}, expected {expected} ms")
        })?;
    }
    let sent = Instant::now();
    let mut right = enter(addr, "open sesame").await?;
    ensure(sent.elapsed() == Duration::from_secs(1), || {
        format!("{model}: the right password waited {:?}", sent.elapsed())
    })?;
    right.finish().await?;
    let sent = Instant::now();
    enter(addr, "open sesame").await?;
    ensure(sent.elapsed().is_zero(), || {
        format!("{model}: the count was not reset: {:?}", sent.elapsed())
    })?;
    server.stop().await
}

/// The binary reads the first line of `--password-file`, and warns at start
/// when the password would cross a network in clear text (no TLS, not on
/// loopback). Nothing connects: listening on every interface is enough.
#[test]
fn a_password_without_tls_off_loopback_is_warned_about() -> io::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = std::env::temp_dir().join(format!("chat-password-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("room.pass");
    std::fs::write(&file, "open sesame\nthis line is ignored\n")?;
    let log = dir.join("server.log");
    let mut child = Command::new(chat_testkit::process::binary("chat-server")?)
        .args(["--addr", "0.0.0.0:0", "--password-file"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    // The banner comes after the warning is logged.
    let mut banner = String::new();
    if let Some(stdout) = child.stdout.take() {
        BufReader::new(stdout).read_line(&mut banner)?;
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log)?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure(banner.contains("listening on 0.0.0.0:"), || {
        format!("no banner: {banner:?}")
    })?;
    ensure(text.contains("clear text"), || {
        format!("no warning in:\n{text}")
    })
}
