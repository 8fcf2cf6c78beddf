//! The local server's config, when there is one (`/etc/novacron/server.toml`
//! or `NOVACRON_SERVER_CONFIG`): it names the default API address and the
//! data directory holding `admin.token` and `ca.pem`. Only `data_dir` and
//! `[api]`'s `listen`, `plaintext` and `cert_file` are read; the rest of
//! the file is the server's business.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the server reads its config unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/novacron/server.toml";

/// What the CLI takes from the server's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LocalServer {
    /// The server's data directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The API section.
    #[serde(default)]
    pub api: LocalApi,
}

/// The API section of the server's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LocalApi {
    /// Where the API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plain HTTP instead of HTTPS.
    #[serde(default)]
    pub plaintext: bool,
    /// The operator's certificate for the API, if any (its chain anchors
    /// the check besides the fleet CA).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/novacron")
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7080))
}

impl Default for LocalApi {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            plaintext: false,
            cert_file: None,
        }
    }
}

impl Default for LocalServer {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            api: LocalApi::default(),
        }
    }
}

impl LocalServer {
    /// The config at `path`; the defaults when it is missing or unreadable
    /// (the CLI then needs `--api` and a token).
    pub fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| toml::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// The local server's config: `NOVACRON_SERVER_CONFIG` or the default path.
    pub fn find() -> Self {
        let path = std::env::var_os("NOVACRON_SERVER_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        Self::load(&path)
    }

    /// The admin token the server writes into its data directory.
    pub fn admin_token(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }

    /// The fleet CA in the data directory.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    /// The API address to call: the listen address, loopback when it is
    /// the unspecified address.
    pub fn api_addr(&self) -> SocketAddr {
        let mut addr = self.api.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_settings_and_ignores_the_rest() {
        let c: LocalServer = toml::from_str(
            "data_dir = \"/srv/nc\"\n[api]\nlisten = \"0.0.0.0:9000\"\nrate_limit = 5.0\n[quic]\nlisten = \"0.0.0.0:7443\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.admin_token(), PathBuf::from("/srv/nc/admin.token"));
        assert_eq!(c.api_addr(), SocketAddr::from(([127, 0, 0, 1], 9000)));
        let d: LocalServer = toml::from_str("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d, LocalServer::default());
        assert_eq!(
            LocalServer::load(Path::new("/nonexistent/server.toml")),
            LocalServer::default()
        );
    }
}
