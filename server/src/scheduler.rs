//! The scheduler: which host a VM goes to. Pure logic — hosts and a request
//! in, a host or the reasons nothing fits out — so it is deterministic and
//! testable on simulated fleets of any size.
//!
//! Filters (hard): the host is up and not cordoned; CPU and memory fit
//! under the overcommit ratios; storage fits; the host carries every
//! required label; the host reports the shared storage the request needs
//! (any, or one pool in particular: an HA VM's disks must be reachable
//! where it restarts); no VM of the request's anti-affinity group runs
//! there.
//! Scoring (soft): `pack` prefers the fullest host that fits, `spread` the
//! emptiest; measured load (when the host reports it) counts towards
//! fullness; hosts already running the request's affinity group score
//! higher. Ties go to the lowest host id.
//!
//! Like Nomad, the scan stops after `candidate_limit` feasible hosts (from a
//! deterministic starting point that rotates between placements), so a
//! placement costs the same on 100 or 10,000 hosts; `0` scans every host.
//! When nothing fits, every host is examined and the reasons are counted
//! per filter.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use novacron_shared::ids::HostId;
use serde::{Deserialize, Serialize};

/// How to choose among hosts that fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fill hosts up before using empty ones (fewer hosts busy).
    Pack,
    /// Keep hosts evenly loaded (the default).
    #[default]
    Spread,
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// vCPUs allowed per host CPU.
    #[serde(default = "default_cpu_ratio")]
    pub cpu_overcommit: f64,
    /// VM memory allowed per MiB of host memory.
    #[serde(default = "default_mem_ratio")]
    pub memory_overcommit: f64,
    /// Pack or spread.
    #[serde(default)]
    pub mode: Mode,
    /// Feasible hosts to compare per placement (0: all).
    #[serde(default = "default_limit")]
    pub candidate_limit: usize,
}

fn default_cpu_ratio() -> f64 {
    4.0
}
fn default_mem_ratio() -> f64 {
    1.0
}
fn default_limit() -> usize {
    64
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu_overcommit: default_cpu_ratio(),
            memory_overcommit: default_mem_ratio(),
            mode: Mode::default(),
            candidate_limit: default_limit(),
        }
    }
}

impl Policy {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if !(1.0..=64.0).contains(&self.cpu_overcommit) {
            return Err(format!(
                "cpu_overcommit {} is outside 1..=64",
                self.cpu_overcommit
            ));
        }
        if !(0.1..=4.0).contains(&self.memory_overcommit) {
            return Err(format!(
                "memory_overcommit {} is outside 0.1..=4",
                self.memory_overcommit
            ));
        }
        Ok(())
    }
}

/// A host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// Its id.
    pub id: HostId,
    /// Connected (its agent holds a session).
    pub up: bool,
    /// Cordoned hosts take no new VMs.
    pub cordoned: bool,
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Free space in its VM storage pool, MiB (before this round's
    /// placements; see `used.storage_mib`).
    pub storage_free_mib: u64,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Measured CPU load, 0..=1, when the host reports metrics.
    pub load: Option<f64>,
    /// What VMs placed on it already claim.
    pub used: Usage,
    /// Placement groups of the VMs on it.
    pub groups: HashSet<String>,
    /// The shared storage its agent reports (the pool's identity), if any.
    pub shared_storage: Option<String>,
    /// The disk lock space its agent reports (`Inventory.disk_locks`).
    pub disk_locks: Option<String>,
}

/// Resources claimed on a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Storage claimed but not yet allocated, MiB.
    pub storage_mib: u64,
}

/// What a VM needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Storage, MiB.
    pub storage_mib: u64,
    /// Labels the host must carry with these values.
    pub required_labels: BTreeMap<String, String>,
    /// Prefer hosts running VMs of this group.
    pub affinity: Option<String>,
    /// Never share a host with a VM of this group.
    pub anti_affinity: Option<String>,
    /// The shared storage the host must report (None: any host).
    pub shared_storage: Option<SharedStorageNeed>,
    /// The disk lock space the host must report (`[ha] disk_locks`: HA
    /// VMs only on such hosts, restarts within the same space).
    pub disk_locks: Option<SharedStorageNeed>,
}

