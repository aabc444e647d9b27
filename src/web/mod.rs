//! The second door into the room: a browser's (`--web-addr`, feature `web`).
//!
//! The accept loop admits a connection on the web port exactly as it admits
//! one on the line port (the same `--max-clients` slot, the same place in
//! its address's `--max-clients-per-ip` count, the same TLS acceptor and
//! SIGHUP reload) and hands it to [`serve`], which speaks HTTP/1.1 through
//! hyper until the request is answered:
//!
//! - `GET /`, `/app.js`, `/style.css`: the page, embedded in the binary,
//!   under a Content-Security-Policy that allows only these same-origin
//!   scripts and styles and same-origin WebSocket connections (no inline
//!   script, nothing fetched from elsewhere, no framing);
//! - `GET /settings.json`: what the page must know before it connects
//!   (whether to ask for a password, whether names and the present list are
//!   on);
//! - `GET /ws`: the WebSocket handshake. Its `Origin` must be the page's own
//!   (`http(s)://` + the request's `Host`) or one of `--web-origin`, or it
//!   is refused with 403, so that another site's page cannot open the room
//!   in a visitor's browser (cross-site WebSocket hijacking). A request
//!   without `Origin` does not come from a browser page and is let in, as a
//!   netcat client is.
//!
//! Every other request gets 404 or 405, and every connection serves one
//! request (no keep-alive), so a page's loads hold their slots for a moment
//! only. The whole exchange, TLS handshake included, must be over within
//! [`HANDSHAKE_TIMEOUT`].
//!
//! After the `101`, the stream is taken back from hyper (with anything it
//! read past the request) and becomes a [`ws::WebSocket`] transport, and
//! from then on the connection is an ordinary session: the lobby (password,
//! name), the hub of whichever model, the cluster, flood control, the idle
//! timeout, the slow-client policy. The client is known by the address the
//! socket came from; `X-Forwarded-For` is not read (see ARCHITECTURE.md).

#[cfg(feature = "test-util")]
#[doc(hidden)]
pub mod bare;
mod ws;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::client::Client;
use crate::config::Config;
use crate::room::hub::Hub;
use crate::session::{self, ServerContext};
use crate::transport::Transport;

/// How long a connection may take from accept to the end of its HTTP
/// exchange (the TLS handshake, the request, our answer).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pings are sent at least this often, below the 60 s read timeout common
/// in reverse proxies (nginx's `proxy_read_timeout`).
const MAX_PING_INTERVAL: Duration = Duration::from_secs(30);

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// The page may run only its own script and style, and talk only to its
/// own origin (CSP level 3: `'self'` covers `ws:`/`wss:` of the same host).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The RFC 6455 handshake's constant.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What every web connection shares.
#[derive(Debug)]
pub(crate) struct Web {
    /// `--web-origin`, lower-cased, without a trailing `/`.
    origins: Vec<String>,
    /// Whether the door speaks TLS (the page's own origin is `https://`).
    tls: bool,
    settings: Bytes,
    limits: ws::Limits,
}

impl Web {
    pub(crate) fn new(config: &Config) -> Web {
        let settings = format!(
            "{{\"password\":{},\"names\":{},\"present\":{},\"max_line\":{}}}\n",
            config.password.is_some(),
            config.names,
            config.announce_present,
            config.max_line,
        );
        Web {
            origins: config
                .web_origins
                .iter()
                .map(|origin| origin.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            tls: config.tls.is_some(),
            settings: Bytes::from(settings),
            limits: ws::Limits {
                max_message: config.max_line,
                ping_every: config
                    .keepalive
                    .map(|every| every.min(MAX_PING_INTERVAL))
                    .or(Some(MAX_PING_INTERVAL)),
            },
        }
    }

    /// Whether a page from `origin` may open the WebSocket on `host`.
    fn allows(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if let Some(host) = host {
            let scheme = if self.tls { "https://" } else { "http://" };
            if origin.strip_prefix(scheme) == Some(&*host.to_ascii_lowercase()) {
                return true;
            }
        }
        self.origins.contains(&origin)
    }
}

/// Serves one connection of the web port: the HTTP exchange, then, if it
/// was a WebSocket handshake, the chat session on it. `stream` is the
/// accepted socket, or the TLS handshake that yields it.
pub(crate) async fn serve<H, S>(
    hub: Arc<H>,
    stream: impl std::future::Future<Output = Option<S>> + Send + Unpin,
    client: Arc<Client>,
    server: Arc<ServerContext>,
    web: Arc<Web>,
) where
    H: Hub,
    S: Transport + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Boxed, and gone once the exchange is over: hyper's connection state
    // is several KiB, which the task would otherwise keep for the whole
    // chat session (a task's future is allocated at its largest).
    let upgraded = Box::pin(async {
        let exchange = async {
            let stream = stream.await?;
            http_exchange(stream, &web).await
        };
        tokio::select! {
            upgraded = tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange) => match upgraded {
                Ok(upgraded) => upgraded,
                Err(_elapsed) => {
                    client.span().in_scope(|| debug!("web: request not finished in time; closed"));
                    None
                }
            },
            () = client.ending() => None,
        }
    })
    .await;
    if let Some((stream, preread)) = upgraded {
        let socket = ws::WebSocket::new(stream, preread, web.limits);
        session::serve(hub, socket, client, server).await;
    }
}

