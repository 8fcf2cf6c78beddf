//! The invariants, checked after every step (and at restart decisions and
//! recovery deadlines).

use super::*;

impl World {
    pub(super) fn check(&mut self) {
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
        // A server outage of any length, with the witness on, kills and
        // restarts nothing.
        if self.cfg.profile == Profile::Outage {
            self.stats.checks.outage += 1;
            let s = self.stats;
            if s.fences > 0 || s.guard_kills > 0 || s.restarts > 0 || s.bmc_offs > 0 {
                let msg = format!(
                    "a server outage fenced {}, fired {} fence guard(s), powered off {} and restarted {}",
                    s.fences, s.guard_kills, s.bmc_offs, s.restarts
                );
                self.violate(msg);
            }
        }
        self.check_locks();
    }

    pub(super) fn recovery_check(&mut self, index: usize) {
        let Some((host, crashed, vms)) = self.crashes.get(index).cloned() else {
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
                .filter(|h| h.up)
                .find_map(|h| h.copies.get(&v).filter(|c| c.phase == Phase::Running))
                .map(|c| c.since);
            if let Some(since) = running {
                self.recoveries_ms.push(since.saturating_sub(crashed) / MS);
            } else {
                let bound = self.cfg.recovery_bound().as_millis();
                self.violate(format!(
                    "vm{v} of crashed h{} not running again within {bound} ms",
                    host + 1
                ));
            }
        }
    }
}