/// Which shared storage a VM needs its host to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedStorageNeed {
    /// Any shared storage (a new HA VM with disks).
    Any,
    /// This pool (an HA VM whose disks are already there).
    Same(String),
}

/// Why a host was excluded, in the order filters run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Not connected.
    Down,
    /// Cordoned.
    Cordoned,
    /// Missing a required label.
    Labels,
    /// Reports no shared storage, and the VM needs it.
    SharedStorage,
    /// Reports shared storage other than the one the VM's disks are on.
    OtherSharedStorage,
    /// Reports no disk locks, and the VM needs them (`[ha] disk_locks`).
    DiskLocks,
    /// Reports a disk lock space other than the VM's.
    OtherLockSpace,
    /// Runs a VM of the anti-affinity group.
    AntiAffinity,
    /// Not enough CPU under the overcommit ratio.
    Cpu,
    /// Not enough memory under the overcommit ratio.
    Memory,
    /// Not enough storage.
    Storage,
}

impl Filter {
    fn phrase(self) -> &'static str {
        match self {
            Filter::Down => "down",
            Filter::Cordoned => "cordoned",
            Filter::Labels => "missing required labels",
            Filter::SharedStorage => "with no shared storage",
            Filter::OtherSharedStorage => "with other shared storage",
            Filter::DiskLocks => "without disk locks",
            Filter::OtherLockSpace => "in another disk lock space",
            Filter::AntiAffinity => "excluded by anti-affinity",
            Filter::Cpu => "exhausted CPU",
            Filter::Memory => "exhausted memory",
            Filter::Storage => "exhausted storage",
        }
    }
}

/// Nothing fits: how many hosts each filter excluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NoFit {
    /// Hosts examined.
    pub hosts: usize,
    /// Hosts excluded, per filter (each host counts once, for the first
    /// filter it failed).
    pub excluded: BTreeMap<Filter, usize>,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hosts == 0 {
            return f.write_str("no host fits: there are no hosts");
        }
        f.write_str("no host fits: ")?;
        let mut parts: Vec<(usize, Filter)> = self.excluded.iter().map(|(k, v)| (*v, *k)).collect();
        parts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (i, (n, filter)) in parts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let hosts = if *n == 1 { "host" } else { "hosts" };
            write!(f, "{n} {hosts} {}", filter.phrase())?;
        }
        Ok(())
    }
}

impl std::error::Error for NoFit {}

/// The first filter `h` fails for `r`, if any.
pub fn check(p: &Policy, h: &Host, r: &Request) -> Option<Filter> {
    if !h.up {
        return Some(Filter::Down);
    }
    if h.cordoned {
        return Some(Filter::Cordoned);
    }
    if !r
        .required_labels
        .iter()
        .all(|(k, v)| h.labels.get(k).is_some_and(|hv| hv == v))
    {
        return Some(Filter::Labels);
    }
    match (&r.shared_storage, &h.shared_storage) {
        (None, _) => {}
        (Some(_), None) => return Some(Filter::SharedStorage),
        (Some(SharedStorageNeed::Same(want)), Some(has)) if want != has => {
            return Some(Filter::OtherSharedStorage)
        }
        (Some(_), Some(_)) => {}
    }
    match (&r.disk_locks, &h.disk_locks) {
        (None, _) => {}
        (Some(_), None) => return Some(Filter::DiskLocks),
        (Some(SharedStorageNeed::Same(want)), Some(has)) if want != has => {
            return Some(Filter::OtherLockSpace)
        }
        (Some(_), Some(_)) => {}
    }
    if r.anti_affinity.as_ref().is_some_and(|g| h.groups.contains(g)) {
        return Some(Filter::AntiAffinity);
    }
    let cpu_cap = (f64::from(h.cpus) * p.cpu_overcommit).floor() as u64;
    if h.used.vcpus + r.vcpus > cpu_cap {
        return Some(Filter::Cpu);
    }
    let mem_cap = (h.memory_mib as f64 * p.memory_overcommit).floor() as u64;
    if h.used.memory_mib + r.memory_mib > mem_cap {
        return Some(Filter::Memory);
    }
    if h.used.storage_mib + r.storage_mib > h.storage_free_mib {
        return Some(Filter::Storage);
    }
    None
}

