//! No document names a `--flag` that does not exist, and README.md's flag
//! tables give every flag of the server exactly one row.
//!
//! The flags that exist are read from the binaries' own `--help` (the
//! option lines only): `chat-server`, `chat-load` and each of its
//! subcommands, and `netcat`. Every `--flag` in README.md, ARCHITECTURE.md,
//! `docs/**/*.md` and the doc comments of `src/` must be one of:
//! - a `chat-server` flag (the server is what the documents are about, so
//!   these need no context);
//! - a flag of `chat-load` or `netcat`, or of another program in
//!   [`OTHER_PROGRAMS`], when its context names that program: the context
//!   is the paragraph (text between blank lines; a fenced code block is one
//!   paragraph; doc comments split at blank `///` lines) together with the
//!   heading it sits under.
//!
//! A flag is a `--` preceded by neither a word character nor `-` and
//! followed by a lowercase letter, so `cargo test -- --nocapture` and
//! `a--b` read as expected.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use chat_testkit::ensure;
use chat_testkit::process::binary;

/// Programs other than ours whose flags the documents use, with the words
/// that mark a paragraph as being about them.
const OTHER_PROGRAMS: &[(&[&str], &[&str])] = &[
    (
        &["cargo"],
        &[
            "--release",
            "--test",
            "--bin",
            "--bins",
            "--lib",
            "--bench",
            "--features",
            "--no-default-features",
            "--workspace",
            "--all-targets",
            "--no-deps",
            "--timings",
            "--package",
            "--no-run",
            "--no-fail-fast",
            "--locked",
            "--precise",
            "--offline",
            // the libtest harness, after `--`
            "--nocapture",
            "--ignored",
            "--include-ignored",
            "--test-threads",
            "--exact",
            "--skip",
            // criterion, after `--`
            "--warm-up-time",
            "--measurement-time",
            "--save-baseline",
            "--baseline",
        ],
    ),
    (&["nats-server"], &["--routes", "--cluster"]),
    (
        &["redis-server"],
        &["--port", "--bind", "--save", "--appendonly"],
    ),
    (&["ncat"], &["--ssl", "--ssl-trustfile"]),
    (&["valgrind", "callgrind"], &["--tool"]),
    (&["perf"], &["--call-graph"]),
    // Not a default member, so not built by `cargo test`: its flags by hand.
    (&["ws-compare"], &["--impl", "--addr", "--threads"]),
    (&["heaptrack"], &["--pid"]),
];

/// The flags a program's `--help` defines: the first `--word` of each
/// option line (`  -n, --clients <N>`, `      --json`).
fn defined_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.strip_prefix('-') {
                Some(rest) if !rest.starts_with('-') => rest.split_once(", ")?.1,
                _ => line,
            };
            line.starts_with("--")
                .then(|| flags_in(line).into_iter().next())?
        })
        .collect()
}

/// Every `--flag` in `text`, in order.
fn flags_in(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut flags = Vec::new();
    let mut at = 0;
    while let Some(found) = text[at..].find("--") {
        let start = at + found;
        at = start + 2;
        let before_ok = start == 0 || {
            let before = bytes[start - 1];
            !(before.is_ascii_alphanumeric() || before == b'_' || before == b'-')
        };
        if !before_ok || !bytes.get(at).is_some_and(u8::is_ascii_lowercase) {
            continue;
        }
        let end = text[at..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .map_or(text.len(), |length| at + length);
        flags.push(text[start..end].trim_end_matches('-').to_string());
        at = end;
    }
    flags
}

fn help_of(program: &Path, args: &[&str]) -> io::Result<String> {
    let output = Command::new(program).args(args).arg("--help").output()?;
    ensure(output.status.success(), || {
        format!("{} {} --help failed", program.display(), args.join(" "))
    })?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The subcommands listed under `Commands:` in a clap help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Who may be named where: the server everywhere, the others in context.
struct Owners {
    server: BTreeSet<String>,
    in_context: Vec<(Vec<&'static str>, BTreeSet<String>)>,
}

impl Owners {
    fn read() -> io::Result<Owners> {
        let server = defined_flags(&help_of(&binary("chat-server")?, &[])?);
        let load = binary("chat-load")?;
        let load_help = help_of(&load, &[])?;
        let mut load_flags = defined_flags(&load_help);
        for subcommand in subcommands(&load_help) {
            load_flags.extend(defined_flags(&help_of(&load, &[&subcommand])?));
        }
        let netcat = defined_flags(&help_of(&binary("netcat")?, &[])?);
        let mut in_context = vec![
            (vec!["chat-load", "compare"], load_flags),
            (vec!["netcat"], netcat),
        ];
        for (names, flags) in OTHER_PROGRAMS {
            let flags = flags.iter().map(|flag| flag.to_string()).collect();
            in_context.push((names.to_vec(), flags));
        }
        Ok(Owners { server, in_context })
    }

    fn allows(&self, flag: &str, context: &str) -> bool {
        self.server.contains(flag)
            || self.in_context.iter().any(|(names, flags)| {
                flags.contains(flag) && names.iter().any(|name| context.contains(name))
            })
    }
}

/// A document's paragraphs, each with the heading above it and the line it
/// starts on.
fn paragraphs(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut paragraph = String::new();
    let mut start = 0;
    let mut in_fence = false;
    let flush = |paragraph: &mut String, heading: &str, start: usize, out: &mut Vec<_>| {
        if !paragraph.trim().is_empty() {
            out.push((start, format!("{heading}\n{paragraph}")));
        }
        paragraph.clear();
    };
    for (index, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        if fence && !in_fence {
            flush(&mut paragraph, &heading, start, &mut out);
        }
        if !in_fence && line.starts_with('#') {
            flush(&mut paragraph, &heading, start, &mut out);
            heading = line.to_string();
        }
        if !in_fence && !fence && line.trim().is_empty() {
            flush(&mut paragraph, &heading, start, &mut out);
            continue;
        }
        if paragraph.is_empty() {
            start = index + 1;
        }
        paragraph.push_str(line);
        paragraph.push('\n');
        if fence {
            in_fence = !in_fence;
            if !in_fence {
                flush(&mut paragraph, &heading, start, &mut out);
            }
        }
    }
    flush(&mut paragraph, &heading, start, &mut out);
    out
}

/// The doc comments of a Rust file, as a document: `///` and `//!` lines,
/// with a blank line wherever a run of them ends.
fn doc_comments(source: &str) -> String {
    let mut doc = String::new();
    for line in source.lines() {
        let line = line.trim_start();
        match line
            .strip_prefix("///")
            .or_else(|| line.strip_prefix("//!"))
        {
            Some(text) => doc.push_str(text),
            None if !doc.ends_with("\n\n") => doc.push('\n'),
            None => continue,
        }
        doc.push('\n');
    }
    doc
}

fn files_under(dir: &Path, extension: &str, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files_under(&path, extension, out)?;
        } else if path.extension().is_some_and(|ext| ext == extension) {
            out.push(path);
        }
    }
    Ok(())
}

/// Every document the test reads, with its text (doc comments only, for
/// Rust files).
fn documents() -> io::Result<Vec<(PathBuf, String)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut markdown = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    files_under(&root.join("docs"), "md", &mut markdown)?;
    let mut rust = Vec::new();
    files_under(&root.join("src"), "rs", &mut rust)?;
    let mut documents = Vec::new();
    for path in markdown {
        let text = fs::read_to_string(&path)?;
        documents.push((path, text));
    }
    for path in rust {
        let text = doc_comments(&fs::read_to_string(&path)?);
        documents.push((path, text));
    }
    Ok(documents)
}

