//! The simulated world: hosts (agent with its witness, fence guard,
//! hypervisor, lock service, BMC), the server (host leases, HA controller,
//! hardware fences, store), the network (sessions and peer links) and the
//! clocks, stepped one event at a time from one seeded RNG, with the
//! invariants checked after every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use novacron_agent::guard::{Guard as FenceGuard, GuardEvent, Target};
use novacron_agent::lease::{Action, EpochGuard, Event, FenceMode, GuardDuty, Lease, State};
use novacron_server::ha::controller::{Controller, Decision, HostInput, Policy, VmInput};
use novacron_server::ha::fence::{FenceAction, FenceMachine, FencePolicy, FenceStatus, Ran};
use novacron_server::ha::guard::{GuardPolicy, GuardState};
use novacron_server::ha::lease::{HostLeases, HostState, LeasePolicy, Restored, Transition};
use novacron_server::scheduler;
use novacron_shared::clock::Clock;
use novacron_shared::ids::{HostId, VmId};
use novacron_shared::protocol::{IsolationResponse, WitnessPeer, WitnessTerms};
use novacron_shared::witness::{self, Contact, LeaseView, Witness};

use crate::config::{Config, CrashPoint, Fault, Nanos, Profile, Way, MS, SEC};

mod agent;
mod bmc;
mod faults;
mod invariants;
mod locks;
mod net;
mod peers;
mod server;

/// Steps after which a run counts as stuck (a run takes about a thousand).
const MAX_STEPS: u64 = 1_000_000;

/// A node's monotonic clock: `base + t·(1 + rate)`, `t` the real time of
/// the run. Every node's instants derive from one base.
#[derive(Debug, Clone, Copy)]
struct NodeClock {
    base: Instant,
    rate_ppm: i64,
}

impl NodeClock {
    fn local_ns(&self, t: Nanos) -> u64 {
        let scaled = i128::from(t) * i128::from(1_000_000 + self.rate_ppm) / 1_000_000;
        scaled.max(0) as u64
    }

    fn local(&self, t: Nanos) -> Instant {
        self.base + Duration::from_nanos(self.local_ns(t))
    }

    /// The earliest real time at which this clock reads `x` or later.
    fn real_at(&self, x: Instant) -> Nanos {
        let e = x.saturating_duration_since(self.base).as_nanos();
        let e = u64::try_from(e).unwrap_or(u64::MAX / 2);
        let mut t = (u128::from(e) * 1_000_000).div_ceil((1_000_000 + self.rate_ppm) as u128) as u64;
        while self.local_ns(t) < e {
            t += 1;
        }
        while t > 0 && self.local_ns(t - 1) >= e {
            t -= 1;
        }
        t
    }
}

/// Frames from an agent to the server.
#[derive(Debug, Clone)]
enum Up {
    Hello,
    /// A heartbeat and the lease left when it was sent.
    Heartbeat(u64, Option<Duration>),
    Converged(u64),
}

/// Frames from the server to an agent.
#[derive(Debug, Clone)]
enum Down {
    Terms,
    Witness(WitnessTerms),
    Desired(Desired),
    Ack(u64),
    Reset,
}

/// A desired state as the wire carries it.
#[derive(Debug, Clone)]
struct Desired {
    gen: u64,
    vms: Vec<(usize, u64)>,
    departed: Vec<usize>,
}

/// One ordered stream of a session.
#[derive(Debug)]
struct Stream<M> {
    queue: VecDeque<(Nanos, u64, M)>,
    last_due: Nanos,
}

impl<M> Default for Stream<M> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            last_due: 0,
        }
    }
}

/// A session between one agent and the server.
#[derive(Debug)]
struct Session {
    host: usize,
    up: Stream<Up>,
    down: Stream<Down>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Booting,
    Running,
    Dying,
}

#[derive(Debug, Clone, Copy)]
struct VmCopy {
    id: u64,
    /// When it finished booting (real time; 0 while booting).
    since: Nanos,
    epoch: u64,
    ha: bool,
    phase: Phase,
}

