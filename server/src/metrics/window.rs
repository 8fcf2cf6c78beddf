//! The in-memory recent window: per series, every raw point of the last
//! `raw_window` (15 minutes by default), the running 1-minute rollup and the
//! latest value. No I/O: ingest feeds it, queries read it, and it hands back
//! the rollups of minutes that closed so the caller can store them.
//!
//! Memory: 16 bytes per point (timestamp + raw integer), so a host with 500
//! series sampled every second costs about 7 MiB for 15 minutes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use novacron_shared::ids::{HostId, VmId};
use novacron_shared::metrics::{Kind, Metric};
use serde::Serialize;

/// Whose series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A host.
    Host(HostId),
    /// A VM, wherever it runs.
    Vm(VmId),
}

impl Owner {
    /// `host` or `vm`.
    pub fn kind(&self) -> &'static str {
        match self {
            Owner::Host(_) => "host",
            Owner::Vm(_) => "vm",
        }
    }

    /// The id as text.
    pub fn id_string(&self) -> String {
        match self {
            Owner::Host(h) => h.to_string(),
            Owner::Vm(v) => v.to_string(),
        }
    }
}

/// One series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    /// Whose.
    pub owner: Owner,
    /// What.
    pub metric: Metric,
    /// Which (mode, device, ...), for metrics with a label.
    pub label: Option<Arc<str>>,
}

impl SeriesKey {
    /// The rollup table's key for this series (without the minute): owner
    /// tag, id, metric, label length, label.
    pub fn storage_key(&self, out: &mut Vec<u8>) {
        let (tag, id) = match self.owner {
            Owner::Host(h) => (b'h', h.0),
            Owner::Vm(v) => (b'v', v.0),
        };
        out.push(tag);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&self.metric.id().to_be_bytes());
        let label = self.label.as_deref().unwrap_or("");
        out.push(label.len().min(255) as u8);
        out.extend_from_slice(&label.as_bytes()[..label.len().min(255)]);
    }
}

/// A 1-minute rollup of a series' values (levels for gauges, per-second
/// rates for counters).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Rollup {
    /// Mean.
    pub avg: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Values summarised.
    pub count: u32,
}

/// A minute that closed, to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedMinute {
    /// The series.
    pub key: SeriesKey,
    /// Minutes since the Unix epoch.
    pub minute: u64,
    /// The summary.
    pub rollup: Rollup,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    ts_ms: u64,
    raw: i64,
}

#[derive(Debug, Clone, Copy)]
struct Acc {
    minute: u64,
    sum: f64,
    min: f64,
    max: f64,
    count: u32,
}

/// One series' recent points and its open minute.
#[derive(Debug)]
pub struct Series {
    key: SeriesKey,
    points: VecDeque<Point>,
    acc: Option<Acc>,
    /// The host that reported the last point (VMs move).
    pub host: HostId,
}

impl Series {
    fn new(key: SeriesKey, host: HostId) -> Series {
        Series {
            key,
            points: VecDeque::new(),
            acc: None,
            host,
        }
    }

    /// The series' key.
    pub fn key(&self) -> &SeriesKey {
        &self.key
    }

    /// What a point means: a gauge's level, or a counter's rate per second
    /// since the point before (none for the first point or after a reset).
    fn value(metric: Metric, prev: Option<Point>, p: Point) -> Option<f64> {
        match metric.kind() {
            Kind::Gauge => Some(p.raw as f64 * metric.scale()),
            Kind::Counter => {
                let prev = prev?;
                if p.raw < prev.raw || p.ts_ms <= prev.ts_ms {
                    return None;
                }
                let dt = (p.ts_ms - prev.ts_ms) as f64 / 1000.0;
                Some((p.raw - prev.raw) as f64 * metric.scale() / dt)
            }
        }
    }

    /// Adds a point. Points must come in time order; an older or equal
    /// timestamp is refused (`false`). Drops points older than `window_ms`
    /// before the new one. A minute that closes is appended to `closed`
    /// when `emit` is set.
    pub fn push(
        &mut self,
        ts_ms: u64,
        raw: i64,
        window_ms: u64,
        emit: bool,
        closed: &mut Vec<ClosedMinute>,
    ) -> bool {
        let prev = self.points.back().copied();
        if prev.is_some_and(|p| p.ts_ms >= ts_ms) {
            return false;
        }
        let p = Point { ts_ms, raw };
        if let Some(v) = Self::value(self.key.metric, prev, p).filter(|v| v.is_finite()) {
            let minute = ts_ms / 60_000;
            match &mut self.acc {
                Some(a) if a.minute == minute => {
                    a.sum += v;
                    a.min = a.min.min(v);
                    a.max = a.max.max(v);
                    a.count += 1;
                }
                slot => {
                    if let (Some(a), true) = (slot.as_ref(), emit) {
                        closed.push(ClosedMinute {
                            key: self.key.clone(),
                            minute: a.minute,
                            rollup: a.rollup(),
                        });
                    }
                    *slot = Some(Acc {
                        minute,
                        sum: v,
                        min: v,
                        max: v,
                        count: 1,
                    });
                }
            }
        }
        let cutoff = ts_ms.saturating_sub(window_ms);
        while self.points.front().is_some_and(|f| f.ts_ms < cutoff) {
            self.points.pop_front();
        }
        self.points.push_back(p);
        true
    }

