//! The simulated world: hosts (agent + hypervisor), the server (host
//! leases, HA controller, store), the network and the clocks, stepped one
//! event at a time from one seeded RNG, with the invariants checked after
//! every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use novacron_agent::lease::{Action, EpochGuard, Event, FenceMode, Lease, State};
use novacron_server::ha::controller::{Controller, Decision, HostInput, Policy, VmInput};
use novacron_server::ha::guard::{GuardPolicy, GuardState};
use novacron_server::ha::lease::{HostLeases, HostState, LeasePolicy, Restored, Transition};
use novacron_server::scheduler;
use novacron_shared::clock::Clock;
use novacron_shared::ids::{HostId, VmId};

use crate::config::{Config, CrashPoint, Fault, Nanos, Profile, MS, SEC};

/// Steps after which a run counts as stuck (a run takes a few thousand).
const MAX_STEPS: u64 = 1_000_000;

/// A node's monotonic clock: `base + offset + t·(1 + rate)`, `t` the real
/// time of the run. Every node's instants derive from one base.
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
    Heartbeat(u64),
    Converged(u64),
}

/// Frames from the server to an agent.
#[derive(Debug, Clone)]
enum Down {
    Terms,
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
}

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    AgentBeat { host: usize, inc: u64 },
    AgentTimer { host: usize, inc: u64 },
    AgentStart { host: usize },
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
}

impl Checks {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.single_copy + self.epochs + self.tolerance + self.restart_after_fence + self.held + self.recovery
    }

    /// Adds `o` to these.
    pub fn add(&mut self, o: &Checks) {
        self.single_copy += o.single_copy;
        self.epochs += o.epochs;
        self.tolerance += o.tolerance;
        self.restart_after_fence += o.restart_after_fence;
        self.held += o.held;
        self.recovery += o.recovery;
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
    /// Host crashes to check the recovery bound for: (host, HA VMs it held).
    crashes: Vec<(usize, Vec<usize>)>,
}

fn policy(cfg: &Config) -> Policy {
    Policy {
        enabled: true,
        guard: GuardPolicy {
            ratio: cfg.mass_failure_ratio,
            ..GuardPolicy::default()
        },
        retry: Duration::from_secs(2),
    }
}