#[derive(Debug)]
struct Agent {
    inc: u64,
    lease: Lease,
    guard: EpochGuard,
    session: Option<u64>,
    seq: u64,
    desired: Option<Desired>,
    converged_sent: Option<u64>,
    last_rx: Instant,
    timer_at: Option<Nanos>,
    fencing: bool,
    /// The peer witness (the real `novacron_shared::witness::Witness`).
    witness: Witness,
    /// When its timer is due.
    witness_at: Option<Nanos>,
    /// When the lease this run held ended (its loss start).
    loss_start: Option<Instant>,
    /// The confirmation last handed to the lease.
    confirmation: Option<Instant>,
    /// The HA VMs were kept past the lease (the lease lapsed).
    lapsed: bool,
    /// A lapse held by the peers' confirmation was logged.
    confirmed_logged: bool,
    /// Starts that failed at the disk lock: per VM, attempts and when the
    /// next may be made (real time).
    lock_wait: BTreeMap<usize, (u32, Nanos)>,
}

#[derive(Debug)]
struct Host {
    id: HostId,
    up: bool,
    clock: NodeClock,
    agent: Option<Agent>,
    copies: BTreeMap<usize, VmCopy>,
    up_blocked: bool,
    down_blocked: bool,
    delay_max_ms: Option<u64>,
    inc: u64,
    /// The fence guard process: outlives the agent, not the host.
    guard: FenceGuard,
    /// What the agent last told its guard (deadline, HA copies, fenced).
    guard_view: Option<GuardView>,
    /// When the guard's timer is due.
    guard_timer: Option<Nanos>,
    /// Cut from its peers (witness links both ways).
    peer_cut: bool,
}

/// What the agent tells its fence guard: the lease deadline, the running
/// HA copies (by copy id), whether it has fenced.
type GuardView = (Option<Instant>, Vec<u64>, bool);

#[derive(Debug, Clone)]
struct VmRec {
    id: VmId,
    host: Option<usize>,
    ha: bool,
    priority: u8,
    epoch: u64,
    vcpus: u64,
    memory_mib: u64,
    created_ms: u64,
}

#[derive(Debug, Clone, Default)]
struct HostRec {
    gen: u64,
    departed: BTreeSet<usize>,
    /// Declared fenced and not reported reconciled since (kept across
    /// server restarts, as the fleet's store keeps it).
    must_return: bool,
}

/// What survives a server crash.
#[derive(Debug, Clone)]
struct Store {
    vms: Vec<VmRec>,
    hosts: Vec<HostRec>,
}

struct Server {
    alive: bool,
    inc: u64,
    clock: NodeClock,
    leases: HostLeases,
    ctl: Controller,
    sched: scheduler::Scheduler,
    sessions: BTreeMap<usize, u64>,
    last_rx: BTreeMap<usize, Nanos>,
    converged: BTreeMap<usize, u64>,
    tick_at: Option<Nanos>,
    /// Armed crash points: killed right after the next one, for so long.
    crash_at: Vec<(CrashPoint, u64)>,
    /// The hardware fences under way (the real `FenceMachine`), by host.
    fences: BTreeMap<usize, FenceMachine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    AgentBeat { host: usize, inc: u64 },
    AgentTimer { host: usize, inc: u64 },
    AgentStart { host: usize },
    GuardTimer { host: usize },
    HostBoot { host: usize },
    BootDone { host: usize, vm: usize, copy: u64 },
    CopyGone { host: usize, vm: usize, copy: u64 },
    Deliver { sid: u64, down: bool, msg: u64 },
    ServerTick { inc: u64 },
    ServerStart,
    Unblock { host: usize, up: bool, down: bool },
    UnIsolate,
    DelayEnd { host: usize },
    Fault { index: usize },
    RecoveryCheck { index: usize },
    WitnessTimer { host: usize, inc: u64 },
    Peer { msg: u64 },
    PeerUncut { host: usize },
    PeerNoiseEnd,
    LockRetry { host: usize, inc: u64 },
    FenceDone { run: u64 },
}

/// A witness query or answer in flight between two agents.
#[derive(Debug, Clone, Copy)]
struct PeerMsg {
    /// The asker.
    asker: usize,
    /// The asker's agent run.
    asker_inc: u64,
    /// The peer asked.
    peer: usize,
    /// The round (the query's nonce).
    round: u64,
    /// `None` for the query, the peer's answer on the way back.
    answer: Option<Contact>,
}