    /// The latest value (level or rate) and its time.
    pub fn latest(&self) -> Option<(u64, f64)> {
        let n = self.points.len();
        let last = *self.points.back()?;
        let prev = if n >= 2 {
            self.points.get(n - 2).copied()
        } else {
            None
        };
        Self::value(self.key.metric, prev, last).map(|v| (last.ts_ms, v))
    }

    /// The latest raw value in the catalog unit (a counter's total), and its time.
    pub fn latest_total(&self) -> Option<(u64, f64)> {
        let last = self.points.back()?;
        Some((last.ts_ms, last.raw as f64 * self.key.metric.scale()))
    }

    /// The mean value over the points newer than `since_ms`.
    pub fn mean_since(&self, since_ms: u64) -> Option<f64> {
        let mut sum = 0.0;
        let mut n = 0u32;
        let mut prev: Option<Point> = None;
        for p in self.points.iter() {
            if p.ts_ms > since_ms {
                if let Some(v) = Self::value(self.key.metric, prev, *p) {
                    sum += v;
                    n += 1;
                }
            }
            prev = Some(*p);
        }
        (n > 0).then(|| sum / f64::from(n))
    }

    /// Values (levels or rates) with `from_ms <= ts <= to_ms`.
    pub fn range(&self, from_ms: u64, to_ms: u64, out: &mut Vec<(u64, f64)>) {
        let start = self.points.partition_point(|p| p.ts_ms < from_ms);
        let mut prev = start.checked_sub(1).and_then(|i| self.points.get(i).copied());
        for p in self.points.range(start..) {
            if p.ts_ms > to_ms {
                break;
            }
            if let Some(v) = Self::value(self.key.metric, prev, *p) {
                out.push((p.ts_ms, v));
            }
            prev = Some(*p);
        }
    }

    /// The oldest point's time.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.points.front().map(|p| p.ts_ms)
    }

    /// The newest point's time.
    pub fn newest_ms(&self) -> Option<u64> {
        self.points.back().map(|p| p.ts_ms)
    }

    /// Points held.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether no point is held.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The open minute's summary so far.
    pub fn open_minute(&self) -> Option<(u64, Rollup)> {
        self.acc.map(|a| (a.minute, a.rollup()))
    }
}

impl Acc {
    fn rollup(&self) -> Rollup {
        Rollup {
            avg: self.sum / f64::from(self.count.max(1)),
            min: self.min,
            max: self.max,
            count: self.count,
        }
    }
}

/// A shared handle on one series.
pub type SeriesHandle = Arc<Mutex<Series>>;

/// Every series, by owner.
#[derive(Debug, Default)]
pub struct Window {
    owners: RwLock<HashMap<Owner, Vec<SeriesHandle>>>,
}

/// Locks a series, shrugging off poisoning (a panicked writer leaves a
/// consistent-enough series behind: points are pushed whole).
pub fn lock(s: &SeriesHandle) -> std::sync::MutexGuard<'_, Series> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Window {
    /// The handle of a series, created if new; `host` is who reports it.
    pub fn handle(&self, key: &SeriesKey, host: HostId) -> SeriesHandle {
        {
            let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = owners.get(&key.owner).and_then(|v| find(v, key)) {
                return h;
            }
        }
        let mut owners = self.owners.write().unwrap_or_else(|p| p.into_inner());
        let list = owners.entry(key.owner).or_default();
        if let Some(h) = find(list, key) {
            return h;
        }
        let h = Arc::new(Mutex::new(Series::new(key.clone(), host)));
        list.push(h.clone());
        h
    }

    /// The series of one owner.
    pub fn series_of(&self, owner: Owner) -> Vec<SeriesHandle> {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        owners.get(&owner).cloned().unwrap_or_default()
    }

    /// Every owner and its series (for the exposition).
    pub fn all(&self) -> Vec<(Owner, Vec<SeriesHandle>)> {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = owners.iter().map(|(o, s)| (*o, s.clone())).collect();
        v.sort_by_key(|(o, _)| *o);
        v
    }

    /// Number of series and points held.
    pub fn size(&self) -> (usize, usize) {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        let mut series = 0;
        let mut points = 0;
        for list in owners.values() {
            series += list.len();
            points += list.iter().map(|s| lock(s).len()).sum::<usize>();
        }
        (series, points)
    }

    /// Forgets series with no point newer than `cutoff_ms`. Returns how
    /// many went. Handles cached elsewhere keep working but are no longer
    /// found by queries; a new point re-creates the series.
    pub fn forget_idle(&self, cutoff_ms: u64) -> usize {
        let mut owners = self.owners.write().unwrap_or_else(|p| p.into_inner());
        let mut gone = 0;
        owners.retain(|_, list| {
            let before = list.len();
            list.retain(|s| lock(s).newest_ms().is_some_and(|t| t >= cutoff_ms));
            gone += before - list.len();
            !list.is_empty()
        });
        gone
    }
}

