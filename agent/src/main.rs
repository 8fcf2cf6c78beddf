//! `novacron-agent`: parses the command line and wires the parts together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use novacron_agent::config::{self, split_host_port, AgentConfig, ConfigFile};
use novacron_agent::ha;
use novacron_agent::hypervisor::Hypervisor;
use novacron_agent::identity::{Enrollment, Identity, IdentityError, Paths};
use novacron_agent::link::{self, LinkConfig};
use novacron_shared::clock::Clock;
use novacron_shared::notify::{spawn_watchdog, Liveness, Notifier};

/// The NovaCron host agent: runs the VMs the server wants on this host's
/// libvirt and streams the host's state to the server over mutual TLS.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Path to the TOML config file. Without it, /etc/novacron/agent.toml is
    /// read if it exists, and built-in defaults are used otherwise.
    #[arg(long, short, env = "NOVACRON_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll this host: make a key here, send a CSR with a one-time token
    /// over a connection that pins the fleet CA, and store the certificate.
    Join {
        /// The server's agent address, host:port (e.g. fleet.example.com:7443).
        #[arg(long)]
        server: String,
        /// The one-time join token from `novacron-server token create`.
        #[arg(long, env = "NOVACRON_JOIN_TOKEN")]
        token: String,
        /// SHA-256 fingerprint of the fleet CA, from `novacron-server ca fingerprint`.
        #[arg(long)]
        ca_fingerprint: String,
        /// The name on the server's certificate, if not the host part of --server.
        #[arg(long)]
        server_name: Option<String>,
        /// Join again even if this host already joined a fleet.
        #[arg(long)]
        force: bool,
    },
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// Offer only these protocol versions, as MIN-MAX (for compatibility tests).
        #[arg(long, hide = true, value_parser = parse_range)]
        protocol_versions: Option<(u16, u16)>,
    },
    /// Check the config file (and the enrollment, if any) and exit.
    Validate,
    /// The fence guard (started by `run`): kills the HA QEMUs when the
    /// lease deadline passes without an agent renewing it.
    #[command(hide = true)]
    FenceGuard {
        /// Its socket.
        #[arg(long)]
        socket: PathBuf,
    },
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX")?;
    Ok((
        a.parse().map_err(|_| "bad MIN")?,
        b.parse().map_err(|_| "bad MAX")?,
    ))
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Command::FenceGuard { socket } = &cli.command {
        // Needs no config: it only holds a deadline and kills what it was
        // told to (a config that turned invalid must not stop it).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        return Ok(runtime.block_on(novacron_agent::guard::serve(socket, Clock::system()))?);
    }
    let cfg = {
        let (p, explicit) = match &cli.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(config::DEFAULT_PATH), false),
        };
        AgentConfig::load(&p, explicit)?
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command, cfg))
}

