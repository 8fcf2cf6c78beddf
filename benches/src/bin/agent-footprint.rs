//! Agent footprint: CPU (% of one core) and memory of a real
//! `novacron-agent` process with 50 running VMs on a libvirt test-driver
//! host and the real host collectors (/proc), with metrics off, sampled
//! every second, and every 100 ms. The agent streams to a real server (in
//! this process) over QUIC; the server stores and acknowledges, so the
//! spool stays short, as in production.
//!
//! `cargo build --release --bins && ./target/release/agent-footprint [--vms 50] [--seconds 60]`

// A benchmark times real processes (server, agents, libvirtd, QEMU) by the
// OS clock and waits on them in real time: the clock rule does not apply.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use hyper::Method;
use novacron_bench::{clock_ticks_per_sec, machine_description, mib, ProcSample};
use novacron_server::config::ServerConfig;
use novacron_server::datadir::DataDir;
use serde_json::json;

#[derive(Parser, Debug)]
struct Args {
    /// Running VMs on the agent's host.
    #[arg(long, default_value_t = 50)]
    vms: usize,
    /// Seconds measured per setting (after 10 s of warm-up).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The agent binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
}

const NODE: &str = "<node><cpu><mhz>2400</mhz><model>x86_64</model><active>256</active><nodes>1</nodes>\
<sockets>1</sockets><cores>256</cores><threads>1</threads></cpu><memory>1073741824</memory></node>";

fn set_metrics(cfg: &Path, section: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(cfg)?;
    let base = text.split("\n[metrics]").next().unwrap_or("").to_string();
    std::fs::write(cfg, format!("{base}\n[metrics]\n{section}\n"))?;
    Ok(())
}

fn run_agent(bin: &Path, dir: &Path, log: &str) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::File::create(dir.join(log))?;
    Ok(tokio::process::Command::new(bin)
        .arg("-c")
        .arg(dir.join("agent.toml"))
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?)
}

async fn measure(pid: u32, secs: u64) -> anyhow::Result<(f64, ProcSample)> {
    tokio::time::sleep(Duration::from_secs(10)).await;
    let a = ProcSample::read(pid)?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let b = ProcSample::read(pid)?;
    Ok((b.cpu_percent_since(&a, clock_ticks_per_sec()), b))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match args.agent_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no binary directory")?
            .join("novacron-agent"),
    };
    if !bin.exists() {
        bail!("{} is missing: cargo build --release --bins", bin.display());
    }
    println!("machine: {}", machine_description());
    let root = std::env::temp_dir().join(format!("novacron-agent-footprint-{}", std::process::id()));
    let mut cfg = ServerConfig {
        data_dir: root.join("server"),
        ..ServerConfig::default()
    };
    cfg.quic.listen = "127.0.0.1:0".parse()?;
    cfg.api.listen = "127.0.0.1:0".parse()?;
    cfg.api.rate_limit = 0.0;
    let report = DataDir::new(&cfg.data_dir).init(&cfg, SystemTime::now())?;
    let running = novacron_server::start(&cfg).await?;
    let host_dir = root.join("host");
    let mut agent = novacron_server::demo::spawn_test_agent(
        &running,
        &bin,
        &host_dir,
        "footprint",
        NODE,
        &report.ca_fingerprint,
    )
    .await?;
    let token = report.admin_token.clone();
    let api = running.api_client(&token)?;
    let t = Instant::now();
    loop {
        let hosts = api.call(Method::GET, "/v1/hosts", None).await?;
        if hosts["hosts"][0]["capacity"]["cpus"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent did not connect; see {}",
                host_dir.join("agent.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..args.vms {
        api.call(
            Method::POST,
            "/v1/vms",
            Some(json!({"spec": {"name": format!("vm-{i}"), "vcpus": 1, "memory_mib": 64}})),
        )
        .await?;
    }
    let t = Instant::now();
    loop {
        let v = api.call(Method::GET, "/v1/vms?limit=1000", None).await?;
        let running_vms = v["vms"].as_array().map_or(0, |a| {
            a.iter().filter(|v| v["observed"]["state"] == "running").count()
        });
        if running_vms == args.vms {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("only {running_vms} of {} VMs running after 60 s", args.vms);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{} VMs running on a test-driver host; measuring {} s per setting after 10 s of warm-up",
        args.vms, args.seconds
    );
    let _ = agent.kill().await;
    let cfg_path = host_dir.join("agent.toml");
    let mut baseline = None;
    for (label, section) in [
        ("metrics off", "enabled = false"),
        ("metrics every 1 s", "interval = \"1s\""),
        ("metrics every 100 ms", "interval = \"100ms\""),
    ] {
        set_metrics(&cfg_path, section)?;
        let mut child = run_agent(&bin, &host_dir, &format!("agent-{}.log", label.replace(' ', "-")))?;
        let pid = child.id().context("agent exited")?;
        let before = api.call(Method::GET, "/v1/metrics/streams", None).await?;
        let (cpu, s) = measure(pid, args.seconds).await?;
        let after = api.call(Method::GET, "/v1/metrics/streams", None).await?;
        let batches = |v: &serde_json::Value| v["streams"][0]["batches"].as_u64().unwrap_or(0);
        let extra = match baseline {
            None => {
                baseline = Some(cpu);
                String::new()
            }
            Some(b) => format!(
                "; {:.2}% of a core above metrics off; {} batches stored during the run",
                cpu - b,
                batches(&after) - batches(&before)
            ),
        };
        println!(
            "{label}: agent CPU {cpu:.2}% of one core, RSS {} (peak {}), {} threads{extra}",
            mib(s.rss_kib),
            mib(s.hwm_kib),
            s.threads
        );
        let _ = child.kill().await;
    }
    let latest = api
        .call(Method::GET, "/v1/metrics/latest?owner=host", None)
        .await?;
    let series = latest["owners"][0]["values"].as_array().map_or(0, Vec::len);
    let vms = api.call(Method::GET, "/v1/metrics/latest?owner=vm", None).await?;
    println!(
        "series per tick: {series} host series with a value + {} VMs reporting",
        vms["owners"].as_array().map_or(0, Vec::len)
    );
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
