//! `[ha]` of the server's config: host leases, the agents' fence, the
//! isolation response, disk locks, the hardware fence and the peer
//! witness, each validated with the setting it concerns named.
//!
//! `fence` is either the agents' fence style (`fence = "kill"`, as
//! before) or the `[ha.fence]` table of the hardware fence, which then
//! carries the style as `style` (one key cannot be both in TOML).

use std::collections::BTreeMap;
use std::time::Duration;

use novacron_shared::duration::serde_human;
use novacron_shared::protocol::IsolationResponse;
use novacron_shared::witness::WitnessTiming;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{serde_human_opt, ConfigError};

/// How an agent stops its HA VMs when its lease runs out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceMode {
    /// Kill them at once (libvirt's destroy).
    #[default]
    Kill,
    /// Ask the guests to shut down, kill what still runs after `fence_grace`.
    ShutdownThenKill,
}

/// `[ha]`: host leases, fencing and the restart of HA VMs elsewhere.
///
/// `enabled = false` only stops the HA driver from restarting VMs: lease
/// terms, heartbeat acks (withheld from fenced and returning hosts) and the
/// agents' self-fencing stay on, so turning HA on later is safe at any
/// moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Restart HA VMs of fenced hosts elsewhere (leases run either way).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `L`: how long an acknowledged heartbeat keeps an agent's lease.
    #[serde(default = "default_lease", with = "serde_human")]
    pub lease: Duration,
    /// `F`: how long an agent may take to stop its HA VMs after its lease ran out.
    #[serde(default = "default_fence_time", with = "serde_human")]
    pub fence_time: Duration,
    /// How agents stop their HA VMs (`fence = "kill"`), or the hardware
    /// fence (`[ha.fence]`, with the style as its `style`).
    #[serde(default)]
    pub fence: FenceSetting,
    /// With `shutdown_then_kill`: the guests' time to shut down (less than `fence_time`).
    #[serde(default = "default_fence_grace", with = "serde_human")]
    pub fence_grace: Duration,
    /// From the server's start, how long before any lease can count as
    /// expired (default and minimum: the fence wait `W` of the lease).
    #[serde(default, with = "serde_human_opt", skip_serializing_if = "Option::is_none")]
    pub start_grace: Option<Duration>,
    /// More than this share of hosts going silent within
    /// `mass_failure_window` puts the server in *held* (no restarts).
    #[serde(default = "default_mass_ratio")]
    pub mass_failure_ratio: f64,
    /// The window of `mass_failure_ratio`.
    #[serde(default = "default_mass_window", with = "serde_human")]
    pub mass_failure_window: Duration,
    /// While leaving *held*, one more fenced host's VMs are released per step.
    #[serde(default = "default_release_step", with = "serde_human")]
    pub release_step: Duration,
    /// A VM that did not fit anywhere is tried again this often.
    #[serde(default = "default_retry", with = "serde_human")]
    pub retry: Duration,
    /// What an agent does with its HA VMs when its lease runs out.
    #[serde(default)]
    pub isolation: IsolationResponse,
    /// HA VMs are placed only on hosts whose libvirt guards disks with its
    /// lock manager (`Inventory.disk_locks`), and restart only within the
    /// same lock space.
    #[serde(default)]
    pub disk_locks: bool,
    /// `[ha.witness]`: the agents' peer witness.
    #[serde(default)]
    pub witness: WitnessConfig,
}

/// `[ha.fence]`: the hardware fence (a BMC, or the test bed's stand-in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareFence {
    /// How the agents stop their HA VMs (as `fence = "..."` without a table).
    #[serde(default)]
    pub style: FenceMode,
    /// The argv template: absolute program, `{host}` (the host's name) and
    /// `{action}` (`on|off|status`) substituted.
    pub command: Vec<String>,
    /// A command running longer is killed (its answer: unknown).
    #[serde(default = "default_fence_timeout", with = "serde_human")]
    pub timeout: Duration,
    /// Attempts after the first before a fence fails.
    #[serde(default = "default_fence_retries")]
    pub retries: u32,
    /// Per host name, an argv template used instead of `command`.
    #[serde(default)]
    pub hosts: BTreeMap<String, Vec<String>>,
}

fn default_fence_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_fence_retries() -> u32 {
    2
}