/// Answers one request; the stream back if it was a WebSocket handshake.
async fn http_exchange<S>(stream: S, web: &Arc<Web>) -> Option<(S, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let upgrade: Arc<Mutex<Option<OnUpgrade>>> = Arc::default();
    let service = {
        let web = Arc::clone(web);
        let upgrade = Arc::clone(&upgrade);
        service_fn(move |request| {
            let response = respond(request, &web, &upgrade);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let served = http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(err) = served {
        debug!(cause = %err, "web: HTTP connection failed");
        return None;
    }
    let pending = upgrade.lock().take()?;
    let upgraded = pending.await.ok()?;
    let parts = upgraded.downcast::<TokioIo<S>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf.to_vec()))
}

fn respond(
    mut request: Request<Incoming>,
    web: &Web,
    upgrade: &Mutex<Option<OnUpgrade>>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match request.uri().path() {
        "/" | "/index.html" => asset(PAGE, "text/html; charset=utf-8"),
        "/app.js" => asset(SCRIPT, "text/javascript; charset=utf-8"),
        "/style.css" => asset(STYLE, "text/css; charset=utf-8"),
        "/settings.json" => with_headers(
            Response::new(Full::new(web.settings.clone())),
            "application/json",
        ),
        "/ws" => {
            let headers = request.headers();
            let host = headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok());
            if let Some(origin) = headers.get(header::ORIGIN) {
                let allowed = origin.to_str().is_ok_and(|origin| web.allows(origin, host));
                if !allowed {
                    debug!(?origin, "web: WebSocket from a foreign origin refused");
                    return plain(StatusCode::FORBIDDEN, "this origin may not open the chat\n");
                }
            }
            let Some(accept) = handshake_accept(headers) else {
                let mut response = plain(
                    StatusCode::UPGRADE_REQUIRED,
                    "a WebSocket (version 13) handshake is expected here\n",
                );
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                return response;
            };
            let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
                return plain(StatusCode::BAD_REQUEST, "cannot upgrade this connection\n");
            };
            *upgrade.lock() = Some(on_upgrade);
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
            response
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `Sec-WebSocket-Accept` for a well-formed version-13 upgrade request.
fn handshake_accept(headers: &HeaderMap) -> Option<HeaderValue> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return None;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION)? != "13" {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?.as_bytes();
    let engine = base64::engine::general_purpose::STANDARD;
    if engine.decode(key).ok()?.len() != 16 {
        return None;
    }
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key);
    context.update(WEBSOCKET_GUID.as_bytes());
    HeaderValue::from_str(&engine.encode(context.finish())).ok()
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    with_headers(
        Response::new(Full::new(Bytes::from_static(body.as_bytes()))),
        content_type,
    )
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = asset(body, "text/plain; charset=utf-8");
    *response.status_mut() = status;
    response
}

fn with_headers(
    mut response: Response<Full<Bytes>>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The answer a connection over a limit gets on the web port: an HTTP
/// error with the line a netcat client would have read.
pub(crate) fn refusal(line: &[u8]) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        line.len()
    )
    .into_bytes();
    response.extend_from_slice(line);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_of_rfc_6455_example() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(
            handshake_accept(&headers),
            Some(HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="))
        );
    }

    #[test]
    fn origins() {
        let config = Config {
            web_origins: vec!["https://Chat.Example.org/".into()],
            ..Config::default()
        };
        let web = Web::new(&config);
        assert!(web.allows("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!web.allows("http://127.0.0.1:8081", Some("127.0.0.1:8080")));
        assert!(!web.allows("https://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!web.allows("http://evil.example", Some("127.0.0.1:8080")));
        assert!(web.allows("https://chat.example.org", Some("127.0.0.1:8080")));
        assert!(!web.allows("null", None));
    }
}
