//! Cloud burst: VMs that no host fits run in a cloud provider (AWS EC2),
//! within caps, launched exactly once per decision, and brought home when a
//! host fits again.
//!
//! - [`policy`] (pure): which pending VMs burst now, as what instance type
//!   and image, and which wait with the cap that stops them; the budget
//!   events at 80 % and 100 %.
//! - [`cost`] (pure): per-second accrual with the one-minute minimum of a
//!   run, calendar months in UTC.
//! - [`broker`]: the driver task: each `[burst] interval` (or when woken)
//!   it places waiting VMs on hosts when they fit, decides bursts, drives
//!   each cloud record through its life with the [`novacron_cloud::Provider`]
//!   (retries with capped, jittered backoff), brings VMs home, finds
//!   orphans and accrues cost; it publishes a [`Status`] for the API and
//!   Prometheus.
//!
//! Owns: the provider, the burst status, the in-memory orphan list. Must
//! not touch: sessions or the scheduler's state (it places through the
//! fleet's `Placer` like everyone else) or HA.

use std::sync::{Arc, Mutex};

use novacron_cloud::{MicroUsd, Provider};
use novacron_shared::ids::VmId;

use crate::config::{BurstConfig, Caps};
use crate::store::CloudRecord;

pub mod broker;
pub mod cost;
pub mod policy;
mod provider;

/// A VM waiting for a host or for a burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingView {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: String,
    /// Whether it may burst.
    pub burstable: bool,
    /// Why it waits.
    pub reason: String,
}

/// An instance of this fleet that no VM owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanView {
    /// The instance id.
    pub instance: String,
    /// Its type.
    pub instance_type: String,
    /// Its state.
    pub provider_state: String,
    /// Its `novacron:vm-id` tag.
    pub vm_tag: Option<String>,
    /// First seen, Unix ms.
    pub first_seen_ms: u64,
    /// Terminated at (Unix ms), when configured.
    pub terminate_at_ms: Option<u64>,
}

/// What the broker last published.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Every cloud record, with its VM's name (absent once deleted).
    pub records: Vec<(CloudRecord, Option<String>)>,
    /// VMs waiting.
    pub pending: Vec<PendingView>,
    /// Orphans.
    pub orphans: Vec<OrphanView>,
    /// Instances counted against the caps.
    pub instances: u32,
    /// Their summed hourly price.
    pub per_hour: MicroUsd,
    /// This month (`yyyymm`) and its spend.
    pub month: u32,
    /// This month's spend.
    pub month_spent: MicroUsd,
    /// Every month's spend.
    pub total: MicroUsd,
}

/// The burst side the fleet and the API share with the broker.
pub struct Shared {
    /// `[burst]`.
    pub cfg: BurstConfig,
    /// The caps, in micro-dollars.
    pub caps: Caps,
    /// The `novacron:fleet` tag value.
    pub fleet_tag: String,
    /// The provider (absent when bursting is off).
    pub provider: Option<Arc<dyn Provider>>,
    status: Mutex<Status>,
    /// Wakes the broker before its interval (a VM went pending, a host's
    /// capacity changed, a burst VM was deleted or powered).
    pub wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("burst::Shared")
            .field("enabled", &self.cfg.enabled)
            .field("fleet_tag", &self.fleet_tag)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The shared side for `cfg`, tagging instances with `fleet_tag`.
    pub fn new(cfg: BurstConfig, fleet_tag: String, provider: Option<Arc<dyn Provider>>) -> Self {
        Self {
            caps: cfg.caps(),
            cfg,
            fleet_tag,
            provider,
            status: Mutex::new(Status::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Whether VMs may burst.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled && self.provider.is_some()
    }

    /// The last published status.
    pub fn status(&self) -> Status {
        crate::fleet::lock(&self.status).clone()
    }

    /// Publishes a status.
    pub(crate) fn publish(&self, s: Status) {
        *crate::fleet::lock(&self.status) = s;
    }

    /// The AMI a VM launches from: its rule's image key, else its first
    /// disk's template, looked up in `[burst.aws.images]`.
    pub fn image_for(
        &self,
        spec: &novacron_shared::spec::VmSpec,
        rule: &novacron_shared::placement::BurstRule,
    ) -> Result<String, String> {
        let key = rule
            .image
            .clone()
            .or_else(|| spec.disks.first().and_then(|d| d.template.clone()));
        let Some(key) = key else {
            return Err(
                "it has no image key: give placement.burst.image, or a first disk cloned from a template"
                    .into(),
            );
        };
        let images = self.cfg.aws.as_ref().map(|a| &a.images);
        match images.and_then(|m| m.get(&key)) {
            Some(ami) => Ok(ami.clone()),
            None => Err(format!(
                "no AMI is mapped for image {key:?}: add it to [burst.aws.images] in the server's config"
            )),
        }
    }
}

/// The default `novacron:fleet` tag: `nc-` and the first 16 hex digits of
/// the fleet CA certificate's SHA-256.
pub fn default_fleet_tag(ca_der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, ca_der);
    let hex: String = d.as_ref().iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("nc-{hex}")
}

/// The burst side for `cfg`: with the provider built when bursting is on
/// (its credentials resolved now, so a missing one fails the start with a
/// clear error).
pub fn start(cfg: &BurstConfig, ca_der: &[u8]) -> Result<Shared, crate::StartError> {
    let tag = cfg.fleet.clone().unwrap_or_else(|| default_fleet_tag(ca_der));
    let provider = if cfg.enabled {
        Some(provider::build(cfg).map_err(crate::StartError::Burst)?)
    } else {
        None
    };
    Ok(Shared::new(cfg.clone(), tag, provider))
}
