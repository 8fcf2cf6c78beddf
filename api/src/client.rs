//! A client for the server's HTTP JSON API (feature `client`), used by the
//! `novacron` CLI and the admin subcommands of `novacron-server`.
//!
//! [`ApiClient`] makes typed calls ([`ApiClient::get`], [`ApiClient::send`]:
//! bodies and replies are this crate's types; named ones such as
//! [`ApiClient::burst`] fix the path and the reply type) and untyped ones
//! ([`ApiClient::call`]: JSON values), and opens server-sent-event streams;
//! [`SseParser`] is the sans-IO parser behind [`EventStream`].
//!
//! The API is HTTPS: a client trusts only the CA it is given
//! ([`TrustedCa`]: the fleet CA, `ca.pem` in the server's data directory,
//! or the CA of the certificate an operator gave the API), never a system
//! store, and refuses an `https://` call without one. Plain `http://` is
//! for servers configured with `[api] plaintext`.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ErrorBody, ErrorCode};

/// How long a call may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Calling the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API address is not a usable `http://host:port` URL.
    #[error("invalid API URL {url:?}: {reason}")]
    InvalidUrl {
        /// What was given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An `https://` URL, but no CA to verify the server's certificate with.
    #[error("{url} is HTTPS, and no CA to verify its certificate was given: pass the fleet CA (ca.pem in the server's data directory) with --ca-file or NOVACRON_CA_FILE")]
    NoCa {
        /// Where.
        url: String,
    },
    /// The CA file is unusable.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The server could not be reached.
    #[error("cannot reach the NovaCron API at {url} (is `novacron-server run` running there?)")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The server did not answer in time.
    #[error("the NovaCron API at {url} did not answer within {after:?}")]
    Timeout {
        /// Where.
        url: String,
        /// How long we waited.
        after: Duration,
    },
    /// Building the request failed (a path or header the HTTP layer refused).
    #[error("cannot build the request for {path}")]
    Request {
        /// The path asked for.
        path: String,
        /// Why.
        #[source]
        source: hyper::http::Error,
    },
    /// The connection broke while reading the reply.
    #[error("the connection to the API broke while reading the reply")]
    Body(#[source] hyper::Error),
    /// The server answered with an error.
    #[error("{status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The API's stable error code (`forbidden`, `not_found`, ...).
        code: String,
        /// The server's message.
        message: String,
    },
    /// A request body could not be encoded.
    #[error("cannot encode the request body for {path}")]
    Encode {
        /// The path asked for.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A successful reply that is not JSON (or not the JSON of the call's reply type).
    #[error("the API's reply ({status}) is not the expected JSON")]
    Json {
        /// HTTP status.
        status: u16,
        /// Why it did not parse.
        #[source]
        source: serde_json::Error,
    },
}

/// A CA the client cannot use.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the CA file {path}: {reason}")]
pub struct CaError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl ClientError {
    /// Whether the server could not be reached at all (as opposed to
    /// refusing the request or answering something odd).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. } | ClientError::Timeout { .. })
    }

    /// The API's error code of a refusal (`Unknown` for a code this build
    /// does not know or a proxy's refusal); `None` for other errors.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(
                serde_json::from_value(serde_json::Value::String(code.clone())).unwrap_or(ErrorCode::Unknown),
            ),
            _ => None,
        }
    }
}

/// Where the API is: `https://host:port` (or `http://` for a plain-text
/// server), optionally with a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// HTTPS (the default) or plain HTTP.
    tls: bool,
    /// `host:port` (the host may be a bracketed IPv6 address).
    authority: String,
    /// A path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl ApiUrl {
    /// The full URL for an API path (`/v1/...`).
    pub fn join(&self, path: &str) -> String {
        format!("{}{}", self, path)
    }

    /// `http://addr`: a server configured with `[api] plaintext`.
    pub fn plain(addr: SocketAddr) -> Self {
        ApiUrl {
            tls: false,
            ..Self::from(addr)
        }
    }

    /// Whether this is an `https://` URL.
    pub fn is_https(&self) -> bool {
        self.tls
    }
}

