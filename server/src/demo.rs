//! `novacron-server demo`: a whole fleet on this machine with no setup — a
//! real server and real agent processes, each agent on its own libvirt
//! test-driver host, all enrolled through the real join path and connected
//! over mutual-TLS QUIC. Each host is then given two VMs through the
//! desired-state path, and the demo waits until every agent reports that
//! its host matches.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::config::{ConfigFile, ServerConfig};
use crate::datadir::DataDir;

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
    cfg.validate()?;
    let config_path = root.join("server.toml");
    std::fs::write(&config_path, toml::to_string(&cfg)?)?;
    let dir = DataDir::new(&cfg.data_dir);
    let report = dir.init(&cfg, SystemTime::now())?;
    let running = crate::start(&cfg)
        .await
        .context("cannot start the server (is another demo running? try --api/--quic)")?;
    println!(
        "server up: agent link quic://{}, API http://{}",
        running.quic_addr, running.api_addr
    );

    let mut agents = Vec::new();
    let result = async {
        for i in 1..=args.agents {
            let name = format!("demo-host-{i}");
            let host_dir = root.join(&name);
            std::fs::create_dir_all(&host_dir)?;
            let node = host_dir.join("node.xml");
            std::fs::write(&node, node_xml(i, 4 * (1 + i % 4), 8 * u64::from(1 + i % 3)))?;
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
            let out = Command::new(&agent_bin)
                .arg("-c")
                .arg(&agent_cfg)
                .args([
                    "join",
                    "--server",
                    &running.quic_addr.to_string(),
                    "--token",
                    &token,
                ])
                .args([
                    "--ca-fingerprint",
                    &report.ca_fingerprint,
                    "--server-name",
                    "localhost",
                ])
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "{name} could not join: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let log = std::fs::File::create(host_dir.join("agent.log"))?;
            let child = Command::new(&agent_bin)
                .arg("-c")
                .arg(&agent_cfg)
                .arg("run")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()?;
            println!(
                "  {name}: joined and started (log: {})",
                host_dir.join("agent.log").display()
            );
            agents.push(AgentProc { name, child });
        }
        let start = Instant::now();
        while running.fleet.session_count() < agents.len() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "only {} of {} agents connected within 60s; see the agent logs",
                    running.fleet.session_count(),
                    agents.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        place_vms(&running).await?;
        print_summary(&running, &config_path, &root, &report.admin_token)?;
        let stop = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = stop => {}
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
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

/// Gives every host a web VM (running) and a database VM (stopped), then
/// waits until each agent reports a converged pass.
async fn place_vms(running: &crate::Running) -> anyhow::Result<()> {
    let hosts = running.fleet.hosts()?;
    let mut want = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let vm = |name: String, power: &str, disk_mib: u64| -> anyhow::Result<crate::fleet::VmRequest> {
            Ok(serde_json::from_value(serde_json::json!({
                "spec": {
                    "name": name,
                    "vcpus": 1,
                    "memory_mib": 512,
                    "disks": [{"name": "root", "size_mib": disk_mib}],
                    "cloud_init": {"user_data": "#cloud-config\nhostname: demo\n"},
                    "labels": {"demo": "true"}
                },
                "power": power
            }))?)
        };
        let vms = vec![
            vm(format!("web-{}", i + 1), "running", 2048)?,
            vm(format!("db-{}", i + 1), "stopped", 4096)?,
        ];
        let rec = running.fleet.set_desired(h.record.id, vms)?;
        want.push((h.record.id, rec.generation));
    }
    let start = Instant::now();
    for (id, generation) in want {
        loop {
            let converged = running
                .fleet
                .host_vms(id)?
                .and_then(|v| v.report)
                .is_some_and(|r| r.generation == generation && r.converged);
            if converged {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("host {id} did not converge on its VMs within 60s; see its agent log");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("  VMs placed: every host runs web-N and has db-N defined but stopped");
    Ok(())
}

fn print_summary(running: &crate::Running, config: &Path, root: &Path, token: &str) -> anyhow::Result<()> {
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
    println!();
    for h in running.fleet.hosts()? {
        if let Some(v) = running.fleet.host_vms(h.record.id)? {
            for vm in v.observed.map(|o| o.vms).unwrap_or_default() {
                let kind = if vm.managed { "managed" } else { "not managed" };
                println!(
                    "  {:<14} {:<14} {:<8} {kind}",
                    h.record.name,
                    vm.name,
                    format!("{:?}", vm.state)
                );
            }
        }
    }
    println!();
    println!("Where to look:");
    println!(
        "  curl -s -H 'Authorization: Bearer {token}' http://{}/v1/hosts",
        running.api_addr
    );
    println!(
        "  curl -s -H 'Authorization: Bearer {token}' http://{}/v1/hosts/<HOST ID>/vms",
        running.api_addr
    );
    println!("  novacron-server -c {} host list", config.display());
    println!("  files and logs: {}", root.display());
    println!("Press Ctrl-C to stop.");
    Ok(())
}
