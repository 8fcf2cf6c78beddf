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
    /// How VMs are laid out on this host.
    #[serde(default)]
    pub vms: VmConfig,
    /// The host's labels (`rack = "r1"`), reported to the server; VMs ask
    /// for them with `placement.required_labels`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Metric sampling and the spool.
    #[serde(default)]
    pub metrics: crate::metrics::MetricsSettings,
    /// The peer witness (HA: agents ask each other whether they still
    /// have the server before fencing).
    #[serde(default)]
    pub witness: WitnessSettings,
}

/// The `[witness]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessSettings {
    /// Answer peers and ask them (mutual-TLS QUIC with the fleet's
    /// certificates). Off, this host's HA VMs fence on every lease loss,
    /// and it counts for no peer.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Where to listen for peers (UDP).
    #[serde(default = "default_witness_listen")]
    pub listen: std::net::SocketAddr,
    /// The address peers reach this host at, reported to the server.
    /// Unset: the local IP of the connection to the server, with the
    /// listen port.
    #[serde(default)]
    pub advertise: Option<std::net::SocketAddr>,
}

fn default_witness_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 7444))
}

impl Default for WitnessSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_witness_listen(),
            advertise: None,
        }
    }
}

impl WitnessSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = self.advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(ConfigError::Invalid {
                    key: "witness.advertise",
                    message: format!("{a} is not an address peers can reach (no unspecified IP, no port 0)"),
                });
            }
        }
        Ok(())
    }
}

/// The `[vms]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The libvirt storage pool for VM disks (dir-backed; created if missing).
    #[serde(default = "default_pool")]
    pub storage_pool: String,
    /// The pool's directory.
    #[serde(default = "default_pool_path")]
    pub storage_path: PathBuf,
    /// Where serial console logs are written (by libvirt's virtlogd).
    #[serde(default = "default_console_dir")]
    pub console_log_dir: PathBuf,
    /// `auto` (kvm when the host offers it, else qemu), `kvm` or `qemu`.
    #[serde(default = "default_virt_type")]
    pub virt_type: String,
    /// How long a guest gets to shut down (ACPI) before it is powered off.
    #[serde(default = "default_shutdown", with = "novacron_shared::duration::serde_human")]
    pub shutdown_timeout: std::time::Duration,
    /// How long one libvirt call may take before it counts as hung.
    #[serde(
        default = "default_call_timeout",
        with = "novacron_shared::duration::serde_human"
    )]
    pub call_timeout: std::time::Duration,
    /// The libvirt URI other hosts' libvirtd use to live-migrate VMs here,
    /// e.g. `qemu+tls://host.example/system`. Unset: this host takes no
    /// migrations (the server says so when one is asked for).
    #[serde(default)]
    pub migration_uri: Option<String>,
    /// The storage pool's directory is shared with other hosts (NFS, or
    /// one directory for namespaced test hosts), at the same path on
    /// each: reported to the server (HA VMs with disks move only between
    /// hosts sharing it), and a volume another host created is reused.
    #[serde(default)]
    pub storage_shared: bool,
    /// libvirt guards the disks of running VMs with its lock manager
    /// (`lock_manager = "lockd"` in qemu.conf, virtlockd running; the
    /// locks are taken on the disk files of the shared pool): reported to
    /// the server, which may then restart an HA VM elsewhere while this
    /// host is silent, since a second start fails at the lock. Needs
    /// `storage_shared`.
    #[serde(default)]
    pub disk_locks: bool,
    /// Run the fence guard (a small process of this binary that kills the
    /// HA QEMUs at the lease deadline if the agent is killed or stopped
    /// and no agent renews the lease). Off, an agent stopped or killed for
    /// longer than the server's fence wait leaves its HA VMs running while
    /// the server restarts them elsewhere: two copies. Only for hosts that
    /// run no HA VMs, or tests.
    #[serde(default = "default_true")]
    pub fence_guard: bool,
    /// Where libvirt keeps its QEMU pid files (`<domain>.pid`), for the
    /// fence guard.
    #[serde(default = "default_qemu_pid_dir")]
    pub qemu_pid_dir: PathBuf,
}

