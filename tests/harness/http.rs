//! Reaching what the harness starts: the TLS trust of each HTTPS server
//! this process started (its own fleet CA only), sockets and programs
//! inside a server's network namespace, a minimal HTTP/1.1 client for the
//! API and a server-sent events reader. Processes (`Server`, `Agent`) are
//! in the harness library's root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The TLS client configs of the HTTPS servers this process started, by
/// API address (each trusts only its own server's fleet CA).
pub(crate) fn tls_servers(
) -> &'static std::sync::Mutex<std::collections::HashMap<SocketAddr, std::sync::Arc<rustls::ClientConfig>>> {
    static SERVERS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<SocketAddr, std::sync::Arc<rustls::ClientConfig>>>,
    > = std::sync::OnceLock::new();
    SERVERS.get_or_init(Default::default)
}

/// The network namespaces of the servers this process started inside one
/// (`Server::start_in_netns`), by API address.
pub(crate) fn netns_servers() -> &'static std::sync::Mutex<std::collections::HashMap<SocketAddr, String>> {
    static SERVERS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<SocketAddr, String>>> =
        std::sync::OnceLock::new();
    SERVERS.get_or_init(Default::default)
}

/// A TCP connection to `addr` opened from inside the network namespace
/// `ns` (`/run/netns/NS`, as `ip netns` names it): a helper thread enters
/// the namespace, connects and ends; the socket stays in that namespace.
pub fn connect_in_netns(ns: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}

/// `ip netns exec NS PROGRAM`: the program runs in that network namespace
/// (same pid: `ip` execs it), with everything else of this process.
pub(crate) fn in_netns(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        None => Command::new(program),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
    }
}

/// A TLS client config trusting only the CA certificates in `ca_pem`.
pub fn tls_client(ca_pem: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    let pem =
        std::fs::read_to_string(ca_pem).unwrap_or_else(|e| panic!("cannot read {}: {e}", ca_pem.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in novacron_shared::pki::certs_from_pem(&pem).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    std::sync::Arc::new(cfg)
}

/// A connection to an API: TLS when the server at `addr` serves HTTPS.
pub enum Conn {
    /// Plain HTTP.
    Plain(TcpStream),
    /// HTTPS.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    /// Connects to the API at `addr` (HTTPS if a server this harness
    /// started there serves it).
    pub fn open(addr: SocketAddr) -> Conn {
        let ns = netns_servers().lock().unwrap().get(&addr).cloned();
        let tcp = match ns {
            None => TcpStream::connect(addr).expect("connect to API"),
            Some(ns) => connect_in_netns(&ns, addr)
                .unwrap_or_else(|e| panic!("connect to API {addr} in network namespace {ns}: {e}")),
        };
        let cfg = tls_servers().lock().unwrap().get(&addr).cloned();
        match cfg {
            None => Conn::Plain(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let conn = rustls::ClientConnection::new(cfg, name).unwrap();
                Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        }
    }

    /// The TCP stream under it (for timeouts).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(t) => t,
            Conn::Tls(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(t) => t.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(t) => t.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(t) => t.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// A minimal HTTP/1.1 call; returns status and JSON body (`null` for an
/// empty body, the text as a JSON string when it is not JSON).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, text) = request(addr, method, path, token, body.unwrap_or(""));
    let value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    (status, value)
}

/// A minimal HTTP/1.1 call; returns status and the body as text.
pub fn http_text(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    request(addr, method, path, token, "")
}

fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = Conn::open(addr);
    s.tcp().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        // The server closes after `Connection: close` without a TLS
        // close_notify; everything it sent has arrived.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => panic!("reading the API's reply to {method} {path}: {e}"),
    }
    let out = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// A server-sent events stream read off a raw socket.
pub struct Sse {
    stream: Conn,
    buf: String,
}

/// Opens `GET path` as an event stream with `token`.
pub fn sse(addr: SocketAddr, token: &str, path: &str) -> Sse {
    let mut stream = Conn::open(addr);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    Sse {
        stream,
        buf: String::new(),
    }
}

impl Sse {
    /// The next event as (event name, data), or `None` after `timeout`.
    /// Chunk-size lines of the chunked encoding are skipped.
    pub fn next_event(&mut self, timeout: Duration) -> Option<(String, String)> {
        let start = Instant::now();
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    let line = line.trim_end_matches('\r');
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.to_string());
                    }
                }
                if let (Some(n), Some(d)) = (name, data) {
                    return Some((n, d));
                }
            }
            let left = timeout.checked_sub(start.elapsed())?;
            self.stream
                .tcp()
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))
                .unwrap();
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(_) => {
                    if start.elapsed() >= timeout {
                        return None;
                    }
                }
            }
        }
    }
}
