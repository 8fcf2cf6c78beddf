//! `[burst]` of the server's config: cloud burst to AWS EC2 — the policy
//! (when a VM bursts, when it comes home), the caps, orphan handling, and
//! `[burst.aws]`: region, endpoint, credentials, network and the image map.
//!
//! Credentials are [`Secret`]s: their `Debug` never shows the value, and
//! nothing logs or serves them (only the demo writes them into a config it
//! makes for a local emulator).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use novacron_cloud::{InstanceTypes, MicroUsd};
use novacron_shared::duration::serde_human;
use serde::{Deserialize, Serialize};

use super::{serde_human_opt, ConfigError};

/// A secret value (a credential): `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[burst]`: when VMs go to the cloud, what they may cost, and when they
/// come home.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurstConfig {
    /// Burst at all (off by default; needs `[burst.aws]`).
    #[serde(default)]
    pub enabled: bool,
    /// The value of the `novacron:fleet` tag on this fleet's instances
    /// (default: `nc-` and the first 16 hex digits of the fleet CA's
    /// SHA-256, so two fleets sharing an account never adopt each other's
    /// instances).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    /// A burstable VM with no host waits this long for one before it bursts
    /// (0: at once); a VM's `burst.after_ms` overrides it.
    #[serde(default, with = "serde_human")]
    pub burst_after: Duration,
    /// How often the broker looks at pending VMs, instances and costs.
    #[serde(default = "default_interval", with = "serde_human")]
    pub interval: Duration,
    /// Instances running (or launching) at once, at most.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// The summed hourly price of the fleet's instances, at most (USD).
    #[serde(default = "default_per_hour")]
    pub max_usd_per_hour: f64,
    /// What the fleet's instances may cost in a calendar month (UTC), at
    /// most (USD): no burst starts that would pass it within the hour.
    #[serde(default = "default_per_month")]
    pub max_usd_per_month: f64,
    /// Retries of a throttled or failed call back off up to this long.
    #[serde(default = "default_retry_max", with = "serde_human")]
    pub retry_max: Duration,
    /// A launch that has not succeeded after this long (retrying throttles
    /// and server errors) ends: the VM stays pending with the last error.
    #[serde(default = "default_launch_timeout", with = "serde_human")]
    pub launch_timeout: Duration,
    /// Bring repatriable VMs home when a host fits them.
    #[serde(default = "default_true")]
    pub repatriate: bool,
    /// A repatriated VM must run on its host within this long, or the move
    /// is abandoned (the instance keeps running).
    #[serde(default = "default_repatriate_timeout", with = "serde_human")]
    pub repatriate_timeout: Duration,
    /// Both copies of a repatriated VM run at most this long: if the
    /// instance's termination is not confirmed by then, the host's copy is
    /// stopped and the move is abandoned.
    #[serde(default = "default_overlap", with = "serde_human")]
    pub max_overlap: Duration,
    /// Instances tagged with this fleet that no VM owns are terminated after
    /// this long (absent: only reported).
    #[serde(default, with = "serde_human_opt", skip_serializing_if = "Option::is_none")]
    pub orphan_terminate_after: Option<Duration>,
    /// The AWS EC2 provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsConfig>,
}

fn default_true() -> bool {
    true
}
fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_max_instances() -> u32 {
    10
}
fn default_per_hour() -> f64 {
    5.0
}
fn default_per_month() -> f64 {
    1000.0
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}
fn default_launch_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_repatriate_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_overlap() -> Duration {
    Duration::from_secs(300)
}

impl Default for BurstConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            fleet: None,
            burst_after: Duration::ZERO,
            interval: default_interval(),
            max_instances: default_max_instances(),
            max_usd_per_hour: default_per_hour(),
            max_usd_per_month: default_per_month(),
            retry_max: default_retry_max(),
            launch_timeout: default_launch_timeout(),
            repatriate: true,
            repatriate_timeout: default_repatriate_timeout(),
            max_overlap: default_overlap(),
            orphan_terminate_after: None,
            aws: None,
        }
    }
}

