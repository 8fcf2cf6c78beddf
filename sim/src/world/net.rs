//! The network: ordered per-session streams with delay, stalls while a
//! direction is blocked, retimed in order when it comes back.

use super::*;

impl World {
    pub(super) fn delay(&mut self, host: usize) -> Nanos {
        let (lo, hi) = self.cfg.normal_delay_ms;
        let hi = self.hosts[host].delay_max_ms.unwrap_or(hi).max(lo);
        self.rng.random_range(lo * MS..=hi * MS)
    }

    pub(super) fn blocked(&self, host: usize, down: bool) -> bool {
        let h = &self.hosts[host];
        self.isolated || !h.up || if down { h.down_blocked } else { h.up_blocked }
    }

    pub(super) fn send_up(&mut self, sid: u64, m: Up) {
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

    pub(super) fn send_down(&mut self, sid: u64, m: Down) {
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
    pub(super) fn retime(&mut self, host: Option<usize>) {
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

    pub(super) fn deliver(&mut self, sid: u64, down: bool, msg: u64) {
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
}
