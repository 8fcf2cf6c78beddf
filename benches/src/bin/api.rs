//! API benchmark: (1) create-VM request to VM running on a libvirt
//! test-driver host (a real server in this process, a real agent process,
//! the real HTTP API), median and p99; (2) listing VMs with 100,000 VMs in
//! the store: first page, full paging, filtered scans; (3) create latency
//! with 100,000 VMs stored (the scheduler's view of the fleet).
//!
//! `cargo build --release --bins && ./target/release/api [--creates 200] [--vms 100000]`

// A benchmark times real processes (server, agents, libvirtd, QEMU) by the
// OS clock and waits on them in real time: the clock rule does not apply.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use hyper::Method;
use novacron_bench::{machine_description, ms, Summary};
use novacron_server::client::ApiClient;
use novacron_server::config::ServerConfig;
use novacron_server::datadir::DataDir;
use novacron_server::store::{PlacementRules, Store, VmRecord};
use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::spec::{DesiredVm, Power, VmSpec};
use serde_json::json;

#[derive(Parser, Debug)]
struct Args {
    /// VMs created one after another for the latency figures.
    #[arg(long, default_value_t = 200)]
    creates: usize,
    /// VMs in the store for the list figures.
    #[arg(long, default_value_t = 100_000)]
    vms: usize,
    /// The agent binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Serve the API as plain HTTP on loopback (`[api] plaintext`), to
    /// compare with builds that had no HTTPS; the default is HTTPS.
    #[arg(long)]
    plain_http: bool,
}

const NODE: &str = "<node><cpu><mhz>2400</mhz><model>x86_64</model><active>256</active><nodes>1</nodes>\
<sockets>1</sockets><cores>256</cores><threads>1</threads></cpu><memory>1073741824</memory></node>";

fn spec(name: &str) -> serde_json::Value {
    json!({"name": name, "vcpus": 1, "memory_mib": 64})
}