/// `[burst.aws]`: where and how instances are launched.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// The region (must be priced in the instance-type table).
    pub region: String,
    /// An endpoint URL instead of AWS's (e.g. an emulator on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Static credentials; with `secret_access_key`. When absent the
    /// standard AWS environment variables and profile files are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// The secret of `access_key_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// A session token for temporary credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<Secret>,
    /// The profile of the shared files (default: `AWS_PROFILE`, else `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The subnet to launch into (the account's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Security groups for the instances.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// An EC2 key pair for SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// An edited instance-type table (the shipped one when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_types: Option<PathBuf>,
    /// One EC2 call (connect and answer), at most.
    #[serde(default = "default_call_timeout", with = "serde_human")]
    pub call_timeout: Duration,
    /// Image map: a VM's image key (its `burst.image`, else its first
    /// disk's template) → the AMI to launch it from.
    #[serde(default)]
    pub images: BTreeMap<String, String>,
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(30)
}

impl AwsConfig {
    /// `region` with everything else at its default (AWS's endpoint, the
    /// standard credentials, no network settings, the shipped table, no
    /// images); set the rest with struct update syntax.
    pub fn new(region: &str) -> Self {
        Self {
            region: region.to_string(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            profile: None,
            subnet_id: None,
            security_group_ids: Vec::new(),
            key_name: None,
            instance_types: None,
            call_timeout: default_call_timeout(),
            images: BTreeMap::new(),
        }
    }
}

/// The burst caps, in micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Instances at once.
    pub instances: u32,
    /// The fleet's summed hourly price.
    pub per_hour: MicroUsd,
    /// A calendar month's spend.
    pub per_month: MicroUsd,
}

impl BurstConfig {
    /// The caps (valid after [`Self::validate`]).
    pub fn caps(&self) -> Caps {
        Caps {
            instances: self.max_instances,
            per_hour: MicroUsd::from_dollars(self.max_usd_per_hour).unwrap_or_default(),
            per_month: MicroUsd::from_dollars(self.max_usd_per_month).unwrap_or_default(),
        }
    }

