//! The hardware fence: a BMC per host (good, slow, lying, hanging or
//! unreachable, [`crate::config::Bmc`]) and the server's real
//! `FenceMachine` per host driven as the server's HA driver drives it: a
//! host whose fence the controller asks for gets `status` / `off` /
//! `status` ×2 run against its BMC, each command taking its time (killed
//! at the fence timeout); confirmed off, the host is fenced in the lease
//! view at once. A host heard again (or no longer expired) drops its
//! fence.

use super::*;

use crate::config::Bmc;
use novacron_server::ha::fence::{Exit, FenceEvent, Phase};

impl World {
    /// Starts fencing host `h` (the controller's [`Decision::Fence`]).
    pub(super) fn fence_start(&mut self, h: usize) {
        if !self.cfg.hw_fence {
            return;
        }
        let retry = (self.cfg.isolation == IsolationResponse::KeepRunning && !self.cfg.disk_locks)
            .then_some(Policy::default().retry);
        let policy = FencePolicy {
            retries: self.cfg.fence_retries,
            retry,
        };
        let next = self
            .server
            .fences
            .entry(h)
            .or_insert_with(|| FenceMachine::new(policy))
            .start();
        self.fence_next(h, next);
    }

    /// Drops the fences of hosts no longer expired or fenced (unless `off`
    /// went out: `FenceMachine::committed`), and runs failed fences whose
    /// retry is due.
    pub(super) fn fences_settle(&mut self) {
        let local = self.server.clock.local(self.now);
        let gone: Vec<usize> = self
            .server
            .fences
            .iter()
            .filter(|(&h, m)| {
                !m.committed()
                    && !matches!(
                        self.server.leases.state(self.hosts[h].id),
                        Some(HostState::LeaseExpired | HostState::Fenced)
                    )
            })
            .map(|(&h, _)| h)
            .collect();
        for h in gone {
            if self.server.fences.remove(&h).is_some_and(|m| m.busy()) {
                self.note(format!("server: h{} fence abandoned: the host is back", h + 1));
            }
        }
        let due: Vec<(usize, novacron_server::ha::fence::Next)> = self
            .server
            .fences
            .iter_mut()
            .map(|(h, m)| (*h, m.poll(local)))
            .filter(|(_, n)| n.run.is_some())
            .collect();
        for (h, n) in due {
            self.fence_next(h, n);
        }
    }

    /// Logs a machine's events and runs the command it asks for.
    fn fence_next(&mut self, h: usize, next: novacron_server::ha::fence::Next) {
        for e in next.events {
            let line = match e {
                FenceEvent::Started { attempt } => format!("hardware fence started (attempt {attempt})"),
                FenceEvent::Step { action, what } => format!("fence {} -> {what}", action.as_str()),
                FenceEvent::Off { already } => {
                    format!(
                        "confirmed off{}",
                        if already { " (it was off already)" } else { "" }
                    )
                }
                FenceEvent::AttemptFailed { error } => format!("fence attempt failed: {error}"),
                FenceEvent::Failed { error } => {
                    self.stats.fence_failures += 1;
                    format!("fence failed: {error}")
                }
            };
            self.note(format!("server: h{} {line}", h + 1));
        }
        if let Some(action) = next.run {
            self.bmc_run(h, action);
        }
    }

    /// Runs `action` against host `h`'s BMC: its result arrives when the
    /// command ends (or is killed at the timeout).
    fn bmc_run(&mut self, h: usize, action: FenceAction) {
        let timeout = self.cfg.fence_timeout.as_nanos() as u64;
        let (took, exit) = match self.cfg.bmc_of(h) {
            Bmc::Good | Bmc::Lies => (self.rng.random_range(200 * MS..=1_000 * MS), None),
            Bmc::Slow { ms } => (ms * MS, None),
            Bmc::Hangs => (u64::MAX, None),
            Bmc::Unreachable => (
                self.rng.random_range(50 * MS..=200 * MS),
                Some(Exit::Error("connection refused".into())),
            ),
        };
        let (took, exit) = if took > timeout {
            (timeout, Some(Exit::TimedOut))
        } else {
            (took, exit)
        };
        let ran = Ran {
            exit: exit.unwrap_or(Exit::Code(0)),
            output: String::new(),
        };
        let run = self.next_msg;
        self.next_msg += 1;
        self.fence_runs.insert(run, (h, self.server.inc, action, ran));
        self.at(self.now + took, Ev::FenceDone { run });
    }

    /// A fence command ended: the BMC acts (powering the host off), the
    /// machine is fed its result.
    pub(super) fn fence_done(&mut self, run: u64) {
        let Some((h, inc, action, mut ran)) = self.fence_runs.remove(&run) else {
            return;
        };
        if !self.server.alive || self.server.inc != inc {
            return;
        }
        if ran.exit == Exit::Code(0) {
            let lies = self.cfg.bmc_of(h) == Bmc::Lies;
            ran.exit = match action {
                FenceAction::Status => {
                    let says_off = !self.hosts[h].up || (lies && self.bmc_lie.remove(&h));
                    Exit::Code(if says_off { 2 } else { 0 })
                }
                FenceAction::Off => {
                    if lies {
                        self.bmc_lie.insert(h);
                    } else {
                        self.power_off(h);
                    }
                    Exit::Code(0)
                }
                FenceAction::On => Exit::Code(0),
            };
        }
        let local = self.server.clock.local(self.now);
        let Some(m) = self.server.fences.get_mut(&h) else {
            return;
        };
        let mut next = m.done(local, action, &ran);
        let trusted = self.cfg.broken.fence_trusts_one_confirmation
            && matches!(m.phase(), Phase::Confirming { done } if *done >= 1);
        if trusted {
            // Broken on purpose: the first confirmation stands for both.
            let off = Ran {
                exit: Exit::Code(2),
                output: String::new(),
            };
            let rest = m.done(local, FenceAction::Status, &off);
            next.run = rest.run;
            next.events.extend(rest.events);
        }
        let off = matches!(m.status(), FenceStatus::Off);
        self.fence_next(h, next);
        if off {
            let id = self.hosts[h].id;
            if let Err(e) = self.server.leases.confirmed_off(id, local) {
                self.violate(format!("confirmed_off refused: {e}"));
            }
            if trusted {
                self.note(format!("server: h{} taken as off after one confirmation", h + 1));
            }
            self.server_step();
        }
    }

    /// The BMC powers host `h` off: agent, QEMUs and lock service die.
    fn power_off(&mut self, h: usize) {
        if !self.hosts[h].up {
            return;
        }
        self.stats.bmc_offs += 1;
        self.note(format!("h{} powered off by its BMC", h + 1));
        let host = &mut self.hosts[h];
        host.up = false;
        host.agent = None;
        host.copies.clear();
        host.guard = FenceGuard::default();
        host.guard_view = None;
        host.guard_timer = None;
        self.locks_die_with(h);
    }
}