#[test]
fn every_flag_the_documents_name_exists() -> io::Result<()> {
    let owners = Owners::read()?;
    ensure(owners.server.contains("--model"), || {
        format!("could not read chat-server's flags: {:?}", owners.server)
    })?;
    let mut unknown = Vec::new();
    let mut seen = 0;
    for (path, text) in documents()? {
        for (line, paragraph) in paragraphs(&text) {
            for flag in flags_in(&paragraph) {
                seen += 1;
                if !owners.allows(&flag, &paragraph) {
                    let shown = path
                        .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                        .unwrap_or(&path);
                    unknown.push(format!(
                        "{} (paragraph at line {line}): {flag}",
                        shown.display()
                    ));
                }
            }
        }
    }
    ensure(seen > 100, || {
        format!("only {seen} flags found: is the scan broken?")
    })?;
    ensure(unknown.is_empty(), || {
        format!(
            "these flags exist in no --help that their paragraph names (chat-server's \
             need no context; chat-load's need `chat-load` or `compare` in the paragraph \
             or its heading, netcat's `netcat`; other programs: OTHER_PROGRAMS in this \
             file). Fix the text, or the flag:\n  {}\n(line numbers of doc comments \
             count doc lines only; run alone, this test reads chat-load's and netcat's \
             --help from target/: `cargo build --bins` first if they may be stale)",
            unknown.join("\n  ")
        )
    })
}

/// The flag each row of README.md's flag tables is about: the first flag of
/// the row's first cell.
fn table_rows(readme: &str) -> Vec<String> {
    readme
        .lines()
        .filter_map(|line| line.strip_prefix('|')?.split('|').next())
        .filter_map(|cell| flags_in(cell).into_iter().next())
        .collect()
}

#[test]
fn the_readme_tours_every_server_flag_once() -> io::Result<()> {
    let owners = Owners::read()?;
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))?;
    let rows = table_rows(&readme);
    let mut problems = Vec::new();
    for flag in &owners.server {
        if ["--help", "--version"].contains(&flag.as_str()) {
            continue;
        }
        match rows.iter().filter(|row| *row == flag).count() {
            1 => {}
            0 => problems.push(format!("{flag} has no row")),
            n => problems.push(format!("{flag} has {n} rows")),
        }
    }
    ensure(problems.is_empty(), || {
        format!(
            "README.md's flag tables should give every chat-server flag exactly one row \
             (its first cell naming the flag): {problems:?}"
        )
    })
}

#[test]
fn the_scanner_reads_flags_as_a_reader_would() -> io::Result<()> {
    let found = flags_in("cargo test -- --nocapture; a--b, `--max-line`, --x- (--flood-lines).");
    ensure(
        found == ["--nocapture", "--max-line", "--x", "--flood-lines"],
        || format!("{found:?}"),
    )?;
    let help = "Options:\n  -n, --clients <N>  how many\n      --json  as JSON (see --other)\n  -h, --help  help\n";
    let defined: Vec<String> = defined_flags(help).into_iter().collect();
    ensure(defined == ["--clients", "--help", "--json"], || {
        format!("{defined:?}")
    })
}