impl HardwareFence {
    /// The command the runner uses.
    pub fn command(&self) -> crate::ha::fence::FenceCommand {
        crate::ha::fence::FenceCommand {
            argv: self.command.clone(),
            hosts: self.hosts.clone(),
            timeout: self.timeout,
        }
    }
}

/// `[ha] fence`: a style alone, or the hardware fence's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceSetting {
    /// `fence = "kill"`: no hardware fence.
    Style(FenceMode),
    /// `[ha.fence]`.
    Hardware(HardwareFence),
}

impl Default for FenceSetting {
    fn default() -> Self {
        FenceSetting::Style(FenceMode::default())
    }
}

impl FenceSetting {
    /// How the agents stop their HA VMs.
    pub fn style(&self) -> FenceMode {
        match self {
            FenceSetting::Style(m) => *m,
            FenceSetting::Hardware(h) => h.style,
        }
    }

    /// The hardware fence, when configured.
    pub fn hardware(&self) -> Option<&HardwareFence> {
        match self {
            FenceSetting::Style(_) => None,
            FenceSetting::Hardware(h) => Some(h),
        }
    }
}

impl Serialize for FenceSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            FenceSetting::Style(m) => m.serialize(s),
            FenceSetting::Hardware(h) => h.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for FenceSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FenceSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a fence style (\"kill\" or \"shutdown_then_kill\") or an [ha.fence] table")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FenceSetting, E> {
                FenceMode::deserialize(serde::de::value::StrDeserializer::<E>::new(v))
                    .map(FenceSetting::Style)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<FenceSetting, A::Error> {
                HardwareFence::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(FenceSetting::Hardware)
            }
        }
        d.deserialize_any(V)
    }
}

/// `[ha.witness]`: agents ask their peers before fencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// Push witness terms (peers, quorum) to agents.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// At most this many peers per agent.
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
}

fn default_max_peers() -> usize {
    64
}

impl Default for WitnessConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_peers: default_max_peers(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_lease() -> Duration {
    novacron_shared::lease::DEFAULT_LEASE
}
fn default_fence_time() -> Duration {
    novacron_shared::lease::DEFAULT_FENCE_TIME
}
fn default_fence_grace() -> Duration {
    Duration::from_secs(1)
}
fn default_mass_ratio() -> f64 {
    0.3
}
fn default_mass_window() -> Duration {
    Duration::from_secs(60)
}
fn default_release_step() -> Duration {
    Duration::from_secs(10)
}
fn default_retry() -> Duration {
    Duration::from_secs(5)
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lease: default_lease(),
            fence_time: default_fence_time(),
            fence: FenceSetting::default(),
            fence_grace: default_fence_grace(),
            start_grace: None,
            mass_failure_ratio: default_mass_ratio(),
            mass_failure_window: default_mass_window(),
            release_step: default_release_step(),
            retry: default_retry(),
            isolation: IsolationResponse::default(),
            disk_locks: false,
            witness: WitnessConfig::default(),
        }
    }
}

impl HaConfig {
    /// The lease and fence time agents are held to.
    pub fn timing(&self) -> novacron_shared::lease::LeaseTiming {
        novacron_shared::lease::LeaseTiming {
            lease: self.lease,
            fence_time: self.fence_time,
        }
    }

    /// The terms sent to every agent at the start of its session.
    pub fn terms(&self) -> novacron_shared::protocol::LeaseTerms {
        use novacron_shared::protocol::{FenceStyle, LeaseTerms};
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        LeaseTerms {
            lease_ms: ms(self.lease),
            fence_time_ms: ms(self.fence_time),
            fence: match self.fence.style() {
                FenceMode::Kill => FenceStyle::Kill,
                FenceMode::ShutdownThenKill => FenceStyle::ShutdownThenKill {
                    grace_ms: ms(self.fence_grace),
                },
            },
            isolation: self.isolation,
        }
    }

    /// The start grace: the configured one, never shorter than `W`.
    pub fn start_grace(&self) -> Duration {
        let w = self.timing().fenced_after();
        self.start_grace.map_or(w, |g| g.max(w))
    }

    /// The server's lease policy for agents beating every `heartbeat_interval`.
    pub fn policy(&self, heartbeat_interval: Duration) -> crate::ha::lease::LeasePolicy {
        crate::ha::lease::LeasePolicy {
            timing: self.timing(),
            heartbeat_interval,
            start_grace: self.start_grace(),
        }
    }