impl std::fmt::Display for ApiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.prefix)
    }
}

impl From<SocketAddr> for ApiUrl {
    /// `https://addr`.
    fn from(addr: SocketAddr) -> Self {
        ApiUrl {
            tls: true,
            authority: addr.to_string(),
            prefix: String::new(),
        }
    }
}

impl FromStr for ApiUrl {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| ClientError::InvalidUrl {
            url: s.to_string(),
            reason,
        };
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if s.contains("://") {
            return Err(bad(
                "the scheme must be https:// (or http:// for a plain-text server)",
            ));
        } else {
            // A bare `host:port`: HTTPS, as the server serves by default.
            (true, s)
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains('@') || prefix.contains(['?', '#']) {
            return Err(bad("user info, queries and fragments are not allowed"));
        }
        let authority = match authority.rsplit_once(':') {
            Some((_, port)) if !authority.ends_with(']') => {
                port.parse::<u16>().map_err(|_| bad("the port is not a number"))?;
                authority.to_string()
            }
            _ => format!("{authority}:{}", if tls { 443 } else { 80 }),
        };
        let uri = format!("http://{authority}{prefix}/");
        uri.parse::<hyper::Uri>().map_err(|_| bad("not a valid URL"))?;
        Ok(ApiUrl {
            tls,
            authority,
            prefix: prefix.to_string(),
        })
    }
}

/// The certificate authorities an HTTPS client trusts: only these, never
/// a system store.
#[derive(Clone)]
pub struct TrustedCa(std::sync::Arc<rustls::ClientConfig>);

impl std::fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TrustedCa").finish_non_exhaustive()
    }
}

impl TrustedCa {
    /// The CA certificates in a PEM text (`what` names it in errors).
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, CaError> {
        use rustls::pki_types::pem::PemObject;
        let bad = |reason: String| CaError {
            path: what.to_string(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| bad(format!("not PEM certificates ({e})")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("not a usable CA certificate ({e})")))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(std::sync::Arc::new(cfg)))
    }

