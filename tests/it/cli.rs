//! The `chat-server` command line: help that explains every model, and
//! clear refusals for settings that cannot work.

use crate::common;

use std::io;
use std::process::Command;

use common::ensure;

fn chat_server(args: &[&str]) -> io::Result<(bool, String, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_chat-server"))
        .args(args)
        .output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn help_explains_every_model() -> io::Result<()> {
    let (ok, stdout, _) = chat_server(&["--help"])?;
    ensure(ok, || "--help failed".into())?;
    for model in ["sharded", "broadcaster", "locked", "broadcast"] {
        ensure(stdout.contains(&format!("- {model}:")), || {
            format!("--help does not explain {model}:\n{stdout}")
        })?;
    }
    Ok(())
}

#[test]
fn broadcast_with_block_is_refused_at_start() -> io::Result<()> {
    let (ok, _, stderr) = chat_server(&[
        "--addr",
        "127.0.0.1:0",
        "--model",
        "broadcast",
        "--slow-client",
        "block",
    ])?;
    ensure(!ok, || "the server started".into())?;
    ensure(
        stderr.contains("model `broadcast` cannot support --slow-client block"),
        || format!("unclear refusal: {stderr}"),
    )
}

#[test]
fn a_queue_smaller_than_a_line_is_refused() -> io::Result<()> {
    let (ok, _, stderr) = chat_server(&["--addr", "127.0.0.1:0", "--max-pending", "10"])?;
    ensure(!ok, || "the server started".into())?;
    ensure(stderr.contains("--max-pending must be at least"), || {
        format!("unclear refusal: {stderr}")
    })
}

#[test]
fn zero_worker_threads_are_refused() -> io::Result<()> {
    let (ok, _, stderr) = chat_server(&["--addr", "127.0.0.1:0", "--threads", "0"])?;
    ensure(!ok, || "the server started".into())?;
    ensure(stderr.contains("--threads"), || {
        format!("unclear refusal: {stderr}")
    })
}

#[test]
fn a_queue_choice_with_the_ring_model_is_refused() -> io::Result<()> {
    let (ok, _, stderr) = chat_server(&[
        "--addr",
        "127.0.0.1:0",
        "--model",
        "broadcast",
        "--queue",
        "mpsc",
    ])?;
    ensure(!ok, || "the server started".into())?;
    ensure(
        stderr.contains("--queue mpsc has no effect with --model broadcast"),
        || format!("unclear refusal: {stderr}"),
    )
}

#[test]
fn an_unknown_model_lists_the_choices() -> io::Result<()> {
    let (ok, _, stderr) = chat_server(&["--addr", "127.0.0.1:0", "--model", "actors"])?;
    ensure(!ok, || "the server started".into())?;
    ensure(
        chat_wire::banner::MODELS
            .iter()
            .all(|model| stderr.contains(model)),
        || format!("the refusal does not list the models: {stderr}"),
    )
}

#[test]
fn limits_that_cannot_work_are_refused() -> io::Result<()> {
    for (args, says) in [
        (
            &["--max-client-memory", "100"][..],
            "--max-client-memory must be at least",
        ),
        (&["--flood-burst", "0"], "--flood-burst must be at least"),
    ] {
        let (ok, _, stderr) = chat_server(&[&["--addr", "127.0.0.1:0"][..], args].concat())?;
        ensure(!ok, || format!("{args:?}: the server started"))?;
        ensure(stderr.contains(says), || {
            format!("{args:?}: unclear refusal: {stderr}")
        })?;
    }
    Ok(())
}
