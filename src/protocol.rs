//! The wire protocol of the gopl.io chat server, byte for byte.
//!
//! The protocol is plain text, one message per `\n`-terminated line:
//!
//! | event | the newcomer / sender sees | everyone else sees |
//! |---|---|---|
//! | connect | `You are IP:PORT` | `IP:PORT has arrived` |
//! | a line `text` | `IP:PORT: text` | `IP:PORT: text` |
//! | input ends | (connection closes) | `IP:PORT has left` |
//!
//! Two opt-in additions (gopl exercises 8.12 and 8.14) leave that table as
//! it is when they are off:
//!
//! - `--names`: the server first sends [`NAME_PROMPT`] and reads the
//!   client's first line as its name ([`check_name`]); a bad or taken name
//!   gets one `error: ...` line and the client tries again. The name then
//!   stands wherever the table says `IP:PORT`.
//! - `--announce-present`: right after `You are WHO` the newcomer gets one
//!   line `present (N): A, B, C` naming the N clients already present, in no
//!   particular order, separated by `, ` (names and addresses hold no
//!   spaces and names no commas, so the list splits unambiguously); an empty room is
//!   `present (0): nobody`. The count is authoritative.
//!
//! This module owns everything about that text and nothing about sockets:
//! splitting an input stream into lines under a length limit ([`LineBuffer`]),
//! making a user's text safe to show on other people's terminals
//! ([`sanitize_into`]), and formatting outbound text once into a [`Message`]
//! that every recipient shares. A message may hold several lines: all the
//! lines one read completed for one sender ([`ChatBatch`]), so that what it
//! costs to reach each recipient is paid once per read rather than once per
//! line.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use triomphe::ThinArc;

/// Formatted outbound text, one or more whole lines, shared by every recipient.
///
/// A message is formatted once and cloned into each recipient's queue; a
/// clone is a reference-count increment, never a copy of the text. The text
/// is always valid UTF-8, ends with `\n`, and holds no control characters
/// other than tab and the line ends.
///
/// The handle is a thin pointer (8 bytes; the length lives in the shared
/// allocation). A queue slot holds one handle, and tokio's channels allocate
/// slots 32 at a time and keep a spare block after a burst, so halving the
/// handle saves about 500 bytes of every idle connection.
///
/// The shared allocation also holds the message's place in the room's
/// history (`--history`): 0 until [`History`](crate::room::history::History)
/// appends it, then its room sequence number, set once before the message
/// reaches anyone. The `sharded` model needs it to drop a newcomer's live
/// copies of lines its history block already showed.
#[derive(Clone)]
pub(crate) struct Message(ThinArc<AtomicU64, u8>);

impl PartialEq for Message {
    fn eq(&self, other: &Message) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Message {}

impl Message {
    /// `You are IP:PORT`: the first line a client receives.
    pub(crate) fn greeting(who: &str) -> Message {
        Message::from_parts(&[chat_wire::GREETING_PREFIX, who, "\n"])
    }

    /// `IP:PORT has arrived`: announced to everyone already present.
    pub(crate) fn arrived(who: &str) -> Message {
        Message::from_parts(&[who, chat_wire::ARRIVED_SUFFIX, "\n"])
    }

    /// `IP:PORT has left`: announced to everyone who remains.
    pub(crate) fn left(who: &str) -> Message {
        Message::from_parts(&[who, chat_wire::LEFT_SUFFIX, "\n"])
    }

    /// `You are WHO`, followed with `--announce-present` by the
    /// `present (N): ...` line: what the writer sends before anything else.
    pub(crate) fn hello(who: &str, present: Option<&[std::sync::Arc<str>]>) -> Message {
        match present {
            None => Message::greeting(who),
            Some(present) => Message::from_parts(&[
                chat_wire::GREETING_PREFIX,
                who,
                "\n",
                &chat_wire::present(present),
                "\n",
            ]),
        }
    }

