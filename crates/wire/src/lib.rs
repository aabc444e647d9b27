//! The texts of the gopl.io chat protocol, in one place.
//!
//! The server writes these texts, and the load tool and the tests read
//! them; each lives here once so that the two sides cannot drift apart.
//! This crate has no dependencies and knows nothing about sockets: the
//! server's own `protocol` module does the framing and sanitising, and
//! builds its shared messages from the pieces below.
//!
//! | event | the newcomer / sender sees | everyone else sees |
//! |---|---|---|
//! | connect | `You are IP:PORT` | `IP:PORT has arrived` |
//! | a line `text` | `IP:PORT: text` | `IP:PORT: text` |
//! | input ends | (connection closes) | `IP:PORT has left` |
//!
//! With `--names` the server first sends [`NAME_PROMPT`] and answers a bad
//! or taken name with [`BAD_NAME`] or [`NAME_TAKEN`]; with
//! `--announce-present` the greeting is followed by a [`present`] line;
//! with `--history` by the room's recent lines in a block that opens with a
//! [`history_header`] and closes with [`HISTORY_END`].
//!
//! Every text here is a line without its `\n`.

/// Starts the first line a client receives: `You are IP:PORT`.
pub const GREETING_PREFIX: &str = "You are ";

/// Ends the line everyone already present receives when a client connects.
pub const ARRIVED_SUFFIX: &str = " has arrived";

/// Ends the line everyone who remains receives when a client leaves.
pub const LEFT_SUFFIX: &str = " has left";

/// Separates the sender from the text in a chat line: `IP:PORT: text`.
pub const CHAT_SEPARATOR: &str = ": ";

/// The last line of a client disconnected for not keeping up.
pub const TOO_SLOW: &str = "error: disconnected: too slow";

/// The only line a connection over `--max-clients` receives.
pub const SERVER_FULL: &str = "error: server full";

/// The only line a connection over `--max-clients-per-ip` receives.
pub const TOO_MANY_FROM_ADDRESS: &str = "error: too many connections from your address";

/// The last line of a client that stayed over its input budget
/// (`--flood-lines`, `--flood-bytes`) for `--flood-grace`.
pub const FLOODING: &str = "error: flooding";

/// The last line of the client holding the most memory when all clients
/// together held more than `--max-client-memory`.
pub const TOO_MUCH_MEMORY: &str = "error: disconnected: holding too much server memory";

/// The only line a client that sent a wrong password (`--password-file`)
/// receives before the server closes the connection.
pub const WRONG_PASSWORD: &str = "error: wrong password";

/// The last line of every client when the server stops.
pub const SHUTTING_DOWN: &str = "server shutting down";

/// `You are WHO`.
pub fn greeting(who: &str) -> String {
    [GREETING_PREFIX, who].concat()
}

/// `WHO has arrived`.
pub fn arrived(who: &str) -> String {
    [who, ARRIVED_SUFFIX].concat()
}

/// `WHO has left`.
pub fn left(who: &str) -> String {
    [who, LEFT_SUFFIX].concat()
}

/// `WHO: text`.
pub fn chat(who: &str, text: &str) -> String {
    [who, CHAT_SEPARATOR, text].concat()
}

/// The `WHO` of a greeting line, `None` if the line is not one.
pub fn greeted(line: &str) -> Option<&str> {
    line.strip_prefix(GREETING_PREFIX)
}

/// The `WHO` of an arrival line, as bytes (the load tool's receive path
/// works on bytes).
pub fn arrival_of(line: &[u8]) -> Option<&[u8]> {
    line.strip_suffix(ARRIVED_SUFFIX.as_bytes())
}

/// The `WHO` of a departure line, as bytes.
pub fn departure_of(line: &[u8]) -> Option<&[u8]> {
    line.strip_suffix(LEFT_SUFFIX.as_bytes())
}

/// `--names`: the first line the server sends; the client's first line is
/// then taken as its name.
pub const NAME_PROMPT: &str = "Enter your name:";

/// `--names`: the longest name, in bytes.
pub const MAX_NAME: usize = 32;

/// `--names`: the answer to a line that is not a well-formed name; the
/// client may try again.
pub const BAD_NAME: &str =
    "error: a name is 1-32 printable ASCII characters, no spaces, ':' or ','; try another";

/// `--names`: the answer to a name someone in the room already has.
pub const NAME_TAKEN: &str = "error: that name is taken; try another";

/// `--names` with `--cluster`: the answer to any name while the room's
/// broker, which keeps every node's names, cannot be asked; the client
/// may try again.
pub const NAMES_UNAVAILABLE: &str =
    "error: names are unavailable while the room's broker is unreachable; try again";