fn default_true() -> bool {
    true
}
fn default_qemu_pid_dir() -> PathBuf {
    PathBuf::from("/run/libvirt/qemu")
}
fn default_pool() -> String {
    "novacron".into()
}
fn default_pool_path() -> PathBuf {
    PathBuf::from("/var/lib/libvirt/images/novacron")
}
fn default_console_dir() -> PathBuf {
    PathBuf::from("/var/log/libvirt/qemu")
}
fn default_virt_type() -> String {
    "auto".into()
}
fn default_shutdown() -> std::time::Duration {
    std::time::Duration::from_secs(120)
}
fn default_call_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            storage_pool: default_pool(),
            storage_path: default_pool_path(),
            console_log_dir: default_console_dir(),
            virt_type: default_virt_type(),
            shutdown_timeout: default_shutdown(),
            call_timeout: default_call_timeout(),
            migration_uri: None,
            storage_shared: false,
            disk_locks: false,
            fence_guard: true,
            qemu_pid_dir: default_qemu_pid_dir(),
        }
    }
}

impl VmConfig {
    /// Whether the pool is shared (`storage_shared`).
    pub fn storage(&self) -> crate::vmops::Storage {
        if self.storage_shared {
            crate::vmops::Storage::Shared
        } else {
            crate::vmops::Storage::Local
        }
    }

    /// The driver's view of this section.
    pub fn host_setup(&self) -> crate::vmops::HostSetup {
        use crate::domxml::VirtType;
        crate::vmops::HostSetup {
            pool: self.storage_pool.clone(),
            pool_path: self.storage_path.to_string_lossy().into_owned(),
            console_dir: self.console_log_dir.to_string_lossy().into_owned(),
            migration_uri: self.migration_uri.clone(),
            labels: Default::default(),
            host_name: String::new(),
            disk_locks: self.disk_locks,
            virt_type: match self.virt_type.as_str() {
                "kvm" => Some(VirtType::Kvm),
                "qemu" => Some(VirtType::Qemu),
                _ => None,
            },
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Err(m) = novacron_shared::spec::check_name(&self.storage_pool, 63) {
            return Err(ConfigError::Invalid {
                key: "vms.storage_pool",
                message: m,
            });
        }
        for (key, p) in [
            ("vms.storage_path", &self.storage_path),
            ("vms.console_log_dir", &self.console_log_dir),
            ("vms.qemu_pid_dir", &self.qemu_pid_dir),
        ] {
            let s = p.to_string_lossy();
            if !p.is_absolute() || s.chars().any(char::is_control) || s.contains("/../") {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{s:?} must be a clean absolute path"),
                });
            }
        }
        if !matches!(self.virt_type.as_str(), "auto" | "kvm" | "qemu") {
            return Err(ConfigError::Invalid {
                key: "vms.virt_type",
                message: format!("{:?} is not one of auto, kvm, qemu", self.virt_type),
            });
        }
        if let Some(u) = &self.migration_uri {
            novacron_shared::spec::check_libvirt_uri(u).map_err(|message| ConfigError::Invalid {
                key: "vms.migration_uri",
                message,
            })?;
        }
        if self.call_timeout < std::time::Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "vms.call_timeout",
                message: "must be at least 1s".into(),
            });
        }
        if self.disk_locks && !self.storage_shared {
            return Err(ConfigError::Invalid {
                key: "vms.disk_locks",
                message: "needs vms.storage_shared = true: the locks guard disks that other hosts can open"
                    .into(),
            });
        }
        Ok(())
    }
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
            vms: VmConfig::default(),
            labels: Default::default(),
            metrics: Default::default(),
            witness: Default::default(),
        }
    }
}

impl AgentConfig {
    /// The VM layout of this host, with its labels.
    pub fn host_setup(&self) -> crate::vmops::HostSetup {
        let mut s = self.vms.host_setup();
        s.labels = self.labels.clone();
        s.host_name = self.host_name();
        s
    }

    /// The host's name: `hostname`, else the kernel's.
    pub fn host_name(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "unknown".into())
        })
    }
}