/// Invariant evaluations made, per invariant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checks {
    /// Never two copies of one VM (after every step).
    pub single_copy: u64,
    /// Epochs only increase, in the store and in started copies (after
    /// every step).
    pub epochs: u64,
    /// Within tolerance nothing fences or restarts (after every step of a
    /// benign run).
    pub tolerance: u64,
    /// A restart is decided only when the old host can no longer run the
    /// VM (at every restart decision).
    pub restart_after_fence: u64,
    /// No restart while held (at every restart decision).
    pub held: u64,
    /// Every HA VM of a lost host runs again within the bound (per VM, at
    /// the bound).
    pub recovery: u64,
    /// A server outage fences, kills and restarts nothing (after every
    /// step of an outage run).
    pub outage: u64,
    /// With disk locks, every copy holds its disk's lock and no disk has
    /// two holders (after every step).
    pub disk_lock: u64,
    /// In keep-running nothing is killed by a lease expiry (at every
    /// fence and fence-guard kill).
    pub keep_running: u64,
}

impl Checks {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.single_copy
            + self.epochs
            + self.tolerance
            + self.restart_after_fence
            + self.held
            + self.recovery
            + self.outage
            + self.disk_lock
            + self.keep_running
    }

    /// Adds `o` to these.
    pub fn add(&mut self, o: &Checks) {
        self.single_copy += o.single_copy;
        self.epochs += o.epochs;
        self.tolerance += o.tolerance;
        self.restart_after_fence += o.restart_after_fence;
        self.held += o.held;
        self.recovery += o.recovery;
        self.outage += o.outage;
        self.disk_lock += o.disk_lock;
        self.keep_running += o.keep_running;
    }
}

/// Totals of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events stepped.
    pub steps: u64,
    /// Invariant evaluations made.
    pub checks: Checks,
    /// Restarts carried out.
    pub restarts: u64,
    /// Fences started by agents.
    pub fences: u64,
    /// Fence-guard firings that killed something.
    pub guard_kills: u64,
    /// Witness rounds started.
    pub rounds: u64,
    /// Agents that kept their HA VMs past the lease on a confirmation.
    pub witness_holds: u64,
    /// Starts refused at the disk lock.
    pub lock_refusals: u64,
    /// Hosts powered off by their BMC.
    pub bmc_offs: u64,
    /// Hardware fences that failed (every attempt).
    pub fence_failures: u64,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Totals.
    pub stats: Stats,
    /// The first invariant broken, with its time.
    pub violation: Option<String>,
    /// Every violation (up to 20), when the run went on past the first.
    pub violations: Vec<String>,
    /// In host-loss runs, from the crash to each of the lost host's HA
    /// VMs running (booted) again, ms.
    pub recoveries_ms: Vec<u64>,
    /// The HA event log (restarts, fences, host states, held).
    pub log: Vec<String>,
}

/// One simulated run.
pub struct World {
    cfg: Config,
    rng: StdRng,
    now: Nanos,
    seq: u64,
    events: BTreeMap<(Nanos, u64), Ev>,
    hosts: Vec<Host>,
    server: Server,
    store: Store,
    sessions: BTreeMap<u64, Session>,
    next_sid: u64,
    next_msg: u64,
    next_copy: u64,
    isolated: bool,
    stats: Stats,
    log: Vec<String>,
    violation: Option<String>,
    violations: Vec<String>,
    /// The store's epoch per VM at the last step.
    last_epoch: Vec<u64>,
    /// Highest epoch of a copy ever started, per VM.
    started_epoch: BTreeMap<usize, u64>,
    /// Host crashes to check the recovery bound for: (host, when, HA VMs
    /// it held).
    crashes: Vec<(usize, Nanos, Vec<usize>)>,
    /// From a host crash to each of its HA VMs running again, ms.
    recoveries_ms: Vec<u64>,
    /// Witness messages in flight.
    peer_msgs: BTreeMap<u64, PeerMsg>,
    /// Peer links lossy and slow: (loss percent, largest delay ms).
    peer_noise: Option<(u8, u64)>,
    /// Disk locks (virtlockd, one lock space): per VM, the host and copy
    /// holding it.
    locks: BTreeMap<usize, (usize, u64)>,
    /// An operator released *held* in this run.
    operator_released: bool,
    /// Fence commands running: (host, server run, action, result).
    fence_runs: BTreeMap<u64, (usize, u64, FenceAction, Ran)>,
    /// A lying BMC's next `status` says off (after an `off` it ignored).
    bmc_lie: BTreeSet<usize>,
}