    /// The witness's timing bounds for these lease terms.
    pub fn witness_timing(&self) -> WitnessTiming {
        WitnessTiming { lease: self.timing() }
    }

    /// The hardware fence, when configured.
    pub fn hardware_fence(&self) -> Option<&HardwareFence> {
        self.fence.hardware()
    }

    /// Checks ranges and relations (`heartbeat` from `[agents]`).
    pub(super) fn validate(&self, heartbeat: Duration) -> Result<(), ConfigError> {
        let fmt = novacron_shared::duration::format;
        let invalid = |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        if self.lease < heartbeat * 3 {
            return invalid(
                "ha.lease",
                format!(
                    "must be at least three heartbeat intervals ({}), so that a lost heartbeat or two do not end it",
                    fmt(heartbeat * 3)
                ),
            );
        }
        if self.lease > Duration::from_secs(600) {
            return invalid("ha.lease", "must be at most 10m".into());
        }
        if self.fence_time < Duration::from_millis(100) || self.fence_time > Duration::from_secs(300) {
            return invalid("ha.fence_time", "must be between 100ms and 5m".into());
        }
        if self.fence.style() == FenceMode::ShutdownThenKill
            && (self.fence_grace.is_zero() || self.fence_grace >= self.fence_time)
        {
            return invalid(
                "ha.fence_grace",
                format!(
                    "must be more than 0 and less than ha.fence_time ({}): the kill after it must still land within the fence time",
                    fmt(self.fence_time)
                ),
            );
        }
        let w = self.timing().fenced_after();
        if let Some(g) = self.start_grace {
            if g < w {
                return invalid(
                    "ha.start_grace",
                    format!(
                        "must be at least the fence wait of the lease ({}); a shorter grace could restart VMs of a host whose agent still holds a lease from before the server started",
                        fmt(w)
                    ),
                );
            }
            if g > Duration::from_secs(3600) {
                return invalid("ha.start_grace", "must be at most 1h".into());
            }
        }
        let r = self.mass_failure_ratio;
        if !r.is_finite() || r <= 0.0 || r > 1.0 {
            return invalid(
                "ha.mass_failure_ratio",
                format!("must be a share of hosts above 0 and at most 1, got {r}"),
            );
        }
        for (key, d) in [
            ("ha.mass_failure_window", self.mass_failure_window),
            ("ha.release_step", self.release_step),
            ("ha.retry", self.retry),
        ] {
            if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                return invalid(key, "must be between 1s and 1h".into());
            }
        }
        if let Some(f) = self.hardware_fence() {
            f.validate()?;
        }
        if self.isolation == IsolationResponse::KeepRunning
            && !self.disk_locks
            && self.hardware_fence().is_none()
        {
            return invalid(
                "ha.isolation",
                "keep-running needs ha.disk_locks = true or a hardware fence ([ha.fence] command): \
                 otherwise an isolated host's copy keeps running while another starts"
                    .into(),
            );
        }
        if self.witness.enabled {
            if self.witness.max_peers == 0 || self.witness.max_peers > 1024 {
                return invalid("ha.witness.max_peers", "must be between 1 and 1024".into());
            }
            if let Err(message) = self.witness_timing().check(
                self.mass_failure_ratio,
                self.mass_failure_window,
                self.release_step,
            ) {
                let key = if message.starts_with("ha.mass_failure_ratio") {
                    "ha.mass_failure_ratio"
                } else if message.starts_with("ha.mass_failure_window") {
                    "ha.mass_failure_window"
                } else {
                    "ha.release_step"
                };
                return invalid(
                    key,
                    format!("{message} (or turn the witness off: [ha.witness] enabled = false)"),
                );
            }
        }
        Ok(())
    }
}

