//! The chat page in a real browser: Debian's headless `chromium`, driven
//! through WebDriver (`chromedriver`), with a small WebDriver client of our
//! own (a few JSON requests over HTTP/1.1 on loopback, no crate).
//!
//! Two pages and one netcat-style client chat in one room; a line of HTML
//! is shown as text and runs nothing; the page reconnects by itself after
//! the server restarts on the same port. A screenshot of the page is kept
//! at `target/browser/page.png` (the README's `docs/web.png` is one).
//! Under `--password-file` and `--names` the page asks for both, from the
//! keyboard alone: a wrong password shows the server's error, the right
//! one lets it in, a taken name is refused and another chosen, and the
//! chosen name is what a terminal in the room sees.
//!
//! Without chromium and chromedriver the test says so loudly and passes;
//! with `CI` or `CHAT_REQUIRE_CHROMIUM` set it fails instead.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, Password};
use chat_testkit::process::installed_or_skip;
use common::ensure;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// How long one WebDriver command may take (starting the browser is the
/// slowest, on a busy machine).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the page may take to show something expected.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The browser window's size, as at the start of each scenario.
const WINDOW: (u32, u32) = (900, 640);

/// The WebDriver key for Enter.
const ENTER: &str = "\u{E007}";

const INJECTION: &str = "<img src=x onerror=alert(1)>";

/// chromedriver, when both it and chromium are installed; otherwise `None`
/// after saying so (an error where `CHAT_REQUIRE_CHROMIUM` or `CI` is set).
fn chromedriver() -> io::Result<Option<&'static str>> {
    let require = "CHAT_REQUIRE_CHROMIUM";
    let package = "chromium chromium-driver";
    if installed_or_skip(&["chromium"], require, package, "browser")?.is_none() {
        return Ok(None);
    }
    installed_or_skip(&["chromedriver"], require, package, "browser")
}

/// Both scenarios below, one after the other in one browser: starting
/// chromium and chromedriver costs about 1.2 CPU-seconds, and the test
/// binary is bound by its CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_real_browser() -> io::Result<()> {
    let Some(driver) = chromedriver()? else {
        return Ok(());
    };
    let browser = Browser::start(driver).await?;
    two_pages_and_a_terminal_chat_and_the_page_reconnects(&browser)
        .await
        .map_err(|err| io::Error::other(format!("two pages and a terminal: {err}")))?;
    browser.fresh_window().await?;
    the_page_asks_for_the_password_and_a_name(&browser)
        .await
        .map_err(|err| io::Error::other(format!("password and name: {err}")))?;
    // No alert was ever opened (a command with one open would have failed).
    browser.quit().await
}

