//! What one run simulates: the fleet, the timing, and the faults with their
//! times; and the random plans drawn from a seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use novacron_shared::lease::{LeaseTiming, DEFAULT_FENCE_TIME, DEFAULT_LEASE, MAX_DRIFT_PPM};
use novacron_shared::protocol::IsolationResponse;
use novacron_shared::witness;

/// Simulated real time, in nanoseconds since the run began.
pub type Nanos = u64;

/// One millisecond in [`Nanos`].
pub const MS: Nanos = 1_000_000;
/// One second in [`Nanos`].
pub const SEC: Nanos = 1_000 * MS;

/// A transition of the server right after which it can be killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashPoint {
    /// A host newly declared fenced, its must-return flag stored, before
    /// the controller stepped.
    Fenced,
    /// A restart committed (placement, epoch, departed), before its push.
    Restart,
    /// A returning host's departed list and flag cleared in the store,
    /// before the lease view was told.
    ReturnedClean,
    /// The guard held.
    Held,
    /// A VM reported lost.
    Lost,
}

/// A fault, injected at a time.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The host's link to the server is cut both ways for `for_ms`.
    Partition {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// Server-to-agent frames (acks, desired states) stall for `for_ms`.
    DropAcks {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// Agent-to-server frames (heartbeats) stall for `for_ms`.
    DropBeats {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// The link goes down for `down_ms`, up for `up_ms`, `times` times.
    Flap {
        /// Host index.
        host: usize,
        /// Down phase.
        down_ms: u64,
        /// Up phase.
        up_ms: u64,
        /// How many down phases.
        times: u32,
    },
    /// Frames of this host's link take up to `max_ms` for `for_ms`.
    Delay {
        /// Host index.
        host: usize,
        /// Largest one-way delay.
        max_ms: u64,
        /// How long.
        for_ms: u64,
    },
    /// The agent process stops (kill -9) for `for_ms`; its QEMUs keep running.
    AgentStop {
        /// Host index.
        host: usize,
        /// How long until it is started again.
        for_ms: u64,
    },
    /// The whole host dies (agent and VMs); it boots again after
    /// `reboot_ms` if given.
    HostCrash {
        /// Host index.
        host: usize,
        /// When it comes back, if it does.
        reboot_ms: Option<u64>,
    },
    /// The server is killed (-9) and started again after `for_ms`; the
    /// store survives.
    ServerCrash {
        /// How long it is down.
        for_ms: u64,
    },
    /// The server is killed right after it next reaches `point` (its
    /// store written, what follows not done), and started again after
    /// `for_ms`.
    ServerCrashAfter {
        /// Where.
        point: CrashPoint,
        /// How long it is down.
        for_ms: u64,
    },
    /// The host's session is lost (both ends see it close at once); the
    /// agent reconnects at its next heartbeat.
    SessionLoss {
        /// Host index.
        host: usize,
    },
    /// The server is unreachable from every host for `for_ms`.
    Isolate {
        /// How long.
        for_ms: u64,
    },
    /// An operator releases *held*.
    Release,
    /// The server is partitioned from `hosts` for `for_ms`, the other hosts
    /// keep it: both ways, or one way (`up`: their heartbeats are lost;
    /// `down`: the server's frames to them are lost).
    Split {
        /// Host indexes cut off.
        hosts: Vec<usize>,
        /// How long.
        for_ms: u64,
        /// Which way.
        #[serde(default)]
        way: Way,
    },
    /// The host is cut from its peers (their witness links) for `for_ms`;
    /// its link to the server is left alone.
    PeerCut {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// The host is cut from the server and from its peers for `for_ms`.
    Cut {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// Witness queries and answers between peers are lost with
    /// probability `percent` % and delayed up to `max_ms` for `for_ms`.
    PeerNoise {
        /// Loss, percent.
        percent: u8,
        /// Largest one-way delay.
        max_ms: u64,
        /// How long.
        for_ms: u64,
    },
}

/// Which way a [`Fault::Split`] cuts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// Both ways.
    #[default]
    Both,
    /// Agent-to-server frames only.
    Up,
    /// Server-to-agent frames only.
    Down,
}

impl Fault {
    /// Whether this fault is within the stated tolerance for `cfg`: it
    /// must then never fence or restart anything.
    pub fn within_tolerance(&self, cfg: &Config) -> bool {
        let tol = cfg.tolerance().as_millis() as u64;
        match *self {
            Fault::Partition { for_ms, .. }
            | Fault::DropAcks { for_ms, .. }
            | Fault::DropBeats { for_ms, .. }
            | Fault::AgentStop { for_ms, .. }
            | Fault::ServerCrash { for_ms }
            | Fault::Isolate { for_ms } => for_ms <= tol,
            Fault::Flap { down_ms, .. } => down_ms <= tol,
            Fault::Delay { max_ms, .. } => max_ms <= cfg.normal_delay_ms.1,
            Fault::SessionLoss { .. } => true,
            Fault::HostCrash { .. } | Fault::ServerCrashAfter { .. } | Fault::Release => false,
            Fault::Split { for_ms, .. } | Fault::Cut { for_ms, .. } => for_ms <= tol,
            // Peers matter only while a lease is gone.
            Fault::PeerCut { .. } | Fault::PeerNoise { .. } => true,
        }
    }

    /// Whether this fault is a server outage that the witness must make
    /// harmless for `cfg`: the server killed, unreachable from every
    /// host, or cut off from at least [`witness::needed`] hosts (which
    /// keep their peers), for any length.
    pub fn is_outage(&self, cfg: &Config) -> bool {
        match self {
            Fault::ServerCrash { .. } | Fault::Isolate { .. } => true,
            Fault::Split { hosts, .. } => {
                let mut h = hosts.clone();
                h.sort_unstable();
                h.dedup();
                h.len() >= witness::needed(cfg.hosts)
            }
            Fault::PeerNoise { .. } | Fault::SessionLoss { .. } => true,
            _ => false,
        }
    }
}

/// A fault and when it starts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Timed {
    /// Milliseconds since the run began.
    pub at_ms: u64,
    /// The fault.
    #[serde(flatten)]
    pub fault: Fault,
}

/// Which properties a run must show besides the safety invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Only faults within tolerance: nothing fences, nothing restarts.
    Benign,
    /// One real host loss on an otherwise quiet fleet: every HA VM runs
    /// again within [`Config::recovery_bound`].
    HostLoss,
    /// Anything: the safety invariants only.
    Chaos,
    /// Server outages of any length ([`Fault::is_outage`]) with the
    /// witness on and no host otherwise faulty: nothing fences, nothing
    /// restarts, in either isolation mode.
    Outage,
}

/// The hardware fence (a BMC per host) the server may run, and how each
/// host's BMC misbehaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bmc {
    /// Answers within a second, tells the truth.
    #[default]
    Good,
    /// Takes `ms` per command (it may exceed the fence timeout).
    Slow {
        /// Per command.
        ms: u64,
    },
    /// Says off while the host is on, and does nothing on `off`.
    Lies,
    /// Hangs until the command's timeout kills it.
    Hangs,
    /// Fails at once (unreachable: connection refused).
    Unreachable,
}

