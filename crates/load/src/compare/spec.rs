//! What `compare` is asked to run: our server's models by name, peers as
//! `NAME[@ADDR]=COMMAND`, and the `--server-arg`s it refuses because it
//! sets those flags itself.

use std::str::FromStr;

use anyhow::bail;

/// One of our server's models, by the name its `--model` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model(&'static str);

impl Model {
    pub fn name(self) -> &'static str {
        self.0
    }
}

impl FromStr for Model {
    type Err = String;

    fn from_str(name: &str) -> Result<Model, String> {
        chat_wire::banner::MODELS
            .into_iter()
            .find(|model| *model == name)
            .map(Model)
            .ok_or_else(|| {
                format!(
                    "unknown model {name:?}; expected one of {}",
                    chat_wire::banner::MODELS.join(", ")
                )
            })
    }
}

/// A server to compare that is not ours: `NAME[@ADDR]=COMMAND`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    /// Where it listens, if it cannot be told.
    pub addr: Option<String>,
    pub command: String,
}

impl FromStr for PeerSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<PeerSpec, String> {
        let usage = "expected NAME=COMMAND (with {port} or {addr} in COMMAND) or NAME@ADDR=COMMAND";
        let (head, command) = spec.split_once('=').ok_or_else(|| usage.to_owned())?;
        let (name, addr) = match head.split_once('@') {
            Some((name, addr)) => (name, Some(addr.to_owned())),
            None => (head, None),
        };
        if name.is_empty() || command.trim().is_empty() || addr.as_deref() == Some("") {
            return Err(usage.to_owned());
        }
        if addr.is_none() && !command.contains("{port}") && !command.contains("{addr}") {
            return Err(format!(
                "peer {name:?}: say where it listens, as {name}@HOST:PORT=COMMAND, \
                 or put {{port}} or {{addr}} in COMMAND"
            ));
        }
        Ok(PeerSpec {
            name: name.to_owned(),
            addr,
            command: command.to_owned(),
        })
    }
}

/// Flags `compare` gives each of our servers itself; passed again through
/// `--server-arg` they would make the server refuse to start.
const OWN_SERVER_FLAGS: [(&str, &str); 3] = [
    ("--addr", "each server gets a fresh port"),
    ("--model", "use --models"),
    ("--threads", "use --server-threads"),
];

/// Limits `compare` lifts on our servers unless a `--server-arg` sets the
/// flag: the scenarios open thousands of connections from 127.0.0.1 and send
/// as fast as the server takes their lines, and what is compared is the
/// models, not the server's defences. (Keep flood control on, for the
/// `flood` scenario, with `--server-arg=--flood-lines=500
/// --server-arg=--flood-bytes=65536`.)
const LIFTED_LIMITS: [(&str, &str); 3] = [
    ("--max-clients-per-ip", "0"),
    ("--flood-lines", "0"),
    ("--flood-bytes", "0"),
];

/// Everything after the binary on our server's command line, in `model`:
/// what `compare` sets itself, the limits it lifts, then `server_args`.
pub fn our_server_args(model: Model, threads: usize, server_args: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--addr",
        "127.0.0.1:0",
        "--model",
        model.name(),
        "--threads",
        &threads.to_string(),
    ]
    .map(String::from)
    .to_vec();
    for (flag, value) in LIFTED_LIMITS {
        let given = server_args
            .iter()
            .any(|arg| arg.split('=').next() == Some(flag));
        if !given {
            args.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    args.extend(server_args.iter().cloned());
    args
}

/// Refuses a `--server-arg` that `compare` already passes, naming the
/// option to use instead.
pub fn check_server_args(args: &[String]) -> anyhow::Result<()> {
    for arg in args {
        let flag = arg.split('=').next().unwrap_or(arg);
        if let Some((_, instead)) = OWN_SERVER_FLAGS.iter().find(|(own, _)| *own == flag) {
            bail!("--server-arg={arg}: compare sets {flag} itself ({instead})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_server_args_compare_sets_itself() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert!(check_server_args(&args(&["--queue", "mpsc", "--slow-client=drop"])).is_ok());
        for own in [
            &["--threads", "2"][..],
            &["--model=locked"],
            &["--addr", "x"],
        ] {
            let err = check_server_args(&args(own)).unwrap_err().to_string();
            assert!(err.contains("compare sets"), "{own:?}: {err}");
        }
        let err = check_server_args(&args(&["--threads=1"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--server-threads"), "{err}");
    }

    #[test]
    fn lifts_limits_unless_told_otherwise() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let lifted = our_server_args("sharded".parse().unwrap(), 1, &[]).join(" ");
        assert_eq!(
            lifted,
            "--addr 127.0.0.1:0 --model sharded --threads 1 \
             --max-clients-per-ip 0 --flood-lines 0 --flood-bytes 0"
        );
        let kept = our_server_args(
            "locked".parse().unwrap(),
            2,
            &args(&["--flood-lines=500", "--flood-bytes", "65536"]),
        )
        .join(" ");
        assert_eq!(
            kept,
            "--addr 127.0.0.1:0 --model locked --threads 2 \
             --max-clients-per-ip 0 --flood-lines=500 --flood-bytes 65536"
        );
    }

    #[test]
    fn parses_peer_specs() {
        let seed: PeerSpec = "seed@127.0.0.1:8000=/tmp/gopl-chat-server".parse().unwrap();
        assert_eq!(seed.name, "seed");
        assert_eq!(seed.addr.as_deref(), Some("127.0.0.1:8000"));
        assert_eq!(seed.command, "/tmp/gopl-chat-server");
        let ported: PeerSpec = "x=./server --listen {addr} --flag=1".parse().unwrap();
        assert_eq!(ported.addr, None);
        assert_eq!(ported.command, "./server --listen {addr} --flag=1");
        assert!(
            "x=./server".parse::<PeerSpec>().is_err(),
            "no way to find its port"
        );
        assert!("=cmd {port}".parse::<PeerSpec>().is_err());
        assert!("x@=cmd".parse::<PeerSpec>().is_err());
        assert!("nothing".parse::<PeerSpec>().is_err());
    }
}
