//! The fault proxy: the one stand-in of the cloud-burst tests. moto is the
//! real EC2 peer, but it never throttles, never fails with a server error
//! and never loses an answer; this small HTTP/1.1 proxy on 127.0.0.1, in
//! front of moto, injects exactly those, and nothing else.
//!
//! It forwards every request unchanged and answers moto's reply, except
//! when a queued [`Fault`] matches the request's EC2 `Action` (parsed from
//! the form body). It runs in the test process, on a tokio runtime of its
//! own thread ([`Background`], which `moto.rs` uses too), so sync tests and
//! `#[tokio::test]`s can both use it.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A tokio runtime on a thread of its own, stopped (and joined) on drop:
/// lets sync code run async work, and async tests hold it without dropping
/// a runtime inside theirs.
pub struct Background {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts the runtime's thread (`name` names it).
    pub fn start(name: &str) -> Background {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                tx.send(rt.handle().clone()).unwrap();
                let _ = rt.block_on(stopped);
            })
            .unwrap();
        Background {
            handle: rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The runtime, to spawn on.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `fut` on the runtime and waits for its output (from sync code,
    /// or from an async test: only this thread waits, the work runs there).
    pub fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .expect("the background runtime stopped while running a task")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the proxy does to a matching request instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 503 with EC2's `RequestLimitExceeded` (not forwarded).
    Throttle,
    /// HTTP 500 with `InternalError` (not forwarded).
    ServerError,
    /// HTTP 400 with this EC2 error code (not forwarded).
    Permanent(String),
    /// Forwarded to moto (so the action takes effect), then answered with
    /// HTTP 500 `InternalError`: the call went through but the answer was
    /// lost.
    ForwardThenFail,
}

#[derive(Default)]
struct State {
    /// Queued faults in order: (action, fault, times left).
    queue: Vec<(String, Fault, usize)>,
    /// Requests seen per action.
    seen: HashMap<String, usize>,
}

/// The proxy; stops on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    // Last: the runtime stops after nothing else needs it.
    _bg: Background,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream`
    /// (`127.0.0.1:PORT` or `http://127.0.0.1:PORT`).
    pub fn start(upstream: impl ToString) -> FaultProxy {
        let upstream = upstream.to_string();
        let upstream = upstream
            .strip_prefix("http://")
            .unwrap_or(&upstream)
            .trim_end_matches('/')
            .to_owned();
        let bg = Background::start("fault-proxy");
        let state = Arc::new(Mutex::new(State::default()));
        let listener = bg.run(async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() });
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        bg.handle().spawn(async move {
            let client: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: try again shortly.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let (client, st, upstream) = (client.clone(), st.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, client.clone(), st.clone(), upstream.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FaultProxy { addr, state, _bg: bg }
    }

    /// The proxy's URL (`http://127.0.0.1:PORT`), to use as the EC2 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `fault` for the next `times` requests of `action` (after any
    /// fault already queued for it).
    pub fn push(&self, action: &str, fault: Fault, times: usize) {
        if times > 0 {
            self.state
                .lock()
                .unwrap()
                .queue
                .push((action.to_owned(), fault, times));
        }
    }

    /// The requests of `action` seen so far (faulted or forwarded).
    pub fn seen(&self, action: &str) -> usize {
        self.state.lock().unwrap().seen.get(action).copied().unwrap_or(0)
    }

    /// Forgets the queued faults and the counts.
    pub fn clear(&self) {
        *self.state.lock().unwrap() = State::default();
    }
}

/// The EC2 `Action` of a form-encoded query-protocol body.
fn action_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("")
        .to_owned()
}

/// EC2's XML error answer.
fn ec2_error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>injected by the fault proxy</Message></Error></Errors>\
         <RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn bad_gateway(why: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .body(Full::new(Bytes::from(why)))
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    client: Client<HttpConnector, Full<Bytes>>,
    state: Arc<Mutex<State>>,
    upstream: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(bad_gateway(format!("fault proxy: reading the request: {e}"))),
    };
    let action = action_of(&body);
    let fault = {
        let mut st = state.lock().unwrap();
        *st.seen.entry(action.clone()).or_default() += 1;
        let hit = st.queue.iter().position(|(a, _, _)| *a == action);
        hit.map(|i| {
            let fault = st.queue[i].1.clone();
            st.queue[i].2 -= 1;
            if st.queue[i].2 == 0 {
                st.queue.remove(i);
            }
            fault
        })
    };
    match fault {
        Some(Fault::Throttle) => {
            return Ok(ec2_error(StatusCode::SERVICE_UNAVAILABLE, "RequestLimitExceeded"))
        }
        Some(Fault::ServerError) => return Ok(ec2_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError")),
        Some(Fault::Permanent(code)) => return Ok(ec2_error(StatusCode::BAD_REQUEST, &code)),
        Some(Fault::ForwardThenFail) | None => {}
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut up = Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://{upstream}{path}"));
    for (k, v) in &parts.headers {
        up = up.header(k, v);
    }
    let answer = match client.request(up.body(Full::new(body)).unwrap()).await {
        Ok(a) => a,
        Err(e) => return Ok(bad_gateway(format!("fault proxy: forwarding to {upstream}: {e}"))),
    };
    let (aparts, abody) = answer.into_parts();
    let abody = match abody.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(bad_gateway(format!("fault proxy: reading the answer: {e}"))),
    };
    if fault == Some(Fault::ForwardThenFail) {
        return Ok(ec2_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"));
    }
    let mut out = Response::builder().status(aparts.status);
    for (k, v) in &aparts.headers {
        // The body is whole now: hyper sets its length.
        if k != "transfer-encoding" && k != "content-length" && k != "connection" {
            out = out.header(k, v);
        }
    }
    Ok(out.body(Full::new(abody)).unwrap())
}

#[cfg(test)]
mod tests {
    use super::action_of;

    #[test]
    fn the_action_is_read_from_the_form_body() {
        assert_eq!(
            action_of(b"Action=RunInstances&Version=2016-11-15&MinCount=1"),
            "RunInstances"
        );
        assert_eq!(
            action_of(b"Version=2016-11-15&Action=DescribeInstances"),
            "DescribeInstances"
        );
        assert_eq!(action_of(b"no action here"), "");
    }
}