/// Creates `n` VMs one at a time; each is timed from the request until the
/// API shows it running (polled every millisecond).
async fn create_latencies(api: &ApiClient, prefix: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let v = api
            .call(
                Method::POST,
                "/v1/vms",
                Some(json!({"spec": spec(&format!("{prefix}-{i}"))})),
            )
            .await?;
        let id = v["vm"]["id"].as_str().context("no id")?.to_string();
        loop {
            let v = api.call(Method::GET, &format!("/v1/vms/{id}"), None).await?;
            if v["observed"]["state"] == "running" {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("VM {id} not running after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(t0.elapsed());
    }
    Ok(out)
}

/// Fills the store with `n` VMs on 100 made-up hosts, in batches.
fn fill(store: &Store, n: usize) -> anyhow::Result<()> {
    let hosts = 100usize;
    let per = n.div_ceil(hosts);
    let mut made = 0;
    for h in 0..hosts {
        let host = HostId(0xbe00 + h as u128);
        let mut batch = Vec::with_capacity(per);
        while batch.len() < per && made < n {
            let s: VmSpec = serde_json::from_value(spec(&format!("vm-{made:06}")))?;
            batch.push(VmRecord {
                vm: DesiredVm {
                    id: VmId::random(),
                    op_id: OpId::random(),
                    spec: s,
                    power: Power::Running,
                    epoch: 0,
                },
                placement: Placement::Host(host),
                rules: PlacementRules {
                    host: Some(host),
                    ..PlacementRules::default()
                },
                created_ms: 1,
            });
            made += 1;
        }
        store
            .replace_host_vms(host, batch)?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// A fresh server data directory and config (API unthrottled).
fn init(
    dir: &std::path::Path,
    plain_http: bool,
) -> anyhow::Result<(ServerConfig, novacron_server::datadir::InitReport)> {
    let mut cfg = ServerConfig {
        data_dir: dir.to_path_buf(),
        ..ServerConfig::default()
    };
    cfg.quic.listen = "127.0.0.1:0".parse()?;
    cfg.api.listen = "127.0.0.1:0".parse()?;
    cfg.api.rate_limit = 0.0;
    cfg.api.plaintext = plain_http;
    let report = DataDir::new(&cfg.data_dir).init(&cfg, SystemTime::now())?;
    Ok((cfg, report))
}

/// One real agent on a big test-driver host, connected and reporting.
async fn agent_on(
    running: &novacron_server::Running,
    bin: &std::path::Path,
    dir: &std::path::Path,
    fingerprint: &str,
) -> anyhow::Result<tokio::process::Child> {
    let child =
        novacron_server::demo::spawn_test_agent(running, bin, dir, "bench-host", NODE, fingerprint).await?;
    let t = Instant::now();
    while running
        .fleet
        .hosts()?
        .first()
        .is_none_or(|h| h.record.capacity.cpus == 0)
    {
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent did not report within 30 s; see {}",
                dir.join("agent.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

async fn timed<F, T, E>(runs: usize, mut f: impl FnMut() -> F) -> anyhow::Result<Summary>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut d = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f().await?;
        d.push(t.elapsed());
    }
    Summary::of(d).context("no runs")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let agent_bin = match args.agent_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no binary directory")?
            .join("novacron-agent"),
    };
    if !agent_bin.exists() {
        bail!("{} is missing: cargo build --release --bins", agent_bin.display());
    }
    println!("machine: {}", machine_description());
    let root = std::env::temp_dir().join(format!("novacron-api-bench-{}", std::process::id()));

    // Part 1: an empty fleet of one test-driver host.
    let (cfg, report) = init(&root.join("server-a"), args.plain_http)?;
    let token = report.admin_token.clone();
    let running = novacron_server::start(&cfg).await?;
    let mut agent = agent_on(&running, &agent_bin, &root.join("host-a"), &report.ca_fingerprint).await?;
    let lat = create_latencies(&running.api_client(&token)?, "warm", 10).await?;
    drop(lat);
    let lat = Summary::of(create_latencies(&running.api_client(&token)?, "lat", args.creates).await?)
        .context("no runs")?;
    println!(
        "create -> running, empty store, {} sequential creates: median {} p99 {} max {}",
        args.creates,
        ms(lat.median),
        ms(lat.p99),
        ms(lat.max)
    );
    running.shutdown().await;
    let _ = agent.kill().await;

    // Part 2: a second server whose store holds 100,000 VMs (on made-up
    // hosts, never connected) before it starts.
    let (cfg, report) = init(&root.join("server-b"), args.plain_http)?;
    let token = report.admin_token.clone();
    let t = Instant::now();
    {
        let store = Store::open(&DataDir::new(&cfg.data_dir).db())?;
        fill(&store, args.vms)?;
    }
    println!("stored {} VMs in {:.1} s", args.vms, t.elapsed().as_secs_f64());
    let running = novacron_server::start(&cfg).await?;
    let api = running.api_client(&token)?;
    let api = &api;
    let first = timed(20, || api.call(Method::GET, "/v1/vms", None)).await?;
    println!(
        "GET /v1/vms (first page of 100): median {} p99 {}",
        ms(first.median),
        ms(first.p99)
    );
    let big = timed(20, || api.call(Method::GET, "/v1/vms?limit=1000", None)).await?;
    println!(
        "GET /v1/vms?limit=1000: median {} p99 {}",
        ms(big.median),
        ms(big.p99)
    );
    let t = Instant::now();
    let mut after: Option<String> = None;
    let mut total = 0;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/vms?limit=1000&after={a}"),
            None => "/v1/vms?limit=1000".to_string(),
        };
        let v = api.call(Method::GET, &path, None).await?;
        total += v["vms"].as_array().map_or(0, Vec::len);
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    println!(
        "paging through all {total} VMs, 1000 per page: {:.2} s ({:.0} VMs/s)",
        t.elapsed().as_secs_f64(),
        total as f64 / t.elapsed().as_secs_f64()
    );
    let q = format!("/v1/vms?host={}", HostId(0xbe00 + 99));
    let scan = timed(5, || api.call(Method::GET, &q, None)).await?;
    println!(
        "GET /v1/vms?host=<last host> (filter scans the store): median {} p99 {}",
        ms(scan.median),
        ms(scan.p99)
    );
    let q = format!("/v1/vms?name_prefix=vm-{:06}", args.vms - 1);
    let scan = timed(5, || api.call(Method::GET, &q, None)).await?;
    println!(
        "GET /v1/vms?name_prefix=<last VM's name>: median {} p99 {}",
        ms(scan.median),
        ms(scan.p99)
    );

    // Part 3: create -> running with the full store.
    let mut agent = agent_on(&running, &agent_bin, &root.join("host-b"), &report.ca_fingerprint).await?;
    let n = (args.creates / 4).max(10);
    let lat = Summary::of(create_latencies(api, "full", n).await?).context("no runs")?;
    println!(
        "create -> running with {} VMs stored, {n} creates: median {} p99 {}",
        args.vms,
        ms(lat.median),
        ms(lat.p99)
    );
    running.shutdown().await;
    let _ = agent.kill().await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