/// The product's default HA policy, with the run's mass-failure ratio,
/// guards and (with the witness on) the guard's memory, as the server's
/// HA driver derives it from its config.
fn policy(cfg: &Config) -> Policy {
    let memory = (cfg.witness && !cfg.broken.guard_without_memory).then(|| {
        witness::WitnessTiming {
            lease: cfg.server_timing,
        }
        .guard_memory()
    });
    Policy {
        guard: GuardPolicy {
            ratio: cfg.mass_failure_ratio,
            memory,
            ..GuardPolicy::default()
        },
        isolation: cfg.isolation,
        disk_locks: cfg.disk_locks || cfg.broken.locks_assumed,
        hardware_fence: cfg.hw_fence,
        ..Policy::default()
    }
}

/// The server's lease policy of `cfg`: with the witness on, its wait covers the grace.
pub(crate) fn lease_policy(cfg: &Config) -> LeasePolicy {
    let mut p = LeasePolicy::new(cfg.server_timing, cfg.heartbeat);
    if cfg.witness {
        p.witness_grace = cfg.witness_grace;
        let w = p.wait_timing().fenced_after();
        p.start_grace = p.start_grace.max(w);
    }
    p
}

impl World {
    /// The world of `cfg` at time zero: every VM placed and running, every
    /// agent connecting.
    pub fn new(cfg: Config) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let (clock, _manual) = Clock::manual();
        let base = clock.now();
        let node = |i: usize| NodeClock {
            base,
            rate_ppm: cfg.drift_ppm.get(i).copied().unwrap_or(0),
        };
        let hosts: Vec<Host> = (0..cfg.hosts)
            .map(|i| Host {
                id: HostId(i as u128 + 1),
                up: true,
                clock: node(i + 1),
                agent: None,
                copies: BTreeMap::new(),
                up_blocked: false,
                down_blocked: false,
                delay_max_ms: None,
                inc: 0,
                guard: FenceGuard::default(),
                guard_view: None,
                guard_timer: None,
                peer_cut: false,
            })
            .collect();
        let mut vms = Vec::new();
        for i in 0..cfg.ha_vms + cfg.plain_vms {
            vms.push(VmRec {
                id: VmId(1000 + i as u128),
                host: Some(i % cfg.hosts),
                ha: i < cfg.ha_vms,
                priority: rng.random_range(0..3),
                epoch: 1,
                vcpus: 1,
                memory_mib: 1024,
                created_ms: i as u64,
            });
        }
        let store = Store {
            vms,
            hosts: vec![HostRec::default(); cfg.hosts],
        };
        let sclock = node(0);
        let known: Vec<HostId> = hosts.iter().map(|h| h.id).collect();
        let server = Server {
            alive: true,
            inc: 0,
            clock: sclock,
            leases: HostLeases::new(lease_policy(&cfg), known.clone(), sclock.local(0)),
            ctl: Controller::new(policy(&cfg), known.clone(), sclock.local(0)),
            sched: scheduler::Scheduler::default(),
            sessions: BTreeMap::new(),
            last_rx: BTreeMap::new(),
            converged: BTreeMap::new(),
            tick_at: None,
            crash_at: Vec::new(),
            fences: BTreeMap::new(),
        };
        let mut w = Self {
            cfg,
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            hosts,
            server,
            store,
            sessions: BTreeMap::new(),
            next_sid: 1,
            next_msg: 1,
            next_copy: 1,
            isolated: false,
            stats: Stats::default(),
            log: Vec::new(),
            violation: None,
            violations: Vec::new(),
            last_epoch: Vec::new(),
            started_epoch: BTreeMap::new(),
            crashes: Vec::new(),
            recoveries_ms: Vec::new(),
            peer_msgs: BTreeMap::new(),
            peer_noise: None,
            locks: BTreeMap::new(),
            operator_released: false,
            fence_runs: BTreeMap::new(),
            bmc_lie: BTreeSet::new(),
        };
        // Every VM already runs where it is placed, under a lease the
        // agent is about to renew: start each agent with its copies.
        for v in 0..w.store.vms.len() {
            let Some(h) = w.store.vms[v].host else { continue };
            let copy = w.new_copy(v, Phase::Running);
            w.hosts[h].copies.insert(v, copy);
            if w.cfg.disk_locks {
                w.locks.insert(v, (h, copy.id));
            }
            w.started_epoch.insert(v, 1);
        }
        for h in 0..w.hosts.len() {
            let at = w.rng.random_range(0..SEC);
            w.at(at, Ev::AgentStart { host: h });
        }
        for i in 0..w.cfg.faults.len() {
            let at = w.cfg.faults[i].at_ms * MS;
            w.at(at, Ev::Fault { index: i });
        }
        w.last_epoch = w.store.vms.iter().map(|v| v.epoch).collect();
        w.schedule_server_tick();
        w
    }

    fn new_copy(&mut self, vm: usize, phase: Phase) -> VmCopy {
        self.next_copy += 1;
        let r = &self.store.vms[vm];
        VmCopy {
            id: self.next_copy,
            since: 0,
            epoch: r.epoch,
            ha: r.ha,
            phase,
        }
    }

    fn at(&mut self, t: Nanos, ev: Ev) {
        self.seq += 1;
        self.events.insert((t.max(self.now), self.seq), ev);
    }

    fn note(&mut self, what: String) {
        let line = format!("[{:>3}s] {what}", self.now / SEC);
        self.log.push(line);
    }

    fn violate(&mut self, what: String) {
        let what = format!("t={}ms: {what}", self.now / MS);
        if self.violation.is_none() {
            self.violation = Some(what.clone());
        }
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    /// Runs to the end (or to the first violation).
    pub fn run(mut self) -> Outcome {
        let end = self.cfg.duration_ms * MS;
        while let Some((&(t, s), _)) = self.events.first_key_value() {
            if t > end || (self.violation.is_some() && !self.cfg.keep_going) {
                break;
            }
            let Some(ev) = self.events.remove(&(t, s)) else {
                break;
            };
            self.now = t;
            if self.stats.steps > MAX_STEPS {
                self.violate(format!(
                    "more than {MAX_STEPS} steps: the run does not advance ({ev:?})"
                ));
                break;
            }
            self.handle(ev);
            self.stats.steps += 1;
            self.check();
        }
        Outcome {
            stats: self.stats,
            violation: self.violation,
            violations: self.violations,
            recoveries_ms: self.recoveries_ms,
            log: self.log,
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::AgentStart { host } => self.agent_start(host),
            Ev::GuardTimer { host } => {
                if self.hosts[host].up && self.hosts[host].guard_timer == Some(self.now) {
                    self.hosts[host].guard_timer = None;
                    self.guard_step(host, GuardEvent::Tick);
                }
            }
            Ev::AgentBeat { host, inc } => {
                if self.agent_inc(host) == Some(inc) {
                    self.agent_beat(host);
                }
            }
            Ev::AgentTimer { host, inc } => {
                let due = self.hosts[host].agent.as_ref().and_then(|a| a.timer_at);
                if self.agent_inc(host) == Some(inc) && due == Some(self.now) {
                    self.agent_event(host, Event::Tick);
                    self.reconcile(host);
                }
            }
            Ev::HostBoot { host } => {
                let h = &mut self.hosts[host];
                h.up = true;
                self.note(format!("host h{} boots", host + 1));
                self.agent_start(host);
            }
            Ev::BootDone { host, vm, copy } => {
                if let Some(c) = self.hosts[host].copies.get_mut(&vm) {
                    if c.id == copy && c.phase == Phase::Booting {
                        c.phase = Phase::Running;
                        c.since = self.now;
                    }
                }
            }
            Ev::CopyGone { host, vm, copy } => {
                if self.hosts[host].copies.get(&vm).is_some_and(|c| c.id == copy) {
                    self.hosts[host].copies.remove(&vm);
                    self.unlock_disk(vm, host, copy);
                    self.after_copy_gone(host);
                }
            }
            Ev::Deliver { sid, down, msg } => self.deliver(sid, down, msg),
            Ev::ServerTick { inc } => {
                if self.server.alive && self.server.inc == inc && self.server.tick_at == Some(self.now) {
                    self.server.tick_at = None;
                    self.server_idle_check();
                    self.server_step();
                }
            }
            Ev::ServerStart => self.server_start(),
            Ev::Unblock { host, up, down } => {
                let h = &mut self.hosts[host];
                if up {
                    h.up_blocked = false;
                }
                if down {
                    h.down_blocked = false;
                }
                self.retime(Some(host));
            }
            Ev::UnIsolate => {
                self.isolated = false;
                self.note("server reachable again".into());
                self.retime(None);
            }
            Ev::DelayEnd { host } => self.hosts[host].delay_max_ms = None,
            Ev::Fault { index } => self.fault(index),
            Ev::RecoveryCheck { index } => self.recovery_check(index),
            Ev::WitnessTimer { host, inc } => {
                let due = self.hosts[host].agent.as_ref().and_then(|a| a.witness_at);
                if self.agent_inc(host) == Some(inc) && due == Some(self.now) {
                    if let Some(a) = self.hosts[host].agent.as_mut() {
                        a.witness_at = None;
                    }
                    self.witness_tick(host);
                }
            }
            Ev::Peer { msg } => self.peer_deliver(msg),
            Ev::PeerUncut { host } => self.hosts[host].peer_cut = false,
            Ev::PeerNoiseEnd => self.peer_noise = None,
            Ev::FenceDone { run } => self.fence_done(run),
            Ev::LockRetry { host, inc } => {
                if self.agent_inc(host) == Some(inc) {
                    self.reconcile(host);
                }
            }
        }
    }
}