    /// The CA certificates in a PEM file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, CaError> {
        Self::from_files(path, &[])
    }

    /// The CA certificates in `path` and in each of `more` (on the server
    /// host: the fleet CA, and the chain of an operator's own API
    /// certificate, whose intermediate then anchors the check).
    pub fn from_files(path: &std::path::Path, more: &[&std::path::Path]) -> Result<Self, CaError> {
        let mut pem = String::new();
        for p in std::iter::once(path).chain(more.iter().copied()) {
            pem.push_str(&std::fs::read_to_string(p).map_err(|e| CaError {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?);
        }
        Self::from_pem(&pem, &path.display().to_string())
    }
}

type Http = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn http_client(ca: Option<&TrustedCa>) -> Http {
    let tls = match ca {
        Some(c) => (*c.0).clone(),
        // Plain http:// only: an https:// call without a CA is refused
        // before connecting (and this empty store would trust nothing).
        None => rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| unreachable_config()),
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// ring's default provider supports the safe default versions; this is
/// never reached, and trusts nothing if it were.
fn unreachable_config() -> rustls::ClientConfig {
    rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// A client for one API endpoint, with an optional bearer token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: ApiUrl,
    token: Option<String>,
    timeout: Duration,
    has_ca: bool,
    http: Http,
}

impl ApiClient {
    /// A client for `base` that sends `token` (when given) with every call.
    /// An `https://` base also needs [`ApiClient::with_ca`].
    pub fn new(base: ApiUrl, token: Option<String>) -> Self {
        Self {
            base,
            token,
            timeout: DEFAULT_TIMEOUT,
            has_ca: false,
            http: http_client(None),
        }
    }

    /// Verifies the server's certificate against `ca` (and only `ca`).
    pub fn with_ca(mut self, ca: &TrustedCa) -> Self {
        self.http = http_client(Some(ca));
        self.has_ca = true;
        self
    }

    /// Sets how long a call (or opening a stream) may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where the API is.
    pub fn base(&self) -> &ApiUrl {
        &self.base
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        accept: &'static str,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        if self.base.tls && !self.has_ca {
            return Err(ClientError::NoCa {
                url: self.base.to_string(),
            });
        }
        let url = self.base.join(path);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header("accept", accept);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|source| ClientError::Request {
                path: path.to_string(),
                source,
            })?;
        self.http
            .request(req)
            .await
            .map_err(|source| ClientError::Connect {
                url: self.base.to_string(),
                source,
            })
    }

    /// Calls `method path` with an optional JSON body; returns the JSON
    /// reply, or the API's error as [`ClientError::Refused`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes) = self.exchange(method, path, body.as_deref()).await?;
        decode_reply(status, &bytes)
    }

    /// `GET path`, read into the typed reply `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, bytes) = self.exchange(Method::GET, path, None).await?;
        decode_typed(status, &bytes)
    }

    /// `GET /v1/burst`: the cloud burst caps, spend, instances, waiting VMs
    /// and orphans.
    pub async fn burst(&self) -> Result<crate::burst::BurstStatus, ClientError> {
        self.get("/v1/burst").await
    }

    /// `method path` with the typed request `body` (none: no body), read
    /// into the typed reply `T`.
    pub async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|source| ClientError::Encode {
                path: path.to_string(),
                source,
            })?;
        let (status, bytes) = self.exchange(method, path, body.as_deref()).await?;
        decode_typed(status, &bytes)
    }

    /// Sends one request (repeating a rate-limited read as the server
    /// asks) under the timeout; returns the status and the whole body.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let work = async {
            let mut retries = 0;
            loop {
                let resp = self
                    .request(method.clone(), path, body, "application/json")
                    .await?;
                let status = resp.status();
                // Reads are safe to repeat: wait as long as the server asks.
                if status == StatusCode::TOO_MANY_REQUESTS && method == Method::GET && retries < MAX_RETRIES {
                    retries += 1;
                    tokio::time::sleep(retry_after(resp.headers())).await;
                    continue;
                }
                let bytes = body_of(resp).await?;
                return Ok((status, bytes));
            }
        };
        self.within(work).await?
    }

    /// Runs `work` under the client's timeout.
    async fn within<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.base.to_string(),
                after: self.timeout,
            })
    }

    /// `GET path` as text (the Prometheus exposition, say); a non-2xx
    /// status is an error like [`ApiClient::call`]'s.
    pub async fn text(&self, path: &str) -> Result<String, ClientError> {
        let work = async {
            let resp = self.request(Method::GET, path, None, "text/plain").await?;
            let status = resp.status();
            let bytes = body_of(resp).await?;
            if !status.is_success() {
                decode_reply(status, &bytes)?;
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        self.within(work).await?
    }

    /// Opens a `text/event-stream` at `path` (`GET`). Only opening the
    /// stream is subject to the timeout; events then arrive as they come.
    pub async fn stream(&self, path: &str) -> Result<EventStream, ClientError> {
        let resp = self
            .within(self.request(Method::GET, path, None, "text/event-stream"))
            .await??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = body_of(resp).await?;
            return Err(refusal(status, &bytes));
        }
        Ok(EventStream {
            body: resp.into_body(),
            parser: SseParser::default(),
        })
    }
}

/// The whole body of a reply.
async fn body_of(resp: hyper::Response<Incoming>) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Body)?
        .to_bytes())
}

/// How often a rate-limited read is tried again.
const MAX_RETRIES: u32 = 3;

/// The delay a `429` asks for (`Retry-After` in seconds), at least 100 ms
/// and at most 10 s; 1 s when absent or unreadable.
fn retry_after(headers: &hyper::HeaderMap) -> Duration {
    headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(1), |s| {
            Duration::from_secs_f64(s.clamp(0.1, 10.0))
        })
}

/// The API's reply as JSON, or its error.
fn decode_reply(status: StatusCode, bytes: &[u8]) -> Result<serde_json::Value, ClientError> {
    if !status.is_success() {
        return Err(refusal(status, bytes));
    }
    let bytes = if bytes.is_empty() {
        b"null".as_slice()
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|source| ClientError::Json {
        status: status.as_u16(),
        source,
    })
}