async fn two_pages_and_a_terminal_chat_and_the_page_reconnects(
    browser: &Browser,
) -> io::Result<()> {
    let web_port = chat_testkit::ports::unused_port()?;
    let server = TestServer::start(Config::with_model(Model::Broadcaster).with(|c| {
        // A port no connection takes while the server is away, so that
        // it can come back on it.
        c.web_addr = Some(format!("127.0.0.1:{web_port}"));
        c.announce_present = true;
    }))?;
    let web = server
        .web_addr()
        .ok_or_else(|| io::Error::other("no web address"))?;
    let url = format!("http://{web}/");

    let first = browser.current_window().await?;
    browser.navigate(&url).await?;
    let first_who = browser.wait_for_greeting().await?;

    let second = browser.new_window().await?;
    browser.switch_to(&second).await?;
    browser.navigate(&url).await?;
    let second_who = browser.wait_for_greeting().await?;

    let mut terminal = TestClient::connect(server.addr()).await?;
    let present = terminal.line().await?;
    let listed = chat_wire::present_of(&present).unwrap_or_default();
    ensure(
        listed.len() == 2 && listed.contains(&&*first_who) && listed.contains(&&*second_who),
        || format!("the terminal was told {present:?}"),
    )?;

    // The second page types; everyone sees it.
    browser.type_line("hello from the second page").await?;
    let from_second = chat_wire::chat(&second_who, "hello from the second page");
    terminal.expect(&from_second).await?;
    browser.wait_for_line(&from_second).await?;

    // The terminal sends a line of HTML: both pages show it as text.
    terminal.send(INJECTION).await?;
    let injected = chat_wire::chat(&terminal.who, INJECTION);
    terminal.expect(&injected).await?;
    browser.wait_for_line(&injected).await?;
    browser.switch_to(&first).await?;
    browser.wait_for_line(&from_second).await?;
    browser.wait_for_line(&injected).await?;
    let images = browser
        .script("return document.querySelectorAll('#lines img').length;")
        .await?;
    ensure(images == json!(0), || {
        format!("the line became HTML: {images} images")
    })?;

    // The first page answers; the terminal and the second page see it, and
    // the who-is-here list has all three.
    browser.type_line("hi both").await?;
    let from_first = chat_wire::chat(&first_who, "hi both");
    terminal.expect(&from_first).await?;
    let present = browser
        .script("return [...document.querySelectorAll('#people li')].map(li => li.textContent);")
        .await?;
    for who in [&first_who, &second_who, &terminal.who] {
        ensure(
            present.as_array().is_some_and(|people| {
                people.iter().any(|person| {
                    person
                        .as_str()
                        .is_some_and(|text| text.starts_with(who.as_str()))
                })
            }),
            || format!("{who} is not in the who-is-here list {present}"),
        )?;
    }
    browser.screenshot("page.png").await?;
    // A phone's width: one column, still readable.
    browser
        .request(
            "POST",
            &browser.path("/window/rect"),
            Some(json!({ "width": 390, "height": 720 })),
        )
        .await?;
    browser.screenshot("phone.png").await?;
    browser.switch_to(&second).await?;
    browser.wait_for_line(&from_first).await?;

    // The server goes away and comes back on the same port: the page says
    // so, then reconnects by itself.
    drop(terminal);
    server.stop();
    browser
        .wait_for(
            "return document.getElementById('notice').textContent;",
            |notice| {
                notice
                    .as_str()
                    .is_some_and(|text| text.contains("reconnecting"))
            },
        )
        .await?;
    let restarted = TestServer::start(
        Config::with_model(Model::Sharded).with(|c| c.web_addr = Some(web.to_string())),
    )?;
    let mut terminal = TestClient::connect(restarted.addr()).await?;
    let again = browser.wait_for_greeting_after(&second_who).await?;
    browser.type_line("back again").await?;
    // The other page's arrival may come first: it reconnected too.
    let back = chat_wire::chat(&again, "back again");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let line = terminal.line().await?;
        if line == back {
            break;
        }
        seen.push(line);
    }
    ensure(seen.len() < 4, || {
        format!("expected {back:?}, got {seen:?}")
    })?;
    browser.screenshot("reconnected.png").await
}

/// The page's password and name prompts, typed at the keyboard (each
/// keystroke goes to whatever has the focus, which the page must have put
/// on its input), with a terminal in the room under the same rules.
async fn the_page_asks_for_the_password_and_a_name(browser: &Browser) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(Model::Sharded).with(|c| {
        c.web_addr = Some("127.0.0.1:0".into());
        c.password = Some(Password::new("open sesame"));
        c.names = true;
        c.announce_present = true;
    }))?;
    let web = server
        .web_addr()
        .ok_or_else(|| io::Error::other("no web address"))?;

    // A terminal takes the name "tess" first.
    let mut terminal = TestClient::connect_raw(server.addr()).await?;
    terminal.send("open sesame").await?;
    terminal.expect(chat_wire::NAME_PROMPT).await?;
    terminal.send("tess").await?;
    terminal.expect(&chat_wire::greeting("tess")).await?;
    terminal.who = "tess".into();
    terminal.expect(&chat_wire::present::<&str>(&[])).await?;

    browser.navigate(&format!("http://{web}/")).await?;

    // The page knows a password is needed before it connects at all.
    browser.wait_for_prompt("Password", "password").await?;
    browser.type_keys("guess").await?;
    browser.wait_for_notice(chat_wire::WRONG_PASSWORD).await?;
    browser.wait_for_prompt("Password", "password").await?;
    browser.type_keys("open sesame").await?;

    // Let in, it is asked for a name; a taken one is refused.
    browser.wait_for_prompt("Your name", "text").await?;
    browser.type_keys("tess").await?;
    browser.wait_for_notice(chat_wire::NAME_TAKEN).await?;
    browser.wait_for_prompt("Your name", "text").await?;
    browser.type_keys("ann").await?;
    browser.wait_for_prompt("Message", "text").await?;
    browser.wait_for_line(&chat_wire::greeting("ann")).await?;

    // The chosen name is what the room sees.
    terminal.expect(&chat_wire::arrived("ann")).await?;
    browser.type_keys("hello tess").await?;
    let hello = chat_wire::chat("ann", "hello tess");
    terminal.expect(&hello).await?;
    browser.wait_for_line(&hello).await?;
    terminal.send("hi ann").await?;
    browser
        .wait_for_line(&chat_wire::chat("tess", "hi ann"))
        .await?;

    // Who is here: the present line the page was sent, and itself.
    browser
        .wait_for(
            "return [...document.querySelectorAll('#people li')].map(li => li.textContent);",
            |people| *people == json!(["ann (you)", "tess"]),
        )
        .await?;
    browser.screenshot("names.png").await
}