    /// A server notice to one client, such as `error: line too long (max 65536 bytes)`.
    pub(crate) fn notice(text: &str) -> Message {
        Message::from_parts(&[text, "\n"])
    }

    fn from_parts(parts: &[&str]) -> Message {
        Message::from_text(&parts.concat())
    }

    fn from_text(text: &str) -> Message {
        Message(ThinArc::from_header_and_slice(
            AtomicU64::new(0),
            text.as_bytes(),
        ))
    }

    /// The message's room sequence number in the history, 0 if it was never
    /// appended to one.
    #[inline]
    pub(crate) fn seq(&self) -> u64 {
        self.0.header.header.load(Ordering::Relaxed)
    }

    /// Set by the history when it appends the message, before the message
    /// is handed to anyone (the hand-off to other threads orders it).
    pub(crate) fn set_seq(&self, seq: u64) {
        self.0.header.header.store(seq, Ordering::Relaxed);
    }

    /// The message without its first `skip` lines, with the same sequence
    /// number: what the history keeps of its oldest message when a bound
    /// cuts into it. A copy of the rest (the one place history copies text).
    pub(crate) fn without_first_lines(&self, skip: usize) -> Message {
        let bytes = self.as_bytes();
        let start = match skip.checked_sub(1) {
            None => 0,
            Some(last) => memchr::memchr_iter(b'\n', bytes)
                .nth(last)
                .map_or(bytes.len(), |newline| newline + 1),
        };
        Message(ThinArc::from_header_and_slice(
            AtomicU64::new(self.seq()),
            &bytes[start..],
        ))
    }

    /// The bytes to write to the socket, newline included.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0.slice
    }

