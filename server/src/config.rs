//! The server's TOML configuration, validated into typed values before any
//! socket is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod burst;
mod ha;

pub use burst::{AwsConfig, BurstConfig, Caps, Secret};
pub use ha::{FenceMode, HaConfig, HardwareFence, WitnessConfig};
pub use novacron_shared::config::{ConfigError, ConfigFile};
use novacron_shared::duration::serde_human;
use serde::{Deserialize, Serialize};

/// Where the server looks for its config when none is given.
pub const DEFAULT_PATH: &str = "/etc/novacron/server.toml";

/// The server configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the CA, certificates, database and tokens live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The agent link.
    #[serde(default)]
    pub quic: QuicConfig,
    /// The web API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Agent policies.
    #[serde(default)]
    pub agents: AgentPolicy,
    /// VM placement.
    #[serde(default)]
    pub scheduler: crate::scheduler::Policy,
    /// Live migration.
    #[serde(default)]
    pub migration: MigrationPolicy,
    /// Metric ingest and retention.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// High availability: host leases, fencing and restarts.
    #[serde(default)]
    pub ha: HaConfig,
    /// Cloud burst.
    #[serde(default)]
    pub burst: BurstConfig,
}

/// `Option<Duration>` in the human form of `serde_human` (`"10s"`).
pub(crate) mod serde_human_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serde_human::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Human(#[serde(with = "super::serde_human")] Duration);
        Option::<Human>::deserialize(d).map(|o| o.map(|h| h.0))
    }
}

/// `[metrics]`: how long metrics are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Every raw sample stays queryable (in memory, and on disk for
    /// restarts) this long.
    #[serde(default = "default_raw_window", with = "serde_human")]
    pub raw_window: Duration,
    /// 1-minute rollups (avg, min, max) are kept this long.
    #[serde(default = "default_retention", with = "serde_human")]
    pub retention: Duration,
}

fn default_raw_window() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 86_400)
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            raw_window: default_raw_window(),
            retention: default_retention(),
        }
    }
}

impl MetricsSettings {
    /// The ingest settings.
    pub fn to_config(&self) -> crate::metrics::MetricsConfig {
        crate::metrics::MetricsConfig {
            raw_window: self.raw_window,
            retention: self.retention,
        }
    }
}

/// How live migrations run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationPolicy {
    /// A migration running longer is aborted (the VM stays on its source).
    #[serde(default = "default_migration_timeout", with = "serde_human")]
    pub timeout: Duration,
    /// Bandwidth cap per migration, MiB/s (0: libvirt's default).
    #[serde(default)]
    pub bandwidth_mib_s: u64,
    /// How long the target and source agents get to acknowledge that they
    /// leave the VM alone before the migration starts.
    #[serde(default = "default_prepare_timeout", with = "serde_human")]
    pub prepare_timeout: Duration,
}

fn default_migration_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_prepare_timeout() -> Duration {
    Duration::from_secs(15)
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        Self {
            timeout: default_migration_timeout(),
            bandwidth_mib_s: 0,
            prepare_timeout: default_prepare_timeout(),
        }
    }
}

/// The agent link (QUIC).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    /// UDP address to listen on.
    #[serde(default = "default_quic_listen")]
    pub listen: SocketAddr,
    /// DNS names and IPs written into the server certificate at `init`.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// UDP receive buffer asked of the kernel, bytes. A fleet reconnecting
    /// at once overflows the kernel default (~208 KiB); the kernel caps the
    /// request at `net.core.rmem_max` (see packaging/etc/sysctl.d).
    #[serde(default = "default_udp_buffer")]
    pub udp_recv_buffer: usize,
}

fn default_udp_buffer() -> usize {
    8 << 20
}

/// The web API (HTTPS by default).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP address to listen on.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// A certificate chain (PEM, leaf first) to serve instead of the server
    /// certificate from the fleet CA; with `key_file`. Re-read when it
    /// changes on disk.
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// Serve plain HTTP instead of HTTPS: bearer tokens then cross the
    /// network in clear text, so only on a loopback address unless
    /// `plaintext_on_network` is also set.
    #[serde(default)]
    pub plaintext: bool,
    /// Allows `plaintext` on a non-loopback address (tokens in clear text
    /// on the network: only behind a TLS-terminating proxy on the same host).
    #[serde(default)]
    pub plaintext_on_network: bool,
    /// Requests per second each API token may make (sustained); 0 turns
    /// rate limiting off.
    #[serde(default = "default_rate")]
    pub rate_limit: f64,
    /// Requests a token may make in a burst above the sustained rate.
    #[serde(default = "default_burst")]
    pub rate_burst: u32,
}