fn lease_policy(cfg: &Config) -> LeasePolicy {
    LeasePolicy::new(cfg.server_timing, cfg.heartbeat)
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
        };
        // Every VM already runs where it is placed, under a lease the
        // agent is about to renew: start each agent with its copies.
        for v in 0..w.store.vms.len() {
            let Some(h) = w.store.vms[v].host else { continue };
            let copy = w.new_copy(v, Phase::Running);
            w.hosts[h].copies.insert(v, copy);
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
            log: self.log,
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::AgentStart { host } => self.agent_start(host),
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
                    }
                }
            }
            Ev::CopyGone { host, vm, copy } => {
                if self.hosts[host].copies.get(&vm).is_some_and(|c| c.id == copy) {
                    self.hosts[host].copies.remove(&vm);
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
        }
    }

    // ---- faults ----

    fn fault(&mut self, index: usize) {
        let fault = self.cfg.faults[index].fault.clone();
        let now = self.now;
        match fault {
            Fault::Partition { host, for_ms } => {
                self.note(format!("fault: h{} link cut for {for_ms} ms", host + 1));
                self.block(host, true, true, for_ms);
            }
            Fault::DropAcks { host, for_ms } => {
                self.note(format!("fault: h{} acks lost for {for_ms} ms", host + 1));
                self.block(host, false, true, for_ms);
            }
            Fault::DropBeats { host, for_ms } => {
                self.note(format!("fault: h{} heartbeats lost for {for_ms} ms", host + 1));
                self.block(host, true, false, for_ms);
            }
            Fault::Flap {
                host,
                down_ms,
                up_ms,
                times,
            } => {
                self.note(format!(
                    "fault: h{} link flaps {times}x ({down_ms} ms down, {up_ms} ms up)",
                    host + 1
                ));
                self.block(host, true, true, down_ms);
                for i in 1..u64::from(times) {
                    let t = now + i * (down_ms + up_ms) * MS;
                    self.cfg.faults.push(crate::config::Timed {
                        at_ms: t / MS,
                        fault: Fault::Partition {
                            host,
                            for_ms: down_ms,
                        },
                    });
                    let index = self.cfg.faults.len() - 1;
                    self.at(t, Ev::Fault { index });
                }
            }
            Fault::Delay { host, max_ms, for_ms } => {
                self.note(format!(
                    "fault: h{} delays up to {max_ms} ms for {for_ms} ms",
                    host + 1
                ));
                self.hosts[host].delay_max_ms = Some(max_ms);
                self.at(now + for_ms * MS, Ev::DelayEnd { host });
            }
            Fault::AgentStop { host, for_ms } => {
                if self.hosts[host].agent.is_some() {
                    self.note(format!("fault: h{} agent stopped for {for_ms} ms", host + 1));
                    self.hosts[host].agent = None;
                    self.at(now + for_ms * MS, Ev::AgentStart { host });
                }
            }
            Fault::HostCrash { host, reboot_ms } => {
                if !self.hosts[host].up {
                    return;
                }
                self.note(format!("fault: h{} crashes", host + 1));
                let held: Vec<usize> = self.hosts[host]
                    .copies
                    .iter()
                    .filter(|(_, c)| c.ha)
                    .map(|(v, _)| *v)
                    .collect();
                let h = &mut self.hosts[host];
                h.up = false;
                h.agent = None;
                h.copies.clear();
                if let Some(ms) = reboot_ms {
                    self.at(now + ms * MS, Ev::HostBoot { host });
                }
                if self.cfg.profile == Profile::HostLoss {
                    self.crashes.push((host, held));
                    let idx = self.crashes.len() - 1;
                    let bound = self.cfg.recovery_bound().as_nanos() as u64;
                    self.at(now + bound, Ev::RecoveryCheck { index: idx });
                }
            }
            Fault::ServerCrash { for_ms } => {
                if self.server.alive {
                    self.note(format!("fault: server killed for {for_ms} ms"));
                    self.server_crash(for_ms);
                }
            }
            Fault::ServerCrashAfter { point, for_ms } => {
                self.server.crash_at.push((point, for_ms));
            }
            Fault::SessionLoss { host } => {
                let Some(sid) = self.hosts[host].agent.as_ref().and_then(|a| a.session) else {
                    return;
                };
                self.note(format!("fault: h{} session lost", host + 1));
                if let Some(a) = self.hosts[host].agent.as_mut() {
                    a.session = None;
                }
                if self.server.alive && self.server.sessions.get(&host) == Some(&sid) {
                    self.server.sessions.remove(&host);
                    let local = self.server.clock.local(now);
                    let id = self.host_id(host);
                    self.server.leases.disconnected(id, local);
                    self.server_step();
                }
            }
            Fault::Isolate { for_ms } => {
                self.note(format!("fault: server unreachable for {for_ms} ms"));
                self.isolated = true;
                self.at(now + for_ms * MS, Ev::UnIsolate);
            }
            Fault::Release => {
                if self.server.alive && self.held() {
                    self.note("operator releases held".into());
                    let hosts = self.host_inputs();
                    if let Some(d) = self.server.ctl.release(&hosts) {
                        self.apply(d);
                    }
                    self.server_step();
                }
            }
        }
    }

    fn block(&mut self, host: usize, up: bool, down: bool, for_ms: u64) {
        let h = &mut self.hosts[host];
        h.up_blocked |= up;
        h.down_blocked |= down;
        self.at(self.now + for_ms * MS, Ev::Unblock { host, up, down });
    }

    // ---- network ----

    fn delay(&mut self, host: usize) -> Nanos {
        let (lo, hi) = self.cfg.normal_delay_ms;
        let hi = self.hosts[host].delay_max_ms.unwrap_or(hi).max(lo);
        self.rng.random_range(lo * MS..=hi * MS)
    }

    fn blocked(&self, host: usize, down: bool) -> bool {
        let h = &self.hosts[host];
        self.isolated || !h.up || if down { h.down_blocked } else { h.up_blocked }
    }

    fn send_up(&mut self, sid: u64, m: Up) {
        let Some(host) = self.sessions.get(&sid).map(|s| s.host) else {
            return;
        };
        let d = self.delay(host);
        let msg = self.next_msg;
        self.next_msg += 1;
        let now = self.now;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let due = (now + d).max(s.up.last_due);
        s.up.last_due = due;
        s.up.queue.push_back((due, msg, m));
        self.at(
            due,
            Ev::Deliver {
                sid,
                down: false,
                msg,
            },
        );
    }

    fn send_down(&mut self, sid: u64, m: Down) {
        let Some(host) = self.sessions.get(&sid).map(|s| s.host) else {
            return;
        };
        let d = self.delay(host);
        let msg = self.next_msg;
        self.next_msg += 1;
        let now = self.now;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let due = (now + d).max(s.down.last_due);
        s.down.last_due = due;
        s.down.queue.push_back((due, msg, m));
        self.at(due, Ev::Deliver { sid, down: true, msg });
    }

    /// After a link comes back: stalled frames go out again, in order.
    fn retime(&mut self, host: Option<usize>) {
        let sids: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| host.is_none_or(|h| h == s.host))
            .map(|(id, _)| *id)
            .collect();
        for sid in sids {
            for down in [false, true] {
                let Some(h) = self.sessions.get(&sid).map(|s| s.host) else {
                    continue;
                };
                if self.blocked(h, down) {
                    continue;
                }
                let n = self.sessions.get(&sid).map_or(0, |s| {
                    if down {
                        s.down.queue.len()
                    } else {
                        s.up.queue.len()
                    }
                });
                let mut last = self.now;
                for i in 0..n {
                    let d = self.delay(h);
                    let Some(s) = self.sessions.get_mut(&sid) else {
                        break;
                    };
                    let (due, msg) = if down {
                        let e = &mut s.down.queue[i];
                        e.0 = e.0.max(self.now + d).max(last);
                        s.down.last_due = s.down.last_due.max(e.0);
                        (e.0, e.1)
                    } else {
                        let e = &mut s.up.queue[i];
                        e.0 = e.0.max(self.now + d).max(last);
                        s.up.last_due = s.up.last_due.max(e.0);
                        (e.0, e.1)
                    };
                    last = due;
                    self.at(due, Ev::Deliver { sid, down, msg });
                }
            }
        }
    }

    fn deliver(&mut self, sid: u64, down: bool, msg: u64) {
        let Some(s) = self.sessions.get(&sid) else { return };
        let host = s.host;
        let head = if down {
            s.down.queue.front().map(|e| (e.0, e.1))
        } else {
            s.up.queue.front().map(|e| (e.0, e.1))
        };
        if head != Some((self.now, msg)) || self.blocked(host, down) {
            return;
        }
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if down {
            let Some((_, _, m)) = s.down.queue.pop_front() else {
                return;
            };
            self.agent_receive(host, sid, m);
        } else {
            let Some((_, _, m)) = s.up.queue.pop_front() else {
                return;
            };
            self.server_receive(host, sid, m);
        }
    }

    // ---- agent ----

    fn agent_inc(&self, host: usize) -> Option<u64> {
        self.hosts[host].agent.as_ref().map(|a| a.inc)
    }

    fn agent_start(&mut self, host: usize) {
        let h = &mut self.hosts[host];
        if !h.up || h.agent.is_some() {
            return;
        }
        h.inc += 1;
        let local = h.clock.local(self.now);
        let Ok(lease) = Lease::new(self.cfg.agent_timing, FenceMode::Kill, local) else {
            self.violate("the agent's lease refused its timing".into());
            return;
        };
        h.agent = Some(Agent {
            inc: h.inc,
            lease,
            guard: EpochGuard::new(),
            session: None,
            seq: 0,
            desired: None,
            converged_sent: None,
            last_rx: local,
            timer_at: None,
            fencing: false,
        });
        self.schedule_agent_timer(host);
        self.agent_beat(host);
    }

    fn schedule_agent_timer(&mut self, host: usize) {
        let h = &mut self.hosts[host];
        let clock = h.clock;
        let Some(a) = h.agent.as_mut() else { return };
        let next = a.lease.next_timer().map(|i| clock.real_at(i).max(self.now));
        if next == a.timer_at {
            return;
        }
        a.timer_at = next;
        let inc = a.inc;
        if let Some(t) = next {
            self.at(t, Ev::AgentTimer { host, inc });
        }
    }

    fn agent_event(&mut self, host: usize, ev: Event) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        let actions = match a.lease.step(local, ev) {
            Ok(actions) => actions,
            Err(e) => {
                self.violate(format!("h{} lease refused an event: {e}", host + 1));
                return;
            }
        };
        for act in actions {
            match act {
                Action::FenceHaVms { .. } => self.fence(host),
                Action::LeaseAcquired { .. } => {}
                Action::LeaseLost { .. } => self.note(format!("h{} lease lost", host + 1)),
                Action::Renewing { .. } | Action::Renewed { .. } | Action::AckIgnored { .. } => {}
            }
        }
        self.schedule_agent_timer(host);
    }

    fn fence(&mut self, host: usize) {
        self.stats.fences += 1;
        self.note(format!("h{} fences its HA VMs", host + 1));
        let f = self.cfg.agent_timing.fence_time.as_nanos() as u64;
        let now = self.now;
        let victims: Vec<(usize, u64)> = self.hosts[host]
            .copies
            .iter()
            .filter(|(_, c)| c.ha && c.phase != Phase::Dying)
            .map(|(v, c)| (*v, c.id))
            .collect();
        for (vm, copy) in victims {
            let gone = now + self.rng.random_range(0..=f);
            if let Some(c) = self.hosts[host].copies.get_mut(&vm) {
                c.phase = Phase::Dying;
            }
            self.at(gone, Ev::CopyGone { host, vm, copy });
        }
        if let Some(a) = self.hosts[host].agent.as_mut() {
            a.fencing = true;
        }
        self.after_copy_gone(host);
    }

    fn after_copy_gone(&mut self, host: usize) {
        let ha_left = self.hosts[host].copies.values().any(|c| c.ha);
        let fencing = self.hosts[host].agent.as_ref().is_some_and(|a| a.fencing);
        if fencing && !ha_left {
            if let Some(a) = self.hosts[host].agent.as_mut() {
                a.fencing = false;
            }
            self.agent_event(host, Event::HaVmsGone);
        }
        self.reconcile(host);
    }

    fn agent_beat(&mut self, host: usize) {
        let clock = self.hosts[host].clock;
        let local = clock.local(self.now);
        let idle = self.cfg.idle_timeout;
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        let inc = a.inc;
        if a.session.is_some() && local.saturating_duration_since(a.last_rx) > idle {
            a.session = None;
        }
        if a.session.is_none() {
            self.agent_connect(host);
        }
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        if let Some(sid) = a.session {
            a.seq += 1;
            let seq = a.seq;
            self.agent_event(host, Event::HeartbeatSent { seq });
            self.send_up(sid, Up::Heartbeat(seq));
        }
        self.reconcile(host);
        let next = clock.real_at(local + self.cfg.heartbeat);
        self.at(next, Ev::AgentBeat { host, inc });
    }

    fn agent_connect(&mut self, host: usize) {
        let reachable = self.server.alive && !self.blocked(host, false) && !self.blocked(host, true);
        if !reachable {
            return;
        }
        let sid = self.next_sid;
        self.next_sid += 1;
        self.sessions.insert(
            sid,
            Session {
                host,
                up: Stream::default(),
                down: Stream::default(),
            },
        );
        let local = self.hosts[host].clock.local(self.now);
        if let Some(a) = self.hosts[host].agent.as_mut() {
            a.session = Some(sid);
            a.seq = 0;
            a.desired = None;
            a.converged_sent = None;
            a.last_rx = local;
        }
        self.agent_event(host, Event::SessionStarted);
        self.send_up(sid, Up::Hello);
    }

    fn agent_receive(&mut self, host: usize, sid: u64, m: Down) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        if a.session != Some(sid) {
            return;
        }
        a.last_rx = local;
        match m {
            Down::Terms => {}
            Down::Desired(d) => {
                a.desired = Some(d);
                self.reconcile(host);
            }
            Down::Ack(seq) => {
                self.agent_event(host, Event::AckReceived { seq });
                self.reconcile(host);
            }
            Down::Reset => {
                a.session = None;
                self.agent_connect(host);
                let Some(a) = self.hosts[host].agent.as_mut() else {
                    return;
                };
                if let Some(sid) = a.session {
                    a.seq += 1;
                    let seq = a.seq;
                    self.agent_event(host, Event::HeartbeatSent { seq });
                    self.send_up(sid, Up::Heartbeat(seq));
                }
            }
        }
    }

    /// The agent's reconciler: starts desired VMs (HA ones only under
    /// `may_start_ha` and the epoch guard), destroys departed ones, and
    /// reports converged.
    fn reconcile(&mut self, host: usize) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_ref() else {
            return;
        };
        let Some(d) = a.desired.clone() else { return };
        let sid = a.session;
        let f = self.cfg.agent_timing.fence_time.as_nanos() as u64;
        for &(vm, epoch) in &d.vms {
            let present = self.hosts[host].copies.get(&vm).copied();
            let ha = self.store.vms[vm].ha;
            let id = self.store.vms[vm].id;
            let Some(a) = self.hosts[host].agent.as_mut() else {
                return;
            };
            match present {
                Some(c) if c.phase != Phase::Dying => {
                    a.guard.admit(id, epoch.max(c.epoch));
                }
                Some(_) => {}
                None => {
                    if ha && !a.lease.may_start_ha(local) {
                        continue;
                    }
                    if !a.guard.admit(id, epoch) {
                        continue;
                    }
                    self.start_copy(host, vm, epoch);
                }
            }
        }
        for &vm in &d.departed {
            let Some(c) = self.hosts[host].copies.get_mut(&vm) else {
                continue;
            };
            if c.phase != Phase::Dying {
                c.phase = Phase::Dying;
                let copy = c.id;
                let gone = self.now + self.rng.random_range(0..=f);
                self.at(gone, Ev::CopyGone { host, vm, copy });
            }
        }
        let clean = d
            .departed
            .iter()
            .all(|v| !self.hosts[host].copies.contains_key(v));
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        if clean && a.converged_sent != Some(d.gen) {
            a.converged_sent = Some(d.gen);
            if let Some(sid) = sid {
                self.send_up(sid, Up::Converged(d.gen));
            }
        }
    }

    fn start_copy(&mut self, host: usize, vm: usize, epoch: u64) {
        self.next_copy += 1;
        let copy = VmCopy {
            id: self.next_copy,
            epoch,
            ha: self.store.vms[vm].ha,
            phase: Phase::Booting,
        };
        let seen = self.started_epoch.get(&vm).copied().unwrap_or(0);
        if epoch < seen {
            self.violate(format!(
                "vm{} started at epoch {epoch} after a copy at epoch {seen}",
                vm
            ));
        }
        self.started_epoch.insert(vm, epoch.max(seen));
        self.hosts[host].copies.insert(vm, copy);
        if copy.ha {
            self.note(format!("h{} starts vm{vm} at epoch {epoch}", host + 1));
        }
        let (lo, hi) = self.cfg.boot_ms;
        let boot = self.rng.random_range(lo * MS..=hi * MS);
        self.at(
            self.now + boot,
            Ev::BootDone {
                host,
                vm,
                copy: copy.id,
            },
        );
    }

    // ---- server ----

    fn host_id(&self, host: usize) -> HostId {
        self.hosts[host].id
    }

    fn host_index(&self, id: HostId) -> Option<usize> {
        self.hosts.iter().position(|h| h.id == id)
    }

    fn vm_index(&self, id: VmId) -> Option<usize> {
        self.store.vms.iter().position(|v| v.id == id)
    }

    fn desired_for(&self, host: usize) -> Desired {
        let vms = self
            .store
            .vms
            .iter()
            .enumerate()
            .filter(|(_, v)| v.host == Some(host))
            .map(|(i, v)| (i, v.epoch))
            .collect();
        let rec = &self.store.hosts[host];
        Desired {
            gen: rec.gen,
            vms,
            departed: rec.departed.iter().copied().collect(),
        }
    }

    fn push_desired(&mut self, host: usize) {
        if let Some(&sid) = self.server.sessions.get(&host) {
            let d = self.desired_for(host);
            self.send_down(sid, Down::Desired(d));
        }
    }

    fn server_receive(&mut self, host: usize, sid: u64, m: Up) {
        if !self.server.alive {
            return;
        }
        let local = self.server.clock.local(self.now);
        let id = self.host_id(host);
        let current = self.server.sessions.get(&host).copied();
        if let Up::Hello = m {
            if current.is_some_and(|c| c >= sid) {
                return;
            }
            self.server.sessions.insert(host, sid);
            self.server.last_rx.insert(host, self.now);
            self.server.leases.connected(id, local);
            self.send_down(sid, Down::Terms);
            self.push_desired(host);
            self.server_step();
            return;
        }
        if current != Some(sid) {
            // A frame of a session this run does not know: a stateless reset.
            self.send_down(sid, Down::Reset);
            return;
        }
        self.server.last_rx.insert(host, self.now);
        self.server.leases.heard(id, local);
        match m {
            Up::Hello => {}
            Up::Heartbeat(seq) => {
                // Recorded, then under the same lock whether it may be acked.
                if self.server.leases.may_ack(id, local) {
                    self.send_down(sid, Down::Ack(seq));
                }
                self.server_step();
            }
            Up::Converged(gen) => {
                let c = self.server.converged.entry(host).or_insert(0);
                *c = (*c).max(gen);
                self.server_step();
            }
        }
    }

    fn server_idle_check(&mut self) {
        let idle = self.cfg.idle_timeout.as_nanos() as u64;
        let stale: Vec<usize> = self
            .server
            .sessions
            .keys()
            .copied()
            .filter(|h| self.server.last_rx.get(h).is_some_and(|t| self.now > t + idle))
            .collect();
        let local = self.server.clock.local(self.now);
        for h in stale {
            self.server.sessions.remove(&h);
            let id = self.host_id(h);
            self.server.leases.disconnected(id, local);
        }
    }

    /// One step of the server under its one lock: leases ticked, the
    /// controller stepped, its decisions carried out.
    fn server_step(&mut self) {
        if !self.server.alive {
            return;
        }
        let local = self.server.clock.local(self.now);
        let transitions: Vec<Transition> = self.server.leases.tick(local);
        let mut fenced = false;
        for t in &transitions {
            if t.to == HostState::Fenced {
                if let Some(h) = self.host_index(t.host) {
                    self.store.hosts[h].must_return = true;
                    fenced = true;
                }
            }
        }
        for t in &transitions {
            if matches!(t.to, HostState::Fenced | HostState::Returning) || t.from == HostState::Fenced {
                if let Some(h) = self.host_index(t.host) {
                    self.note(format!("server: h{} {:?} -> {:?}", h + 1, t.from, t.to));
                }
            }
        }
        if fenced && self.crash_point(CrashPoint::Fenced) {
            return;
        }
        let hosts = self.host_inputs();
        let vms: Vec<VmInput> = self
            .store
            .vms
            .iter()
            .map(|v| VmInput {
                id: v.id,
                host: v.host.map(|h| self.hosts[h].id),
                ha: v.ha,
                priority: v.priority,
                running: true,
                epoch: v.epoch,
                migrating: false,
                created_ms: v.created_ms,
            })
            .collect();
        let decisions = self.server.ctl.step(local, &hosts, &vms);
        for d in decisions {
            if !self.server.alive {
                return;
            }
            self.apply(d);
        }
        self.schedule_server_tick();
    }

    fn host_inputs(&self) -> Vec<HostInput> {
        self.server
            .leases
            .hosts()
            .map(|(id, lease)| {
                let h = self.host_index(id).unwrap_or(0);
                HostInput {
                    id,
                    lease,
                    reconciled: self.server.converged.get(&h) == Some(&self.store.hosts[h].gen),
                }
            })
            .collect()
    }

    /// The guard holds every fenced host (no restart may be decided).
    fn held(&self) -> bool {
        matches!(self.server.ctl.guard(), GuardState::Held { .. })
    }

    fn apply(&mut self, d: Decision) {
        match d {
            Decision::Restart { vm, from, epoch } => self.restart(vm, from, epoch),
            Decision::ReturnedClean { host } => {
                let Some(h) = self.host_index(host) else { return };
                // Stored first (departed and must-return cleared), then the
                // lease view; the fleet does the same.
                self.store.hosts[h].departed.clear();
                self.store.hosts[h].must_return = false;
                self.store.hosts[h].gen += 1;
                if self.crash_point(CrashPoint::ReturnedClean) {
                    return;
                }
                if let Err(e) = self.server.leases.returned_clean(host) {
                    self.violate(format!("returned_clean refused: {e}"));
                    return;
                }
                self.note(format!("server: h{} returned clean", h + 1));
                self.push_desired(h);
            }
            Decision::Lost { vm, host } => {
                let (v, h) = (self.vm_index(vm).unwrap_or(0), self.host_index(host).unwrap_or(0));
                self.note(format!("server: vm{v} lost with h{}", h + 1));
                self.crash_point(CrashPoint::Lost);
            }
            Decision::Held { silent, monitored } => {
                self.note(format!("server: held ({silent} of {monitored} hosts silent)"));
                self.crash_point(CrashPoint::Held);
            }
            Decision::Releasing => self.note("server: releasing".into()),
            Decision::Released { by_operator } => {
                self.note(format!("server: released (by operator: {by_operator})"));
            }
        }
    }

    fn restart(&mut self, vm: VmId, from: HostId, epoch: u64) {
        let local = self.server.clock.local(self.now);
        let (Some(v), Some(f)) = (self.vm_index(vm), self.host_index(from)) else {
            self.violate(format!("restart of unknown vm {vm} or host {from}"));
            return;
        };
        self.stats.checks.held += 1;
        self.stats.checks.restart_after_fence += 1;
        if self.held() {
            self.violate(format!("restart of vm{v} decided while held"));
        }
        // The old host must no longer be able to run it.
        let old = &self.hosts[f];
        let copy_left = old.copies.contains_key(&v);
        let may_run = old
            .agent
            .as_ref()
            .is_some_and(|a| matches!(a.lease.state(), State::Leased { .. } | State::Renewing { .. }));
        if old.up && (copy_left || may_run) {
            self.violate(format!(
                "restart of vm{v} decided while h{} can still run it (copy left: {copy_left}, lease: {:?})",
                f + 1,
                old.agent.as_ref().map(|a| state_name(a.lease.state()))
            ));
        }
        let rec = &self.store.vms[v];
        if rec.host != Some(f) || rec.epoch != epoch || !self.server.leases.must_return(from) {
            self.server.ctl.restart_failed(vm, local, "stale decision".into());
            return;
        }
        let hosts: Vec<scheduler::Host> = (0..self.hosts.len())
            .filter(|&h| self.server.leases.state(self.hosts[h].id) == Some(HostState::Online))
            .map(|h| {
                let mut used = scheduler::Usage::default();
                for r in self.store.vms.iter().filter(|r| r.host == Some(h)) {
                    used.vcpus += r.vcpus;
                    used.memory_mib += r.memory_mib;
                }
                scheduler::Host {
                    id: self.hosts[h].id,
                    up: true,
                    cordoned: false,
                    cpus: self.cfg.host_cpus,
                    memory_mib: self.cfg.host_memory_mib,
                    storage_free_mib: u64::MAX / 4,
                    labels: BTreeMap::new(),
                    load: None,
                    used,
                    groups: Default::default(),
                    shared_storage: Some("pool".into()),
                }
            })
            .collect();
        let req = scheduler::Request {
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            ..Default::default()
        };
        let to = match self
            .server
            .sched
            .place(&scheduler::Policy::default(), &hosts, &req)
        {
            Ok(to) => to,
            Err(nofit) => {
                self.note(format!("server: vm{v} waits: {nofit}"));
                self.server.ctl.restart_failed(vm, local, nofit.to_string());
                return;
            }
        };
        let Some(t) = self.host_index(to) else { return };
        // One store transaction: placement, epoch + 1, departed entry.
        let new_epoch = epoch + 1;
        if new_epoch <= self.store.vms[v].epoch {
            self.violate(format!("vm{v} epoch would not increase"));
        }
        let rec = &mut self.store.vms[v];
        rec.host = Some(t);
        rec.epoch = new_epoch;
        self.store.hosts[f].departed.insert(v);
        self.store.hosts[f].gen += 1;
        self.store.hosts[t].departed.remove(&v);
        self.store.hosts[t].gen += 1;
        self.stats.restarts += 1;
        self.note(format!(
            "server: restart vm{v} h{} -> h{} epoch {new_epoch}",
            f + 1,
            t + 1
        ));
        if self.crash_point(CrashPoint::Restart) {
            return;
        }
        self.push_desired(t);
        self.push_desired(f);
        self.server.ctl.restart_done(vm);
    }

    /// Kills the server if a crash is armed at `point`; whether it did.
    fn crash_point(&mut self, point: CrashPoint) -> bool {
        let Some(i) = self.server.crash_at.iter().position(|(p, _)| *p == point) else {
            return false;
        };
        let (_, ms) = self.server.crash_at.remove(i);
        self.note(format!("fault: server killed right after {point:?}, for {ms} ms"));
        self.server_crash(ms);
        true
    }

    fn schedule_server_tick(&mut self) {
        if !self.server.alive {
            return;
        }
        let local = self.server.clock.local(self.now);
        let mut next = self.server.leases.next_tick(local);
        if let Some(w) = self.server.ctl.next_wakeup() {
            next = Some(next.map_or(w, |n| n.min(w)));
        }
        let mut t = next.map(|i| self.server.clock.real_at(i).max(self.now));
        let idle = self.cfg.idle_timeout.as_nanos() as u64;
        for (h, _) in self.server.sessions.iter() {
            if let Some(rx) = self.server.last_rx.get(h) {
                let at = rx + idle + 1;
                t = Some(t.map_or(at, |x| x.min(at)));
            }
        }
        let Some(mut t) = t else { return };
        if t == self.now {
            // An input to report: the step that follows this one does it.
            t += 1;
        }
        if self.server.tick_at.is_some_and(|x| x <= t && x >= self.now) {
            return;
        }
        self.server.tick_at = Some(t);
        let inc = self.server.inc;
        self.at(t, Ev::ServerTick { inc });
    }

    fn server_crash(&mut self, for_ms: u64) {
        self.server.alive = false;
        self.server.inc += 1;
        self.server.sessions.clear();
        self.server.tick_at = None;
        self.at(self.now + for_ms * MS, Ev::ServerStart);
    }

    fn server_start(&mut self) {
        let local = self.server.clock.local(self.now);
        let known: Vec<HostId> = self.hosts.iter().map(|h| h.id).collect();
        let restored: Vec<(HostId, Restored)> = known
            .iter()
            .zip(&self.store.hosts)
            .map(|(id, r)| {
                (
                    *id,
                    Restored {
                        maintenance: false,
                        must_return: r.must_return,
                    },
                )
            })
            .collect();
        self.server.alive = true;
        self.server.leases = HostLeases::restored(lease_policy(&self.cfg), restored, local);
        self.server.ctl = Controller::new(policy(&self.cfg), known, local);
        self.server.sched = scheduler::Scheduler::default();
        self.server.last_rx.clear();
        self.server.converged.clear();
        self.note("server starts".into());
        self.schedule_server_tick();
    }

    // ---- invariants ----

    fn check(&mut self) {
        self.stats.checks.single_copy += 1;
        self.stats.checks.epochs += 1;
        // Never two copies of one VM (a dying copy still counts).
        let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
        for (hi, h) in self.hosts.iter().enumerate() {
            if !h.up {
                continue;
            }
            for v in h.copies.keys() {
                if let Some(other) = seen.insert(*v, hi) {
                    let msg = format!("vm{v} runs twice: on h{} and h{}", other + 1, hi + 1);
                    self.violate(msg);
                    return;
                }
            }
        }
        // Epochs only increase: the store never holds one below a started copy.
        for (v, e) in &self.started_epoch {
            if self.store.vms[*v].epoch < *e {
                let msg = format!(
                    "vm{v}: store epoch {} below started {e}",
                    self.store.vms[*v].epoch
                );
                self.violate(msg);
                return;
            }
        }
        let back = (0..self.last_epoch.len()).find(|&v| self.store.vms[v].epoch < self.last_epoch[v]);
        if let Some(v) = back {
            let msg = format!(
                "vm{v}: store epoch went back from {} to {}",
                self.last_epoch[v], self.store.vms[v].epoch
            );
            self.violate(msg);
            return;
        }
        for (last, rec) in self.last_epoch.iter_mut().zip(&self.store.vms) {
            *last = rec.epoch;
        }
        // Within tolerance nothing fences or restarts.
        if self.cfg.profile == Profile::Benign {
            self.stats.checks.tolerance += 1;
        }
        if self.cfg.profile == Profile::Benign && (self.stats.fences > 0 || self.stats.restarts > 0) {
            let msg = format!(
                "faults within tolerance ({} ms) fenced {} and restarted {}",
                self.cfg.tolerance().as_millis(),
                self.stats.fences,
                self.stats.restarts
            );
            self.violate(msg);
        }
    }

    fn recovery_check(&mut self, index: usize) {
        let Some((host, vms)) = self.crashes.get(index).cloned() else {
            return;
        };
        if self.held() {
            return;
        }
        for v in vms {
            self.stats.checks.recovery += 1;
            let running = self
                .hosts
                .iter()
                .any(|h| h.up && h.copies.get(&v).is_some_and(|c| c.phase == Phase::Running));
            if !running {
                let bound = self.cfg.recovery_bound().as_millis();
                self.violate(format!(
                    "vm{v} of crashed h{} not running again within {bound} ms",
                    host + 1
                ));
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