    /// The text, newline included.
    pub(crate) fn as_str(&self) -> &str {
        // Every constructor takes a `&str`, so this cannot fail; an empty
        // string would be the answer if it ever did.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// Length in bytes, newlines included.
    #[allow(clippy::len_without_is_empty)] // a message always holds at least its newline
    pub(crate) fn len(&self) -> usize {
        self.0.slice.len()
    }

    /// How many lines the message holds.
    pub(crate) fn lines(&self) -> usize {
        memchr::memchr_iter(b'\n', self.as_bytes()).count()
    }
}

/// Formats one sender's chat lines, `IP:PORT: text` each, into one [`Message`].
///
/// The session pushes every line a read completed, then takes the message:
/// one allocation for the lot, however many lines and recipients. The
/// buffer is reused across reads and released when it grew large.
#[derive(Debug, Default)]
pub(crate) struct ChatBatch {
    text: String,
}

impl ChatBatch {
    /// Appends `who: line`, with `line` sanitised (see [`sanitize_into`]).
    pub(crate) fn push(&mut self, who: &str, line: &[u8]) {
        self.text.reserve(who.len() + 2 + line.len() + 1);
        self.text.push_str(who);
        self.text.push_str(chat_wire::CHAT_SEPARATOR);
        sanitize_into(line, &mut self.text);
        self.text.push('\n');
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Bytes pushed since the last take.
    pub(crate) fn len(&self) -> usize {
        self.text.len()
    }

    /// The lines pushed since the last take, as one message.
    pub(crate) fn take(&mut self) -> Option<Message> {
        if self.text.is_empty() {
            return None;
        }
        let message = Message::from_text(&self.text);
        self.text.clear();
        if self.text.capacity() > 16 * 1024 {
            self.text = String::new();
        }
        Some(message)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Appends `line` to `out` as text that is safe to print on a terminal.
///
/// - Invalid UTF-8 becomes U+FFFD (as `String::from_utf8_lossy` does), so a
///   client never gets disconnected for sending bytes that are not text.
/// - Control characters other than tab are shown, never passed through: C0
///   controls and DEL in caret notation (`ESC` becomes `^[`, `BEL` `^G`, `CR`
///   `^M`, `DEL` `^?`), C1 controls (U+0080..=U+009F, which some terminals
///   treat as escape sequences) as U+FFFD. Otherwise one user could clear
///   everyone's screen, move their cursor, retitle their terminal, or use a
///   bare `\r` to overwrite its own `IP:PORT:` prefix with someone else's.
pub(crate) fn sanitize_into(line: &[u8], out: &mut String) {
    // Fast path: printable ASCII (and tab) is by far the common case and is
    // already valid UTF-8 with nothing to replace.
    if line
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
    {
        if let Ok(text) = std::str::from_utf8(line) {
            out.push_str(text);
            return;
        }
    }
    for chunk in line.utf8_chunks() {
        for ch in chunk.valid().chars() {
            push_visible(ch, out);
        }
        if !chunk.invalid().is_empty() {
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
}

fn push_visible(ch: char, out: &mut String) {
    match ch {
        '\t' => out.push('\t'),
        '\u{0}'..='\u{1f}' => {
            out.push('^');
            // Caret notation: ^@ for NUL, ^A for SOH ... ^_ for US.
            out.push(char::from(ch as u8 + 0x40));
        }
        '\u{7f}' => out.push_str("^?"),
        '\u{80}'..='\u{9f}' => out.push(char::REPLACEMENT_CHARACTER),
        _ => out.push(ch),
    }
}

pub(crate) use chat_wire::{BAD_NAME, MAX_NAME, NAMES_UNAVAILABLE, NAME_PROMPT, NAME_TAKEN};

/// The name in a client's first line (one trailing `\r` dropped), if it is
/// one: 1 to [`MAX_NAME`] printable ASCII characters other than space, `:`
/// and `,`. ASCII only, so that no name can carry terminal controls,
/// bidirectional overrides or look-alike letters; no `:`, so that no name
/// looks like an `IP:PORT` or turns `NAME has arrived` into a chat line of
/// `NAME:`; no `,`, which separates names in the `present` line.
pub(crate) fn check_name(line: &[u8]) -> Option<&str> {
    let name = strip_cr(line);
    let allowed = |byte: &u8| byte.is_ascii_graphic() && *byte != b':' && *byte != b',';
    if name.is_empty() || name.len() > MAX_NAME || !name.iter().all(allowed) {
        return None;
    }
    std::str::from_utf8(name).ok()
}

/// The line a client sent was longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line too long (max {max} bytes)")]
pub(crate) struct LineTooLong {
    /// The limit in bytes, excluding the newline.
    pub max: usize,
}

/// Splits a byte stream into lines, holding at most one partial line.
///
/// Bytes are appended through [`LineBuffer::read_buf`] and taken out with [`LineBuffer::next_line`]. The buffer is allocated
/// lazily and released whenever it holds no partial line, so an idle
/// connection costs no read buffer at all; it never holds more than
/// `max_line` bytes of one line plus one read's worth of bytes, whatever a
/// client sends.
#[derive(Debug)]
pub(crate) struct LineBuffer {
    buf: Vec<u8>,
    /// Start of the first line not yet returned.
    start: usize,
    /// Bytes in `buf[start..scanned]` are known to contain no newline, so a
    /// long line that arrives in many reads is scanned once, not once per read.
    scanned: usize,
    max_line: usize,
}

/// How many bytes one read asks the socket for.
pub(crate) const READ_CHUNK: usize = 8 * 1024;

impl LineBuffer {
    /// An empty buffer that rejects lines longer than `max_line` bytes.
    pub(crate) fn new(max_line: usize) -> LineBuffer {
        LineBuffer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max_line,
        }
    }

    /// The buffer to read into: its spare capacity is at least
    /// [`READ_CHUNK`] bytes. Append to it (tokio's `try_read_buf` does) and
    /// nothing else.
    pub(crate) fn read_buf(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            if self.start == self.buf.len() {
                self.clear();
            } else if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                // Move the partial line to the front rather than growing.
                self.buf.drain(..self.start);
                self.scanned -= self.start;
                self.start = 0;
            }
        }
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    /// The next complete line, without its `\n` and without one trailing `\r`.
    ///
    /// Returns `Ok(None)` when no complete line is buffered, and an error
    /// once the partial line is longer than the limit (the stream cannot be
    /// resynchronised after that, so the caller should disconnect).
    pub(crate) fn next_line(&mut self) -> Result<Option<&[u8]>, LineTooLong> {
        match memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            Some(offset) => {
                let newline = self.scanned + offset;
                let line_start = self.start;
                if newline - line_start > self.max_line {
                    return Err(LineTooLong { max: self.max_line });
                }
                self.start = newline + 1;
                self.scanned = self.start;
                Ok(Some(strip_cr(&self.buf[line_start..newline])))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.max_line {
                    return Err(LineTooLong { max: self.max_line });
                }
                self.release_if_empty();
                Ok(None)
            }
        }
    }

    /// At end of input: the final line if the client sent one without a
    /// newline. The seed drops nothing here either (`bufio.Scanner` returns a
    /// final unterminated token).
    pub(crate) fn take_unterminated(&mut self) -> Option<&[u8]> {
        if self.start == self.buf.len() {
            return None;
        }
        let line_start = self.start;
        self.start = self.buf.len();
        self.scanned = self.start;
        Some(strip_cr(&self.buf[line_start..]))
    }

    /// Bytes held for a partial line.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes of heap memory held: what `--max-client-memory` counts.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Frees the buffer if it holds no partial line; call before waiting
    /// for input so that an idle connection holds no buffer.
    pub(crate) fn release_if_empty(&mut self) {
        if self.start == self.buf.len() {
            self.clear();
        }
    }

    fn clear(&mut self) {
        // Dropping the allocation, not just truncating, is what keeps idle
        // connections cheap after a burst.
        self.buf = Vec::new();
        self.start = 0;
        self.scanned = 0;
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{longest_message, Config};

    /// The smallest queue allowed must hold the largest message a legal line
    /// can become: sanitising turns each invalid byte into three.
    #[test]
    fn the_smallest_queue_holds_the_longest_formatted_line() {
        let max_line = 1000;
        let mut batch = ChatBatch::default();
        let who = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        batch.push(who, &vec![0xFF; max_line]);
        let longest = batch.take().map_or(0, |message| message.len());
        assert!(longest > max_line * 3, "the worst case is the one tested");
        assert!(longest <= longest_message(max_line), "{longest} bytes");
        let config = Config {
            max_line,
            max_pending: longest_message(max_line),
            ..Config::default()
        };
        assert_eq!(config.validate(), Ok(()));
        let config = Config {
            max_pending: longest - 1,
            ..config
        };
        assert!(config.validate().is_err());
    }

    fn sanitized(line: &[u8]) -> String {
        let mut out = String::new();
        sanitize_into(line, &mut out);
        out
    }

    fn feed(buffer: &mut LineBuffer, bytes: &[u8]) {
        for chunk in bytes.chunks(READ_CHUNK) {
            buffer.read_buf().extend_from_slice(chunk);
        }
    }

    fn lines(buffer: &mut LineBuffer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = buffer.next_line().unwrap() {
            out.push(String::from_utf8_lossy(line).into_owned());
        }
        out
    }

    #[test]
    fn formats_the_seed_lines() {
        assert_eq!(
            Message::greeting("127.0.0.1:1").as_str(),
            "You are 127.0.0.1:1\n"
        );
        assert_eq!(
            Message::arrived("127.0.0.1:1").as_str(),
            "127.0.0.1:1 has arrived\n"
        );
        assert_eq!(
            Message::left("127.0.0.1:1").as_str(),
            "127.0.0.1:1 has left\n"
        );
        let mut batch = ChatBatch::default();
        assert_eq!(batch.take(), None);
        batch.push("127.0.0.1:1", b"Hi!");
        let one = batch.take().unwrap();
        assert_eq!(one.as_str(), "127.0.0.1:1: Hi!\n");
        assert_eq!(one.lines(), 1);
        batch.push("127.0.0.1:1", b"a");
        batch.push("127.0.0.1:1", b"b\x1b");
        let two = batch.take().unwrap();
        assert_eq!(two.as_str(), "127.0.0.1:1: a\n127.0.0.1:1: b^[\n");
        assert_eq!(two.lines(), 2);
        assert!(batch.is_empty());
    }

    #[test]
    fn formats_hello_and_checks_names() {
        assert_eq!(Message::hello("bob", None).as_str(), "You are bob\n");
        assert_eq!(
            Message::hello("bob", Some(&[])).as_str(),
            "You are bob\npresent (0): nobody\n"
        );
        let present: Vec<std::sync::Arc<str>> = vec!["ann".into(), "1.2.3.4:5".into()];
        assert_eq!(
            Message::hello("bob", Some(&present)).as_str(),
            "You are bob\npresent (2): ann, 1.2.3.4:5\n"
        );
        assert_eq!(check_name(b"ann\r"), Some("ann"));
        assert_eq!(check_name(&[b'x'; MAX_NAME]), Some(&*"x".repeat(MAX_NAME)));
        for bad in [
            &b""[..],
            b"\r",
            b"two words",
            b"tab\t",
            b"bob:",
            b"a,b",
            b"esc\x1b[2J",
            "caf\u{e9}".as_bytes(),
            &[b'x'; MAX_NAME + 1],
        ] {
            assert_eq!(check_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn passes_text_and_utf8_through() {
        assert_eq!(sanitized(b"plain text\twith tab"), "plain text\twith tab");
        assert_eq!(sanitized("你好，世界 🦀".as_bytes()), "你好，世界 🦀");
    }

    #[test]
    fn replaces_invalid_utf8() {
        assert_eq!(sanitized(b"a\xffb\xc3"), "a\u{FFFD}b\u{FFFD}");
    }

    #[test]
    fn shows_control_characters_visibly() {
        assert_eq!(sanitized(b"\x1b[2J"), "^[[2J");
        assert_eq!(sanitized(b"ding\x07"), "ding^G");
        assert_eq!(sanitized(b"x\rforged"), "x^Mforged");
        assert_eq!(sanitized(b"ab\x08\x08"), "ab^H^H");
        assert_eq!(sanitized(b"\x00\x7f"), "^@^?");
        assert_eq!(sanitized("\u{9b}31m".as_bytes()), "\u{FFFD}31m");
    }

    #[test]
    fn splits_lines_and_drops_one_trailing_cr() {
        let mut buffer = LineBuffer::new(100);
        feed(&mut buffer, b"one\r\ntwo\n\nthree");
        assert_eq!(lines(&mut buffer), ["one", "two", ""]);
        assert_eq!(buffer.take_unterminated(), Some(&b"three"[..]));
        assert_eq!(buffer.take_unterminated(), None);
    }

    #[test]
    fn reassembles_a_line_split_across_reads() {
        let mut buffer = LineBuffer::new(100);
        for byte in b"split line\n" {
            feed(&mut buffer, &[*byte]);
        }
        assert_eq!(lines(&mut buffer), ["split line"]);
        assert_eq!(buffer.capacity(), 0, "buffer released once empty");
    }

    #[test]
    fn rejects_a_long_line_without_buffering_it() {
        let mut buffer = LineBuffer::new(10);
        feed(&mut buffer, b"0123456789\n");
        assert_eq!(lines(&mut buffer), ["0123456789"]);
        feed(&mut buffer, b"0123456789A");
        assert_eq!(buffer.next_line(), Err(LineTooLong { max: 10 }));

        let mut buffer = LineBuffer::new(READ_CHUNK);
        let mut rejected = false;
        for _ in 0..100 {
            feed(&mut buffer, &[b'x'; READ_CHUNK]);
            if buffer.next_line().is_err() {
                rejected = true;
                break;
            }
            assert!(buffer.pending() <= READ_CHUNK);
        }
        assert!(rejected);
        assert!(buffer.capacity() <= 4 * READ_CHUNK);
    }
}