/// A headless chromium under chromedriver, one WebDriver session.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    async fn start(driver: &str) -> io::Result<Browser> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let profile = std::env::temp_dir().join(format!(
            "chat-browser-profile-{}-{port}",
            std::process::id()
        ));
        let mut browser = Browser {
            driver: child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
            profile,
        };
        // Until chromedriver answers.
        let started = Instant::now();
        loop {
            match browser.request("GET", "/status", None).await {
                Ok(status) if status["value"]["ready"] == json!(true) => break,
                _ if started.elapsed() > COMMAND_TIMEOUT => {
                    return Err(io::Error::other("chromedriver did not start"));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let capabilities = json!({
            "capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                    format!("--user-data-dir={}", browser.profile.display()),
                ],
            }}}
        });
        let session = browser
            .request("POST", "/session", Some(capabilities))
            .await?;
        browser.session = session["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| io::Error::other(format!("no session: {session}")))?
            .to_string();
        Ok(browser)
    }

    /// One WebDriver command: an HTTP/1.1 request with a JSON body; its
    /// JSON answer, or an error with WebDriver's message.
    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> io::Result<Value> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await?;
            let body = body.map(|body| body.to_string()).unwrap_or_default();
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.addr,
                body.len()
            );
            stream.write_all(request.as_bytes()).await?;
            // chromedriver keeps the connection open: read the head, then
            // Content-Length bytes (or to the end, without one).
            let mut answer = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            loop {
                let read = stream.read(&mut chunk).await?;
                answer.extend_from_slice(&chunk[..read]);
                if read == 0 || complete(&answer) {
                    break;
                }
            }
            io::Result::Ok(answer)
        };
        let answer = timeout(COMMAND_TIMEOUT, exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{method} {path}")))??;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| io::Error::other(format!("not HTTP: {answer}")))?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        let value: Value = serde_json::from_str(&body)
            .map_err(|err| io::Error::other(format!("{method} {path}: {err}: {body}")))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!(
                "{method} {path}: {head}: {value}"
            )));
        }
        Ok(value)
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    async fn navigate(&self, url: &str) -> io::Result<()> {
        self.request("POST", &self.path("/url"), Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    async fn current_window(&self) -> io::Result<String> {
        let handle = self.request("GET", &self.path("/window"), None).await?;
        Ok(handle["value"].as_str().unwrap_or_default().to_string())
    }

    async fn new_window(&self) -> io::Result<String> {
        let window = self
            .request(
                "POST",
                &self.path("/window/new"),
                Some(json!({ "type": "window" })),
            )
            .await?;
        Ok(window["value"]["handle"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Leaves one new window at the starting size, the current one: the
    /// pages before it, which would go on reconnecting to a server that is
    /// gone, are closed.
    async fn fresh_window(&self) -> io::Result<()> {
        let fresh = self.new_window().await?;
        let handles = self
            .request("GET", &self.path("/window/handles"), None)
            .await?;
        for handle in handles["value"].as_array().into_iter().flatten() {
            let Some(handle) = handle.as_str().filter(|&handle| handle != fresh) else {
                continue;
            };
            self.switch_to(handle).await?;
            self.request("DELETE", &self.path("/window"), None).await?;
        }
        self.switch_to(&fresh).await?;
        self.request(
            "POST",
            &self.path("/window/rect"),
            Some(json!({ "width": WINDOW.0, "height": WINDOW.1 })),
        )
        .await
        .map(drop)
    }

    async fn switch_to(&self, handle: &str) -> io::Result<()> {
        self.request(
            "POST",
            &self.path("/window"),
            Some(json!({ "handle": handle })),
        )
        .await
        .map(drop)
    }

    async fn script(&self, script: &str) -> io::Result<Value> {
        let answer = self
            .request(
                "POST",
                &self.path("/execute/sync"),
                Some(json!({ "script": script, "args": [] })),
            )
            .await?;
        Ok(answer["value"].clone())
    }

    /// Polls `script` until `done` holds of its value (bounded).
    async fn wait_for(&self, script: &str, done: impl Fn(&Value) -> bool) -> io::Result<Value> {
        let started = Instant::now();
        loop {
            let value = self.script(script).await?;
            if done(&value) {
                return Ok(value);
            }
            if started.elapsed() > PAGE_TIMEOUT {
                return Err(io::Error::other(format!("{script}: still {value}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The lines the page shows.
    async fn wait_for_line(&self, line: &str) -> io::Result<()> {
        let expected = json!(line);
        self.wait_for(
            "return [...document.querySelectorAll('#lines li')].map(li => li.textContent);",
            |lines| {
                lines
                    .as_array()
                    .is_some_and(|lines| lines.contains(&expected))
            },
        )
        .await
        .map(drop)
    }

    /// Waits for the page's greeting; its address as the server named it.
    async fn wait_for_greeting(&self) -> io::Result<String> {
        self.wait_for_greeting_after("").await
    }

    /// The greeting of a connection other than `earlier`.
    async fn wait_for_greeting_after(&self, earlier: &str) -> io::Result<String> {
        let earlier = chat_wire::greeting(earlier);
        let lines = self
            .wait_for(
                "return [...document.querySelectorAll('#lines li')].map(li => li.textContent);",
                |lines| {
                    lines.as_array().is_some_and(|lines| {
                        lines.iter().any(|line| {
                            line.as_str().is_some_and(|line| {
                                chat_wire::greeted(line).is_some() && line != earlier
                            })
                        })
                    })
                },
            )
            .await?;
        let greeting = lines
            .as_array()
            .and_then(|lines| {
                lines.iter().rev().find_map(|line| {
                    line.as_str()
                        .filter(|line| *line != earlier)
                        .and_then(chat_wire::greeted)
                })
            })
            .ok_or_else(|| io::Error::other("no greeting"))?;
        Ok(greeting.to_string())
    }

    /// Waits until the page's input is enabled, has the focus, is labelled
    /// `label` and is of `kind` (`password` hides what is typed).
    async fn wait_for_prompt(&self, label: &str, kind: &str) -> io::Result<()> {
        let expected = json!([label, kind, true, true]);
        self.wait_for(
            "const input = document.getElementById('input');
             return [document.getElementById('prompt').textContent, input.type,
                     !input.disabled, document.activeElement === input];",
            |state| *state == expected,
        )
        .await
        .map(drop)
    }

    /// Waits until the page's notice (its `role=alert` line) holds `text`.
    async fn wait_for_notice(&self, text: &str) -> io::Result<()> {
        self.wait_for(
            "const notice = document.getElementById('notice');
             return notice.hidden ? '' : notice.textContent;",
            |notice| notice.as_str().is_some_and(|notice| notice.contains(text)),
        )
        .await
        .map(drop)
    }

    /// Presses the keys of `text`, then Enter, as a keyboard would: they
    /// go to whatever has the focus.
    async fn type_keys(&self, text: &str) -> io::Result<()> {
        let mut keys: Vec<Value> = Vec::new();
        for key in text.chars().map(String::from).chain([ENTER.to_string()]) {
            keys.push(json!({ "type": "keyDown", "value": key }));
            keys.push(json!({ "type": "keyUp", "value": key }));
        }
        let actions = json!({ "actions": [
            { "type": "key", "id": "keyboard", "actions": keys }
        ]});
        self.request("POST", &self.path("/actions"), Some(actions))
            .await
            .map(drop)
    }

    /// Types `text` into the page's input and presses Enter.
    async fn type_line(&self, text: &str) -> io::Result<()> {
        self.wait_for(
            "return !document.getElementById('input').disabled;",
            |enabled| *enabled == json!(true),
        )
        .await?;
        let found = self
            .request(
                "POST",
                &self.path("/element"),
                Some(json!({ "using": "css selector", "value": "#input" })),
            )
            .await?;
        let element = found["value"]
            .as_object()
            .and_then(|element| element.values().next())
            .and_then(Value::as_str)
            .ok_or_else(|| io::Error::other(format!("no input: {found}")))?
            .to_string();
        self.request(
            "POST",
            &self.path(&format!("/element/{element}/value")),
            Some(json!({ "text": format!("{text}{ENTER}") })),
        )
        .await
        .map(drop)
    }

    /// Saves a screenshot under `target/browser/`.
    async fn screenshot(&self, name: &str) -> io::Result<()> {
        let shot = self.request("GET", &self.path("/screenshot"), None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["value"].as_str().unwrap_or_default())
            .map_err(|err| io::Error::other(err.to_string()))?;
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), png)?;
        println!("screenshot: {}", dir.join(name).display());
        Ok(())
    }

    async fn quit(mut self) -> io::Result<()> {
        let path = self.path("");
        self.request("DELETE", &path, None).await?;
        self.session.clear();
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Our own child, by its handle; the browser goes with its session
        // (or with the driver, if the test failed before quitting).
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Whether `answer` holds a whole HTTP answer with a Content-Length.
fn complete(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|length| length.trim().parse::<usize>().ok())
        .is_some_and(|length| answer.len() >= end + 4 + length)
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
