//! Named scenarios: a fleet, a script of faults with times, and the HA
//! event log the run must produce, in TOML (in the manner of Proxmox's
//! ha-manager regression tests: a command list and a `log.expect`). They run
//! through the same harness as the random seeds, with every invariant
//! checked; a scenario may instead name the violation it must end in.

use std::path::Path;

use serde::Deserialize;

use crate::config::{Config, Profile, Timed};
use crate::world::{run, Outcome};
use novacron_shared::lease::MAX_DRIFT_PPM;
use novacron_shared::protocol::IsolationResponse;

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What it shows.
    pub name: String,
    /// The run's seed (delays, boot and kill times).
    pub seed: u64,
    /// Hosts.
    pub hosts: usize,
    /// HA VMs.
    pub ha_vms: usize,
    /// Non-HA VMs.
    #[serde(default)]
    pub plain_vms: usize,
    /// Length of the run.
    pub duration_ms: u64,
    /// Clocks at the drift bound, the server fast and the agents slow.
    #[serde(default)]
    pub worst_drift: bool,
    /// `benign` (nothing may fence or restart), `host_loss` (the recovery
    /// bound is checked), `outage` (a server outage: nothing may fence,
    /// kill or restart) or `chaos` (safety only; the default).
    #[serde(default)]
    pub profile: Option<String>,
    /// Hosts run the agent's fence guard (the default; `false` shows what
    /// it covers).
    #[serde(default = "yes")]
    pub fence_guard: bool,
    /// The peer witness is on (the default, as in the product).
    #[serde(default = "yes")]
    pub witness: bool,
    /// The isolation response: `self-fence` (the default) or
    /// `keep-running`.
    #[serde(default)]
    pub isolation: IsolationResponse,
    /// Hosts run virtlockd; restarts wait on the disk lock.
    #[serde(default)]
    pub disk_locks: bool,
    /// A hardware fence is configured.
    #[serde(default)]
    pub hw_fence: bool,
    /// The hosts' BMCs, in host order (missing ones are good).
    #[serde(default)]
    pub bmc: Vec<crate::config::Bmc>,
    /// The witness grace in ms (the simulation's default when absent).
    #[serde(default)]
    pub witness_grace_ms: Option<u64>,
    /// The faults.
    #[serde(default)]
    pub fault: Vec<Timed>,
    /// The HA event log expected, line by line.
    #[serde(default)]
    pub log: Vec<String>,
    /// A substring of the violation the run must end in, for scenarios
    /// that show what the design does not cover.
    #[serde(default)]
    pub expect_violation: Option<String>,
}

fn yes() -> bool {
    true
}

/// A scenario that could not be read or did not go as written.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid scenario.
    #[error("parsing {path}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// An unknown profile name.
    #[error("unknown profile {0:?} (benign, host_loss, outage or chaos)")]
    Profile(String),
    /// The run broke an invariant it was not expected to.
    #[error("scenario {name:?} broke an invariant: {violation}")]
    Violation {
        /// The scenario.
        name: String,
        /// The first violation.
        violation: String,
    },
    /// The run did not end in the violation the scenario names.
    #[error("scenario {name:?} expected a violation containing {expected:?}, got {got:?}")]
    ViolationMissing {
        /// The scenario.
        name: String,
        /// What was expected.
        expected: String,
        /// What happened.
        got: Option<String>,
    },
    /// The event log differs from the expected one.
    #[error("scenario {name:?}: the event log differs\n--- expected\n{expected}\n--- got\n{got}")]
    Log {
        /// The scenario.
        name: String,
        /// The expected log.
        expected: String,
        /// The log of the run.
        got: String,
    },
}

impl Scenario {
    /// Reads a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ScenarioError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// The run this scenario describes.
    pub fn config(&self) -> Result<Config, ScenarioError> {
        let mut cfg = Config::base(self.seed, self.hosts);
        cfg.ha_vms = self.ha_vms;
        cfg.plain_vms = self.plain_vms;
        cfg.duration_ms = self.duration_ms;
        cfg.faults = self.fault.clone();
        cfg.fence_guard = self.fence_guard;
        cfg.witness = self.witness;
        cfg.isolation = self.isolation;
        cfg.disk_locks = self.disk_locks;
        cfg.hw_fence = self.hw_fence;
        cfg.bmc = self.bmc.clone();
        if let Some(ms) = self.witness_grace_ms {
            cfg.witness_grace = std::time::Duration::from_millis(ms);
        }
        cfg.profile = match self.profile.as_deref() {
            None | Some("chaos") => Profile::Chaos,
            Some("benign") => Profile::Benign,
            Some("host_loss") => Profile::HostLoss,
            Some("outage") => Profile::Outage,
            Some(other) => return Err(ScenarioError::Profile(other.to_string())),
        };
        if self.worst_drift {
            let rho = MAX_DRIFT_PPM as i64;
            cfg.drift_ppm = std::iter::once(rho)
                .chain((0..self.hosts).map(|_| -rho))
                .collect();
        }
        Ok(cfg)
    }

    /// Runs it, without comparing anything.
    pub fn run(&self) -> Result<Outcome, ScenarioError> {
        Ok(run(self.config()?))
    }

    /// Runs it and compares the outcome with what the file expects.
    pub fn check(&self) -> Result<Outcome, ScenarioError> {
        let out = self.run()?;
        match (&self.expect_violation, &out.violation) {
            (None, Some(v)) => {
                return Err(ScenarioError::Violation {
                    name: self.name.clone(),
                    violation: v.clone(),
                })
            }
            (Some(e), got) if !got.as_deref().is_some_and(|g| g.contains(e.as_str())) => {
                return Err(ScenarioError::ViolationMissing {
                    name: self.name.clone(),
                    expected: e.clone(),
                    got: got.clone(),
                })
            }
            _ => {}
        }
        if out.log != self.log {
            return Err(ScenarioError::Log {
                name: self.name.clone(),
                expected: self.log.join("\n"),
                got: out.log.join("\n"),
            });
        }
        Ok(out)
    }
}