/// How full `h` would be with `r` on it (0 = empty, 1 = at capacity).
fn fullness(p: &Policy, h: &Host, r: &Request) -> f64 {
    let cpu_cap = (f64::from(h.cpus) * p.cpu_overcommit).max(1.0);
    let mem_cap = (h.memory_mib as f64 * p.memory_overcommit).max(1.0);
    let cpu = (h.used.vcpus + r.vcpus) as f64 / cpu_cap;
    let mem = (h.used.memory_mib + r.memory_mib) as f64 / mem_cap;
    let claimed = cpu.max(mem);
    match h.load {
        Some(l) => (claimed + l.clamp(0.0, 1.0)) / 2.0,
        None => claimed,
    }
}

fn score(p: &Policy, h: &Host, r: &Request) -> f64 {
    let full = fullness(p, h, r);
    let base = match p.mode {
        Mode::Pack => full,
        Mode::Spread => 1.0 - full,
    };
    let affinity = r.affinity.as_ref().is_some_and(|g| h.groups.contains(g));
    base + if affinity { 1.0 } else { 0.0 }
}

/// The scheduler's memory between placements: where the next scan starts.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    cursor: usize,
}

impl Scheduler {
    /// Picks a host for `r` among `hosts`, or says why none fits.
    pub fn place(&mut self, p: &Policy, hosts: &[Host], r: &Request) -> Result<HostId, NoFit> {
        let n = hosts.len();
        if n == 0 {
            return Err(NoFit {
                hosts: 0,
                excluded: BTreeMap::new(),
            });
        }
        let limit = if p.candidate_limit == 0 {
            n
        } else {
            p.candidate_limit
        };
        let start = self.cursor % n;
        let mut best: Option<(f64, &Host)> = None;
        let mut feasible = 0;
        for i in 0..n {
            let h = &hosts[(start + i) % n];
            if check(p, h, r).is_some() {
                continue;
            }
            feasible += 1;
            let s = score(p, h, r);
            let better = match best {
                None => true,
                Some((bs, bh)) => s > bs || (s == bs && h.id < bh.id),
            };
            if better {
                best = Some((s, h));
            }
            if feasible >= limit {
                break;
            }
        }
        match best {
            Some((_, h)) => {
                self.cursor = self.cursor.wrapping_add(1);
                Ok(h.id)
            }
            None => {
                let mut excluded = BTreeMap::new();
                for h in hosts {
                    if let Some(f) = check(p, h, r) {
                        *excluded.entry(f).or_insert(0) += 1;
                    }
                }
                Err(NoFit { hosts: n, excluded })
            }
        }
    }
}

