//! The seed's protocol, line for line, in every model: the seed's two-terminal
//! netcat session, and the framing cases the seed leaves to `bufio.Scanner`.

use crate::common;

use std::io;

use chat_server::harness::TestClient;
use chat_server::Model;
use common::{ensure, server};

for_each_model!(
    seed_transcript,
    crlf_is_dropped,
    line_split_across_many_writes,
    many_lines_in_one_write,
    unterminated_last_line_is_delivered,
    multibyte_utf8_passes_through,
    invalid_utf8_is_replaced_not_fatal,
    control_characters_are_shown_not_sent,
    empty_line_is_a_message,
);

/// The session from the seed text: two netcats chat, the first leaves, a
/// third arrives, the second welcomes it and leaves.
async fn seed_transcript(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut first = TestClient::connect(server.addr()).await?;
    let mut second = TestClient::connect(server.addr()).await?;
    let (a, b) = (first.who.clone(), second.who.clone());
    first.expect(&format!("{b} has arrived")).await?;

    first.send("Hi!").await?;
    first.expect(&format!("{a}: Hi!")).await?;
    second.expect(&format!("{a}: Hi!")).await?;

    second.send("Hi yourself.").await?;
    first.expect(&format!("{b}: Hi yourself.")).await?;
    second.expect(&format!("{b}: Hi yourself.")).await?;

    first.finish().await?;
    let rest = first.lines_until_closed().await?;
    ensure(rest.is_empty(), || format!("leaver got {rest:?}"))?;
    second.expect(&format!("{a} has left")).await?;

    let mut third = TestClient::connect(server.addr()).await?;
    let c = third.who.clone();
    second.expect(&format!("{c} has arrived")).await?;

    second.send("Welcome.").await?;
    second.expect(&format!("{b}: Welcome.")).await?;
    third.expect(&format!("{b}: Welcome.")).await?;

    second.finish().await?;
    let rest = second.lines_until_closed().await?;
    ensure(rest.is_empty(), || format!("leaver got {rest:?}"))?;
    third.expect(&format!("{b} has left")).await?;
    Ok(())
}

async fn crlf_is_dropped(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut telnet = TestClient::connect(server.addr()).await?;
    let mut other = TestClient::connect(server.addr()).await?;
    telnet.line().await?; // other's arrival
    telnet.send_raw(b"from telnet\r\n").await?;
    let expected = format!("{}: from telnet", telnet.who);
    telnet.expect(&expected).await?;
    other.expect(&expected).await
}

async fn line_split_across_many_writes(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut slow_typist = TestClient::connect(server.addr()).await?;
    let mut other = TestClient::connect(server.addr()).await?;
    slow_typist.line().await?;
    for byte in b"one byte at a time\n" {
        slow_typist.send_raw(&[*byte]).await?;
    }
    other
        .expect(&format!("{}: one byte at a time", slow_typist.who))
        .await
}

async fn many_lines_in_one_write(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut sender = TestClient::connect(server.addr()).await?;
    let mut other = TestClient::connect(server.addr()).await?;
    sender.line().await?;
    let burst: String = (0..500).map(|i| format!("line {i}\n")).collect();
    sender.send_raw(burst.as_bytes()).await?;
    for i in 0..500 {
        let expected = format!("{}: line {i}", sender.who);
        sender.expect(&expected).await?;
        other.expect(&expected).await?;
    }
    Ok(())
}

async fn unterminated_last_line_is_delivered(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut leaver = TestClient::connect(server.addr()).await?;
    let mut other = TestClient::connect(server.addr()).await?;
    leaver.line().await?;
    leaver.send_raw(b"no newline at the end").await?;
    leaver.finish().await?;
    let who = leaver.who.clone();
    let rest = leaver.lines_until_closed().await?;
    ensure(rest == [format!("{who}: no newline at the end")], || {
        format!("leaver got {rest:?}")
    })?;
    other
        .expect(&format!("{who}: no newline at the end"))
        .await?;
    other.expect(&format!("{who} has left")).await
}

async fn multibyte_utf8_passes_through(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut sender = TestClient::connect(server.addr()).await?;
    let mut other = TestClient::connect(server.addr()).await?;
    sender.line().await?;
    let text = "héllo 你好，世界 🦀 ∑x²";
    sender.send(text).await?;
    other.expect(&format!("{}: {text}", sender.who)).await
}

async fn invalid_utf8_is_replaced_not_fatal(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut sender = TestClient::connect(server.addr()).await?;
    let mut other = TestClient::connect(server.addr()).await?;
    sender.line().await?;
    sender
        .send_raw(b"bad \xff\xfe bytes, cut \xe4\xb8\n")
        .await?;
    other
        .expect(&format!(
            "{}: bad \u{FFFD}\u{FFFD} bytes, cut \u{FFFD}",
            sender.who
        ))
        .await?;
    // Still connected.
    sender.send("still here").await?;
    other.expect(&format!("{}: still here", sender.who)).await
}

async fn control_characters_are_shown_not_sent(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut attacker = TestClient::connect(server.addr()).await?;
    let mut victim = TestClient::connect(server.addr()).await?;
    attacker.line().await?;
    let who = attacker.who.clone();
    let cases: [(&[u8], String); 6] = [
        // Clear screen, cursor home.
        (b"\x1b[2J\x1b[H", "^[[2J^[[H".into()),
        // Retitle the terminal (OSC ... BEL).
        (b"\x1b]0;pwned\x07", "^[]0;pwned^G".into()),
        // Overwrite our own prefix with someone else's.
        (b"x\r10.0.0.1:1: fake", "x^M10.0.0.1:1: fake".into()),
        (b"oops\x08\x08\x08\x08", "oops^H^H^H^H".into()),
        // C1 CSI, which some terminals honour like ESC [.
        ("\u{9b}2J".as_bytes(), "\u{FFFD}2J".into()),
        (b"tab\tstays", "tab\tstays".into()),
    ];
    for (sent, shown) in &cases {
        let mut line = sent.to_vec();
        line.push(b'\n');
        attacker.send_raw(&line).await?;
        victim.expect(&format!("{who}: {shown}")).await?;
    }
    Ok(())
}

async fn empty_line_is_a_message(model: Model) -> io::Result<()> {
    let server = server(model)?;
    let mut sender = TestClient::connect(server.addr()).await?;
    let mut other = TestClient::connect(server.addr()).await?;
    sender.line().await?;
    sender.send("").await?;
    other.expect(&format!("{}: ", sender.who)).await
}
