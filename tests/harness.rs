//! Test harness for NovaCron's end-to-end tests: starts real
//! `novacron-server` and `novacron-agent` processes in temporary
//! directories, talks to the API over HTTPS (verifying the server's
//! certificate against that server's fleet CA; plain HTTP only for a server
//! configured with `[api] plaintext`), and opens raw QUIC connections for
//! the bad-peer cases. The API client (HTTP, SSE, TLS trust, network
//! namespaces) is in `harness/http.rs`; the libvirt test bed (namespaced
//! hosts, the HA bed, `virsh`, log reading) in `harness/testbed.rs`. This
//! file keeps the processes (`Server`, `Agent`), the raw QUIC peer and the
//! waiting helpers every test uses.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! `make test` does); a missing binary is a loud failure, never a skip.

#![allow(clippy::unwrap_used)]
// The harness drives real server, agent and libvirtd processes, which keep
// real time: waiting on them needs the OS clock and real sleeps.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use novacron_shared::framing::{self, FramedRecv, MAX_FRAME_LEN};
use novacron_shared::protocol::{AgentMessage, Hello, ServerMessage, HANDSHAKE_VERSION};

/// The path of a workspace binary next to the test executable (one
/// directory above it; for a benchmark binary, in its own directory).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    if let Some(p) = exe.parent().map(|d| d.join(name)).filter(|p| p.exists()) {
        return p;
    }
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (make test does)",
        p.display()
    );
    p
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`
/// with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` every 50 ms for `period` and panics with `what` and the
/// reason `check` gives the first time it fails: a condition that must hold
/// all along, checked more often than a single look after a sleep would.
pub fn assert_holds(what: &str, period: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        if let Err(why) = check() {
            panic!("{what} stopped holding after {:?}: {why}", start.elapsed());
        }
        if start.elapsed() >= period {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the OS wall clock reads at least `t`: for deadlines a real
/// process keeps by the wall clock (token and certificate expiry).
pub fn wait_until_wall(t: SystemTime) {
    while SystemTime::now() < t {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real process stays away (or a real guest runs) for `d`: the outage
/// itself is what a test needs, not a condition it could poll.
pub fn let_real_time_pass(d: Duration) {
    std::thread::sleep(d);
}

/// `novacron-server -c CONFIG init`, then the admin token (from `data`)
/// and the CA fingerprint.
fn init_server(config: &Path, data: &Path) -> (String, String) {
    let out = Command::new(bin("novacron-server"))
        .arg("-c")
        .arg(config)
        .arg("init")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let fp = Command::new(bin("novacron-server"))
        .arg("-c")
        .arg(config)
        .args(["ca", "fingerprint"])
        .output()
        .unwrap();
    (token, String::from_utf8_lossy(&fp.stdout).trim().to_string())
}

/// A server process with its own data directory.
pub struct Server {
    /// Holds the data directory and logs.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    child: Option<Child>,
    /// The QUIC address.
    pub quic: SocketAddr,
    /// The API address.
    pub api: SocketAddr,
    /// The admin token.
    pub token: String,
    /// The CA fingerprint.
    pub fingerprint: String,
    starts: u32,
    /// The network namespace it runs in (`None`: this process's).
    netns: Option<String>,
    /// Extra environment for the next runs (see [`Server::restart_with_env`]).
    env: Vec<(String, String)>,
}

impl Server {
    /// Initialises a data directory and starts the server. `agents_toml` is
    /// appended to the `[agents]` table of the config.
    pub fn start(agents_toml: &str) -> Server {
        Server::start_with(agents_toml, "", "")
    }

    /// Like [`Server::start`], with `api_toml` added to the `[api]` table
    /// and `extra_toml` (whole tables) at the end of the config.
    pub fn start_with(agents_toml: &str, api_toml: &str, extra_toml: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("server.toml");
        let text = format!(
            "data_dir = \"{}\"\n[quic]\nlisten = \"127.0.0.1:0\"\n[api]\n{api_toml}\nlisten = \"127.0.0.1:0\"\n[agents]\n{agents_toml}\n{extra_toml}\n",
            dir.path().join("data").display()
        );
        std::fs::write(&config, text).unwrap();
        let (token, fingerprint) = init_server(&config, &dir.path().join("data"));
        let mut s = Server {
            dir,
            config,
            child: None,
            quic: "0.0.0.0:0".parse().unwrap(),
            api: "0.0.0.0:0".parse().unwrap(),
            token,
            fingerprint,
            starts: 0,
            netns: None,
            env: Vec::new(),
        };
        s.spawn();
        // Pin the ports so that restarts come back on the same addresses.
        let text = std::fs::read_to_string(&s.config)
            .unwrap()
            .replace(
                "listen = \"127.0.0.1:0\"\n[api]",
                &format!("listen = \"{}\"\n[api]", s.quic),
            )
            .replace(
                "listen = \"127.0.0.1:0\"\n[agents]",
                &format!("listen = \"{}\"\n[agents]", s.api),
            );
        std::fs::write(&s.config, text).unwrap();
        s
    }

    /// Like [`Server::start_with`], inside the network namespace `netns`:
    /// the agent link listens on `quic_ip` (also in its certificate's
    /// names), the API on that namespace's loopback (this harness's API
    /// calls reach it there, see [`connect_in_netns`]).
    pub fn start_in_netns(netns: &str, quic_ip: &str, agents_toml: &str, extra_toml: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("server.toml");
        let data = dir.path().join("data");
        let text = |quic: &str, api: &str| {
            format!(
                "data_dir = \"{}\"\n[quic]\nlisten = \"{quic}\"\nserver_names = [\"localhost\", \"127.0.0.1\", \"{quic_ip}\"]\n[api]\nlisten = \"{api}\"\n[agents]\n{agents_toml}\n{extra_toml}\n",
                data.display()
            )
        };
        std::fs::write(&config, text(&format!("{quic_ip}:0"), "127.0.0.1:0")).unwrap();
        let (token, fingerprint) = init_server(&config, &dir.path().join("data"));
        let mut s = Server {
            config: config.clone(),
            child: None,
            quic: "0.0.0.0:0".parse().unwrap(),
            api: "0.0.0.0:0".parse().unwrap(),
            token,
            fingerprint,
            starts: 0,
            netns: Some(netns.to_string()),
            env: Vec::new(),
            dir,
        };
        s.spawn();
        // Pin the ports so that restarts come back on the same addresses.
        std::fs::write(&config, text(&s.quic.to_string(), &s.api.to_string())).unwrap();
        s
    }

    /// The network namespace the server runs in, if not this process's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The current log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.starts))
    }

    /// Everything the server logged in all its runs.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                let p = self.dir.path().join(format!("server-{i}.log"));
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
            })
            .collect()
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = in_netns(self.netns.as_deref(), &bin("novacron-server"))
            .arg("-c")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info,novacron_server=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let path = self.log_path();
        let (q, a, https) = wait_for("server to start", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&path).ok()?;
            let line = text.lines().find(|l| l.contains("novacron-server started"))?;
            let field = |k: &str| -> Option<SocketAddr> {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
            };
            let https = line.contains("api=https://");
            Some((field("quic_addr=")?, field("api_addr=")?, https))
        });
        self.quic = q;
        self.api = a;
        match &self.netns {
            Some(ns) => netns_servers().lock().unwrap().insert(a, ns.clone()),
            None => netns_servers().lock().unwrap().remove(&a),
        };
        let mut servers = tls_servers().lock().unwrap();
        if https {
            servers.insert(a, tls_client(&self.ca_file()));
        } else {
            servers.remove(&a);
        }
    }

    /// Starts the server again after [`Server::kill9`].
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Starts the server again after [`Server::kill9`] with `env` set (and
    /// only it: an empty `env` clears what an earlier call set).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.spawn();
    }

    /// SIGKILLs the server.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The fleet CA (PEM): what the API's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("data/ca.pem")
    }

    /// The API's URL: `https://ADDR` (`http://` for a plain-text server).
    pub fn api_url(&self) -> String {
        if tls_servers().lock().unwrap().contains_key(&self.api) {
            format!("https://{}", self.api)
        } else {
            format!("http://{}", self.api)
        }
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Runs `novacron-server -c CONFIG ARGS…`.
    pub fn cli(&self, args: &[&str]) -> Output {
        in_netns(self.netns.as_deref(), &bin("novacron-server"))
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// A fresh join token.
    pub fn join_token(&self, ttl: &str) -> String {
        let out = self.cli(&["token", "create", "--ttl", ttl]);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// GET with the admin token.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (status, v) = http(self.api, "GET", path, Some(&self.token), None);
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// A call with the admin token and a JSON body.
    pub fn send(&self, method: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        http(self.api, method, path, Some(&self.token), Some(&body.to_string()))
    }

    /// The host record for `id`.
    pub fn host(&self, id: &str) -> serde_json::Value {
        self.get(&format!("/v1/hosts/{id}"))
    }

    /// Waits until host `id` has `connected == want`.
    pub fn wait_connected(&self, id: &str, want: bool) -> serde_json::Value {
        wait_for(
            &format!("host {id} connected == {want}"),
            Duration::from_secs(30),
            || {
                let h = self.host(id);
                (h["connected"] == want).then_some(h)
            },
        )
    }

    /// The fleet CA, loaded from the data directory (to forge test certificates).
    pub fn ca(&self) -> novacron_shared::pki::FleetCa {
        let d = self.dir.path().join("data");
        novacron_shared::pki::FleetCa::from_pem(
            &std::fs::read_to_string(d.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(d.join("ca.key")).unwrap(),
        )
        .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An agent with its own data directory, on a libvirt test-driver host.
pub struct Agent {
    /// Holds the data directory and logs.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// The host id, once joined.
    pub host_id: String,
    /// The network namespace it joins and runs in (`None`: this process's).
    netns: Option<String>,
}

impl Agent {
    /// A new, not yet enrolled agent called `name` on `test:///default`.
    pub fn new(name: &str) -> Agent {
        Agent::on(name, "test:///default", "")
    }

    /// A new agent on libvirt `uri`, with `vms_toml` appended to its
    /// `[vms]` table (its storage pool and console logs live in its own
    /// directory unless `vms_toml` says otherwise).
    ///
    /// Its peer witness listens on an ephemeral loopback port: several
    /// agents share this network namespace, and only one could bind the
    /// default port.
    pub fn on(name: &str, uri: &str, vms_toml: &str) -> Agent {
        Agent::with_witness(name, uri, vms_toml, "\n[witness]\nlisten = \"127.0.0.1:0\"\n")
    }

    /// [`Agent::on`] with `witness_toml` (a `[witness]` table, or nothing
    /// for its defaults) at the end of the config.
    fn with_witness(name: &str, uri: &str, vms_toml: &str, witness_toml: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        let mut vms = String::from(vms_toml);
        if !vms.contains("storage_path") {
            vms.push_str(&format!(
                "\nstorage_path = \"{}\"",
                dir.path().join("pool").display()
            ));
        }
        if !vms.contains("console_log_dir") {
            vms.push_str(&format!("\nconsole_log_dir = \"{}\"", dir.path().display()));
        }
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nlibvirt_uri = \"{uri}\"\nhostname = \"{name}\"\n[vms]\n{vms}\n{witness_toml}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        Agent {
            dir,
            config,
            child: None,
            starts: 0,
            host_id: String::new(),
            netns: None,
        }
    }

    /// Like [`Agent::on`], for an agent that joins and runs inside the
    /// network namespace `netns` (a test-bed host's: `ip netns pids` lists
    /// it with that host's daemons, and cutting the host's link cuts it).
    /// Its peer witness listens on the default port, on the host's address.
    pub fn in_netns(netns: &str, name: &str, uri: &str, vms_toml: &str) -> Agent {
        let mut a = Agent::with_witness(name, uri, vms_toml, "");
        a.netns = Some(netns.to_string());
        a
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every run's log, in order.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                let p = self.dir.path().join(format!("agent-{i}.log"));
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
            })
            .collect()
    }

    /// The agent's data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `join`; returns the process output (does not assert success).
    pub fn try_join(&self, server: &Server, token: &str, fingerprint: &str) -> Output {
        in_netns(self.netns.as_deref(), &bin("novacron-agent"))
            .arg("-c")
            .arg(&self.config)
            .args([
                "join",
                "--force",
                "--server",
                &server.quic.to_string(),
                "--token",
                token,
                "--ca-fingerprint",
                fingerprint,
            ])
            .output()
            .unwrap()
    }

    /// Joins with a fresh token and remembers the host id.
    pub fn join(&mut self, server: &Server) {
        let token = server.join_token("10m");
        let out = self.try_join(server, &token, &server.fingerprint);
        assert!(
            out.status.success(),
            "join failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        self.host_id = text
            .split_whitespace()
            .skip_while(|w| *w != "host")
            .nth(1)
            .expect("host id in join output")
            .to_string();
    }

    /// Starts `run` with extra arguments.
    pub fn start(&mut self, extra: &[&str]) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = in_netns(self.netns.as_deref(), &bin("novacron-agent"))
            .arg("-c")
            .arg(&self.config)
            .arg("run")
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("NOVACRON_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The current log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("agent-{}.log", self.starts))
    }

    /// The current run's log (empty before the first start).
    pub fn log(&self) -> String {
        if self.starts == 0 {
            return String::new();
        }
        let p = self.log_path();
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
    }

    /// SIGKILLs the agent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The certificate's serial, read from the identity file.
    pub fn cert_serial(&self) -> String {
        let id = novacron_agent::identity::Identity::load(&novacron_agent::identity::Paths::new(self.data()))
            .unwrap();
        novacron_shared::pki::CertInfo::parse(&id.cert_der)
            .unwrap()
            .serial
    }

    /// The agent's identity.
    pub fn identity(&self) -> novacron_agent::identity::Identity {
        novacron_agent::identity::Identity::load(&novacron_agent::identity::Paths::new(self.data())).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Opens a raw QUIC connection to `addr` with `cfg`.
pub async fn raw_connect(
    addr: SocketAddr,
    cfg: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, addr, "localhost").unwrap().await?;
    Ok((ep, conn))
}

/// Sends a hello on a new control stream and returns the first reply, or
/// the error that ended the connection.
pub async fn hello(
    conn: &quinn::Connection,
    versions: (u16, u16),
) -> Result<(quinn::SendStream, FramedRecv, ServerMessage), String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut recv = FramedRecv::new(recv, MAX_FRAME_LEN);
    let msg = AgentMessage::Hello(Hello {
        min_version: versions.0,
        max_version: versions.1,
        agent_version: "test".into(),
        hostname: "raw".into(),
    });
    let mut buf = Vec::new();
    framing::write_frame(&mut send, HANDSHAKE_VERSION, &msg, &mut buf)
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(15), recv.next::<ServerMessage>()).await {
        Ok(Ok(Some((_, m)))) => Ok((send, recv, m)),
        Ok(Ok(None)) => Err("stream finished".into()),
        Ok(Err(e)) => Err(format!("{e}: {:?}", conn.close_reason())),
        Err(_) => Err("timeout".into()),
    }
}

/// The error code a closed connection was closed with, if it was one of ours.
pub async fn close_code(conn: &quinn::Connection) -> Option<novacron_shared::protocol::ErrorCode> {
    match tokio::time::timeout(Duration::from_secs(15), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(ac)) => {
            novacron_shared::protocol::ErrorCode::from_close_code(ac.error_code.into_inner())
        }
        _ => None,
    }
}

#[path = "harness/http.rs"]
mod http;
pub use http::{connect_in_netns, http, http_text, sse, tls_client, Conn, Sse};
use http::{in_netns, netns_servers, tls_servers};
#[path = "harness/stamps.rs"]
pub mod stamps;
#[path = "harness/testbed.rs"]
mod testbed;
pub use testbed::*;
// The moto harness and the fault proxy (`harness/moto.rs`,
// `harness/faultproxy.rs`) are not modules of this library: they link the
// EC2 SDK, so only the test binaries that need them include them
// (`#[path]` modules in `ec2.rs` and `burst.rs`).