fn find(list: &[SeriesHandle], key: &SeriesKey) -> Option<SeriesHandle> {
    list.iter().find(|s| lock(s).key == *key).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(metric: Metric, label: Option<&str>) -> SeriesKey {
        SeriesKey {
            owner: Owner::Host(HostId(1)),
            metric,
            label: label.map(Arc::from),
        }
    }

    #[test]
    fn counters_become_rates_and_minutes_close_into_rollups() {
        let mut s = Series::new(key(Metric::HostCpu, Some("user")), HostId(1));
        let mut closed = Vec::new();
        // 0.5 s of CPU per second, as nanoseconds, every second for 2 minutes.
        for i in 0..120u64 {
            assert!(s.push(
                60_000 + i * 1000,
                (i * 500_000_000) as i64,
                900_000,
                true,
                &mut closed
            ));
        }
        assert_eq!(closed.len(), 1);
        let c = &closed[0];
        assert_eq!(c.minute, 1);
        // The first point has no rate: 59 rates in the first minute.
        assert_eq!(c.rollup.count, 59);
        assert!((c.rollup.avg - 0.5).abs() < 1e-9);
        assert!((c.rollup.min - 0.5).abs() < 1e-9 && (c.rollup.max - 0.5).abs() < 1e-9);
        let (ts, v) = s.latest().expect("latest");
        assert_eq!(ts, 60_000 + 119_000);
        assert!((v - 0.5).abs() < 1e-9);
        let (_, total) = s.latest_total().expect("total");
        assert!((total - 59.5).abs() < 1e-9);
        // A reset gives no rate for that point, not a negative one.
        assert!(s.push(300_000, 0, 900_000, true, &mut closed));
        assert_eq!(s.latest(), None);
        let mut out = Vec::new();
        s.range(0, u64::MAX, &mut out);
        assert!(out.iter().all(|(_, v)| *v >= 0.0));
        assert_eq!(out.len(), 119);
    }

    #[test]
    fn gauges_roll_up_levels_and_old_points_leave_the_window() {
        let mut s = Series::new(key(Metric::HostLoad, Some("1m")), HostId(1));
        let mut closed = Vec::new();
        for (i, v) in [1000i64, 3000, 2000].into_iter().enumerate() {
            s.push(i as u64 * 1000, v, 10_000, true, &mut closed);
        }
        s.push(60_000, 500, 10_000, true, &mut closed);
        assert_eq!(
            closed[0].rollup,
            Rollup {
                avg: 2.0,
                min: 1.0,
                max: 3.0,
                count: 3
            }
        );
        // Only the newest point is within 10 s of itself.
        assert_eq!(s.len(), 1);
        assert_eq!(s.oldest_ms(), Some(60_000));
        // Out of order and duplicate timestamps are refused.
        assert!(!s.push(60_000, 1, 10_000, true, &mut closed));
        assert!(!s.push(59_000, 1, 10_000, true, &mut closed));
        // Replays do not emit.
        s.push(200_000, 1, 10_000, false, &mut closed);
        assert_eq!(closed.len(), 1);
    }

    #[test]
    fn range_includes_the_rate_of_the_first_point_in_range() {
        let mut s = Series::new(key(Metric::HostNetRxBytes, Some("eth0")), HostId(1));
        let mut closed = Vec::new();
        for i in 0..10u64 {
            s.push(i * 1000, (i * 100) as i64, 60_000, true, &mut closed);
        }
        let mut out = Vec::new();
        s.range(5_000, 7_000, &mut out);
        assert_eq!(out, vec![(5_000, 100.0), (6_000, 100.0), (7_000, 100.0)]);
        assert_eq!(s.mean_since(7_000), Some(100.0));
    }

    #[test]
    fn window_finds_series_by_owner_and_forgets_idle_ones() {
        let w = Window::default();
        let a = w.handle(&key(Metric::HostCpu, Some("user")), HostId(1));
        let b = w.handle(&key(Metric::HostCpu, Some("user")), HostId(1));
        assert!(Arc::ptr_eq(&a, &b));
        let vm = SeriesKey {
            owner: Owner::Vm(VmId(9)),
            metric: Metric::VmCpu,
            label: None,
        };
        let c = w.handle(&vm, HostId(1));
        let mut closed = Vec::new();
        lock(&a).push(1_000, 1, 60_000, true, &mut closed);
        lock(&c).push(5_000, 1, 60_000, true, &mut closed);
        assert_eq!(w.series_of(Owner::Vm(VmId(9))).len(), 1);
        assert_eq!(w.size(), (2, 2));
        assert_eq!(w.forget_idle(2_000), 1);
        assert!(w.series_of(Owner::Host(HostId(1))).is_empty());
        assert_eq!(w.series_of(Owner::Vm(VmId(9))).len(), 1);
    }

    #[test]
    fn storage_keys_of_different_series_differ() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        key(Metric::HostCpu, Some("user")).storage_key(&mut a);
        key(Metric::HostCpu, Some("users")).storage_key(&mut b);
        assert_ne!(a, b);
        assert!(!b.starts_with(&a) || a.len() == b.len());
    }
}
