//! `novacron-server`: parses the command line and wires the parts together.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hyper::Method;
use novacron_server::config::{self, ConfigFile, ServerConfig};
use novacron_server::datadir::DataDir;
use novacron_server::{client, demo};
use novacron_shared::notify::{spawn_watchdog, Notifier};

/// The NovaCron server: fleet state, agent sessions and the web API.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Path to the TOML config file. Without it, /etc/novacron/server.toml is
    /// read if it exists, and built-in defaults are used otherwise.
    #[arg(long, short, env = "NOVACRON_SERVER_CONFIG", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the data directory: fleet CA, server certificate, database and
    /// the first admin API token. Refuses to overwrite an existing CA.
    Init,
    /// Run the server (agent link and web API) until SIGINT or SIGTERM.
    Run,
    /// Check the config file and exit (for systemd's ExecStartPre).
    Validate,
    /// Join tokens for enrolling hosts (talks to the running server's API).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Hosts (talks to the running server's API).
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// The fleet CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run a whole demo fleet here: a server and agents on libvirt test-driver
    /// hosts, all enrolled and connected, in a temporary directory.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a new one-time join token.
    Create {
        /// How long the token stays valid (e.g. 10m, 1h, 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand, Debug)]
enum HostCommand {
    /// List hosts with their state.
    List,
    /// Revoke a host: its certificate is refused from now on, including on
    /// live connections.
    Revoke {
        /// The host id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Print the CA's SHA-256 fingerprint (for `novacron-agent join --ca-fingerprint`).
    Fingerprint,
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<ServerConfig> {
    let (p, explicit) = match path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_PATH), false),
    };
    Ok(ServerConfig::load(&p, explicit)?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo(args) = cli.command {
        return demo::run(args).await;
    }
    let cfg = load_config(&cli.config)?;
    let dir = DataDir::new(&cfg.data_dir);
    match cli.command {
        Command::Validate => {
            println!(
                "config OK (data_dir {}, quic {}, api {})",
                cfg.data_dir.display(),
                cfg.quic.listen,
                cfg.api.listen
            );
        }
        Command::Init => {
            let report = dir.init(&cfg, novacron_shared::clock::Clock::system().wall())?;
            println!("Initialised {}", dir.root().display());
            println!("CA fingerprint: sha256:{}", report.ca_fingerprint);
            println!(
                "Admin API token (also in {}): {}",
                dir.admin_token().display(),
                report.admin_token
            );
            println!("Next: `novacron-server run`, then `novacron-server token create` and on each host");
            println!(
                "  novacron-agent join --server <this-host>:{} --token <token> --ca-fingerprint {}",
                cfg.quic.listen.port(),
                report.ca_fingerprint
            );
        }
        Command::Run => {
            let notifier = Arc::new(Notifier::from_env()?);
            let running = novacron_server::start(&cfg).await?;
            // Both listeners are bound and the store is open: serving.
            notifier.ready(&format!(
                "serving: agents on {}, API on {}",
                running.quic_addr, running.api_url
            ));
            spawn_watchdog(notifier.clone(), running.liveness.clone())?;
            wait_for_signal().await?;
            tracing::info!("shutting down");
            notifier.stopping();
            running.shutdown().await;
        }
        Command::Ca {
            command: CaCommand::Fingerprint,
        } => {
            println!("sha256:{}", dir.ca_fingerprint()?);
        }
        Command::Token {
            command: TokenCommand::Create { ttl },
        } => {
            let d = novacron_shared::duration::parse(&ttl)?;
            let v = api(
                &cfg,
                &dir,
                Method::POST,
                "/v1/join-tokens",
                Some(serde_json::json!({"ttl": novacron_shared::duration::format(d)})),
            )
            .await?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        Command::Host {
            command: HostCommand::List,
        } => {
            let v = api(&cfg, &dir, Method::GET, "/v1/hosts", None).await?;
            println!(
                "{:<38} {:<20} {:<9} {:>5} {:>9}",
                "ID", "NAME", "STATE", "CPUS", "MEM MiB"
            );
            for h in v["hosts"].as_array().into_iter().flatten() {
                println!(
                    "{:<38} {:<20} {:<9} {:>5} {:>9}",
                    h["id"].as_str().unwrap_or("?"),
                    h["name"].as_str().unwrap_or("?"),
                    h["state"].as_str().unwrap_or("?"),
                    h["capacity"]["cpus"].to_string(),
                    h["capacity"]["memory_mib"].to_string(),
                );
            }
        }
        Command::Host {
            command: HostCommand::Revoke { id },
        } => {
            let v = api(&cfg, &dir, Method::POST, &format!("/v1/hosts/{id}/revoke"), None).await?;
            println!(
                "revoked host {} (serial {})",
                v["id"].as_str().unwrap_or(&id),
                v["cert_serial"].as_str().unwrap_or("?")
            );
        }
        Command::Demo(_) => unreachable!("handled above"),
    }
    Ok(())
}

async fn api(
    cfg: &ServerConfig,
    dir: &DataDir,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let token = dir.read_admin_token()?;
    let mut addr = cfg.api.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let (url, ca) = if cfg.api.plaintext {
        (client::ApiUrl::plain(addr), None)
    } else {
        // The fleet CA, and the chain of an operator's own API certificate.
        let extra: Vec<&std::path::Path> = cfg.api.cert_file.iter().map(|p| p.as_path()).collect();
        (
            client::ApiUrl::from(addr),
            Some(client::TrustedCa::from_files(&dir.ca_cert(), &extra)?),
        )
    };
    // The client's own timeout (30 s) bounds the call.
    Ok(client::call(url, ca.as_ref(), &token, method, path, body).await?)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
