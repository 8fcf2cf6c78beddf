//! `fleet-sim`: a NovaCron fleet simulator.
//!
//! Starts a real `novacron-server` in a child process (fresh temporary data
//! directory, 127.0.0.1 ports picked free), creates one join token per
//! simulated agent through the HTTP API, enrolls every agent through the real
//! join path (own key, CSR, certificate), opens one mutual-TLS QUIC session
//! per agent (spread over a few client endpoints in this process) and
//! heartbeats. It then measures a steady window and prints plain text: join
//! to first heartbeat ack, sessions the server reports, ack rate, missed
//! acks, and the server process's RSS and CPU read from `/proc`. Everything
//! is torn down at the end: sessions closed, server stopped by its PID,
//! temporary directory removed.
//!
//! One file, one job: every part (the server process, the simulated agents'
//! enrollment and sessions, their metric streams, the exposition reader, the
//! report) exists only for this one measurement and is read top to bottom
//! as one run; the pieces other benchmarks share live in `benches/src/lib.rs`.

// A benchmark times real processes (server, agents, libvirtd, QEMU) by the
// OS clock and waits on them in real time: the clock rule does not apply.
#![allow(clippy::disallowed_methods)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hyper::Method;
use novacron_agent::identity::Identity;
use novacron_agent::link::{self, LinkConfig};
use novacron_bench::{
    clock_ticks_per_sec, load_average, machine_description, mib, udp_rcvbuf_errors, udp_socket_drops,
    MachineTicks, ProcSample, Summary,
};
use novacron_server::client;
use novacron_server::datadir::DataDir;
use novacron_shared::framing::{self, FrameError, FramedRecv, MAX_FRAME_LEN};
use novacron_shared::protocol::{
    AgentMessage, ErrorCode, Heartbeat, Hello, ServerMessage, HANDSHAKE_VERSION, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};
use tokio::sync::watch;

/// Idle timeout of a simulated agent's QUIC connection (as the real agent).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a handshake, or for the welcome after the hello.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The name the server certificate carries and the agents dial.
const SERVER_NAME: &str = "localhost";
/// Time allowed for one API call.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Simulates a fleet of NovaCron agents against a real server process and
/// reports what the server costs.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Number of simulated agents (each enrolls and holds one session).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds of steady heartbeating to measure once the fleet is connected.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Agents started (join, then connect) per second during the ramp.
    #[arg(long, default_value_t = 500.0)]
    ramp_per_sec: f64,
    /// Heartbeat interval configured on the server (and so used by agents), ms.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Simulated agents sharing one client QUIC endpoint (UDP socket).
    #[arg(long, default_value_t = 256)]
    agents_per_endpoint: usize,
    /// Receive buffer requested for each client endpoint's socket, KiB (0: kernel default).
    #[arg(long, default_value_t = 4096)]
    client_rcvbuf_kib: usize,
    /// Concurrent API calls while creating the join tokens.
    #[arg(long, default_value_t = 8)]
    token_concurrency: usize,
    /// Seconds to wait for every agent's first heartbeat ack before measuring anyway.
    #[arg(long, default_value_t = 180)]
    ramp_timeout: u64,
    /// Copy the server's log here before the temporary directory is removed.
    #[arg(long)]
    keep_server_log: Option<PathBuf>,
    /// Stream metrics too: simulated VMs per agent (0: heartbeats only).
    /// Each agent sends the real host layout (28 series) plus 10 series per VM.
    #[arg(long, default_value_t = 0)]
    metrics_vms: usize,
    /// Stream host metrics even with --metrics-vms 0.
    #[arg(long)]
    metrics: bool,
    /// Sampling interval of the simulated agents, ms (batches go out once a second, as the agent does).
    #[arg(long, default_value_t = 1000)]
    metrics_interval_ms: u64,
}

impl Args {
    fn metrics_on(&self) -> bool {
        self.metrics || self.metrics_vms > 0
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-sim: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-sim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(args: Args) -> anyhow::Result<()> {
    if args.agents == 0 || args.agents_per_endpoint == 0 || args.token_concurrency == 0 {
        bail!("--agents, --agents-per-endpoint and --token-concurrency must be at least 1");
    }
    if args.ramp_per_sec.is_nan() || args.ramp_per_sec <= 0.0 {
        bail!("--ramp-per-sec must be positive");
    }
    let mut server = ServerProc::start(&args)?;
    server.wait_ready().await?;
    let outcome = tokio::select! {
        r = simulate(&args, &mut server) => r,
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C").and_then(|()| bail!("interrupted")),
    };
    let log = server.stop();
    if let Some(log) = log {
        println!(
            "server log: {} lines, {} WARN, {} ERROR",
            log.lines, log.warn, log.error
        );
        for l in &log.examples {
            println!("  {l}");
        }
    }
    outcome
}

// ---------------------------------------------------------------------------
// The server child process.

/// A `novacron-server run` child with its temporary directory; stopped and
/// cleaned up on drop.
struct ServerProc {
    child: Child,
    root: PathBuf,
    log: PathBuf,
    keep_log: Option<PathBuf>,
    quic: SocketAddr,
    api: SocketAddr,
    admin_token: String,
    fingerprint: String,
    stopped: bool,
}

/// What the server logged.
struct LogSummary {
    lines: usize,
    warn: usize,
    error: usize,
    examples: Vec<String>,
}

impl ServerProc {
    fn start(args: &Args) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the current executable")?;
        let bin = exe
            .parent()
            .map(|d| d.join("novacron-server"))
            .context("executable has no directory")?;
        if !bin.exists() {
            bail!(
                "{} is missing; build it next to fleet-sim: cargo build --release -p novacron-bench -p novacron-server --bins",
                bin.display()
            );
        }
        let root = std::env::temp_dir().join(format!("novacron-fleet-sim-{}", std::process::id()));
        if root.exists() {
            std::fs::remove_dir_all(&root).with_context(|| format!("cannot clear {}", root.display()))?;
        }
        std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        match Self::init_and_spawn(args, &bin, &root) {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                Err(e)
            }
        }
    }

