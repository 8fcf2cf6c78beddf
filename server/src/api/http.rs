//! HTTP plumbing of the API: typed JSON replies, bodies read into typed
//! requests (size-limited), query strings, ids in paths, and server-sent
//! event streams.

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use novacron_api::{ErrorBody, ErrorCode, ErrorDetail};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::error::ApiError;

/// Largest request body accepted: room for several VM specs at their
/// limits (one spec's cloud-init user data alone may be 64 KiB).
pub const MAX_BODY: usize = 1024 * 1024;
/// A body past [`MAX_BODY`] is still read (and dropped) up to this much,
/// so the client, still sending, gets the 413 instead of a broken
/// connection; past it the connection is closed.
pub const MAX_DRAIN: usize = 4 * MAX_BODY;
const _: () = assert!(MAX_BODY > 4 * novacron_shared::spec::MAX_USER_DATA);
/// How often an idle event stream gets a keep-alive comment.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// A response body: a whole JSON document or an event stream.
pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
/// A response.
pub type Resp = Response<Body>;

/// A response with these bytes and content type.
pub fn bytes_response(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A typed JSON reply.
pub fn reply<T: Serialize>(status: StatusCode, body: &T) -> Result<Resp, ApiError> {
    serde_json::to_vec(body)
        .map(|v| bytes_response(status, "application/json", Bytes::from(v)))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Encode,
                e.to_string(),
            )
        })
}

/// The error reply: `{"error": {"code", "message"}}`, with `Retry-After`
/// or `Allow` when the error carries one.
pub fn error_response(e: &ApiError) -> Resp {
    let body = ErrorBody {
        error: ErrorDetail {
            code: e.code,
            message: e.message.clone(),
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = bytes_response(e.status, "application/json", Bytes::from(bytes));
    if let Some(wait) = e.retry_after {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
    }
    if let Some(methods) = &e.allow {
        if let Ok(v) = HeaderValue::from_str(&methods.join(", ")) {
            r.headers_mut().insert(ALLOW, v);
        }
    }
    r
}

/// Reads a body of at most `limit` bytes; a longer one is read on (and
/// dropped) up to `drain` bytes before it is refused with 413, so that a
/// client still sending reads the refusal.
async fn read_limited<B>(mut body: B, limit: usize, drain: usize) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BodyTooLarge,
            format!("request bodies are limited to {limit} bytes"),
        )
    };
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidBody,
                "the request body could not be read".to_string(),
            ));
        };
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen > drain {
            return Err(too_large());
        }
        if seen <= limit {
            buf.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

/// Reads a JSON body into a typed request (no body reads as `{}`).
pub async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = read_limited(req.into_body(), MAX_BODY, MAX_DRAIN).await?;
    let bytes = if body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        body
    };
    let invalid = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(
            ErrorCode::InvalidBody,
            format!("request body is not valid JSON for this call: {e}"),
        )
    };
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| invalid(&e))?;
    integral_floats_to_integers(&mut value);
    // serde reads a struct from an array too; no body of the API is one.
    if value.is_array() {
        return Err(invalid(&"the body must not be a JSON array"));
    }
    serde_json::from_value(value).map_err(|e| invalid(&e))
}

/// JSON Schema counts `2.0` as an integer; serde's integer fields do not.
/// Integral numbers written with a fraction become integers (so a request
/// the schema calls valid is read as such); others stay as they are.
fn integral_floats_to_integers(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                    *v = Value::from(f as u64);
                } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                    *v = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

/// Parses an id from a path or query.
pub fn parse_id<T: std::str::FromStr<Err = novacron_shared::ids::ParseIdError>>(
    s: &str,
) -> Result<T, ApiError> {
    s.parse().map_err(|e: novacron_shared::ids::ParseIdError| {
        ApiError::bad_request(ErrorCode::InvalidId, e.to_string())
    })
}

/// Query parameters, percent-decoded (`+` is a space).
pub struct Query(Vec<(String, String)>);

/// Percent-decodes a query value (`+` is a space); a malformed escape is
/// kept as it is.
fn decode_query(v: &str) -> Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return Cow::Borrowed(v);
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