impl ConfigFile for AgentConfig {
    /// Checks values.
    fn validate(&self) -> Result<(), ConfigError> {
        self.metrics
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        let max = novacron_shared::spec::MAX_HOST_LABELS;
        if self.labels.len() > max {
            return Err(ConfigError::Invalid {
                key: "labels",
                message: format!("{} labels; the limit is {max}", self.labels.len()),
            });
        }
        for (k, v) in &self.labels {
            novacron_shared::spec::check_label(k, v).map_err(|message| ConfigError::Invalid {
                key: "labels",
                message: format!("{k:?}: {message}"),
            })?;
        }
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
        self.witness.validate()?;
        self.vms.validate()
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
        let c = AgentConfig::parse("[vms]\nvirt_type = \"qemu\"\nshutdown_timeout = \"20s\"\n", "t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.vms.shutdown_timeout, std::time::Duration::from_secs(20));
        assert_eq!(c.vms.storage_pool, "novacron");
        assert_eq!(c.vms.storage(), crate::vmops::Storage::Local);
        let c = AgentConfig::parse("[vms]\nstorage_shared = true\n", "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.vms.storage(), crate::vmops::Storage::Shared);
        for bad in [
            "virt_type = \"xen\"",
            "storage_path = \"rel/dir\"",
            "storage_pool = \"a b\"",
            "migration_uri = \"not a uri\"",
            "disk_locks = true",
        ] {
            let e = AgentConfig::parse(&format!("[vms]\n{bad}\n"), "t").unwrap_err();
            assert!(e.to_string().contains("vms."), "{bad}: {e}");
        }
    }

    #[test]
    fn the_packaged_example_parses_with_the_defaults() {
        let text = include_str!("../../packaging/etc/agent.toml");
        let c = AgentConfig::parse(text, "packaging/etc/agent.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.vms.storage_shared);
        let shared = text.replace("storage_shared = false", "storage_shared = true");
        assert_ne!(shared, text, "the example documents vms.storage_shared");
        let c = AgentConfig::parse(&shared, "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.vms.storage(), crate::vmops::Storage::Shared);
        assert!(!c.vms.disk_locks);
        let locked = shared.replace("disk_locks = false", "disk_locks = true");
        assert_ne!(locked, shared, "the example documents vms.disk_locks");
        let c = AgentConfig::parse(&locked, "t").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.host_setup().disk_locks);
    }

    #[test]
    fn the_witness_section_has_defaults_and_checks_the_advertised_address() {
        let c = AgentConfig::parse("", "t").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.witness.enabled);
        assert_eq!(
            c.witness.listen,
            "0.0.0.0:7444".parse().unwrap_or_else(|e| panic!("{e}"))
        );
        assert_eq!(c.witness.advertise, None);
        let c = AgentConfig::parse(
            "[witness]\nenabled = false\nlisten = \"[::]:7500\"\nadvertise = \"10.0.0.5:7500\"\n",
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.witness.enabled);
        assert_eq!(c.witness.advertise.map(|a| a.port()), Some(7500));
        for (bad, says) in [
            ("advertise = \"0.0.0.0:7444\"", "witness.advertise"),
            ("advertise = \"10.0.0.5:0\"", "witness.advertise"),
            ("listen = \"nope\"", "socket address"),
            ("port = 1", "port"),
        ] {
            let e = AgentConfig::parse(&format!("[witness]\n{bad}\n"), "t").unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("[::1]:7443"), Ok(("::1".into(), 7443)));
        assert_eq!(split_host_port("a.b:1"), Ok(("a.b".into(), 1)));
        assert!(split_host_port("a.b:0").is_err());
        assert!(split_host_port("a.b:x").is_err());
    }

    #[test]
    fn host_labels_are_read_and_checked() {
        let c = AgentConfig::parse("[labels]\nrack = \"r1\"\n", "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(c.host_setup().labels, c.labels);
        let e = AgentConfig::parse("[labels]\n\"Bad Key\" = \"x\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("labels"), "{e}");
    }
}