    fn init_and_spawn(args: &Args, bin: &Path, root: &Path) -> anyhow::Result<Self> {
        let quic = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        let api = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let data = root.join("data");
        let hb = args.heartbeat_ms;
        let timeout_ms = (3 * hb).max(10_000);
        let config = root.join("server.toml");
        let text = format!(
            "data_dir = {data}\n\n[quic]\nlisten = \"{quic}\"\nserver_names = [\"localhost\", \"127.0.0.1\"]\n\n\
             [api]\nlisten = \"{api}\"\n# The simulator is the only client, on loopback; the API's TLS is not what it measures.\nplaintext = true\nrate_limit = 0\n\n[agents]\nheartbeat_interval = \"{hb}ms\"\nsession_timeout = \"{timeout_ms}ms\"\n",
            data = serde_json::to_string(&data.display().to_string())?,
        );
        std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
        let init = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("init")
            .env("NO_COLOR", "1")
            .output()
            .with_context(|| format!("cannot run {} init", bin.display()))?;
        if !init.status.success() {
            bail!(
                "novacron-server init failed ({}): {}",
                init.status,
                String::from_utf8_lossy(&init.stderr)
            );
        }
        let dd = DataDir::new(&data);
        let fingerprint = dd.ca_fingerprint()?;
        let admin_token = dd.read_admin_token()?;
        let log = root.join("server.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {} run", bin.display()))?;
        Ok(Self {
            child,
            root: root.to_path_buf(),
            log,
            keep_log: args.keep_server_log.clone(),
            quic,
            api,
            admin_token,
            fingerprint,
            stopped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the server's log if the server has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the server exited ({status}); its log ends with:\n{}",
                tail.join("\n")
            );
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_alive()?;
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), self.call(Method::GET, "/healthz", None)).await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the server API at {} did not answer within 20s", self.api);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let r = tokio::time::timeout(
            API_TIMEOUT,
            client::call(
                client::ApiUrl::plain(self.api),
                None,
                &self.admin_token,
                method,
                path,
                body,
            ),
        )
        .await
        .with_context(|| format!("{path}: no answer within {API_TIMEOUT:?}"))?;
        Ok(r?)
    }

    /// The server's Prometheus exposition.
    async fn exposition(&self) -> anyhow::Result<Exposition> {
        let text = client::ApiClient::new(client::ApiUrl::plain(self.api), None)
            .with_timeout(API_TIMEOUT)
            .text("/metrics")
            .await?;
        Ok(Exposition::parse(&text))
    }

    /// `(connected, total)` hosts as the server's API reports them.
    async fn hosts(&self) -> anyhow::Result<(usize, usize)> {
        let v = self.call(Method::GET, "/v1/hosts", None).await?;
        let hosts = v["hosts"].as_array().context("GET /v1/hosts: no hosts array")?;
        let connected = hosts
            .iter()
            .filter(|h| h["connected"].as_bool() == Some(true))
            .count();
        Ok((connected, hosts.len()))
    }

    /// SIGTERM, then SIGKILL after 5 s; summarises the log; removes the
    /// temporary directory. Idempotent.
    fn stop(&mut self) -> Option<LogSummary> {
        if self.stopped {
            return None;
        }
        self.stopped = true;
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!("fleet-sim: server did not stop on SIGTERM within 5s; killing it");
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let summary = std::fs::read_to_string(&self.log)
            .ok()
            .map(|text| summarise_log(&text));
        if let Some(keep) = &self.keep_log {
            if let Err(e) = std::fs::copy(&self.log, keep) {
                eprintln!("fleet-sim: cannot copy the server log to {}: {e}", keep.display());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            eprintln!("fleet-sim: cannot remove {}: {e}", self.root.display());
        }
        summary
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn summarise_log(text: &str) -> LogSummary {
    let mut s = LogSummary {
        lines: 0,
        warn: 0,
        error: 0,
        examples: Vec::new(),
    };
    for line in text.lines() {
        s.lines += 1;
        let is_warn = line.contains(" WARN ");
        let is_error = line.contains(" ERROR ");
        s.warn += usize::from(is_warn);
        s.error += usize::from(is_error);
        if (is_warn || is_error) && s.examples.len() < 5 {
            s.examples.push(line.chars().take(240).collect());
        }
    }
    s
}

// ---------------------------------------------------------------------------
// The simulated agents.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Heartbeat.
    Run,
    /// Stop sending; keep reading acks still in flight.
    Drain,
    /// Close the sessions.
    Stop,
}

#[derive(Debug, Default)]
struct Counters {
    joined: AtomicU64,
    join_failed: AtomicU64,
    live: AtomicU64,
    first_acks: AtomicU64,
    sent: AtomicU64,
    acks: AtomicU64,
    reconnects: AtomicU64,
    metric_acks: AtomicU64,
}

struct Shared {
    endpoints: Vec<quinn::Endpoint>,
    per_endpoint: usize,
    quic: SocketAddr,
    fingerprint: String,
    counters: Counters,
    errors: Mutex<HashMap<String, u64>>,
    measuring: AtomicBool,
    metrics: Option<MetricsSim>,
}

/// What every simulated agent streams.
#[derive(Debug, Clone, Copy)]
struct MetricsSim {
    vms: usize,
    interval_ms: u64,
}

impl Shared {
    fn error(&self, e: &str) {
        let key: String = e.chars().take(200).collect();
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

/// What one simulated agent saw.
#[derive(Debug, Default)]
struct AgentReport {
    /// `link::join` round trip.
    join: Option<Duration>,
    /// Connect, hello, welcome (first session).
    welcome: Option<Duration>,
    /// From the start of the join to the first heartbeat ack.
    first_ack: Option<Duration>,
    sent: u64,
    acked: u64,
    /// Heartbeat round trips during the steady window.
    rtts: Vec<Duration>,
}

/// Counts a live session for as long as it exists.
struct LiveGuard<'a>(&'a AtomicU64);

impl<'a> LiveGuard<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Relaxed);
        Self(c)
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn agent(i: usize, token: String, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) -> AgentReport {
    let mut rep = AgentReport::default();
    let t0 = Instant::now();
    let cfg = LinkConfig::new(sh.quic.to_string(), SERVER_NAME.into(), format!("sim-{i:05}"));
    let identity = match link::join(&cfg, &token, &sh.fingerprint, novacron_agent::VERSION).await {
        Ok(id) => id,
        Err(e) => {
            sh.counters.join_failed.fetch_add(1, Relaxed);
            sh.error(&format!("join: {}", link::error_chain(&e)));
            return rep;
        }
    };
    rep.join = Some(t0.elapsed());
    sh.counters.joined.fetch_add(1, Relaxed);
    let client_cfg = match identity.client_config(IDLE_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            sh.error(&format!("client config: {}", link::error_chain(&e)));
            return rep;
        }
    };
    let ep = &sh.endpoints[(i / sh.per_endpoint).min(sh.endpoints.len() - 1)];
    while *phase.borrow() == Phase::Run {
        let r = session(
            &sh,
            ep,
            &client_cfg,
            &cfg.hostname,
            &identity,
            t0,
            &mut rep,
            &mut phase,
        )
        .await;
        if *phase.borrow() != Phase::Run {
            break;
        }
        sh.error(&r.err().unwrap_or_else(|| "session ended".into()));
        sh.counters.reconnects.fetch_add(1, Relaxed);
        let delay = Duration::from_millis(500 + (i as u64 * 7919) % 1000);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = phase.changed() => {}
        }
    }
    rep
}