fn default_rate() -> f64 {
    50.0
}
fn default_burst() -> u32 {
    100
}

/// How agents are treated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPolicy {
    /// How often agents send heartbeats.
    #[serde(default = "default_heartbeat", with = "serde_human")]
    pub heartbeat_interval: Duration,
    /// A session with no frame for this long is closed.
    #[serde(default = "default_session_timeout", with = "serde_human")]
    pub session_timeout: Duration,
    /// Lifetime of host certificates; agents renew at two thirds.
    #[serde(default = "default_cert_ttl", with = "serde_human")]
    pub cert_ttl: Duration,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/novacron")
}
fn default_quic_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7080))
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_cert_ttl() -> Duration {
    Duration::from_secs(30 * 86_400)
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: default_quic_listen(),
            server_names: default_server_names(),
            udp_recv_buffer: default_udp_buffer(),
        }
    }
}
impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            cert_file: None,
            key_file: None,
            plaintext: false,
            plaintext_on_network: false,
            rate_limit: default_rate(),
            rate_burst: default_burst(),
        }
    }
}
impl Default for AgentPolicy {
    fn default() -> Self {
        Self {
            heartbeat_interval: default_heartbeat(),
            session_timeout: default_session_timeout(),
            cert_ttl: default_cert_ttl(),
        }
    }
}
impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            quic: QuicConfig::default(),
            api: ApiConfig::default(),
            scheduler: crate::scheduler::Policy::default(),
            migration: MigrationPolicy::default(),
            metrics: MetricsSettings::default(),
            agents: AgentPolicy::default(),
            ha: HaConfig::default(),
            burst: BurstConfig::default(),
        }
    }
}

