//! A line-oriented chat client over a real socket, with a timeout on every
//! read, so that a broken server fails a test instead of hanging it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long a test client waits for a line before declaring the server stuck.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// One chat client over a real socket.
#[derive(Debug)]
pub struct TestClient {
    /// `IP:PORT` as the server names this client.
    pub who: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl TestClient {
    /// Connects and reads the greeting, checking it names this client.
    pub async fn connect(addr: SocketAddr) -> io::Result<TestClient> {
        let mut client = TestClient::connect_raw(addr).await?;
        let greeting = client.line().await?;
        let expected = chat_wire::greeting(&client.who);
        if greeting != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected greeting {expected:?}, got {greeting:?}"),
            ));
        }
        Ok(client)
    }

    /// Connects without reading anything.
    pub async fn connect_raw(addr: SocketAddr) -> io::Result<TestClient> {
        let stream = TcpStream::connect(addr).await?;
        let who = stream.local_addr()?.to_string();
        let (reader, writer) = stream.into_split();
        Ok(TestClient {
            who,
            reader: BufReader::new(reader),
            writer,
        })
    }

    /// Sends `text` followed by a newline.
    pub async fn send(&mut self, text: &str) -> io::Result<()> {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.writer.write_all(&line).await
    }

    /// Sends bytes exactly as given.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// Ends this client's input (half-close), as netcat does at end of stdin.
    pub async fn finish(&mut self) -> io::Result<()> {
        self.writer.shutdown().await
    }

    /// The next line, without its newline. Fails on end of stream, on
    /// invalid UTF-8 (the server never sends any) and after [`LINE_TIMEOUT`].
    pub async fn line(&mut self) -> io::Result<String> {
        self.line_within(LINE_TIMEOUT).await
    }

    /// [`TestClient::line`] with a timeout of `within`.
    pub async fn line_within(&mut self, within: Duration) -> io::Result<String> {
        next_line(&mut self.reader, within).await
    }

    /// Reads the next line and checks it is `expected`.
    pub async fn expect(&mut self, expected: &str) -> io::Result<()> {
        let line = self.line().await?;
        if line == expected {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: expected {expected:?}, got {line:?}", self.who),
            ))
        }
    }

    /// Reads until the server closes the connection; returns the lines read.
    pub async fn lines_until_closed(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            match self.line().await {
                Ok(line) => lines.push(line),
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(lines),
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return Ok(lines),
                Err(err) => return Err(err),
            }
        }
    }

    /// Reassembles a client from [`TestClient::into_parts`].
    pub fn from_parts(
        who: String,
        reader: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
    ) -> TestClient {
        TestClient {
            who,
            reader,
            writer,
        }
    }

    /// Splits into the raw halves, for tests that drive the socket themselves.
    pub fn into_parts(self) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        (self.reader, self.writer)
    }
}

/// The next line from `reader`, without its newline: `UnexpectedEof` at the
/// end of the stream (or a line the end cut short), `TimedOut` after
/// `within`, `InvalidData` for invalid UTF-8 (the server never sends any).
pub(crate) async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    within: Duration,
) -> io::Result<String> {
    let mut line = Vec::new();
    let read = timeout(within, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no line from server"))??;
    if read == 0 || line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "connection closed (partial line {:?})",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    line.pop();
    String::from_utf8(line).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
}