impl HardwareFence {
    /// The command's argv: an absolute program, `{action}` named, bounded.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        let argv = |key: &'static str, a: &[String]| -> Result<(), ConfigError> {
            let Some(prog) = a.first() else {
                return invalid(key, "must name a program".into());
            };
            if !prog.starts_with('/') {
                return invalid(key, format!("the program must be an absolute path, got {prog:?}"));
            }
            if !a.iter().any(|x| x.contains("{action}")) {
                return invalid(
                    key,
                    "must name {action} (on, off or status) in an argument".into(),
                );
            }
            if a.len() > 64 || a.iter().any(|x| x.len() > 4096 || x.contains('\0')) {
                return invalid(key, "at most 64 arguments of at most 4096 bytes, no NUL".into());
            }
            Ok(())
        };
        argv("ha.fence.command", &self.command)?;
        for a in self.hosts.values() {
            argv("ha.fence.hosts", a)?;
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(600) {
            return invalid("ha.fence.timeout", "must be between 100ms and 10m".into());
        }
        if self.retries > 10 {
            return invalid("ha.fence.retries", "must be at most 10".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigFile, ServerConfig};
    use super::*;

    #[test]
    fn ha_defaults_and_terms() {
        let c = ServerConfig::default();
        c.validate().unwrap_or_else(|e| panic!("{e}"));
        let ha = &c.ha;
        assert!(ha.enabled);
        assert_eq!(
            (ha.lease, ha.fence_time),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!(ha.start_grace(), ha.timing().fenced_after());
        let t = ha.terms();
        assert_eq!((t.lease_ms, t.fence_time_ms), (5_000, 2_000));
        assert_eq!(t.fence, novacron_shared::protocol::FenceStyle::Kill);
        let c = ServerConfig::parse(
            "[ha]\nenabled = false\nlease = \"8s\"\nfence = \"shutdown_then_kill\"\nfence_grace = \"1500ms\"\nstart_grace = \"1m\"\n",
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.ha.enabled);
        assert_eq!(c.ha.start_grace(), Duration::from_secs(60));
        assert_eq!(
            c.ha.terms().fence,
            novacron_shared::protocol::FenceStyle::ShutdownThenKill { grace_ms: 1_500 }
        );
        assert_eq!(
            c.ha.policy(Duration::from_secs(1)).timing.lease,
            Duration::from_secs(8)
        );
    }

    #[test]
    fn ha_values_out_of_range_are_refused_by_name() {
        for (toml, key, phrase) in [
            ("[ha]\nlease = \"2s\"\n", "ha.lease", "three heartbeat"),
            (
                "[agents]\nheartbeat_interval = \"2s\"\n[ha]\nlease = \"5s\"\n",
                "ha.lease",
                "6s",
            ),
            (
                "[ha]\nfence = \"shutdown_then_kill\"\nfence_grace = \"2s\"\n",
                "ha.fence_grace",
                "less than ha.fence_time",
            ),
            ("[ha]\nstart_grace = \"5s\"\n", "ha.start_grace", "fence wait"),
            (
                "[ha]\nmass_failure_ratio = 0.0\n",
                "ha.mass_failure_ratio",
                "above 0",
            ),
            (
                "[ha]\nmass_failure_ratio = 1.5\n",
                "ha.mass_failure_ratio",
                "at most 1",
            ),
            ("[ha]\nretry = \"0s\"\n", "ha.retry", "between"),
            ("[ha]\nfence = \"reboot\"\n", "fence", "reboot"),
        ] {
            let e = ServerConfig::parse(toml, "t").unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(text.contains(key) && text.contains(phrase), "{toml}: {text}");
        }
        // The fence grace only matters when the guests get one.
        ServerConfig::parse("[ha]\nfence_grace = \"3s\"\n", "t").unwrap_or_else(|e| panic!("{e}"));
        // Above the witness quorum ratio only with the witness off.
        ServerConfig::parse(
            "[ha]\nmass_failure_ratio = 1.0\n[ha.witness]\nenabled = false\n",
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn the_example_config_is_valid_and_lists_every_ha_key() {
        let text = include_str!("../../../packaging/etc/server.toml");
        let c = ServerConfig::parse(text, "server.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.ha.enabled);
        for key in [
            "enabled",
            "lease",
            "fence_time",
            "fence",
            "fence_grace",
            "start_grace",
            "mass_failure_ratio",
            "mass_failure_window",
            "release_step",
            "retry",
        ] {
            assert!(
                text.contains(&format!("\n{key} =")) || text.contains(&format!("# {key} =")),
                "{key}"
            );
        }
    }

    #[test]
    fn isolation_disk_locks_fence_and_witness_parse_and_fill_the_terms() {
        let c = ServerConfig::default();
        assert_eq!(c.ha.isolation, IsolationResponse::SelfFence);
        assert!(!c.ha.disk_locks && c.ha.hardware_fence().is_none());
        assert!(c.ha.witness.enabled);
        assert_eq!(c.ha.witness.max_peers, 64);
        assert_eq!(c.ha.terms().isolation, IsolationResponse::SelfFence);
        let c = ServerConfig::parse(
            "[ha]\nisolation = \"keep-running\"\ndisk_locks = true\n[ha.fence]\nstyle = \"shutdown_then_kill\"\ncommand = [\"/usr/sbin/fence\", \"--host\", \"{host}\", \"{action}\"]\ntimeout = \"3s\"\nretries = 1\nhosts = { h2 = [\"/bin/other\", \"{action}\", \"{host}\"] }\n[ha.witness]\nmax_peers = 8\n",
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.ha.terms().isolation, IsolationResponse::KeepRunning);
        assert_eq!(
            c.ha.terms().fence,
            novacron_shared::protocol::FenceStyle::ShutdownThenKill { grace_ms: 1_000 }
        );
        let f =
            c.ha.hardware_fence()
                .unwrap_or_else(|| panic!("a hardware fence"));
        assert_eq!((f.timeout, f.retries), (Duration::from_secs(3), 1));
        let cmd = f.command();
        use crate::ha::fence::FenceAction;
        assert_eq!(
            cmd.argv_for("h1", FenceAction::Off),
            ["/usr/sbin/fence", "--host", "h1", "off"]
        );
        assert_eq!(
            cmd.argv_for("h2", FenceAction::Status),
            ["/bin/other", "status", "h2"]
        );
        assert_eq!(c.ha.witness.max_peers, 8);
        // The default fence timeout and retries.
        let c = ServerConfig::parse("[ha.fence]\ncommand = [\"/f\", \"{action}\"]\n", "t")
            .unwrap_or_else(|e| panic!("{e}"));
        let f =
            c.ha.hardware_fence()
                .unwrap_or_else(|| panic!("a hardware fence"));
        assert_eq!(
            (f.timeout, f.retries, f.style),
            (Duration::from_secs(10), 2, FenceMode::Kill)
        );
    }

    #[test]
    fn unsafe_or_malformed_guard_settings_are_refused_by_name() {
        for (toml, key, phrase) in [
            (
                "[ha]\nisolation = \"keep-running\"\n",
                "ha.isolation",
                "disk_locks",
            ),
            ("[ha]\nisolation = \"sometimes\"\n", "isolation", "sometimes"),
            (
                "[ha.fence]\ncommand = [\"fence\", \"{action}\"]\n",
                "ha.fence.command",
                "absolute",
            ),
            (
                "[ha.fence]\ncommand = [\"/usr/sbin/fence\", \"{host}\"]\n",
                "ha.fence.command",
                "{action}",
            ),
            ("[ha.fence]\ncommand = []\n", "ha.fence.command", "program"),
            (
                "[ha.fence]\ncommand = [\"/f\", \"{action}\"]\nhosts = { h = [\"rel\", \"{action}\"] }\n",
                "ha.fence.hosts",
                "absolute",
            ),
            (
                "[ha.fence]\ncommand = [\"/f\", \"{action}\"]\ntimeout = \"10ms\"\n",
                "ha.fence.timeout",
                "100ms",
            ),
            (
                "[ha.fence]\ncommand = [\"/f\", \"{action}\"]\nretries = 99\n",
                "ha.fence.retries",
                "at most",
            ),
            (
                "[ha]\nmass_failure_ratio = 0.6\n",
                "ha.mass_failure_ratio",
                "witness quorum ratio",
            ),
            (
                "[ha]\nmass_failure_window = \"30s\"\n",
                "ha.mass_failure_window",
                "witness needs",
            ),
            (
                "[ha]\nrelease_step = \"2s\"\n",
                "ha.release_step",
                "witness needs",
            ),
            ("[ha.witness]\nmax_peers = 0\n", "ha.witness.max_peers", "between"),
        ] {
            let e = ServerConfig::parse(toml, "t").unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(text.contains(key) && text.contains(phrase), "{toml}: {text}");
        }
        // Each is fine once its guard is there, or the witness is off.
        for toml in [
            "[ha]\nisolation = \"keep-running\"\ndisk_locks = true\n",
            "[ha]\nisolation = \"keep-running\"\n[ha.fence]\ncommand = [\"/f\", \"{host}\", \"{action}\"]\n",
            "[ha]\nmass_failure_window = \"30s\"\nrelease_step = \"2s\"\nmass_failure_ratio = 0.6\n[ha.witness]\nenabled = false\n",
        ] {
            ServerConfig::parse(toml, "t").unwrap_or_else(|e| panic!("{toml}: {e}"));
        }
    }
}