#[allow(clippy::too_many_arguments)]
async fn session(
    sh: &Shared,
    ep: &quinn::Endpoint,
    client_cfg: &quinn::ClientConfig,
    hostname: &str,
    identity: &Identity,
    t0: Instant,
    rep: &mut AgentReport,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), String> {
    let t = Instant::now();
    let connecting = ep
        .connect_with(client_cfg.clone(), sh.quic, SERVER_NAME)
        .map_err(|e| format!("connect: {e}"))?;
    let conn = tokio::time::timeout(OPEN_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("connect: no handshake within {OPEN_TIMEOUT:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    let r = heartbeat(sh, &conn, hostname, identity, t, t0, rep, phase).await;
    conn.close(0u32.into(), b"simulated agent done");
    r.map_err(|e| describe_close(&conn, e))
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat(
    sh: &Shared,
    conn: &quinn::Connection,
    hostname: &str,
    identity: &Identity,
    t: Instant,
    t0: Instant,
    rep: &mut AgentReport,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| format!("open stream: {e}"))?;
    let mut recv = FramedRecv::new(recv, MAX_FRAME_LEN);
    let mut buf = Vec::new();
    let hello = AgentMessage::Hello(Hello {
        min_version: PROTOCOL_VERSION_MIN,
        max_version: PROTOCOL_VERSION_MAX,
        agent_version: novacron_agent::VERSION.into(),
        hostname: hostname.into(),
    });
    framing::write_frame(&mut send, HANDSHAKE_VERSION, &hello, &mut buf)
        .await
        .map_err(|e| frame_err("hello", &e))?;
    let welcome = match tokio::time::timeout(OPEN_TIMEOUT, recv.next::<ServerMessage>()).await {
        Err(_) => return Err(format!("no welcome within {OPEN_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(frame_err("welcome", &e)),
        Ok(Ok(None)) => return Err("the server ended the stream before the welcome".into()),
        Ok(Ok(Some((_, ServerMessage::Welcome(w))))) => w,
        Ok(Ok(Some((_, ServerMessage::Error(e))))) => return Err(format!("refused: {e}")),
        Ok(Ok(Some((_, other)))) => return Err(format!("expected a welcome, got {other:?}")),
    };
    if welcome.host_id != identity.host_id {
        return Err("the welcome names another host id".into());
    }
    rep.welcome.get_or_insert(t.elapsed());
    let _live = LiveGuard::new(&sh.counters.live);
    let version = welcome.version;
    let _metrics = sh.metrics.map(|m| {
        let conn = conn.clone();
        let seed = identity.host_id.0 as u64;
        let task = tokio::spawn(stream_metrics(m, conn, version, seed, phase.clone()));
        AbortOnDrop(task)
    });
    let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut inflight: VecDeque<(u64, Instant)> = VecDeque::new();
    loop {
        let sending = *phase.borrow() == Phase::Run;
        tokio::select! {
            _ = ticker.tick(), if sending => {
                seq += 1;
                let hb = AgentMessage::Heartbeat(Heartbeat { seq, lease_left_ms: None });
                framing::write_frame(&mut send, version, &hb, &mut buf).await.map_err(|e| frame_err("heartbeat", &e))?;
                inflight.push_back((seq, Instant::now()));
                rep.sent += 1;
                sh.counters.sent.fetch_add(1, Relaxed);
            }
            frame = recv.next::<ServerMessage>() => match frame {
                Ok(Some((_, ServerMessage::HeartbeatAck(ack)))) => {
                    while let Some(&(s, at)) = inflight.front() {
                        if s > ack.seq {
                            break;
                        }
                        inflight.pop_front();
                        if s == ack.seq && sh.measuring.load(Relaxed) {
                            rep.rtts.push(at.elapsed());
                        }
                    }
                    rep.acked += 1;
                    sh.counters.acks.fetch_add(1, Relaxed);
                    if rep.first_ack.is_none() {
                        rep.first_ack = Some(t0.elapsed());
                        sh.counters.first_acks.fetch_add(1, Relaxed);
                    }
                }
                Ok(Some((_, ServerMessage::MetricsAck(a)))) => {
                    let _ = a;
                    sh.counters.metric_acks.fetch_add(1, Relaxed);
                }
                Ok(Some((_, ServerMessage::Error(e)))) => return Err(format!("server error frame: {e}")),
                Ok(Some(_)) => {}
                Ok(None) => return Err("the server ended the control stream".into()),
                Err(e) => return Err(frame_err("read", &e)),
            },
            r = phase.changed() => {
                if r.is_err() || *phase.borrow() == Phase::Stop {
                    let _ = send.finish();
                    return Ok(());
                }
            }
        }
    }
}

/// The few server health values the ingest figures need.
#[derive(Debug, Default, Clone)]
struct Exposition {
    samples: f64,
    batches: f64,
    duplicates: f64,
    missing: f64,
    /// Ingest delay histogram: (upper bound, cumulative count).
    delay: Vec<(f64, f64)>,
    /// Ack delay histogram.
    ack: Vec<(f64, f64)>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut e = Exposition::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else { continue };
            let bucket = |prefix: &str| {
                name.strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix("_bucket{le=\""))
                    .and_then(|r| r.strip_suffix("\"}"))
                    .map(|le| {
                        if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().unwrap_or(f64::NAN)
                        }
                    })
            };
            match name {
                "novacron_metrics_samples_total" => e.samples = v,
                "novacron_metrics_batches_total" => e.batches = v,
                "novacron_metrics_duplicate_batches_total" => e.duplicates = v,
                "novacron_metrics_missing_batches_total" => e.missing = v,
                _ => {
                    if let Some(le) = bucket("novacron_metrics_ingest_delay_seconds") {
                        e.delay.push((le, v));
                    } else if let Some(le) = bucket("novacron_metrics_ack_delay_seconds") {
                        e.ack.push((le, v));
                    }
                }
            }
        }
        e
    }
}

