//! A fixed read buffer split into lines in place: the receive path of the
//! load tool and the benches, where nothing may be allocated per line.

/// A fixed read buffer split into lines in place.
///
/// Lines are handed out as slices of the buffer; a partial line at the end of
/// a read is moved to the front before the next read. A line longer than the
/// whole buffer (not one of ours) is skipped rather than grown for.
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Inside a line that did not fit: discard up to the next newline.
    skipping: bool,
}

impl LineReader {
    pub fn new(capacity: usize) -> LineReader {
        LineReader {
            buf: vec![0; capacity.max(256)],
            start: 0,
            end: 0,
            skipping: false,
        }
    }

    /// Room to read into, after moving any partial line to the front (at
    /// most one line's bytes, so every read gets nearly the whole buffer).
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.start == 0 && self.end == self.buf.len() {
            // One line fills the buffer: drop it and its remainder.
            self.skipping = true;
            self.end = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of [`LineReader::spare`] as read.
    pub fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// The next complete buffered line (without `\n` and one trailing
    /// `\r`), if there is one.
    pub fn next_line(&mut self) -> Option<&[u8]> {
        loop {
            let at = self.start;
            let newline = memchr::memchr(b'\n', &self.buf[at..self.end])? + at;
            self.start = newline + 1;
            if self.skipping {
                self.skipping = false;
                continue;
            }
            return Some(strip_cr(&self.buf[at..newline]));
        }
    }

    /// Whether the buffer is full without holding one whole line.
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.buf.len()
    }

    /// Consumes whatever is buffered; returns how many newlines it held.
    pub fn discard_buffered(&mut self) -> u64 {
        let lines = memchr::memchr_iter(b'\n', &self.buf[self.start..self.end]).count();
        self.start = self.end;
        lines as u64
    }

    /// Calls `f` with each complete line (without `\n` and one trailing
    /// `\r`); returns how many lines there were.
    #[inline]
    pub fn lines(&mut self, mut f: impl FnMut(&[u8])) -> u64 {
        let mut count = 0;
        let base = self.start;
        let mut start = base;
        let data = &self.buf[..self.end];
        for newline in memchr::memchr_iter(b'\n', &data[base..]).map(|i| i + base) {
            if self.skipping {
                self.skipping = false;
            } else {
                f(strip_cr(&data[start..newline]));
                count += 1;
            }
            start = newline + 1;
        }
        self.start = start;
        count
    }
}

/// `line` without one trailing `\r`.
pub fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}
