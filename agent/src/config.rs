//! The agent's TOML configuration, validated before anything connects.

use std::path::PathBuf;

pub use novacron_shared::config::{ConfigError, ConfigFile};
use serde::{Deserialize, Serialize};

/// Where the agent looks for its config when none is given.
pub const DEFAULT_PATH: &str = "/etc/novacron/agent.toml";

/// The agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The server's QUIC address (`host:port`). Defaults to the one given to
    /// `join`, which is remembered in the data directory.
    #[serde(default)]
    pub server: Option<String>,
    /// The name the server's certificate must carry. Defaults to the host
    /// part of `server`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Where the key, certificates and enrollment live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The libvirt connection URI.
    #[serde(default = "default_uri")]
    pub libvirt_uri: String,
    /// The host name reported to the server. Defaults to the kernel's.
    #[serde(default)]
    pub hostname: Option<String>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/novacron-agent")
}
fn default_uri() -> String {
    "qemu:///system".into()
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: None,
            server_name: None,
            data_dir: default_data_dir(),
            libvirt_uri: default_uri(),
            hostname: None,
        }
    }
}

impl ConfigFile for AgentConfig {
    /// Checks values.
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(s) = &self.server {
            split_host_port(s).map_err(|message| ConfigError::Invalid {
                key: "server",
                message,
            })?;
        }
        if !self.libvirt_uri.contains(":///") && !self.libvirt_uri.contains("://") {
            return Err(ConfigError::Invalid {
                key: "libvirt_uri",
                message: format!(
                    "{:?} is not a libvirt URI (e.g. qemu:///system, test:///default)",
                    self.libvirt_uri
                ),
            });
        }
        if let Some(h) = &self.hostname {
            if h.is_empty() || h.len() > 253 || h.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(ConfigError::Invalid {
                    key: "hostname",
                    message: "must be 1-253 printable characters without spaces".into(),
                });
            }
        }
        Ok(())
    }
}

/// Splits `host:port` (or `[v6]:port`) and checks the port.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} must be host:port, e.g. fleet.example.com:7443"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: port {port:?} is not a number from 1 to 65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(format!("{s:?} must be host:port with a non-zero port"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c = AgentConfig::parse(
            "server = \"10.0.0.1:7443\"\nlibvirt_uri = \"test:///default\"\n",
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.as_deref(), Some("10.0.0.1:7443"));
        assert!(AgentConfig::parse("server = \"nope\"\n", "t").is_err());
        assert!(AgentConfig::parse("libvirt_uri = \"qemu\"\n", "t").is_err());
        let e = AgentConfig::parse("sever = \"x:1\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("sever"), "{e}");
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("[::1]:7443"), Ok(("::1".into(), 7443)));
        assert_eq!(split_host_port("a.b:1"), Ok(("a.b".into(), 1)));
        assert!(split_host_port("a.b:0").is_err());
        assert!(split_host_port("a.b:x").is_err());
    }
}