impl ConfigFile for ServerConfig {
    /// Checks ranges and relations between values.
    fn validate(&self) -> Result<(), ConfigError> {
        self.scheduler
            .validate()
            .map_err(|message| ConfigError::Invalid {
                key: "scheduler",
                message,
            })?;
        if !self.api.rate_limit.is_finite() || self.api.rate_limit < 0.0 {
            return Err(ConfigError::Invalid {
                key: "api.rate_limit",
                message: "must be a number of requests per second, 0 or more".into(),
            });
        }
        if self.api.cert_file.is_some() != self.api.key_file.is_some() {
            return Err(ConfigError::Invalid {
                key: "api.cert_file",
                message: "api.cert_file and api.key_file go together: give both, or neither to serve the fleet CA's server certificate".into(),
            });
        }
        if self.api.plaintext && self.api.cert_file.is_some() {
            return Err(ConfigError::Invalid {
                key: "api.plaintext",
                message: "plain HTTP serves no certificate: drop api.cert_file/api.key_file or api.plaintext"
                    .into(),
            });
        }
        if self.api.plaintext && !self.api.listen.ip().is_loopback() && !self.api.plaintext_on_network {
            return Err(ConfigError::Invalid {
                key: "api.plaintext",
                message: format!(
                    "plain HTTP on {} would send bearer tokens over the network in clear text; \
                     listen on a loopback address, drop api.plaintext (HTTPS is the default), \
                     or set api.plaintext_on_network = true behind a TLS-terminating proxy",
                    self.api.listen
                ),
            });
        }
        if self.api.rate_limit > 0.0 && self.api.rate_burst == 0 {
            return Err(ConfigError::Invalid {
                key: "api.rate_burst",
                message: "must be at least 1 when rate limiting is on".into(),
            });
        }
        if self.migration.timeout < Duration::from_secs(5) {
            return Err(ConfigError::Invalid {
                key: "migration.timeout",
                message: "must be at least 5s".into(),
            });
        }
        let w = self.metrics.raw_window;
        if w < Duration::from_secs(60) || w > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::Invalid {
                key: "metrics.raw_window",
                message: "must be between 1m and 24h".into(),
            });
        }
        if self.metrics.retention < Duration::from_secs(3600)
            || self.metrics.retention > Duration::from_secs(3660 * 86_400)
        {
            return Err(ConfigError::Invalid {
                key: "metrics.retention",
                message: "must be between 1h and 3660d".into(),
            });
        }
        let hb = self.agents.heartbeat_interval;
        if hb < Duration::from_millis(100) || hb > Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                key: "agents.heartbeat_interval",
                message: "must be between 100ms and 60s".into(),
            });
        }
        if self.agents.session_timeout < hb * 3 {
            return Err(ConfigError::Invalid {
                key: "agents.session_timeout",
                message: format!(
                    "must be at least three heartbeat intervals ({})",
                    novacron_shared::duration::format(hb * 3)
                ),
            });
        }
        self.ha.validate(hb)?;
        self.burst.validate()?;
        let ttl = self.agents.cert_ttl;
        if ttl < Duration::from_secs(5) || ttl > Duration::from_secs(10 * 365 * 86_400) {
            return Err(ConfigError::Invalid {
                key: "agents.cert_ttl",
                message: "must be between 5s and 3650d".into(),
            });
        }
        if self.quic.udp_recv_buffer > 1 << 30 {
            return Err(ConfigError::Invalid {
                key: "quic.udp_recv_buffer",
                message: "must be at most 1 GiB (0 keeps the kernel default)".into(),
            });
        }
        if self.quic.server_names.is_empty() {
            return Err(ConfigError::Invalid {
                key: "quic.server_names",
                message: "list at least one DNS name or IP agents use to reach the server".into(),
            });
        }
        for n in &self.quic.server_names {
            let ok = !n.is_empty()
                && n.len() <= 253
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "quic.server_names",
                    message: format!("{n:?} is not a DNS name or IP address"),
                });
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                message: "must not be empty".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_partial_files_fill_in() {
        let c = ServerConfig::parse("data_dir = \"/tmp/x\"\n[agents]\ncert_ttl = \"1h\"\n", "t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.agents.cert_ttl, Duration::from_secs(3600));
        assert_eq!(c.agents.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.quic.listen.port(), 7443);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = ServerConfig::parse("data_dri = \"/x\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("data_dri"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let e = ServerConfig::parse("[agents]\nheartbeat_interval = \"10ms\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("agents.heartbeat_interval"), "{e}");
        let e = ServerConfig::parse("[agents]\nheartbeat_interval = \"5s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("session_timeout"), "{e}");
        let e = ServerConfig::parse("[quic]\nserver_names = [\"a b\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("server_names"), "{e}");
        let e = ServerConfig::parse("[metrics]\nraw_window = \"5s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("metrics.raw_window"), "{e}");
        let e = ServerConfig::parse("[metrics]\nretention = \"1m\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("metrics.retention"), "{e}");
        let e = ServerConfig::parse("[api]\nlisten = \"nope\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }

    #[test]
    fn plain_http_only_on_loopback_unless_forced() {
        let c = ServerConfig::parse("[api]\nlisten = \"127.0.0.1:7080\"\nplaintext = true\n", "t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.api.plaintext);
        let e = ServerConfig::parse("[api]\nlisten = \"0.0.0.0:7080\"\nplaintext = true\n", "t").unwrap_err();
        assert!(e.to_string().contains("api.plaintext"), "{e}");
        assert!(format!("{e:?}").contains("clear text"), "{e:?}");
        let c = ServerConfig::parse(
            "[api]\nlisten = \"0.0.0.0:7080\"\nplaintext = true\nplaintext_on_network = true\n",
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.api.plaintext_on_network);
        assert!(!ServerConfig::default().api.plaintext, "HTTPS is the default");
    }

    #[test]
    fn api_certificate_and_key_go_together() {
        let e = ServerConfig::parse("[api]\ncert_file = \"/etc/a.pem\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("api.cert_file"), "{e}");
        let e = ServerConfig::parse(
            "[api]\ncert_file = \"/a.pem\"\nkey_file = \"/a.key\"\nplaintext = true\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("api.plaintext"), "{e}");
        ServerConfig::parse("[api]\ncert_file = \"/a.pem\"\nkey_file = \"/a.key\"\n", "t")
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