/// Records a placement on the host list (so the next placement sees it).
pub fn claim(hosts: &mut [Host], id: HostId, r: &Request, group: Option<&str>) {
    if let Some(h) = hosts.iter_mut().find(|h| h.id == id) {
        h.used.vcpus += r.vcpus;
        h.used.memory_mib += r.memory_mib;
        h.used.storage_mib += r.storage_mib;
        if let Some(g) = group {
            h.groups.insert(g.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn host(id: u128, cpus: u32, mem: u64) -> Host {
        Host {
            id: HostId(id),
            up: true,
            cordoned: false,
            cpus,
            memory_mib: mem,
            storage_free_mib: 1 << 20,
            labels: BTreeMap::new(),
            load: None,
            used: Usage::default(),
            groups: HashSet::new(),
            shared_storage: None,
            disk_locks: None,
        }
    }

    fn req(vcpus: u64, mem: u64) -> Request {
        Request {
            vcpus,
            memory_mib: mem,
            ..Request::default()
        }
    }

    fn all_hosts() -> Policy {
        Policy {
            candidate_limit: 0,
            ..Policy::default()
        }
    }

    #[test]
    fn shared_storage_needs_a_host_that_reports_it_and_the_same_pool_to_move() {
        let mut hosts = vec![host(1, 8, 16384), host(2, 8, 16384), host(3, 8, 16384)];
        hosts[1].shared_storage = Some("/srv/a".into());
        hosts[2].shared_storage = Some("/srv/b".into());
        let p = all_hosts();
        let plain = req(1, 1024);
        assert_eq!(check(&p, &hosts[0], &plain), None, "no need, no filter");
        let any = Request {
            shared_storage: Some(SharedStorageNeed::Any),
            ..req(1, 1024)
        };
        assert_eq!(check(&p, &hosts[0], &any), Some(Filter::SharedStorage));
        assert_eq!(check(&p, &hosts[1], &any), None);
        let same = Request {
            shared_storage: Some(SharedStorageNeed::Same("/srv/b".into())),
            ..req(1, 1024)
        };
        assert_eq!(Scheduler::default().place(&p, &hosts, &same), Ok(HostId(3)));
        hosts.pop();
        let e = Scheduler::default().place(&p, &hosts, &same).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no host fits: 1 host with no shared storage, 1 host with other shared storage"
        );
    }

    #[test]
    fn disk_locks_need_a_host_reporting_them_and_restarts_the_same_lock_space() {
        let mut hosts = vec![host(1, 8, 16384), host(2, 8, 16384), host(3, 8, 16384)];
        hosts[1].disk_locks = Some("/srv/a".into());
        hosts[2].disk_locks = Some("/srv/b".into());
        let p = all_hosts();
        let any = Request {
            disk_locks: Some(SharedStorageNeed::Any),
            ..req(1, 1024)
        };
        assert_eq!(check(&p, &hosts[0], &any), Some(Filter::DiskLocks));
        assert_eq!(check(&p, &hosts[1], &any), None);
        let same = Request {
            disk_locks: Some(SharedStorageNeed::Same("/srv/a".into())),
            ..req(1, 1024)
        };
        assert_eq!(check(&p, &hosts[2], &same), Some(Filter::OtherLockSpace));
        assert_eq!(Scheduler::default().place(&p, &hosts, &same), Ok(HostId(2)));
        hosts.remove(1);
        let e = Scheduler::default().place(&p, &hosts, &same).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no host fits: 1 host without disk locks, 1 host in another disk lock space"
        );
    }

    #[test]
    fn pack_fills_the_fullest_host_and_spread_the_emptiest() {
        let mut hosts = vec![host(1, 8, 16384), host(2, 8, 16384)];
        hosts[0].used = Usage {
            vcpus: 4,
            memory_mib: 8192,
            storage_mib: 0,
        };
        let r = req(1, 1024);
        let pack = Policy {
            mode: Mode::Pack,
            ..all_hosts()
        };
        assert_eq!(Scheduler::default().place(&pack, &hosts, &r), Ok(HostId(1)));
        assert_eq!(
            Scheduler::default().place(&all_hosts(), &hosts, &r),
            Ok(HostId(2))
        );
    }

    #[test]
    fn measured_load_steers_spread() {
        let mut hosts = vec![host(1, 8, 16384), host(2, 8, 16384)];
        hosts[1].load = Some(0.9);
        assert_eq!(
            Scheduler::default().place(&all_hosts(), &hosts, &req(1, 512)),
            Ok(HostId(1))
        );
    }

    #[test]
    fn nothing_fits_says_why_per_filter() {
        let mut hosts = vec![
            host(1, 2, 1024),
            host(2, 2, 1024),
            host(3, 2, 1024),
            host(4, 64, 65536),
            host(5, 64, 65536),
            host(6, 64, 65536),
        ];
        hosts[3].groups.insert("db".into());
        hosts[4].groups.insert("db".into());
        hosts[5].up = false;
        let r = Request {
            anti_affinity: Some("db".into()),
            ..req(2, 4096)
        };
        let e = Scheduler::default().place(&all_hosts(), &hosts, &r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no host fits: 3 hosts exhausted memory, 2 hosts excluded by anti-affinity, 1 host down"
        );
        assert_eq!(e.hosts, 6);
    }

    #[test]
    fn labels_and_cordons_filter_and_affinity_attracts() {
        let mut hosts = vec![host(1, 8, 8192), host(2, 8, 8192), host(3, 8, 8192)];
        hosts[0].labels.insert("ssd".into(), "true".into());
        hosts[1].labels.insert("ssd".into(), "true".into());
        hosts[1].cordoned = true;
        let mut r = req(1, 512);
        r.required_labels.insert("ssd".into(), "true".into());
        assert_eq!(
            Scheduler::default().place(&all_hosts(), &hosts, &r),
            Ok(HostId(1))
        );
        hosts[0].labels.clear();
        let e = Scheduler::default().place(&all_hosts(), &hosts, &r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no host fits: 2 hosts missing required labels, 1 host cordoned"
        );
        // Affinity beats spread.
        hosts[2].groups.insert("web".into());
        hosts[2].used.vcpus = 6;
        let r = Request {
            affinity: Some("web".into()),
            ..req(1, 512)
        };
        assert_eq!(
            Scheduler::default().place(&all_hosts(), &hosts, &r),
            Ok(HostId(3))
        );
    }

    fn fleet() -> impl Strategy<Value = Vec<Host>> {
        proptest::collection::vec((1u32..64, 1024u64..262_144, any::<bool>(), 0u8..4), 1..40).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (cpus, mem, up, label))| {
                    let mut h = host(i as u128 + 1, cpus, mem);
                    h.up = up || i == 0;
                    h.labels.insert("zone".into(), format!("z{label}"));
                    h
                })
                .collect()
        })
    }

    fn requests() -> impl Strategy<Value = Vec<(Request, Option<String>)>> {
        proptest::collection::vec((1u64..16, 128u64..32768, 0u8..5, any::<bool>()), 1..120).prop_map(|v| {
            v.into_iter()
                .map(|(c, m, g, anti)| {
                    let group = (g < 3).then(|| format!("g{g}"));
                    let r = Request {
                        anti_affinity: if anti { group.clone() } else { None },
                        affinity: if anti { None } else { group.clone() },
                        ..req(c, m)
                    };
                    (r, group)
                })
                .collect()
        })
    }

    proptest! {
        /// Placing many VMs never exceeds a host's overcommitted capacity,
        /// never puts two VMs of an anti-affinity group together, and the
        /// same inputs give the same placements.
        #[test]
        fn capacity_and_anti_affinity_always_hold(
            hosts in fleet(),
            reqs in requests(),
            pack in any::<bool>(),
            limit in 0usize..8,
        ) {
            let p = Policy {
                mode: if pack { Mode::Pack } else { Mode::Spread },
                candidate_limit: limit,
                ..Policy::default()
            };
            let run = |mut hosts: Vec<Host>| {
                let mut s = Scheduler::default();
                let mut out = Vec::new();
                let mut on_host: BTreeMap<HostId, HashSet<String>> = BTreeMap::new();
                for (r, group) in &reqs {
                    let placed = s.place(&p, &hosts, r);
                    if let Ok(id) = placed {
                        let here = on_host.entry(id).or_default();
                        if let Some(g) = &r.anti_affinity {
                            assert!(!here.contains(g), "anti-affinity group {g} doubled up on {id}");
                        }
                        if let Some(g) = group {
                            here.insert(g.clone());
                        }
                        // Groups of every kind mark the host.
                        claim(&mut hosts, id, r, group.as_deref());
                    }
                    out.push(placed.map_err(|e| e.to_string()));
                }
                (hosts, out)
            };
            let (after, first) = run(hosts.clone());
            for h in &after {
                prop_assert!(h.used.vcpus as f64 <= f64::from(h.cpus) * p.cpu_overcommit);
                prop_assert!(h.used.memory_mib as f64 <= h.memory_mib as f64 * p.memory_overcommit);
                if !h.up {
                    prop_assert_eq!(h.used, Usage::default());
                }
            }
            let (_, second) = run(hosts);
            prop_assert_eq!(first, second);
        }

        /// A refusal's counts add up to the number of hosts.
        #[test]
        fn refusals_account_for_every_host(hosts in fleet(), c in 1u64..10_000) {
            let r = req(c * 64, 1 << 30);
            let e = Scheduler::default().place(&all_hosts(), &hosts, &r).unwrap_err();
            prop_assert_eq!(e.excluded.values().sum::<usize>(), hosts.len());
        }
    }
}
