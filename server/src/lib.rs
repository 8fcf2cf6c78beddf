//! NovaCron server: agent sessions, the redb store and the web API.
//!
//! `main.rs` only parses the command line; [`start`] wires the parts.

pub mod api;
pub mod burst;
pub mod bus;
pub mod client;
pub mod config;
pub mod datadir;
pub mod demo;
pub mod fleet;
/// High availability: host leases (pure), later the HA controller.
pub mod ha;
pub mod https;
pub mod metrics;
pub mod ratelimit;
pub mod scheduler;
pub mod secrets;
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use novacron_shared::clock::Clock;
use novacron_shared::notify::Liveness;

use config::ServerConfig;
use datadir::{DataDir, DataDirError};
use fleet::Fleet;
use store::Store;

pub use novacron_shared::clock::unix_ms;

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A malformed test fault (`NOVACRON_FREEZE`).
    #[error("{0}")]
    Fault(String),
    /// The data directory is missing or broken.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The store failed to open.
    #[error("cannot open the store")]
    Store(#[from] store::StoreError),
    /// The metrics database failed to open.
    #[error("cannot open the metrics database")]
    Metrics(#[from] metrics::db::DbError),
    /// TLS setup failed.
    #[error("TLS setup failed")]
    Tls(#[from] novacron_shared::tls::TlsError),
    /// The server certificate could not be loaded, mended or renewed.
    #[error("server certificate")]
    Https(#[from] https::HttpsError),
    /// The cloud burst provider could not be set up.
    #[error("cloud burst ([burst.aws]): {0}")]
    Burst(String),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The session layer.
    pub fleet: Arc<Fleet>,
    /// The QUIC endpoint agents connect to.
    pub endpoint: quinn::Endpoint,
    /// Where the QUIC endpoint listens.
    pub quic_addr: SocketAddr,
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// The API's URL (`https://`, or `http://` when configured plain).
    pub api_url: client::ApiUrl,
    /// The fleet CA the API's default certificate chains to.
    pub ca_file: std::path::PathBuf,
    /// The main loops, for the systemd watchdog.
    pub liveness: Liveness,
}

impl Running {
    /// A client of this server's API with `token`, trusting the fleet CA.
    pub fn api_client(&self, token: &str) -> Result<client::ApiClient, client::CaError> {
        let c = client::ApiClient::new(self.api_url.clone(), Some(token.to_string()));
        Ok(if self.api_url.is_https() {
            c.with_ca(&client::TrustedCa::from_file(&self.ca_file)?)
        } else {
            c
        })
    }
}

impl Running {
    /// Closes every session and the endpoint, and waits briefly for the
    /// close to reach the agents.
    pub async fn shutdown(&self) {
        self.fleet.close_all();
        self.endpoint.close(
            novacron_shared::protocol::ErrorCode::ShuttingDown
                .close_code()
                .into(),
            b"server shutting down",
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The QUIC endpoint on its own UDP socket, with a receive buffer big
/// enough for a fleet reconnecting at once.
fn server_endpoint(
    server_cfg: quinn::ServerConfig,
    addr: std::net::SocketAddr,
    recv_buffer: usize,
) -> std::io::Result<quinn::Endpoint> {
    let sock = std::net::UdpSocket::bind(addr)?;
    if recv_buffer > 0 {
        let state = quinn::udp::UdpSocketState::new((&sock).into())?;
        state.set_recv_buffer_size((&sock).into(), recv_buffer)?;
        let granted = state.recv_buffer_size((&sock).into())?;
        // Linux reports double the size set, so a full grant reads >= asked.
        if granted < recv_buffer {
            tracing::warn!(
                asked = recv_buffer,
                granted,
                "the kernel capped the QUIC receive buffer; raise net.core.rmem_max \
                 (packaging/etc/sysctl.d/90-novacron-server.conf) or bursts of agents may be dropped"
            );
        } else {
            tracing::info!(bytes = granted, "QUIC receive buffer");
        }
    }
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        sock,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

/// Opens the store, binds the QUIC endpoint and the API, and starts serving
/// on the operating system's clock.
pub async fn start(cfg: &ServerConfig) -> Result<Running, StartError> {
    start_with_clock(cfg, Clock::system()).await
}

/// Like [`start`], with every part reading the time from `clock` (the one
/// clock of the server: sessions, operations, metrics, events).
pub async fn start_with_clock(cfg: &ServerConfig, clock: Clock) -> Result<Running, StartError> {
    let liveness = Liveness::from_env(clock.clone()).map_err(StartError::Fault)?;
    let dir = DataDir::new(&cfg.data_dir);
    let ca = dir.load_ca()?;
    let store = Store::open(&dir.db())?;
    // One certificate for both listeners, renewed in place.
    let renewer = https::Renewer::open(cfg, clock.clone())?;
    let certs = renewer.certs();
    let server_cfg = novacron_shared::tls::server_config_reloadable(
        ca.cert_der().clone(),
        certs.fleet.clone(),
        cfg.agents.session_timeout,
    )?;
    let api_tls = if cfg.api.plaintext {
        tracing::warn!(addr = %cfg.api.listen, "the API serves plain HTTP ([api] plaintext): bearer tokens cross the wire in clear text");
        None
    } else {
        Some(https::acceptor(certs.api.clone())?)
    };
    let endpoint =
        server_endpoint(server_cfg, cfg.quic.listen, cfg.quic.udp_recv_buffer).map_err(|source| {
            StartError::Bind {
                addr: cfg.quic.listen,
                source,
            }
        })?;
    let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.quic.listen,
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.api.listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.api.listen,
        source,
    })?;
    let fleet = Fleet::with_ha(
        store.clone(),
        ca,
        cfg.agents.clone(),
        cfg.scheduler,
        cfg.migration.clone(),
        cfg.ha.clone(),
        clock.clone(),
    )?;
    let metrics = metrics::Metrics::open(&dir.metrics_db(), cfg.metrics.to_config(), clock)?;
    fleet.set_metrics(metrics);
    let burst = Arc::new(burst::start(&cfg.burst, fleet.ca_der())?);
    fleet.set_burst(burst.clone());
    tokio::spawn(fleet.clone().serve(endpoint.clone()));
    fleet.clone().resume_operations();
    tokio::spawn(api::Api::new(fleet.clone(), store, cfg.api.clone()).serve_on(listener, api_tls.clone()));
    tokio::spawn(renewer.run());
    // The main loops the systemd watchdog watches: the HA driver ticks at
    // least every second; a broker tick may wait on a cloud call per
    // instance (each bounded by its timeout), so its gap is generous.
    let ha_beat = liveness.register("ha-driver", ha::driver::MAX_SLEEP * 10);
    let broker_beat = liveness.register("burst-broker", cfg.burst.interval * 4 + cfg.burst.launch_timeout);
    tokio::spawn(ha::driver::run(fleet.clone(), ha_beat));
    // Also without bursting: it places waiting VMs when a host fits.
    tokio::spawn(burst::broker::run(fleet.clone(), burst, broker_beat));
    let api_url = if api_tls.is_some() {
        client::ApiUrl::from(api_addr)
    } else {
        client::ApiUrl::plain(api_addr)
    };
    tracing::info!(%quic_addr, %api_addr, api = %api_url, "novacron-server started");
    Ok(Running {
        fleet,
        endpoint,
        quic_addr,
        api_addr,
        api_url,
        ca_file: dir.ca_cert(),
        liveness,
    })
}
