//! `novacron-server demo`: a whole fleet on this machine with no setup — a
//! real server and real agent processes, each agent on its own libvirt
//! test-driver host, all enrolled through the real join path and connected
//! over mutual-TLS QUIC. VMs are then created through the web API
//! (`POST /v1/vms`), placed by the scheduler, and the demo waits until
//! every agent runs what it was given.
//!
//! High availability: with N agents the demo also runs N - 1 HA VMs
//! (`ha-1`…, one per host by anti-affinity, so one host is always free to
//! take a lost host's HA VM). `--kill-host K` SIGKILLs the agent of
//! `demo-host-K` once everything runs — its test-driver VMs die with it, as
//! a test-driver host's state lives in its agent's process — and prints its
//! HA VMs coming up on other hosts, with the time from the kill to each VM
//! being placed elsewhere and running there, and its other VMs reported
//! lost. The demo's hosts share no storage, so its HA VMs have no disks
//! (an HA VM with disks needs a shared pool, or `ephemeral`, which
//! recreates its disks empty on restart). The mass-failure ratio is 0.5 in
//! the demo: one host of three is a third of the fleet, above the default
//! 30 %, which would hold the restart as a suspected network failure.
//!
//! Cloud burst: `--burst` adds a local EC2 emulator (moto) and a burstable
//! VM that no host fits once the demo hosts are full; see [`burst`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::config::{ConfigFile, ServerConfig};
use crate::datadir::DataDir;

mod burst;

/// Arguments of `novacron-server demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// How many agents (each on its own libvirt test-driver host) to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    agents: u32,
    /// Stop by itself after this long (e.g. 30s); by default run until Ctrl-C.
    #[arg(long)]
    duration: Option<String>,
    /// Keep the demo's files here instead of a new temporary directory
    /// (which is removed on exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the web API listens.
    #[arg(long, default_value = "127.0.0.1:7080")]
    api: SocketAddr,
    /// Where the agent link (QUIC) listens.
    #[arg(long, default_value = "127.0.0.1:7443")]
    quic: SocketAddr,
    /// The agent binary (default: `novacron-agent` next to this binary).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Once every VM runs, SIGKILL the agent of demo-host-K (its VMs die
    /// with it) and show its HA VMs restarting on other hosts; without K
    /// (or K = 0), the first host that runs an HA VM.
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "0")]
    kill_host: Option<u32>,
    /// Show cloud burst: start a local EC2 emulator (moto; installed into a
    /// venv when missing), fill the demo hosts, and burst one VM to it,
    /// printing its instance id, type and accrued cost.
    #[arg(long)]
    burst: bool,
    /// The `moto_server` to run with `--burst` (default: the one
    /// `packaging/dev/moto.sh` installs).
    #[arg(long, value_name = "PATH", requires = "burst")]
    moto: Option<PathBuf>,
}

/// A test-driver host description: `cpus`, `mem_gib` and a few domains.
fn node_xml(host: u32, cpus: u32, mem_gib: u64) -> String {
    let mut domains = String::new();
    for vm in 1..=2 {
        domains.push_str(&format!(
            "  <domain type='test'>\n    <name>demo-{host}-vm{vm}</name>\n    <memory>1048576</memory>\n    \
             <vcpu>1</vcpu>\n    <os><type>hvm</type></os>\n  </domain>\n"
        ));
    }
    format!(
        "<node>\n  <cpu>\n    <mhz>2400</mhz>\n    <model>x86_64</model>\n    <active>{cpus}</active>\n    \
         <nodes>1</nodes>\n    <sockets>1</sockets>\n    <cores>{cpus}</cores>\n    <threads>1</threads>\n  </cpu>\n  \
         <memory>{}</memory>\n{domains}</node>\n",
        mem_gib * 1024 * 1024
    )
}

struct AgentProc {
    name: String,
    child: Child,
}