/// One run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The seed of the run's one RNG.
    pub seed: u64,
    /// Hosts in the fleet.
    pub hosts: usize,
    /// vCPUs per host.
    pub host_cpus: u32,
    /// Memory per host, MiB.
    pub host_memory_mib: u64,
    /// HA VMs (1 vCPU, 1 GiB each).
    pub ha_vms: usize,
    /// Non-HA VMs.
    pub plain_vms: usize,
    /// The lease agents hold (`L`) and their fence time (`F`).
    pub agent_timing: LeaseTiming,
    /// The timing the server computes `W` from; equal to `agent_timing`
    /// unless a test breaks the margin on purpose.
    pub server_timing: LeaseTiming,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Session idle timeout (both sides).
    pub idle_timeout: Duration,
    /// Boot time range of a VM, ms.
    pub boot_ms: (u64, u64),
    /// One-way delay range without a delay fault, ms.
    pub normal_delay_ms: (u64, u64),
    /// Clock rates per node, ppm off real time; `drift_ppm[0]` is the
    /// server's, `drift_ppm[1 + i]` host `i`'s.
    pub drift_ppm: Vec<i64>,
    /// How long the run lasts.
    pub duration_ms: u64,
    /// The faults.
    pub faults: Vec<Timed>,
    /// What must hold besides safety.
    pub profile: Profile,
    /// Mass-failure share of hosts.
    pub mass_failure_ratio: f64,
    /// Go on past the first violation (to see what it leads to).
    pub keep_going: bool,
    /// Each host runs the agent's fence guard (`novacron_agent::guard`),
    /// which outlives the agent and kills its HA QEMUs at `deadline + F/2`.
    pub fence_guard: bool,
    /// Simulated server behaviour broken on purpose (test-only knobs of
    /// the simulation, not of the product).
    pub broken: Broken,
    /// The peer witness is on (`[ha.witness] enabled`, the product's
    /// default).
    pub witness: bool,
    /// What an isolated host does with its HA VMs.
    pub isolation: IsolationResponse,
    /// Hosts run virtlockd and the server restarts within the lock space.
    pub disk_locks: bool,
    /// A hardware fence is configured; `bmc[i]` is host `i`'s BMC.
    pub hw_fence: bool,
    /// Host `i`'s BMC (missing: [`Bmc::Good`]).
    pub bmc: Vec<Bmc>,
    /// A fence command running longer is killed (`[ha.fence] timeout`).
    pub fence_timeout: Duration,
    /// Attempts after the first (`[ha.fence] retries`).
    pub fence_retries: u32,
    /// One-way delay range of witness queries and answers, ms.
    pub peer_delay_ms: (u64, u64),
    /// Witness queries and answers lost, percent.
    pub peer_loss_percent: u8,
    /// An agent whose lease ran out unconfirmed waits up to this long for
    /// a confirmation before it fences (then killing within the rest of
    /// `F`; its fence guard fires halfway through that rest): leases end
    /// up to a heartbeat apart, so without it the first host to lose its
    /// lease in a server outage finds no peer lost yet and fences. Not in
    /// the agent's core: the simulation's driver gives the lease a
    /// provisional confirmation (lease end plus the grace) while the
    /// witness is armed. Zero: the agent's core alone (fence at the lease
    /// end unless confirmed). At most `F`.
    pub witness_grace: Duration,
}