impl Query {
    /// Parses a query string.
    pub fn parse(q: Option<&str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_string(), decode_query(v).into_owned())
                })
                .collect(),
        )
    }

    /// The first value of `k`.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    /// `k` as a number in `min..=max`, or `default` when absent.
    pub fn number(&self, k: &str, default: usize, min: usize, max: usize) -> Result<usize, ApiError> {
        let Some(v) = self.get(k) else {
            return Ok(default);
        };
        match v.parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            Ok(_) => Err(ApiError::bad_query(format!(
                "{k}={v} is not between {min} and {max}"
            ))),
            Err(_) => Err(ApiError::bad_query(format!("{k}={v:?} is not a number"))),
        }
    }

    /// `k` as an id, when present.
    pub fn id<T: std::str::FromStr<Err = novacron_shared::ids::ParseIdError>>(
        &self,
        k: &str,
    ) -> Result<Option<T>, ApiError> {
        self.get(k).map(parse_id).transpose()
    }
}

/// A server-sent events body fed by a channel.
struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// One SSE event with a JSON `data:` line (and an `id:` when given).
pub fn sse_event<T: Serialize>(id: Option<u64>, event: &str, data: &T) -> Option<Bytes> {
    let data = serde_json::to_string(data).ok()?;
    Some(Bytes::from(match id {
        Some(id) => format!("id: {id}\nevent: {event}\ndata: {data}\n\n"),
        None => format!("event: {event}\ndata: {data}\n\n"),
    }))
}

/// Streams a broadcast channel as server-sent events: `render` turns an
/// item into an event (or skips it); keep-alives every 15 s and a `lagged`
/// event when the client falls behind.
pub fn sse<T: Send + Sync + 'static>(
    mut sub: broadcast::Receiver<Arc<T>>,
    render: impl Fn(&T) -> Option<Bytes> + Send + 'static,
) -> Resp {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if tx.send(Bytes::from_static(b": connected\n\n")).await.is_err() {
            return;
        }
        loop {
            let chunk = match tokio::time::timeout(SSE_KEEPALIVE, sub.recv()).await {
                Err(_) => Bytes::from_static(b": keep-alive\n\n"),
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    match sse_event(None, "lagged", &novacron_api::events::Lagged { missed: n }) {
                        Some(b) => b,
                        None => continue,
                    }
                }
                Ok(Ok(item)) => match render(&item) {
                    Some(b) => b,
                    None => continue,
                },
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(SseBody { rx }.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_past_the_limit_are_drained_then_refused() {
        let read = |n: usize| read_limited(Full::new(Bytes::from(vec![b' '; n])), 10, 40);
        assert_eq!(read(10).await.map(|b| b.len()).ok(), Some(10));
        for n in [11, 40, 41] {
            let e = read(n).await.err().map(|e| e.status);
            assert_eq!(e, Some(StatusCode::PAYLOAD_TOO_LARGE), "{n} bytes");
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let q = Query::parse(Some("series=host.cpu%2Chost.memory&from=15m&name=a+b&bad=%zz%4"));
        assert_eq!(q.get("series"), Some("host.cpu,host.memory"));
        assert_eq!(q.get("from"), Some("15m"));
        assert_eq!(q.get("name"), Some("a b"));
        assert_eq!(q.get("bad"), Some("%zz%4"));
        assert_eq!(q.get("none"), None);
    }

    #[test]
    fn integral_floats_read_as_integers() {
        let mut v = serde_json::json!({"a": 450.0, "b": [1.5, -3.0], "c": "2.0", "d": 7});
        integral_floats_to_integers(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": 450, "b": [1.5, -3], "c": "2.0", "d": 7})
        );
        assert!(v["a"].is_u64());
    }

    #[test]
    fn numbers_out_of_range_are_refused_not_clamped() {
        let q = Query::parse(Some("limit=0&big=5000&ok=7&word=x"));
        assert!(q.number("limit", 100, 1, 1000).is_err());
        assert!(q.number("big", 100, 1, 1000).is_err());
        assert_eq!(q.number("ok", 100, 1, 1000).ok(), Some(7));
        assert_eq!(q.number("absent", 100, 1, 1000).ok(), Some(100));
        assert_eq!(
            q.number("word", 100, 1, 1000).map_err(|e| e.code).err(),
            Some(ErrorCode::InvalidQuery)
        );
    }
}