/// Runs the demo until Ctrl-C, SIGTERM or `--duration`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args
        .duration
        .as_deref()
        .map(novacron_shared::duration::parse)
        .transpose()?;
    let agent_bin = match args.agent_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("cannot locate this binary's directory")?
            .join("novacron-agent"),
    };
    if let Some(k) = args.kill_host {
        if k > args.agents || args.agents < 2 {
            bail!(
                "--kill-host {k}: needs 2 or more agents and K at most --agents ({})",
                args.agents
            );
        }
    }
    if !agent_bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release --bins` (or pass --agent-bin)",
            agent_bin.display()
        );
    }
    let temporary = args.dir.is_none();
    let root = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("novacron-demo-{}", std::process::id())));
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;

    let mut cfg = ServerConfig {
        data_dir: root.join("server"),
        ..ServerConfig::default()
    };
    cfg.quic.listen = args.quic;
    cfg.api.listen = args.api;
    // One host of three may fail without holding (see the module header).
    cfg.ha.mass_failure_ratio = 0.5;
    let mut moto = None;
    if args.burst {
        let started = async {
            let m = burst::start_moto(&root, args.moto.as_deref()).await?;
            println!(
                "moto (EC2 emulator) up: {} (log: {})",
                m.endpoint,
                m.log.display()
            );
            let ami = burst::register_image(&m.endpoint).await?;
            anyhow::Ok((m, ami))
        }
        .await;
        let (m, ami) = match started {
            Ok(v) => v,
            Err(e) => {
                if temporary {
                    let _ = std::fs::remove_dir_all(&root);
                }
                return Err(e);
            }
        };
        burst::configure(&mut cfg, &m.endpoint, &ami);
        moto = Some(m);
    }
    cfg.validate()?;
    let config_path = root.join("server.toml");
    std::fs::write(&config_path, toml::to_string(&cfg)?)?;
    let dir = DataDir::new(&cfg.data_dir);
    let clock = novacron_shared::clock::Clock::system();
    let report = dir.init(&cfg, clock.wall())?;
    let running = crate::start_with_clock(&cfg, clock.clone())
        .await
        .context("cannot start the server (is another demo running? try --api/--quic)")?;
    println!(
        "server up: agent link quic://{}, API {}",
        running.quic_addr, running.api_url
    );

    let mut agents = Vec::new();
    let result = async {
        for i in 1..=args.agents {
            let name = format!("demo-host-{i}");
            let host_dir = root.join(&name);
            let child = spawn_test_agent(
                &running,
                &agent_bin,
                &host_dir,
                &name,
                &node_xml(i, 4 * (1 + i % 4), 8 * u64::from(1 + i % 3)),
                &report.ca_fingerprint,
            )
            .await?;
            println!(
                "  {name}: joined and started (log: {})",
                host_dir.join("agent.log").display()
            );
            agents.push(AgentProc { name, child });
        }
        let start = clock.now();
        while running.fleet.session_count() < agents.len() {
            if clock.since(start) > Duration::from_secs(60) {
                bail!(
                    "only {} of {} agents connected within 60s; see the agent logs",
                    running.fleet.session_count(),
                    agents.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        place_vms(&running, &report.admin_token).await?;
        if let Some(m) = &moto {
            burst::show(
                &running.api_client(&report.admin_token)?,
                m,
                Duration::from_secs(5),
            )
            .await?;
        }
        print_summary(&running, &config_path, &root, &report.admin_token, moto.is_some())?;
        if let Some(k) = args.kill_host {
            let i = match k {
                0 => first_with_ha(&running, &report.admin_token, &agents).await?,
                k => usize::try_from(k - 1)?,
            };
            let a = &mut agents[i];
            kill_host(&running, &report.admin_token, &a.name, &mut a.child).await?;
        }
        let stop = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stop);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut live = tokio::time::interval(Duration::from_secs(5));
        let live_api = running.api_client(&report.admin_token)?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = &mut stop => break,
                _ = live.tick() => {
                    print_live(&running);
                    if moto.is_some() {
                        if let Some(line) = burst::live_line(&live_api).await {
                            println!("{line}");
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;

    println!("stopping the demo fleet");
    for a in &mut agents {
        if let Some(pid) = a.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for a in &mut agents {
        if tokio::time::timeout(Duration::from_secs(5), a.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(agent = %a.name, "agent did not stop in 5s; killing it");
            let _ = a.child.kill().await;
        }
    }
    running.shutdown().await;
    if let Some(m) = &mut moto {
        m.stop().await;
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

/// Creates VMs the way an operator does, through the web API: per host a
/// web VM (running, one per host by anti-affinity) and a database VM
/// (stopped); the scheduler places them. Then waits until every agent
/// runs what it was given.
async fn place_vms(running: &crate::Running, token: &str) -> anyhow::Result<()> {
    let api = running.api_client(token)?;
    let n = running.fleet.hosts()?.len();
    let mut ids = Vec::new();
    for i in 1..=n {
        let mut vms = vec![
            (format!("web-{i}"), "running", 1, 512, Some(2048), Some("web")),
            (format!("db-{i}"), "stopped", 2, 1024, Some(4096), None),
        ];
        // One host fewer than there are hosts: a free host for a restart.
        if i < n {
            vms.push((format!("ha-{i}"), "running", 1, 256, None, Some("ha")));
        }
        for (name, power, vcpus, mem, disk, group) in vms {
            let ha = disk.is_none();
            let mut spec = serde_json::json!({
                "name": name,
                "vcpus": vcpus,
                "memory_mib": mem,
                "labels": {"demo": "true"},
                "ha": ha
            });
            if let Some(disk) = disk {
                spec["disks"] = serde_json::json!([{"name": "root", "size_mib": disk}]);
                spec["cloud_init"] = serde_json::json!({"user_data": "#cloud-config\nhostname: demo\n"});
            }
            let body = serde_json::json!({
                "spec": spec,
                "power": power,
                "placement": {"anti_affinity": group}
            });
            let vm = api.call(hyper::Method::POST, "/v1/vms", Some(body)).await?;
            ids.push((
                name,
                vm["vm"]["id"].as_str().unwrap_or_default().to_string(),
                power,
            ));
        }
    }
    println!(
        "  created {} VMs through POST /v1/vms; the scheduler placed them",
        ids.len()
    );
    let clock = running.fleet.clock();
    let start = clock.now();
    for (name, id, power) in &ids {
        let want = if *power == "running" { "running" } else { "stopped" };
        loop {
            let v = api
                .call(hyper::Method::GET, &format!("/v1/vms/{id}"), None)
                .await?;
            if v["observed"]["state"] == want {
                break;
            }
            if clock.since(start) > Duration::from_secs(60) {
                bail!(
                    "VM {name} is not {want} within 60s (observed: {}); see the agent logs",
                    v["observed"]
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The index of the first demo agent whose host runs an HA VM.
async fn first_with_ha(running: &crate::Running, token: &str, agents: &[AgentProc]) -> anyhow::Result<usize> {
    let api = running.api_client(token)?;
    let hosts = api.call(hyper::Method::GET, "/v1/hosts", None).await?;
    let vms = api.call(hyper::Method::GET, "/v1/vms?limit=1000", None).await?;
    let list = |v: &serde_json::Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
    for (i, a) in agents.iter().enumerate() {
        let id = list(&hosts, "hosts")
            .into_iter()
            .find(|h| h["name"].as_str() == Some(a.name.as_str()))
            .and_then(|h| h["id"].as_str().map(str::to_string));
        let has_ha = list(&vms, "vms")
            .iter()
            .any(|v| v["vm"]["spec"]["ha"] == true && v["host"].as_str() == id.as_deref());
        if has_ha {
            return Ok(i);
        }
    }
    bail!("no demo host runs an HA VM")
}

/// SIGKILLs the agent of host `name` (its test-driver VMs die with it) and
/// prints its HA VMs coming up elsewhere, with the time from the kill to
/// each being placed on another host and running there, and its other VMs
/// reported lost.
async fn kill_host(
    running: &crate::Running,
    token: &str,
    name: &str,
    child: &mut Child,
) -> anyhow::Result<()> {
    let api = running.api_client(token)?;
    let hosts = api.call(hyper::Method::GET, "/v1/hosts", None).await?;
    let names: std::collections::HashMap<String, String> = hosts["hosts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|h| Some((h["id"].as_str()?.to_string(), h["name"].as_str()?.to_string())))
        .collect();
    let host = names
        .iter()
        .find(|(_, n)| n.as_str() == name)
        .map(|(id, _)| id.clone())
        .with_context(|| format!("no host named {name}"))?;
    let all = api.call(hyper::Method::GET, "/v1/vms?limit=1000", None).await?;
    let on_host: Vec<(String, String, bool)> = all["vms"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|v| v["host"].as_str() == Some(host.as_str()))
        .filter_map(|v| {
            Some((
                v["vm"]["id"].as_str()?.to_string(),
                v["vm"]["spec"]["name"].as_str()?.to_string(),
                v["vm"]["spec"]["ha"].as_bool().unwrap_or(false),
            ))
        })
        .collect();
    let ha: Vec<&(String, String, bool)> = on_host.iter().filter(|v| v.2).collect();
    println!();
    println!(
        "HA: killing {name} (SIGKILL to its agent; its test-driver VMs die with it): {} HA VM(s) on it: {}",
        ha.len(),
        ha.iter().map(|v| v.1.as_str()).collect::<Vec<_>>().join(", ")
    );
    if ha.is_empty() {
        println!("  (no HA VM runs there: try another --kill-host; its other VMs are reported lost)");
    }
    let clock = running.fleet.clock();
    let t0 = clock.now();
    child.start_kill()?;
    child.wait().await?;
    // VM id -> (placed elsewhere after, running after, lost after).
    let mut seen: std::collections::HashMap<String, (Option<Duration>, Option<Duration>)> =
        std::collections::HashMap::new();
    let mut lost: std::collections::HashSet<String> = std::collections::HashSet::new();
    let deadline = Duration::from_secs(60);
    let mut lease = String::from("online");
    loop {
        let elapsed = clock.since(t0);
        let h = api
            .call(hyper::Method::GET, &format!("/v1/hosts/{host}"), None)
            .await?;
        if let Some(l) = h["lease"].as_str().filter(|l| *l != lease) {
            lease = l.to_string();
            println!(
                "  {name}: lease {} after {:.1}s",
                lease.replace('_', " "),
                elapsed.as_secs_f64()
            );
        }
        for (id, vm_name, is_ha) in &on_host {
            let v = api
                .call(hyper::Method::GET, &format!("/v1/vms/{id}"), None)
                .await?;
            let now_on = v["host"].as_str().unwrap_or_default();
            if *is_ha {
                let e = seen.entry(id.clone()).or_default();
                if e.0.is_none() && now_on != host {
                    e.0 = Some(elapsed);
                    println!(
                        "  {vm_name}: placed on {} after {:.1}s (epoch {})",
                        names.get(now_on).map_or(now_on, String::as_str),
                        elapsed.as_secs_f64(),
                        v["vm"]["epoch"].as_u64().unwrap_or(0)
                    );
                }
                if e.0.is_some() && e.1.is_none() && v["observed"]["state"] == "running" {
                    e.1 = Some(elapsed);
                    println!("  {vm_name}: running there after {:.1}s", elapsed.as_secs_f64());
                }
            } else if !lost.contains(id) && v["ha"]["fenced"]["state"] == "lost" {
                lost.insert(id.clone());
                println!(
                    "  {vm_name}: not HA, reported lost after {:.1}s (never moved)",
                    elapsed.as_secs_f64()
                );
            }
        }
        let ha_done = seen.values().filter(|e| e.1.is_some()).count() == ha.len();
        let lost_done = lost.len() == on_host.len() - ha.len();
        if ha_done && lost_done {
            break;
        }
        if elapsed > deadline {
            println!(
                "  not all of it within {}s; see GET /v1/vms and the server's events",
                deadline.as_secs()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("  {name} stays down (its agent is not restarted); the demo runs on");
    Ok(())
}

/// One line of live host metrics per host (every agent samples every second
/// and streams to the server; this reads the server's in-memory window).
fn print_live(running: &crate::Running) {
    let Some(m) = running.fleet.metrics() else { return };
    let names: std::collections::HashMap<String, String> = running
        .fleet
        .hosts()
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.record.id.to_string(), h.record.name))
        .collect();
    let mut parts = Vec::new();
    for o in m.latest(Some(novacron_shared::metrics::Owner::Host)) {
        let get = |name: &str, label: &str| {
            o.values
                .iter()
                .find(|v| v.name == name && v.label.as_deref() == Some(label))
                .map(|v| v.value)
        };
        let total: f64 = o
            .values
            .iter()
            .filter(|v| v.name == "host.cpu")
            .map(|v| v.value)
            .sum();
        let idle = get("host.cpu", "idle").unwrap_or(0.0) + get("host.cpu", "iowait").unwrap_or(0.0);
        let cpu = if total > 0.0 {
            100.0 * (total - idle) / total
        } else {
            0.0
        };
        let mem = match (get("host.memory", "total"), get("host.memory", "available")) {
            (Some(t), Some(a)) if t > 0.0 => 100.0 * (1.0 - a / t),
            _ => 0.0,
        };
        parts.push(format!(
            "{} cpu {cpu:.1}% load {:.2} mem {mem:.0}%",
            names.get(&o.id).map_or(o.id.as_str(), String::as_str),
            get("host.load", "1m").unwrap_or(0.0),
        ));
    }
    let vms = m.latest(Some(novacron_shared::metrics::Owner::Vm)).len();
    if !parts.is_empty() {
        println!(
            "metrics (1 s samples, {vms} VMs reporting): {}",
            parts.join(" | ")
        );
    }
}

fn print_summary(
    running: &crate::Running,
    config: &Path,
    root: &Path,
    token: &str,
    burst: bool,
) -> anyhow::Result<()> {
    println!();
    println!(
        "{:<38} {:<14} {:<8} {:>4} {:>8} {:>4}",
        "HOST ID", "NAME", "STATE", "CPUS", "MEM MiB", "VMS"
    );
    for h in running.fleet.hosts()? {
        println!(
            "{:<38} {:<14} {:<8} {:>4} {:>8} {:>4}",
            h.record.id.to_string(),
            h.record.name,
            format!("{:?}", h.record.state),
            h.record.capacity.cpus,
            h.record.capacity.memory_mib,
            h.vm_count.map(|n| n.to_string()).unwrap_or_default(),
        );
    }
    let names: std::collections::HashMap<_, _> = running
        .fleet
        .hosts()?
        .into_iter()
        .map(|h| (h.record.id, h.record.name))
        .collect();
    println!();
    println!(
        "{:<10} {:<14} {:<9} {:<9} {:>5} {:>8}",
        "VM", "HOST", "DESIRED", "OBSERVED", "VCPUS", "MEM MiB"
    );
    for rec in running.fleet.store().vms(None, 1000)? {
        let view = running.fleet.vm_view(rec);
        let r = &view.record;
        println!(
            "{:<10} {:<14} {:<9} {:<9} {:>5} {:>8}",
            r.vm.spec.name,
            r.host().and_then(|h| names.get(&h)).map_or("-", String::as_str),
            format!("{:?}", r.vm.power),
            view.observed
                .map_or_else(|| "-".to_string(), |o| format!("{:?}", o.state)),
            r.vm.spec.vcpus,
            r.vm.spec.memory_mib,
        );
    }
    println!();
    println!("Where to look:");
    let ca = running.ca_file.display();
    println!(
        "  curl -s --cacert {ca} -H 'Authorization: Bearer {token}' {}/v1/hosts",
        running.api_url
    );
    println!(
        "  curl -s --cacert {ca} -H 'Authorization: Bearer {token}' {}/v1/vms",
        running.api_url
    );
    println!(
        "  curl -sN --cacert {ca} -H 'Authorization: Bearer {token}' {}/v1/events    (live events)",
        running.api_url
    );
    println!(
        "  curl -s --cacert {ca} -H 'Authorization: Bearer {token}' '{}/v1/metrics?host=<host id>&from=5m'   (host metrics, 1 s samples)",
        running.api_url
    );
    println!(
        "  curl -s --cacert {ca} {}/metrics    (Prometheus exposition: server health and every host's and VM's latest values)",
        running.api_url
    );
    println!("  novacron-server -c {} host list", config.display());
    println!(
        "  novacron --api {} --ca-file {ca} --token-file {} top   (live host and VM metrics)",
        running.api_url,
        DataDir::new(root.join("server")).admin_token().display()
    );
    println!(
        "  novacron --api {} --ca-file {ca} --token-file {} vms list   (also hosts list, events, ...)",
        running.api_url,
        DataDir::new(root.join("server")).admin_token().display()
    );
    if burst {
        println!(
            "  novacron --api {} --ca-file {ca} --token-file {} burst   (cloud burst: caps, spend, instances; also vms show burst-1)",
            running.api_url,
            DataDir::new(root.join("server")).admin_token().display()
        );
        println!("  moto's log: {}", root.join("moto.log").display());
    }
    println!("  files and logs: {}", root.display());
    if !burst {
        println!("  cloud burst: run the demo with --burst (make demo DEMO_ARGS=--burst) to fill the hosts and burst a VM to a local EC2 emulator (moto)");
    }
    println!("  HA: run the demo with --kill-host K (make demo DEMO_ARGS=\"--kill-host\": the first host with an HA VM) to kill demo-host-K's agent once everything runs and watch its HA VMs restart elsewhere");
    println!("Press Ctrl-C to stop.");
    Ok(())
}

/// Enrolls and starts one real agent process on a libvirt test-driver
/// host described by `node_xml`, with its files in `host_dir` (agent.log
/// is its log). Used by the demo and the API benchmark.
pub async fn spawn_test_agent(
    running: &crate::Running,
    agent_bin: &Path,
    host_dir: &Path,
    name: &str,
    node_xml: &str,
    ca_fingerprint: &str,
) -> anyhow::Result<Child> {
    std::fs::create_dir_all(host_dir)?;
    let node = host_dir.join("node.xml");
    std::fs::write(&node, node_xml)?;
    let agent_cfg = host_dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "data_dir = {:?}\nlibvirt_uri = \"test://{}\"\nhostname = {name:?}\n[vms]\nstorage_path = {:?}\nconsole_log_dir = {:?}\n",
            host_dir.join("data").display().to_string(),
            node.display(),
            host_dir.join("pool").display().to_string(),
            host_dir.display().to_string(),
        ),
    )?;
    let (token, _) = running.fleet.create_join_token(Duration::from_secs(600))?;
    let out = Command::new(agent_bin)
        .arg("-c")
        .arg(&agent_cfg)
        .args([
            "join",
            "--server",
            &running.quic_addr.to_string(),
            "--token",
            &token,
        ])
        .args(["--ca-fingerprint", ca_fingerprint, "--server-name", "localhost"])
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "{name} could not join: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let log = std::fs::File::create(host_dir.join("agent.log"))?;
    Ok(Command::new(agent_bin)
        .arg("-c")
        .arg(&agent_cfg)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?)
}