/// Ways to break the simulated server on purpose, to prove the checker
/// can fail and to show which rule carries which guarantee.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Broken {
    /// A restart does not push the new desired state to the old host (a
    /// lost push).
    pub skip_old_host_push: bool,
    /// Heartbeats of fenced and returning hosts are acknowledged too.
    pub ack_fenced_hosts: bool,
    /// The agents' witness counts a peer's loss however far its start
    /// lies from its own (the [`witness::LOSS_SKEW`] test dropped).
    pub witness_ignores_skew: bool,
    /// The server pushes a witness quorum of one peer whatever the fleet.
    pub quorum_of_one: bool,
    /// The mass-failure guard counts expired leases only, not lost ones
    /// over its memory (`GuardPolicy::memory` unset with the witness on).
    pub guard_without_memory: bool,
    /// A hardware fence is trusted after one "off" confirmation.
    pub fence_trusts_one_confirmation: bool,
    /// The server runs as if disk locks guarded the HA disks (restarting
    /// keep-running hosts' VMs after the lease wait) while the hosts hold
    /// none: keep-running without locks.
    pub locks_assumed: bool,
}

impl Config {
    /// A quiet fleet of `hosts` hosts with the product's default timing.
    pub fn base(seed: u64, hosts: usize) -> Self {
        let timing = LeaseTiming::new(DEFAULT_LEASE);
        Self {
            seed,
            hosts,
            host_cpus: 4,
            host_memory_mib: 8 * 1024,
            ha_vms: hosts * 2,
            plain_vms: 1,
            agent_timing: timing,
            server_timing: timing,
            heartbeat: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            boot_ms: (300, 3_000),
            normal_delay_ms: (1, 50),
            drift_ppm: vec![0; hosts + 1],
            duration_ms: 60_000,
            faults: Vec::new(),
            profile: Profile::Chaos,
            mass_failure_ratio: 0.3,
            keep_going: false,
            fence_guard: true,
            broken: Broken::default(),
            witness: true,
            isolation: IsolationResponse::SelfFence,
            disk_locks: false,
            hw_fence: false,
            bmc: Vec::new(),
            fence_timeout: Duration::from_secs(10),
            fence_retries: 2,
            peer_delay_ms: (1, 50),
            peer_loss_percent: 0,
            witness_grace: Duration::from_millis(1_500),
        }
    }