/// The name of a lease state (instants left out: they depend on the base).
fn state_name(s: State) -> &'static str {
    match s {
        State::NoLease { .. } => "no lease",
        State::Leased { .. } => "leased",
        State::Renewing { .. } => "renewing",
        State::Lapsed { .. } => "lapsed",
        State::SelfFencing { .. } => "self-fencing",
        State::Fenced { .. } => "fenced",
    }
}

/// Runs `cfg` and returns what happened.
pub fn run(cfg: Config) -> Outcome {
    World::new(cfg).run()
}

/// A short report of an outcome (for the failure message): the violation,
/// the replay command and the log's last lines.
pub fn report(cfg: &Config, out: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "seed {} ({:?}): {}",
        cfg.seed,
        cfg.profile,
        out.violation.as_deref().unwrap_or("ok")
    );
    let _ = writeln!(
        s,
        "replay: cargo run -p novacron-sim --bin ha-sim -- --seed {} --log",
        cfg.seed
    );
    for l in out.log.iter().rev().take(30).rev() {
        let _ = writeln!(s, "  {l}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_clock_inverts_exactly_at_the_drift_bound() {
        let (clock, _m) = Clock::manual();
        let base = clock.now();
        for rate_ppm in [-1_000, -1, 0, 1, 1_000] {
            let c = NodeClock { base, rate_ppm };
            for t in [0, 1, 999, SEC, 7 * SEC + 12_345, 3_600 * SEC] {
                let x = c.local(t);
                let r = c.real_at(x);
                assert!(r <= t, "rate {rate_ppm}, t {t}: {r}");
                assert!(c.local(r) >= x);
                assert!(r == 0 || c.local(r - 1) < x);
            }
            // A second on a slow clock lasts longer in real time.
            let one = c.real_at(base + Duration::from_secs(1));
            let expect = (1_000_000_000u128 * 1_000_000).div_ceil((1_000_000 + rate_ppm) as u128) as u64;
            assert!(one.abs_diff(expect) <= 1, "rate {rate_ppm}: {one} vs {expect}");
        }
    }
}