/// A quantile from the difference of two cumulative histograms, linearly
/// interpolated inside its bucket (so only as fine as the buckets).
fn hist_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| (*le, c - before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1)))
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in counts {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = c - prev.1;
            let frac = if span > 0.0 { (rank - prev.1) / span } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    None
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Streams batches with the agent's layout: the 28 host series of a real
/// host plus 10 series per simulated VM, sampled every interval on the wall
/// clock and sent once a second (as the agent does), seq from 1 in a fresh epoch.
async fn stream_metrics(
    m: MetricsSim,
    conn: quinn::Connection,
    version: u16,
    seed: u64,
    phase: watch::Receiver<Phase>,
) {
    use novacron_shared::ids::VmId;
    use novacron_shared::metrics::{BatchBuilder, Metric, Scope};
    let Ok(mut stream) = conn.open_uni().await else {
        return;
    };
    let epoch = seed | 1;
    let mut seq = 0u64;
    let step = m.interval_ms;
    let flush_every = (1000 / step).max(1) as usize;
    let mut b = BatchBuilder::new(step as u32);
    let vms: Vec<VmId> = (0..m.vms)
        .map(|i| VmId(u128::from(seed) << 32 | i as u128))
        .collect();
    let mut buf = Vec::new();
    let mut t = 0i64;
    loop {
        let now = unix_ms();
        let next = (now / step + 1) * step;
        tokio::time::sleep(Duration::from_millis(next - now)).await;
        if *phase.borrow() != Phase::Run {
            return;
        }
        t += 1;
        b.start_tick(next);
        for (i, mode) in [
            "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
        ]
        .iter()
        .enumerate()
        {
            b.push(
                Scope::Host,
                Metric::HostCpu,
                Some(mode),
                t * 10_000_000 * (i as i64 + 1),
            );
        }
        b.push(Scope::Host, Metric::HostCpus, None, 2);
        for k in ["total", "available", "free", "cached", "swap_total", "swap_free"] {
            b.push(Scope::Host, Metric::HostMemory, Some(k), 1 << 34);
        }
        for p in ["1m", "5m", "15m"] {
            b.push(Scope::Host, Metric::HostLoad, Some(p), 500 + t % 7);
        }
        for r in ["cpu_some", "memory_some", "memory_full", "io_some", "io_full"] {
            b.push(Scope::Host, Metric::HostPressure, Some(r), t % 100);
            b.push(Scope::Host, Metric::HostPressureStall, Some(r), t * 1000);
        }
        for v in &vms {
            let s = Scope::Vm(*v);
            b.push(s, Metric::VmState, None, 1);
            b.push(s, Metric::VmCpu, None, t * 50_000_000);
            b.push(s, Metric::VmVcpus, None, 2);
            b.push(s, Metric::VmMemory, Some("current"), 1 << 20);
            b.push(s, Metric::VmMemory, Some("rss"), 1 << 19);
            b.push(s, Metric::VmBlockReadBytes, Some("vda"), t * 4096);
            b.push(s, Metric::VmBlockWriteBytes, Some("vda"), t * 8192);
            b.push(s, Metric::VmNetRxBytes, Some("vnet0"), t * 1500);
            b.push(s, Metric::VmNetTxBytes, Some("vnet0"), t * 900);
            b.push(s, Metric::VmNetRxPackets, Some("vnet0"), t);
        }
        b.end_tick();
        if b.pending_ticks() < flush_every {
            continue;
        }
        while let Some(mut batch) = b.take() {
            seq += 1;
            batch.epoch = epoch;
            batch.seq = seq;
            let samples = batch.samples() as u64;
            if framing::write_frame(&mut stream, version, &AgentMessage::Metrics(batch), &mut buf)
                .await
                .is_err()
            {
                return;
            }
            METRIC_BATCHES.fetch_add(1, Relaxed);
            METRIC_SAMPLES.fetch_add(samples, Relaxed);
        }
    }
}

/// Metric batches the simulated agents sent.
static METRIC_BATCHES: AtomicU64 = AtomicU64::new(0);
/// Metric samples the simulated agents sent.
static METRIC_SAMPLES: AtomicU64 = AtomicU64::new(0);

fn unix_ms() -> u64 {
    novacron_shared::clock::Clock::system().unix_ms()
}

fn frame_err(what: &str, e: &FrameError) -> String {
    format!("{what}: {}", link::error_chain(e))
}

/// The server's close reason if the connection is closed, else `fallback`.
fn describe_close(conn: &quinn::Connection, fallback: String) -> String {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(ac)) => {
            match ErrorCode::from_close_code(ac.error_code.into_inner()) {
                Some(code) => format!(
                    "closed by the server: {code}: {}",
                    String::from_utf8_lossy(&ac.reason)
                ),
                None if ac.error_code.into_inner() == 0 => fallback,
                None => format!("closed: {ac}"),
            }
        }
        Some(quinn::ConnectionError::LocallyClosed) | None => fallback,
        Some(e) => format!("connection lost: {e}"),
    }
}