    /// Host `host`'s BMC.
    pub fn bmc_of(&self, host: usize) -> Bmc {
        self.bmc.get(host).copied().unwrap_or_default()
    }

    /// Which guard lets the server restart a lost host's VMs first:
    /// the hardware fence, else (keep-running) the disk lock, else the
    /// lease wait.
    pub fn guard_name(&self) -> &'static str {
        if self.hw_fence {
            "hardware hook"
        } else if self.isolation == IsolationResponse::KeepRunning {
            "disk lock"
        } else {
            "lease wait"
        }
    }

    /// Faults of silence shorter than this never fence or restart:
    /// `L − 2·heartbeat − 4·(largest normal delay) − ρ·L`, rounded down to
    /// 100 ms. The last acknowledged heartbeat went out at most one
    /// heartbeat and a round trip before the silence began, and the first
    /// one after it at most one heartbeat after it ended (two round trips:
    /// a reset server answers the first with a reset, then acks the next).
    pub fn tolerance(&self) -> Duration {
        let l = self.agent_timing.lease.as_millis() as u64;
        let h = self.heartbeat.as_millis() as u64;
        let drift = l * MAX_DRIFT_PPM / 1_000_000 + 1;
        let t = l.saturating_sub(2 * h + 4 * self.normal_delay_ms.1 + drift);
        Duration::from_millis(t / 100 * 100)
    }

    /// From a host crash to every HA VM it ran running (booted) elsewhere,
    /// outside *held*, with capacity and a quiet network:
    /// `W·(1 + ρ)` (the server's wait, on its clock: the lease plus the
    /// witness grace when the witness is on) `+ d` (the push) `+
    /// heartbeat + 2·d` (the new host's next renewal, if its lease is past
    /// a third) `+ boot`, plus 100 ms of slack.
    pub fn recovery_bound(&self) -> Duration {
        let w = crate::world::lease_policy(self)
            .wait_timing()
            .fenced_after()
            .as_millis() as u64;
        let w = w + w * MAX_DRIFT_PPM / 1_000_000 + 1;
        let d = self.normal_delay_ms.1;
        let h = self.heartbeat.as_millis() as u64;
        Duration::from_millis(w + 3 * d + h + self.boot_ms.1 + 100)
    }

    /// The run a seed stands for: a fleet of 4 or 5 hosts, clock rates
    /// (often at the bound), a profile and its faults.
    pub fn random(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6e6f_7661_6372_6f6e);
        let hosts = rng.random_range(4..=5);
        let mut cfg = Self::base(seed, hosts);
        cfg.ha_vms = rng.random_range(hosts..=hosts * 2);
        cfg.plain_vms = rng.random_range(0..=2);
        let rho = MAX_DRIFT_PPM as i64;
        cfg.drift_ppm = (0..=hosts)
            .map(|_| match rng.random_range(0..4) {
                0 => rho,
                1 => -rho,
                _ => rng.random_range(-rho..=rho),
            })
            .collect();
        // The worst pairing, often: the server fast, the agents slow.
        if rng.random_bool(0.3) {
            cfg.drift_ppm[0] = rho;
            for d in &mut cfg.drift_ppm[1..] {
                *d = -rho;
            }
        }
        cfg.profile = match rng.random_range(0..10) {
            0..=1 => Profile::Benign,
            2..=3 => Profile::HostLoss,
            4..=7 => Profile::Chaos,
            _ => Profile::Outage,
        };
        cfg.duration_ms = 45_000;
        // The guards in force: the witness mostly on (the default),
        // keep-running only with disk locks (the server refuses it
        // otherwise), disk locks also under self-fencing.
        cfg.witness = cfg.profile == Profile::Outage || rng.random_bool(0.8);
        cfg.hw_fence = rng.random_bool(0.3);
        if cfg.hw_fence {
            cfg.bmc = (0..cfg.hosts)
                .map(|_| match rng.random_range(0..10) {
                    0 => Bmc::Slow {
                        ms: rng.random_range(1_000..15_000),
                    },
                    1 => Bmc::Lies,
                    2 => Bmc::Hangs,
                    3 => Bmc::Unreachable,
                    _ => Bmc::Good,
                })
                .collect();
        }
        if rng.random_bool(0.3) {
            // Refused by the server without disk locks or a hardware fence.
            cfg.isolation = IsolationResponse::KeepRunning;
            cfg.disk_locks = !cfg.hw_fence || rng.random_bool(0.5);
        } else {
            cfg.disk_locks = rng.random_bool(0.3);
        }
        if cfg.profile == Profile::Chaos && rng.random_bool(0.3) {
            cfg.peer_loss_percent = rng.random_range(0..=50);
            cfg.peer_delay_ms = (1, rng.random_range(50..=600));
        }
        let tol = cfg.tolerance().as_millis() as u64;
        match cfg.profile {
            Profile::Benign => {
                // Faults within tolerance, each on a quiet host (a fault
                // right after another could add up past the tolerance).
                let n = rng.random_range(1..=3);
                let mut at = 4_000;
                for _ in 0..n {
                    let host = rng.random_range(0..hosts);
                    let for_ms = rng.random_range(100..=tol);
                    let fault = match rng.random_range(0..8) {
                        7 => Fault::SessionLoss { host },
                        0 => Fault::Partition { host, for_ms },
                        1 => Fault::DropAcks { host, for_ms },
                        2 => Fault::DropBeats { host, for_ms },
                        3 => Fault::AgentStop { host, for_ms },
                        4 => Fault::ServerCrash { for_ms },
                        5 => Fault::Isolate { for_ms },
                        _ => Fault::Flap {
                            host,
                            down_ms: rng.random_range(100..=tol),
                            up_ms: 10_000,
                            times: 2,
                        },
                    };
                    let span = match fault {
                        Fault::Flap {
                            down_ms,
                            up_ms,
                            times,
                            ..
                        } => (down_ms + up_ms) * u64::from(times),
                        Fault::SessionLoss { .. } => 0,
                        _ => for_ms,
                    };
                    cfg.faults.push(Timed { at_ms: at, fault });
                    at += span + 12_000;
                }
                cfg.duration_ms = at.max(cfg.duration_ms);
            }
            Profile::HostLoss => {
                let host = rng.random_range(0..hosts);
                let reboot_ms = rng.random_bool(0.5).then(|| rng.random_range(1_000..20_000));
                if cfg.isolation == IsolationResponse::KeepRunning && !cfg.disk_locks {
                    // Its BMC is the only guard: a failing one keeps the
                    // VMs waiting (an alert), outside any bound.
                    cfg.bmc[host] = Bmc::Good;
                }
                cfg.faults.push(Timed {
                    at_ms: rng.random_range(3_000..15_000),
                    fault: Fault::HostCrash { host, reboot_ms },
                });
            }
            Profile::Chaos => {
                let n = rng.random_range(1..=6);
                for _ in 0..n {
                    let host = rng.random_range(0..hosts);
                    let at_ms = rng.random_range(2_000..30_000);
                    let short = rng.random_range(100..=tol);
                    let long = rng.random_range(tol..20_000);
                    let for_ms = if rng.random_bool(0.5) { short } else { long };
                    let fault = match rng.random_range(0..17) {
                        0 => Fault::Partition { host, for_ms },
                        1 => Fault::DropAcks { host, for_ms },
                        2 => Fault::DropBeats { host, for_ms },
                        3 => Fault::Flap {
                            host,
                            down_ms: rng.random_range(100..8_000),
                            up_ms: rng.random_range(100..4_000),
                            times: rng.random_range(2..6),
                        },
                        4 => Fault::Delay {
                            host,
                            max_ms: rng.random_range(100..=cfg.agent_timing.lease.as_millis() as u64),
                            for_ms: long,
                        },
                        // The QEMUs keep running; its fence guard
                        // does not stop.
                        5 => Fault::AgentStop { host, for_ms },
                        6 => Fault::HostCrash {
                            host,
                            reboot_ms: rng.random_bool(0.6).then_some(for_ms),
                        },
                        7 => Fault::ServerCrash { for_ms },
                        8 => Fault::ServerCrashAfter {
                            point: [
                                CrashPoint::Fenced,
                                CrashPoint::Restart,
                                CrashPoint::ReturnedClean,
                                CrashPoint::Held,
                                CrashPoint::Lost,
                            ][rng.random_range(0..5)],
                            for_ms,
                        },
                        9 => Fault::Isolate { for_ms },
                        // An operator's release judges the silent hosts
                        // down; with the witness on they may run on, and
                        // only the disk lock covers that.
                        10 if !cfg.witness || cfg.disk_locks => Fault::Release,
                        11 => Fault::SessionLoss { host },
                        12 => {
                            let k = rng.random_range(2..=hosts);
                            let first = rng.random_range(0..hosts);
                            let hosts_cut = (0..k).map(|i| (first + i) % hosts).collect();
                            let way = [Way::Both, Way::Up, Way::Down][rng.random_range(0..3)];
                            Fault::Split {
                                hosts: hosts_cut,
                                for_ms,
                                way,
                            }
                        }
                        13 => Fault::PeerCut { host, for_ms: long },
                        14 => Fault::Cut { host, for_ms },
                        15 => Fault::PeerNoise {
                            percent: rng.random_range(10..=100),
                            max_ms: rng.random_range(50..=1_000),
                            for_ms: long,
                        },
                        _ => Fault::Partition { host, for_ms: long },
                    };
                    cfg.faults.push(Timed { at_ms, fault });
                }
                cfg.faults.sort_by_key(|t| t.at_ms);
            }
            Profile::Outage => {
                // A larger fleet sometimes, outages of any length one
                // after another: the server killed, unreachable, or cut
                // off (one way or both) from enough hosts that they
                // confirm each other.
                let hosts = if rng.random_bool(0.1) {
                    rng.random_range(6..=10)
                } else {
                    hosts
                };
                if hosts != cfg.hosts {
                    let keep = cfg.clone();
                    cfg = Self::base(seed, hosts);
                    cfg.profile = keep.profile;
                    cfg.witness = true;
                    cfg.isolation = keep.isolation;
                    cfg.disk_locks = keep.disk_locks;
                    cfg.hw_fence = keep.hw_fence;
                    cfg.bmc = (0..hosts).map(|i| keep.bmc_of(i % keep.hosts)).collect();
                    cfg.ha_vms = rng.random_range(hosts..=hosts * 2);
                    cfg.plain_vms = keep.plain_vms;
                    cfg.drift_ppm = (0..=hosts).map(|_| rng.random_range(-rho..=rho)).collect();
                }
                let n = rng.random_range(1..=2);
                let mut at = rng.random_range(3_000..8_000);
                for _ in 0..n {
                    let for_ms = match rng.random_range(0..3) {
                        0 => rng.random_range(100..=tol),
                        1 => rng.random_range(tol..20_000),
                        _ => rng.random_range(20_000..60_000),
                    };
                    let fault = match rng.random_range(0..4) {
                        0 => Fault::ServerCrash { for_ms },
                        1 => Fault::Isolate { for_ms },
                        _ => {
                            let k = rng.random_range(witness::needed(hosts)..=hosts);
                            let mut all: Vec<usize> = (0..hosts).collect();
                            for i in 0..k {
                                let j = rng.random_range(i..hosts);
                                all.swap(i, j);
                            }
                            let mut cut = all[..k].to_vec();
                            cut.sort_unstable();
                            let way = [Way::Both, Way::Up, Way::Down][rng.random_range(0..3)];
                            Fault::Split {
                                hosts: cut,
                                for_ms,
                                way,
                            }
                        }
                    };
                    cfg.faults.push(Timed { at_ms: at, fault });
                    at += for_ms + rng.random_range(12_000..20_000);
                }
                cfg.duration_ms = at.max(cfg.duration_ms);
            }
        }
        cfg
    }

    /// The margin broken on purpose: the server computes `W` for a lease
    /// of `server_lease` while agents hold the default one. Test-only knob
    /// of the simulation, not of the product. The run goes on past the
    /// first violation, so that an early restart shows as the double run
    /// it causes.
    pub fn with_server_lease(mut self, server_lease: Duration) -> Self {
        self.keep_going = true;
        self.server_timing = LeaseTiming {
            lease: server_lease,
            fence_time: DEFAULT_FENCE_TIME,
        };
        self
    }
}