async fn run(command: Command, cfg: AgentConfig) -> anyhow::Result<()> {
    let paths = Paths::new(&cfg.data_dir);
    match command {
        Command::FenceGuard { socket } => {
            novacron_agent::guard::serve(&socket, Clock::system()).await?;
        }
        Command::Validate => {
            let enrolled = match Enrollment::load(&paths) {
                Ok(e) => format!("enrolled as host {} with {}", e.host_id, e.server),
                Err(IdentityError::NotEnrolled(_)) => "not enrolled yet".into(),
                Err(e) => return Err(e.into()),
            };
            println!(
                "config OK (data_dir {}, libvirt {}); {enrolled}",
                cfg.data_dir.display(),
                cfg.libvirt_uri
            );
        }
        Command::Join {
            server,
            token,
            ca_fingerprint,
            server_name,
            force,
        } => {
            if !force && paths.identity().exists() {
                return Err(IdentityError::AlreadyEnrolled(paths.identity().display().to_string()).into());
            }
            let (host, _) = split_host_port(&server).map_err(anyhow::Error::msg)?;
            let server_name = server_name.unwrap_or(host);
            let link_cfg = LinkConfig::new(server.clone(), server_name.clone(), cfg.host_name());
            let clock = Clock::system();
            let started = clock.now();
            let identity = link::join(&link_cfg, &token, &ca_fingerprint, novacron_agent::VERSION)
                .await
                .map_err(|e| anyhow::anyhow!("join failed: {}", link::error_chain(&e)))?;
            identity.save(&paths)?;
            Enrollment {
                server,
                server_name,
                host_id: identity.host_id.to_string(),
            }
            .save(&paths)?;
            println!(
                "joined as host {} in {:?}; certificate valid until {:?}",
                identity.host_id,
                clock.since(started),
                identity.validity.not_after
            );
            println!("start the agent with `novacron-agent run` (or `systemctl start novacron-agent`)");
        }
        Command::Run { protocol_versions } => {
            let identity = Identity::load(&paths)?;
            let enrollment = Enrollment::load(&paths)?;
            let server = cfg.server.clone().unwrap_or(enrollment.server);
            let server_name = match (&cfg.server_name, &cfg.server) {
                (Some(n), _) => n.clone(),
                (None, Some(s)) => split_host_port(s).map_err(anyhow::Error::msg)?.0,
                (None, None) => enrollment.server_name,
            };
            // The one clock every part with timeouts, deadlines or backoff reads.
            let clock = Clock::system();
            let mut link_cfg = LinkConfig::new(server, server_name, cfg.host_name());
            link_cfg.clock = clock.clone();
            if let Some(v) = protocol_versions {
                link_cfg.versions = v;
            }
            let (hv, events) = Hypervisor::start_with_clock(
                &cfg.libvirt_uri,
                cfg.vms.call_timeout,
                cfg.host_setup(),
                clock.clone(),
            )?;
            let hv = hv.with_storage(cfg.vms.storage());
            let metrics = if cfg.metrics.enabled {
                let m = novacron_agent::metrics::start(
                    &cfg.metrics,
                    &cfg.data_dir.join("spool"),
                    &hv,
                    tokio::runtime::Handle::current(),
                    clock.clone(),
                )?;
                tracing::info!(interval = ?cfg.metrics.interval, "sampling metrics");
                link_cfg.metrics = Some(m.clone());
                Some(m)
            } else {
                None
            };
            // systemd: READY once the link is up or retrying; the watchdog
            // watches the link and the converge loops.
            let notifier = Arc::new(Notifier::from_env()?);
            let liveness = Liveness::from_env(clock.clone()).map_err(anyhow::Error::msg)?;
            link_cfg.beat = Some(Arc::new(liveness.register("link", link::LOOP_GAP)));
            let settled = Arc::new(tokio::sync::Notify::new());
            link_cfg.settled = Some(settled.clone());
            let (tx, rx) = tokio::sync::watch::channel(false);
            tracing::info!(host_id = %identity.host_id, server = %link_cfg.server, libvirt = %cfg.libvirt_uri, "novacron-agent starting");
            // The HA lease: without a lease within the saved lease length,
            // HA VMs a previous run left running are fenced.
            let saved = ha::load_terms(&paths.lease_terms());
            let (timing, mode) = ha::initial_timing(saved.as_ref());
            let (lease, lease_driver) =
                ha::LeaseHandle::new(timing, mode, clock.clone(), Some(paths.lease_terms()))?;
            if let Some(t) = &saved {
                // A previous run may have held a lease under these terms,
                // and their isolation response holds until the server
                // says again.
                lease.resume_saved(t);
            }
            tracing::info!(lease = ?timing.lease, fence_time = ?timing.fence_time, ?mode, isolation = ?lease.isolation(), saved = saved.is_some(), "HA lease: none yet");
            // The peer witness. Without it (off, or its port taken) the
            // host fences on every lease loss: the safe side.
            let witness_task = if cfg.witness.enabled {
                match novacron_agent::witness::start(&identity, cfg.witness.listen, cfg.witness.advertise) {
                    Ok(w) => {
                        tracing::info!(listen = %cfg.witness.listen, port = w.endpoint.local_addr().map(|a| a.port()).unwrap_or(0), "peer witness listening");
                        link_cfg.witness = Some(w.handle.clone());
                        Some(tokio::spawn(novacron_agent::witness::run(
                            w,
                            lease.clone(),
                            clock.clone(),
                            rx.clone(),
                        )))
                    }
                    Err(e) => {
                        tracing::error!(error = %link::error_chain(&e), "the peer witness cannot start; HA VMs fence on every lease loss");
                        None
                    }
                }
            } else {
                None
            };
            let ha_task = tokio::spawn(ha::run(lease.clone(), lease_driver, hv.clone(), rx.clone()));
            link_cfg.lease = Some(lease.clone());
            let guard_task = cfg.vms.fence_guard.then(|| {
                let guard_cfg = novacron_agent::guard::GuardConfig {
                    socket: paths.fence_guard(),
                    program: std::env::current_exe().ok(),
                    // Only a QEMU libvirt has QEMU pid files (not the test driver).
                    pid_dir: cfg
                        .libvirt_uri
                        .starts_with("qemu")
                        .then(|| cfg.vms.qemu_pid_dir.clone()),
                };
                tokio::spawn(novacron_agent::guard::run_client(
                    guard_cfg,
                    lease.clone(),
                    clock.clone(),
                    rx.clone(),
                ))
            });
            let (channels, desired) = link::VmChannels::new(1024);
            let converge_cfg = novacron_agent::converge::ConvergeConfig {
                shutdown_grace: cfg.vms.shutdown_timeout,
                lease: Some(lease),
                // A round may wait on libvirt calls (each bounded by
                // `[vms] call_timeout`) and on a guest's shutdown grace:
                // the gap allows both, generously.
                beat: Some(Arc::new(liveness.register(
                    "converge",
                    cfg.vms.shutdown_timeout + cfg.vms.call_timeout * 8 + Duration::from_secs(30),
                ))),
                ..Default::default()
            };
            let vms = tokio::spawn(novacron_agent::converge::run(
                hv.clone(),
                converge_cfg,
                clock.clone(),
                desired,
                events,
                channels.outbox_tx.clone(),
                rx.clone(),
            ));
            {
                let notifier = notifier.clone();
                let server = link_cfg.server.clone();
                tokio::spawn(async move {
                    settled.notified().await;
                    notifier.ready(&format!("serving; link to {server} up or retrying"));
                });
            }
            let link = tokio::spawn(link::run(link_cfg, identity, paths, hv, channels, rx));
            spawn_watchdog(notifier.clone(), liveness)?;
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            if cfg.vms.fence_guard {
                tracing::info!("shutting down; VMs keep running (the fence guard stops HA VMs at the lease deadline unless an agent renews the lease)");
            } else {
                tracing::warn!("shutting down; VMs keep running, HA VMs too (no fence guard): the server may restart them elsewhere after the lease");
            }
            if let Some(m) = &metrics {
                m.stop();
            }
            notifier.stopping();
            let _ = tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), link).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), vms).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), ha_task).await;
            if let Some(w) = witness_task {
                let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
            }
            if let Some(g) = guard_task {
                let _ = tokio::time::timeout(Duration::from_secs(1), g).await;
            }
        }
    }
    Ok(())
}