/// The API's reply as the typed `T`, or its error.
fn decode_typed<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(refusal(status, bytes));
    }
    serde_json::from_slice(bytes).map_err(|source| ClientError::Json {
        status: status.as_u16(),
        source,
    })
}

/// An error reply: the API's [`ErrorBody`], or whatever a proxy in between
/// said.
fn refusal(status: StatusCode, bytes: &[u8]) -> ClientError {
    if let Ok(body) = serde_json::from_slice::<ErrorBody>(bytes) {
        // A code this build does not know keeps its name from the reply.
        let code = match body.error.code {
            ErrorCode::Unknown => serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                .unwrap_or_else(|| "unknown".into()),
            known => known.as_str().to_string(),
        };
        return ClientError::Refused {
            status: status.as_u16(),
            code,
            message: body.error.message,
        };
    }
    let code = status
        .canonical_reason()
        .unwrap_or("error")
        .to_lowercase()
        .replace(' ', "_");
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let message = if text.is_empty() {
        "no message".to_string()
    } else {
        text.chars().take(200).collect()
    };
    ClientError::Refused {
        status: status.as_u16(),
        code,
        message,
    }
}

/// An open server-sent-event stream.
#[derive(Debug)]
pub struct EventStream {
    body: Incoming,
    parser: SseParser,
}

impl EventStream {
    /// The next event; `None` when the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, ClientError> {
        loop {
            if let Some(ev) = self.parser.next_event() {
                return Ok(Some(ev));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Body(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.parser.push(&data);
                    }
                }
            }
        }
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent, as the standard says).
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Most bytes buffered for one line before the stream is treated as broken
/// (a line is cut there, so a misbehaving server cannot exhaust memory).
pub const MAX_SSE_LINE: usize = 1 << 20;

/// Most bytes of `data:` one event may gather; a larger event is dropped
/// whole (its remaining lines are skipped until the blank line ends it).
pub const MAX_SSE_EVENT: usize = 4 << 20;

/// A sans-IO parser for `text/event-stream`: push bytes in, take events out.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    pending: SseEvent,
    has_data: bool,
    oversized: bool,
    ready: std::collections::VecDeque<SseEvent>,
}

impl SseParser {
    /// Feeds bytes as they arrive (any split is fine).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line(&String::from_utf8_lossy(&line));
        }
        if self.buf.len() > MAX_SSE_LINE {
            let line = std::mem::take(&mut self.buf);
            self.line(&String::from_utf8_lossy(&line));
        }
    }

    /// The next complete event, if any.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            let ev = std::mem::take(&mut self.pending);
            let oversized = std::mem::take(&mut self.oversized);
            if std::mem::take(&mut self.has_data) && !oversized {
                let event = if ev.event.is_empty() {
                    "message".to_string()
                } else {
                    ev.event
                };
                self.ready.push_back(SseEvent { event, ..ev });
            }
            return;
        }
        if line.starts_with(':') {
            return; // a comment: keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.pending.event = value.to_string(),
            "data" if self.oversized => {}
            "data" if self.pending.data.len() + value.len() + 1 > MAX_SSE_EVENT => {
                self.oversized = true;
                self.pending.data = String::new();
            }
            "data" => {
                if self.has_data {
                    self.pending.data.push('\n');
                }
                self.pending.data.push_str(value);
                self.has_data = true;
            }
            "id" => self.pending.id = Some(value.to_string()),
            _ => {} // `retry` and unknown fields are ignored
        }
    }
}

/// Calls `method path` at `base` (verified against `ca`) with an optional
/// JSON body; returns the JSON reply (the admin subcommands of
/// `novacron-server` use this).
pub async fn call(
    base: ApiUrl,
    ca: Option<&TrustedCa>,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let mut c = ApiClient::new(base, Some(token.to_string()));
    if let Some(ca) = ca {
        c = c.with_ca(ca);
    }
    c.call(method, path, body).await
}

#[cfg(test)]
mod tests;