    /// The instance-type table: the file `[burst.aws] instance_types`
    /// names, or the shipped one.
    pub fn instance_types(&self) -> Result<InstanceTypes, ConfigError> {
        match self.aws.as_ref().and_then(|a| a.instance_types.as_ref()) {
            None => Ok(InstanceTypes::shipped()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Invalid {
                    key: "burst.aws.instance_types",
                    message: format!("cannot read {}: {e}", p.display()),
                })?;
                InstanceTypes::parse(&text).map_err(|e| ConfigError::Invalid {
                    key: "burst.aws.instance_types",
                    message: format!("{}: {e}", p.display()),
                })
            }
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        let dollars = |key: &'static str, v: f64| -> Result<(), ConfigError> {
            if MicroUsd::from_dollars(v).is_none() {
                return invalid(key, format!("must be a dollar amount of 0 or more, got {v}"));
            }
            Ok(())
        };
        dollars("burst.max_usd_per_hour", self.max_usd_per_hour)?;
        dollars("burst.max_usd_per_month", self.max_usd_per_month)?;
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(300) {
            return invalid("burst.interval", "must be between 100ms and 5m".into());
        }
        if self.retry_max < Duration::from_millis(100) || self.retry_max > Duration::from_secs(3600) {
            return invalid("burst.retry_max", "must be between 100ms and 1h".into());
        }
        if self.launch_timeout < Duration::from_secs(1) {
            return invalid("burst.launch_timeout", "must be at least 1s".into());
        }
        if self.repatriate_timeout < Duration::from_secs(1) {
            return invalid("burst.repatriate_timeout", "must be at least 1s".into());
        }
        if self.max_overlap < Duration::from_secs(1) {
            return invalid("burst.max_overlap", "must be at least 1s".into());
        }
        if let Some(f) = &self.fleet {
            if f.is_empty()
                || f.len() > 128
                || !f.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return invalid(
                    "burst.fleet",
                    "must be 1-128 of letters, digits, '-', '_' and '.'".into(),
                );
            }
        }
        let Some(aws) = &self.aws else {
            if self.enabled {
                return invalid(
                    "burst.aws",
                    "burst is enabled but no provider is configured: add [burst.aws] with a region and images"
                        .into(),
                );
            }
            return Ok(());
        };
        let types = self.instance_types()?;
        let regions = types.regions();
        if !regions.contains(&aws.region.as_str()) {
            return invalid(
                "burst.aws.region",
                format!(
                    "{:?} is not priced in the instance-type table (priced: {}); add it to the table or pick one of those",
                    aws.region,
                    regions.join(", ")
                ),
            );
        }
        if self.enabled && aws.images.is_empty() {
            return invalid(
                "burst.aws.images",
                "no image is mapped to an AMI: add e.g. \"debian-12.qcow2\" = \"ami-…\" (a VM's image key is its burst.image, else its first disk's template)"
                    .into(),
            );
        }
        for (k, ami) in &aws.images {
            if !ami.starts_with("ami-")
                || ami.len() > 64
                || !ami.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return invalid(
                    "burst.aws.images",
                    format!("{k:?} maps to {ami:?}, which is not an AMI id (ami-…)"),
                );
            }
        }
        if aws.access_key_id.is_some() != aws.secret_access_key.is_some() {
            return invalid(
                "burst.aws.access_key_id",
                "access_key_id and secret_access_key go together (or leave both out to use the AWS environment variables and profile files)"
                    .into(),
            );
        }
        if aws.session_token.is_some() && aws.access_key_id.is_none() {
            return invalid(
                "burst.aws.session_token",
                "needs access_key_id and secret_access_key".into(),
            );
        }
        if let Some(e) = &aws.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return invalid(
                    "burst.aws.endpoint",
                    format!("{e:?} must be an http:// or https:// URL"),
                );
            }
        }
        if aws.call_timeout < Duration::from_millis(100) || aws.call_timeout > Duration::from_secs(300) {
            return invalid("burst.aws.call_timeout", "must be between 100ms and 5m".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigFile, ServerConfig};

    const OK: &str = "[burst]\nenabled = true\n[burst.aws]\nregion = \"us-east-1\"\nimages = { \"debian.qcow2\" = \"ami-12345678\" }\n";

    fn err(text: &str) -> String {
        ServerConfig::parse(text, "t").unwrap_err().to_string()
    }

    #[test]
    fn a_minimal_burst_config_is_valid_and_off_by_default() {
        let c = ServerConfig::parse(OK, "t").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.burst.enabled);
        assert_eq!(c.burst.caps().instances, 10);
        assert!(!ServerConfig::default().burst.enabled);
    }

    #[test]
    fn bad_burst_settings_are_refused_naming_the_key() {
        let e = err(&OK.replace("us-east-1", "mars-north-1"));
        assert!(
            e.contains("burst.aws.region") && e.contains("mars-north-1"),
            "{e}"
        );
        let e = err("[burst]\nenabled = true\n[burst.aws]\nregion = \"us-east-1\"\n");
        assert!(e.contains("burst.aws.images"), "{e}");
        let e = err(&OK.replace("[burst.aws]", "max_usd_per_hour = -1.0\n[burst.aws]"));
        assert!(e.contains("burst.max_usd_per_hour"), "{e}");
        let e = err(&OK.replace("[burst.aws]", "max_usd_per_month = -5.0\n[burst.aws]"));
        assert!(e.contains("burst.max_usd_per_month"), "{e}");
        let e = err(&OK.replace("ami-12345678", "12345678"));
        assert!(e.contains("burst.aws.images"), "{e}");
        let e = err("[burst]\nenabled = true\n");
        assert!(e.contains("burst.aws"), "{e}");
        let e = err(&format!("{OK}access_key_id = \"AKIAEXAMPLE\"\n"));
        assert!(e.contains("burst.aws.access_key_id"), "{e}");
        let e = err(&format!("{OK}endpoint = \"127.0.0.1:5000\"\n"));
        assert!(e.contains("burst.aws.endpoint"), "{e}");
        let e = err(&format!("{OK}instance_types = \"/nonexistent/types.toml\"\n"));
        assert!(e.contains("burst.aws.instance_types"), "{e}");
    }

    #[test]
    fn the_secret_never_shows_in_debug_or_errors() {
        let text =
            format!("{OK}access_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"wJalrXUtnFEMI-SECRET\"\n");
        let c = ServerConfig::parse(&text, "t").unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("wJalrXUtnFEMI-SECRET") && shown.contains("<redacted>"),
            "{shown}"
        );
        let bad = text.replace("us-east-1", "nowhere-1");
        let e = ServerConfig::parse(&bad, "t").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("wJalrXUtnFEMI-SECRET"));
    }
}