// ---------------------------------------------------------------------------
// The run.

async fn create_tokens(server: &ServerProc, n: usize, workers: usize) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers.min(n) {
        let (next, out) = (next.clone(), out.clone());
        let (api, token) = (server.api, server.admin_token.clone());
        set.spawn(async move {
            while next.fetch_add(1, Relaxed) < n {
                let body = serde_json::json!({"ttl": "1h"});
                let v = tokio::time::timeout(
                    API_TIMEOUT,
                    client::call(
                        client::ApiUrl::plain(api),
                        None,
                        &token,
                        Method::POST,
                        "/v1/join-tokens",
                        Some(body),
                    ),
                )
                .await
                .context("POST /v1/join-tokens timed out")??;
                let t = v["token"]
                    .as_str()
                    .context("POST /v1/join-tokens: no token in the reply")?;
                out.lock().unwrap_or_else(|p| p.into_inner()).push(t.to_string());
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("token task failed")??;
    }
    let tokens = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(tokens)
}

fn progress(start: Instant, spawned: usize, n: usize, c: &Counters) {
    eprintln!(
        "[{:6.1}s] started {spawned}/{n}, joined {}, join failures {}, live sessions {}, first acks {}, reconnects {}",
        start.elapsed().as_secs_f64(),
        c.joined.load(Relaxed),
        c.join_failed.load(Relaxed),
        c.live.load(Relaxed),
        c.first_acks.load(Relaxed),
        c.reconnects.load(Relaxed),
    );
}

/// UDP packets the kernel dropped for a full receive buffer, so far.
#[derive(Debug, Clone, Copy)]
struct UdpDrops {
    /// On the server's QUIC socket.
    server: u64,
    /// On the simulator's session endpoints.
    sim: u64,
    /// System-wide `RcvbufErrors` (also counts the short-lived join sockets).
    system: u64,
}

impl UdpDrops {
    fn read(server: &ServerProc, sh: &Shared) -> Self {
        Self {
            server: udp_socket_drops(server.quic.port()).unwrap_or(0),
            sim: sh
                .endpoints
                .iter()
                .filter_map(|e| e.local_addr().ok())
                .filter_map(|a| udp_socket_drops(a.port()))
                .sum(),
            system: udp_rcvbuf_errors().unwrap_or(0),
        }
    }

    fn since(&self, earlier: &UdpDrops) -> String {
        format!(
            "UDP receive-buffer drops: server socket {}, simulator session sockets {}, system-wide RcvbufErrors +{}",
            self.server - earlier.server,
            self.sim - earlier.sim,
            self.system.saturating_sub(earlier.system)
        )
    }
}

/// A client endpoint on 127.0.0.1 whose socket asks for `rcvbuf` bytes of
/// receive buffer (the kernel caps it at `net.core.rmem_max`), so that the
/// simulator's own sockets do not drop the server's packets; returns the
/// endpoint and the buffer size granted.
fn client_endpoint(rcvbuf: usize) -> anyhow::Result<(quinn::Endpoint, usize)> {
    let sock = std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let state = quinn::udp::UdpSocketState::new((&sock).into())?;
    if rcvbuf > 0 {
        state.set_recv_buffer_size((&sock).into(), rcvbuf)?;
    }
    let granted = state.recv_buffer_size((&sock).into())?;
    let ep = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        sock,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((ep, granted))
}

fn own_sample() -> anyhow::Result<ProcSample> {
    ProcSample::read(std::process::id()).context("cannot read /proc/self")
}

fn server_sample(server: &ServerProc) -> anyhow::Result<ProcSample> {
    ProcSample::read(server.pid()).with_context(|| format!("cannot read /proc/{}", server.pid()))
}

async fn simulate(args: &Args, server: &mut ServerProc) -> anyhow::Result<()> {
    let n = args.agents;
    let ticks = clock_ticks_per_sec();
    println!(
        "fleet-sim: {n} agents, heartbeat {} ms, ramp {}/s, steady window {} s, {} agents per client endpoint",
        args.heartbeat_ms, args.ramp_per_sec, args.duration, args.agents_per_endpoint
    );
    println!("machine: {}", machine_description());
    let idle = server_sample(server)?;
    println!(
        "server: pid {}, QUIC {}, API {}, RSS idle {}",
        server.pid(),
        server.quic,
        server.api,
        mib(idle.rss_kib)
    );

    // Join tokens, through the API like an operator would.
    let t = Instant::now();
    let tokens = create_tokens(server, n, args.token_concurrency).await?;
    let took = t.elapsed().as_secs_f64();
    println!(
        "join tokens: {} created via POST /v1/join-tokens ({} concurrent) in {took:.1} s = {:.0}/s",
        tokens.len(),
        args.token_concurrency,
        tokens.len() as f64 / took
    );

    let n_ep = n.div_ceil(args.agents_per_endpoint);
    let mut endpoints = Vec::with_capacity(n_ep);
    let mut rcvbuf = 0;
    for _ in 0..n_ep {
        let (ep, size) =
            client_endpoint(args.client_rcvbuf_kib * 1024).context("cannot open a client UDP endpoint")?;
        endpoints.push(ep);
        rcvbuf = size;
    }
    println!(
        "simulator: {n_ep} client endpoints for sessions, receive buffer {} KiB each (joins use link::join's own sockets)",
        rcvbuf / 1024
    );
    let sh = Arc::new(Shared {
        endpoints,
        per_endpoint: args.agents_per_endpoint,
        quic: server.quic,
        fingerprint: server.fingerprint.clone(),
        counters: Counters::default(),
        errors: Mutex::new(HashMap::new()),
        measuring: AtomicBool::new(false),
        metrics: args.metrics_on().then_some(MetricsSim {
            vms: args.metrics_vms,
            interval_ms: args.metrics_interval_ms.max(100),
        }),
    });
    let c = &sh.counters;
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);

    // Ramp: start agents at the requested rate, then wait for every first ack.
    let (srv_r0, sim_r0, udp_r0) = (server_sample(server)?, own_sample()?, UdpDrops::read(server, &sh));
    let start = Instant::now();
    let mut next_progress = start + Duration::from_secs(5);
    let mut tasks = Vec::with_capacity(n);
    for (i, token) in tokens.into_iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / args.ramp_per_sec);
        tokio::time::sleep_until(due.into()).await;
        tasks.push(tokio::spawn(agent(i, token, sh.clone(), phase_rx.clone())));
        if Instant::now() >= next_progress {
            progress(start, i + 1, n, c);
            server.check_alive()?;
            next_progress += Duration::from_secs(5);
        }
    }
    let started_in = start.elapsed();
    let deadline = start + Duration::from_secs(args.ramp_timeout);
    loop {
        let settled = c.first_acks.load(Relaxed) + c.join_failed.load(Relaxed);
        if settled >= n as u64 {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("fleet-sim: ramp timeout: {settled}/{n} agents settled; measuring anyway");
            break;
        }
        if Instant::now() >= next_progress {
            progress(start, n, n, c);
            server.check_alive()?;
            next_progress += Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp = start.elapsed();
    let (srv_r1, sim_r1, udp_r1) = (server_sample(server)?, own_sample()?, UdpDrops::read(server, &sh));
    progress(start, n, n, c);
    println!(
        "ramp: {n} agents started in {:.1} s; {} joined, {} join failures; {} first acks after {:.1} s",
        started_in.as_secs_f64(),
        c.joined.load(Relaxed),
        c.join_failed.load(Relaxed),
        c.first_acks.load(Relaxed),
        ramp.as_secs_f64()
    );
    println!(
        "ramp cost: server CPU {:.0}% of one core, simulator CPU {:.0}% of one core, server RSS {}",
        srv_r1.cpu_percent_since(&srv_r0, ticks),
        sim_r1.cpu_percent_since(&sim_r0, ticks),
        mib(srv_r1.rss_kib)
    );
    println!("ramp {}", udp_r1.since(&udp_r0));

    // Steady window.
    server.check_alive()?;
    let (hosts_connected0, hosts_total) = server.hosts().await?;
    sh.measuring.store(true, Relaxed);
    let (srv0, sim0, udp0) = (server_sample(server)?, own_sample()?, UdpDrops::read(server, &sh));
    let (acks0, sent0, live0) = (c.acks.load(Relaxed), c.sent.load(Relaxed), c.live.load(Relaxed));
    let m0 = MachineTicks::read().unwrap_or_default();
    let expo0 = if sh.metrics.is_some() {
        Some(server.exposition().await?)
    } else {
        None
    };
    let (mb0, ms0) = (METRIC_BATCHES.load(Relaxed), METRIC_SAMPLES.load(Relaxed));
    let window = Duration::from_secs(args.duration);
    let wstart = Instant::now();
    while wstart.elapsed() < window {
        let left = window.saturating_sub(wstart.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(10))).await;
        server.check_alive()?;
        eprintln!(
            "[window {:5.1}s] live sessions {}, acks {}, reconnects {}",
            wstart.elapsed().as_secs_f64(),
            c.live.load(Relaxed),
            c.acks.load(Relaxed) - acks0,
            c.reconnects.load(Relaxed)
        );
    }
    let (srv1, sim1, udp1) = (server_sample(server)?, own_sample()?, UdpDrops::read(server, &sh));
    let (acks1, sent1, live1) = (c.acks.load(Relaxed), c.sent.load(Relaxed), c.live.load(Relaxed));
    let m1 = MachineTicks::read().unwrap_or_default();
    let (mb1, ms1) = (METRIC_BATCHES.load(Relaxed), METRIC_SAMPLES.load(Relaxed));
    let expo1 = if sh.metrics.is_some() {
        Some(server.exposition().await?)
    } else {
        None
    };
    sh.measuring.store(false, Relaxed);
    let (hosts_connected1, _) = server.hosts().await?;

    // Drain acks in flight, then close every session.
    let hb = Duration::from_millis(args.heartbeat_ms);
    let _ = phase_tx.send(Phase::Drain);
    tokio::time::sleep(hb * 2 + Duration::from_secs(1)).await;
    let _ = phase_tx.send(Phase::Stop);
    let mut reports = Vec::with_capacity(n);
    let collect_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut hung = 0usize;
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(collect_deadline, t).await {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(_)) => hung += 1,
            Err(_) => {
                abort.abort();
                hung += 1;
            }
        }
    }
    for ep in &sh.endpoints {
        ep.close(0u32.into(), b"simulation over");
    }
    for ep in &sh.endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(3), ep.wait_idle()).await;
    }

    // Figures.
    let wsecs = srv1.at.duration_since(srv0.at).as_secs_f64();
    let expected_rate = live0 as f64 * 1000.0 / args.heartbeat_ms as f64;
    let rate = (acks1 - acks0) as f64 / wsecs;
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let acked: u64 = reports.iter().map(|r| r.acked).sum();
    let summary =
        |f: fn(&AgentReport) -> Option<Duration>| Summary::of(reports.iter().filter_map(f).collect());
    let show = |s: Option<Summary>| s.map_or_else(|| "no samples".to_string(), |s| s.to_string());
    let rtts: Vec<Duration> = reports.iter().flat_map(|r| r.rtts.iter().copied()).collect();
    println!(
        "join (link::join round trip incl. its endpoint drain): {}",
        show(summary(|r| r.join))
    );
    println!(
        "session open (connect + hello -> welcome): {}",
        show(summary(|r| r.welcome))
    );
    println!(
        "join start -> first HeartbeatAck: {}",
        show(summary(|r| r.first_ack))
    );
    println!(
        "sessions: server reports {hosts_connected0} connected of {hosts_total} hosts before the window, {hosts_connected1} after \
         (GET /v1/hosts); simulator held {live0} at the start, {live1} at the end"
    );
    println!(
        "heartbeat acks in the {wsecs:.1} s window: {} = {rate:.1}/s, expected {expected_rate:.1}/s ({:.2}%); heartbeats sent {}",
        acks1 - acks0,
        if expected_rate > 0.0 { 100.0 * rate / expected_rate } else { 0.0 },
        sent1 - sent0
    );
    println!("heartbeat round trip in the window: {}", show(Summary::of(rtts)));
    if let (Some(m), Some(e0), Some(e1)) = (sh.metrics, &expo0, &expo1) {
        let stored = e1.samples - e0.samples;
        let server_cores = srv1.cpu_percent_since(&srv0, ticks) / 100.0;
        let per_core = if server_cores > 0.0 {
            stored / wsecs / server_cores
        } else {
            0.0
        };
        let q = |h0: &[(f64, f64)], h1: &[(f64, f64)], p: f64| {
            hist_quantile(h0, h1, p).map_or_else(|| "n/a".into(), |s| format!("{:.1} ms", s * 1000.0))
        };
        println!(
            "metrics: {} series per agent ({} VMs), sampled every {} ms; sent in the window {} batches / {} samples; \
             server stored {} batches / {stored:.0} samples = {:.0} samples/s; duplicates {}, missing {}; metric acks received {} (whole run)",
            28 + 10 * m.vms,
            m.vms,
            m.interval_ms,
            mb1 - mb0,
            ms1 - ms0,
            e1.batches - e0.batches,
            stored / wsecs,
            e1.duplicates - e0.duplicates,
            e1.missing - e0.missing,
            c.metric_acks.load(Relaxed)
        );
        println!(
            "ingest: {per_core:.0} samples/s per core of server CPU ({:.1}% of one core for everything the server did in the window)",
            server_cores * 100.0
        );
        println!(
            "sample -> queryable on the server (last sample of a batch; histogram buckets, interpolated): median {}, p99 {}; \
             queued -> committed and acknowledged: median {}, p99 {}",
            q(&e0.delay, &e1.delay, 0.5),
            q(&e0.delay, &e1.delay, 0.99),
            q(&e0.ack, &e1.ack, 0.5),
            q(&e0.ack, &e1.ack, 0.99)
        );
    }
    println!("window {}", udp1.since(&udp0));
    println!(
        "missed acks: {} of {sent} heartbeats sent over the whole run (after a {:.0} s drain); reconnects {}; agent tasks not finished {hung}",
        sent.saturating_sub(acked),
        (hb * 2 + Duration::from_secs(1)).as_secs_f64(),
        c.reconnects.load(Relaxed)
    );
    let per_session_kib = if live1 > 0 {
        srv1.rss_kib.saturating_sub(idle.rss_kib) as f64 / live1 as f64
    } else {
        0.0
    };
    println!(
        "server process: RSS {} (peak {}, idle {}, {per_session_kib:.1} KiB per session), threads {} at the window start \
         and {} at its end; CPU {:.1}% of one core over the steady window",
        mib(srv1.rss_kib),
        mib(srv1.hwm_kib),
        mib(idle.rss_kib),
        srv0.threads,
        srv1.threads,
        srv1.cpu_percent_since(&srv0, ticks)
    );
    println!(
        "simulator process: RSS {}, CPU {:.1}% of one core over the steady window",
        mib(sim1.rss_kib),
        sim1.cpu_percent_since(&sim0, ticks)
    );
    let others = (m1.processes.saturating_sub(m0.processes))
        .saturating_sub(srv1.cpu_ticks - srv0.cpu_ticks)
        .saturating_sub(sim1.cpu_ticks - sim0.cpu_ticks);
    let pct = |t: u64| 100.0 * t as f64 / ticks as f64 / wsecs;
    println!(
        "machine over the steady window: other processes {:.1}%, interrupts/softirq {:.1}%, steal {:.1}% \
         (of one core; steal as the hypervisor reports it); load average now {:.2}",
        pct(others),
        pct(m1.interrupts.saturating_sub(m0.interrupts)),
        pct(m1.steal.saturating_sub(m0.steal)),
        load_average().unwrap_or(0.0)
    );
    let errors = std::mem::take(&mut *sh.errors.lock().unwrap_or_else(|p| p.into_inner()));
    if errors.is_empty() {
        println!("agent errors: none");
    } else {
        let mut errors: Vec<_> = errors.into_iter().collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.1));
        println!("agent errors ({} kinds):", errors.len());
        for (e, count) in errors.iter().take(10) {
            println!("  {count} x {e}");
        }
    }
    Ok(())
}