/// `--announce-present`: the line after the greeting,
/// `present (N): A, B, C`, or `present (0): nobody` for an empty room.
pub fn present<S: AsRef<str>>(names: &[S]) -> String {
    let mut line = format!("present ({}): ", names.len());
    if names.is_empty() {
        line.push_str("nobody");
    }
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            line.push_str(", ");
        }
        line.push_str(name.as_ref());
    }
    line
}

/// The names a `present` line lists, `None` if the line is not one or its
/// count does not match. Names and addresses hold no spaces and names no
/// commas, so `, ` splits the list unambiguously.
pub fn present_of(line: &str) -> Option<Vec<&str>> {
    let (count, names) = line.strip_prefix("present (")?.split_once("): ")?;
    let count: usize = count.parse().ok()?;
    let names: Vec<&str> = match count {
        0 if names == "nobody" => Vec::new(),
        0 => return None,
        _ => names.split(", ").collect(),
    };
    (names.len() == count).then_some(names)
}

/// `--history`: the line that opens the block of the room's recent lines,
/// right after the greeting (and the `present` line): `--- history (N) ---`,
/// where N is the number of lines that follow before [`HISTORY_END`].
/// No live line can look like it: a chat line is `WHO: text` and WHO holds
/// no space, and arrivals and departures end in `has arrived`/`has left`.
pub fn history_header(lines: usize) -> String {
    format!("{HISTORY_PREFIX}{lines}{HISTORY_SUFFIX}")
}

const HISTORY_PREFIX: &str = "--- history (";
const HISTORY_SUFFIX: &str = ") ---";

/// `--history`: the line that closes the block; live lines follow it.
pub const HISTORY_END: &str = "--- end of history ---";

/// The count of a [`history_header`] line, `None` if the line is not one.
pub fn history_of(line: &str) -> Option<usize> {
    line.strip_prefix(HISTORY_PREFIX)?
        .strip_suffix(HISTORY_SUFFIX)?
        .parse()
        .ok()
}

/// The line `chat-server` prints on stdout, alone, once it listens:
/// `chat-server listening on ADDR (model MODEL)`. Scripts, the load tool
/// and the tests learn the port from it.
pub mod banner {
    const PREFIX: &str = "chat-server listening on ";

    /// The models `chat-server --model` takes, by the names its banner
    /// gives, in the order the comparisons list them.
    pub const MODELS: [&str; 4] = ["sharded", "broadcaster", "locked", "broadcast"];

    /// The banner for a server listening on `addr` with `model`.
    pub fn format(addr: &str, model: &str) -> String {
        format!("{PREFIX}{addr} (model {model})")
    }

    /// The address and model a banner names, `None` if `line` is not one.
    pub fn parse(line: &str) -> Option<(&str, &str)> {
        let rest = line.trim_end().strip_prefix(PREFIX)?;
        let (addr, model) = rest.split_once(" (model ")?;
        Some((addr, model.strip_suffix(')')?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_round_trip() {
        assert_eq!(greeting("127.0.0.1:5"), "You are 127.0.0.1:5");
        assert_eq!(greeted(&greeting("a")), Some("a"));
        assert_eq!(arrival_of(arrived("b").as_bytes()), Some(&b"b"[..]));
        assert_eq!(departure_of(left("c").as_bytes()), Some(&b"c"[..]));
        assert_eq!(departure_of(b"c has arrived"), None);
        assert_eq!(chat("d", "hi"), "d: hi");
        let empty: [&str; 0] = [];
        assert_eq!(present(&empty), "present (0): nobody");
        assert_eq!(present_of(&present(&empty)), Some(vec![]));
        assert_eq!(
            present(&["ann", "1.2.3.4:5"]),
            "present (2): ann, 1.2.3.4:5"
        );
        assert_eq!(
            present_of("present (2): ann, 1.2.3.4:5"),
            Some(vec!["ann", "1.2.3.4:5"])
        );
        assert_eq!(present_of("present (3): ann, bob"), None);
        assert_eq!(present_of("present (0): ann"), None);
        assert_eq!(history_header(3), "--- history (3) ---");
        assert_eq!(history_of(&history_header(3)), Some(3));
        assert_eq!(history_of(HISTORY_END), None);
        assert_eq!(history_of("--- history (x) ---"), None);
    }

    #[test]
    fn banner_round_trips() {
        let line = banner::format("127.0.0.1:4242", "sharded");
        assert_eq!(
            line,
            "chat-server listening on 127.0.0.1:4242 (model sharded)"
        );
        assert_eq!(banner::parse(&line), Some(("127.0.0.1:4242", "sharded")));
        assert_eq!(
            banner::parse(&format!("{line}\n")),
            Some(("127.0.0.1:4242", "sharded"))
        );
        assert_eq!(banner::parse("listening on 127.0.0.1:1"), None);
        assert_eq!(banner::parse("chat-server listening on 127.0.0.1:1"), None);
    }
}
