//! Disk locks: virtlockd on every host, one lock space (the shared pool).
//! A QEMU takes its disk's lock when it starts and holds it until it is
//! gone; the lock service dies with its host, releasing that host's locks.
//! A start of a disk locked by a QEMU on another host fails ("lock held");
//! the agent reports it and retries with backoff (1 s doubling, at most
//! 15 s), never forcing it.

use super::*;

/// The first retry after a start refused at the lock.
const LOCK_RETRY_BASE: Nanos = SEC;
/// The longest wait between retries.
const LOCK_RETRY_CAP: Nanos = 15 * SEC;

impl World {
    /// Takes `vm`'s disk lock for a start on `host`; whether the start may
    /// go on. Always true without disk locks.
    pub(super) fn lock_disk(&mut self, host: usize, vm: usize) -> bool {
        if !self.cfg.disk_locks {
            return true;
        }
        let holder = self.locks.get(&vm).copied().filter(|&(h, copy)| {
            self.hosts[h].up && self.hosts[h].copies.get(&vm).is_some_and(|c| c.id == copy)
        });
        let Some((on, _)) = holder else {
            if let Some(a) = self.hosts[host].agent.as_mut() {
                if a.lock_wait.remove(&vm).is_some() {
                    self.note(format!("h{} vm{vm}: disk lock free", host + 1));
                }
            }
            return true;
        };
        self.stats.lock_refusals += 1;
        let inc = self.agent_inc(host);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return false;
        };
        let attempts = a.lock_wait.get(&vm).map_or(0, |w| w.0) + 1;
        let wait = (LOCK_RETRY_BASE << (attempts - 1).min(4)).min(LOCK_RETRY_CAP);
        a.lock_wait.insert(vm, (attempts, self.now + wait));
        if attempts == 1 {
            self.note(format!(
                "h{} vm{vm}: start refused, disk lock held on h{}: waits",
                host + 1,
                on + 1
            ));
        }
        if let Some(inc) = inc {
            self.at(self.now + wait, Ev::LockRetry { host, inc });
        }
        false
    }

    /// A QEMU is gone: the lock it held is free.
    pub(super) fn unlock_disk(&mut self, vm: usize, host: usize, copy: u64) {
        if self.locks.get(&vm) == Some(&(host, copy)) {
            self.locks.remove(&vm);
        }
    }

    /// A host died: its lock service with it, and every lock it held.
    pub(super) fn locks_die_with(&mut self, host: usize) {
        self.locks.retain(|_, (h, _)| *h != host);
    }

    /// With disk locks: every copy on a live host holds its disk's lock.
    pub(super) fn check_locks(&mut self) {
        if !self.cfg.disk_locks {
            return;
        }
        self.stats.checks.disk_lock += 1;
        let mut bad = None;
        for (hi, h) in self.hosts.iter().enumerate() {
            if !h.up {
                continue;
            }
            for (v, c) in &h.copies {
                if self.locks.get(v) != Some(&(hi, c.id)) {
                    bad = Some(format!(
                        "vm{v} runs on h{} without its disk lock (held by {:?})",
                        hi + 1,
                        self.locks.get(v).map(|(h, _)| format!("h{}", h + 1))
                    ));
                }
            }
        }
        if let Some(m) = bad {
            self.violate(m);
        }
    }
}
