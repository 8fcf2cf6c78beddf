//! Queries over the window and the rollups, and the Prometheus text of the
//! fleet's latest values.
//!
//! Values are what people read: a gauge's level in its unit, a counter's
//! rate per second. A range that fits in the raw window is answered from
//! memory at full resolution; a longer one (or `resolution=1m`) from the
//! stored 1-minute rollups plus the open minute.

use std::fmt::Write as _;
use std::sync::Arc;

use novacron_shared::ids::{HostId, VmId};
use novacron_shared::metrics::{Kind, Metric, Owner as MetricOwner};
use serde::Serialize;

use super::window::{self, Owner, Rollup, SeriesKey};
use super::Metrics;

/// Which resolution to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Raw when the range fits in the raw window, else 1m.
    Auto,
    /// Every sample (only within the raw window).
    Raw,
    /// 1-minute rollups.
    Minute,
}

impl std::str::FromStr for Resolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Resolution::Auto),
            "raw" => Ok(Resolution::Raw),
            "1m" => Ok(Resolution::Minute),
            other => Err(format!("resolution must be auto, raw or 1m, not {other:?}")),
        }
    }
}

/// A query.
#[derive(Debug, Clone)]
pub struct Request {
    /// Whose series.
    pub owner: Owner,
    /// Metric names to include (all when empty).
    pub metrics: Vec<Metric>,
    /// From, ms since the epoch, inclusive.
    pub from_ms: u64,
    /// To, ms since the epoch, inclusive.
    pub to_ms: u64,
    /// Resolution.
    pub resolution: Resolution,
}

/// One series in an answer.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesOut {
    /// Metric name (`host.cpu`).
    pub name: &'static str,
    /// The label's name (`mode`, `device`), if the metric has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_name: Option<&'static str>,
    /// The label's value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `counter` or `gauge`.
    pub kind: Kind,
    /// Unit of the values: a gauge's unit, or a counter's unit per second.
    pub unit: String,
    /// Raw: `[ts_ms, value]`; 1m: `[minute_start_ms, avg, min, max]`.
    pub points: Vec<Vec<f64>>,
}

/// An answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// `host` or `vm`.
    pub owner: &'static str,
    /// Its id.
    pub id: String,
    /// Range start (ms).
    pub from_ms: u64,
    /// Range end (ms).
    pub to_ms: u64,
    /// `raw` or `1m`.
    pub resolution: &'static str,
    /// The series, by name then label.
    pub series: Vec<SeriesOut>,
}

fn unit_of(m: Metric) -> String {
    match m.kind() {
        Kind::Gauge => m.unit().to_string(),
        Kind::Counter => format!("{}/s", m.unit()),
    }
}

fn out(key: &SeriesKey, points: Vec<Vec<f64>>) -> SeriesOut {
    SeriesOut {
        name: key.metric.name(),
        label_name: key.metric.label(),
        label: key.label.as_deref().map(str::to_string),
        kind: key.metric.kind(),
        unit: unit_of(key.metric),
        points,
    }
}

/// Parses a storage key back into its series (see [`SeriesKey::storage_key`]).
pub fn parse_storage_key(b: &[u8]) -> Option<SeriesKey> {
    let tag = *b.first()?;
    let id = u128::from_be_bytes(b.get(1..17)?.try_into().ok()?);
    let metric = Metric::from_id(u16::from_be_bytes(b.get(17..19)?.try_into().ok()?))?;
    let len = usize::from(*b.get(19)?);
    let label = std::str::from_utf8(b.get(20..20 + len)?).ok()?;
    let owner = match tag {
        b'h' => Owner::Host(HostId(id)),
        b'v' => Owner::Vm(VmId(id)),
        _ => return None,
    };
    Some(SeriesKey {
        owner,
        metric,
        label: (!label.is_empty()).then(|| Arc::from(label)),
    })
}

impl Metrics {
    /// Answers a query.
    pub fn query(&self, req: &Request) -> Result<Answer, super::db::DbError> {
        let now = self.clock.unix_ms();
        let window_start = now.saturating_sub(self.cfg.raw_window.as_millis() as u64);
        let raw = match req.resolution {
            Resolution::Raw => true,
            Resolution::Minute => false,
            Resolution::Auto => req.from_ms >= window_start,
        };
        let wanted = |m: Metric| req.metrics.is_empty() || req.metrics.contains(&m);
        let mut series: Vec<(SeriesKey, Vec<Vec<f64>>)> = Vec::new();
        if raw {
            let mut pts = Vec::new();
            for h in self.window.series_of(req.owner) {
                let s = window::lock(&h);
                if !wanted(s.key().metric) {
                    continue;
                }
                pts.clear();
                s.range(req.from_ms, req.to_ms, &mut pts);
                series.push((
                    s.key().clone(),
                    pts.iter().map(|(t, v)| vec![*t as f64, *v]).collect(),
                ));
            }
        } else {
            let from_min = req.from_ms / 60_000;
            let to_min = req.to_ms / 60_000;
            let mut by_key: std::collections::BTreeMap<SeriesKey, Vec<(u64, Rollup)>> = Default::default();
            for (bytes, minute, r) in self.db.owner_rollups(req.owner, from_min, to_min)? {
                if let Some(k) = parse_storage_key(&bytes) {
                    if wanted(k.metric) {
                        by_key.entry(k).or_default().push((minute, r));
                    }
                }
            }
            // The open minute lives only in memory.
            for h in self.window.series_of(req.owner) {
                let s = window::lock(&h);
                if !wanted(s.key().metric) {
                    continue;
                }
                if let Some((m, r)) = s.open_minute() {
                    if (from_min..=to_min).contains(&m) {
                        let v = by_key.entry(s.key().clone()).or_default();
                        if !v.iter().any(|(x, _)| *x == m) {
                            v.push((m, r));
                        }
                    }
                }
            }
            for (k, mut v) in by_key {
                v.sort_by_key(|(m, _)| *m);
                let pts = v
                    .into_iter()
                    .map(|(m, r)| vec![(m * 60_000) as f64, r.avg, r.min, r.max])
                    .collect();
                series.push((k, pts));
            }
        }
        series.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Answer {
            owner: req.owner.kind(),
            id: req.owner.id_string(),
            from_ms: req.from_ms,
            to_ms: req.to_ms,
            resolution: if raw { "raw" } else { "1m" },
            series: series.into_iter().map(|(k, p)| out(&k, p)).collect(),
        })
    }

    /// The latest value of every series of every owner of one kind
    /// (`host` or `vm`), for dashboards and `novacron top`.
    pub fn latest(&self, kind: Option<MetricOwner>) -> Vec<LatestOwner> {
        let mut v = Vec::new();
        for (owner, handles) in self.window.all() {
            let matches = matches!(
                (kind, owner),
                (None, _) | (Some(MetricOwner::Host), Owner::Host(_)) | (Some(MetricOwner::Vm), Owner::Vm(_))
            );
            if !matches {
                continue;
            }
            let mut values = Vec::with_capacity(handles.len());
            let mut host = None;
            for h in handles {
                let s = window::lock(&h);
                host = Some(s.host);
                if let Some((ts, value)) = s.latest() {
                    values.push(LatestValue {
                        name: s.key().metric.name(),
                        label: s.key().label.as_deref().map(str::to_string),
                        unit: unit_of(s.key().metric),
                        ts_ms: ts,
                        value,
                    });
                }
            }
            values.sort_by(|a, b| (a.name, &a.label).cmp(&(b.name, &b.label)));
            v.push(LatestOwner {
                owner: owner.kind(),
                id: owner.id_string(),
                host: host.map(|h| h.to_string()),
                values,
            });
        }
        v
    }

    /// Appends the fleet's latest values in the Prometheus text format:
    /// one family per catalog metric, labels `host` (host id) on host
    /// series, `vm` (VM id) and `host` (where it last reported) on VM
    /// series, plus the metric's own label (`mode`, `kind`, `device`, ...).
    /// Counters are exposed as totals, gauges as levels, each with the
    /// timestamp of its sample.
    pub fn write_prometheus(&self, out: &mut String) {
        let all = self.window.all();
        for m in Metric::ALL {
            let mut header = false;
            for (owner, handles) in &all {
                let owner_matches = matches!(
                    (m.owner(), owner),
                    (MetricOwner::Host, Owner::Host(_)) | (MetricOwner::Vm, Owner::Vm(_))
                );
                if !owner_matches {
                    continue;
                }
                for h in handles {
                    let s = window::lock(h);
                    if s.key().metric != *m {
                        continue;
                    }
                    let Some((ts, total)) = s.latest_total() else {
                        continue;
                    };
                    if !header {
                        header = true;
                        let _ = writeln!(out, "# HELP {} {}", m.prometheus_name(), help(*m));
                        let kind = match m.kind() {
                            Kind::Counter => "counter",
                            Kind::Gauge => "gauge",
                        };
                        let _ = writeln!(out, "# TYPE {} {kind}", m.prometheus_name());
                    }
                    out.push_str(m.prometheus_name());
                    out.push('{');
                    match owner {
                        Owner::Host(id) => {
                            let _ = write!(out, "host=\"{id}\"");
                        }
                        Owner::Vm(id) => {
                            let _ = write!(out, "vm=\"{id}\",host=\"{}\"", s.host);
                        }
                    }
                    if let (Some(name), Some(value)) = (m.label(), s.key().label.as_deref()) {
                        // Label values are checked at ingest ([A-Za-z0-9._:@-]):
                        // nothing to escape.
                        let _ = write!(out, ",{name}=\"{value}\"");
                    }
                    let _ = writeln!(out, "}} {} {ts}", fmt_value(total));
                }
            }
        }
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "+Inf".into()
    } else {
        "-Inf".into()
    }
}

fn help(m: Metric) -> String {
    let what = match m.owner() {
        MetricOwner::Host => "per host",
        MetricOwner::Vm => "per VM",
    };
    format!(
        "NovaCron {} ({what}, unit {}{}), latest sample from the agent.",
        m.name(),
        m.unit(),
        m.label().map(|l| format!(", by {l}")).unwrap_or_default()
    )
}

/// The latest values of one owner.
#[derive(Debug, Clone, Serialize)]
pub struct LatestOwner {
    /// `host` or `vm`.
    pub owner: &'static str,
    /// Its id.
    pub id: String,
    /// The host that reported last.
    pub host: Option<String>,
    /// Values.
    pub values: Vec<LatestValue>,
}

/// One latest value.
#[derive(Debug, Clone, Serialize)]
pub struct LatestValue {
    /// Metric name.
    pub name: &'static str,
    /// Label value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Unit (counters: per second).
    pub unit: String,
    /// Sample time.
    pub ts_ms: u64,
    /// Level or rate.
    pub value: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_keys_parse_back() {
        for key in [
            SeriesKey {
                owner: Owner::Host(HostId(42)),
                metric: Metric::HostDiskReads,
                label: Some(Arc::from("nvme0n1")),
            },
            SeriesKey {
                owner: Owner::Vm(VmId(u128::MAX)),
                metric: Metric::VmCpu,
                label: None,
            },
        ] {
            let mut b = Vec::new();
            key.storage_key(&mut b);
            assert_eq!(parse_storage_key(&b), Some(key));
        }
        assert_eq!(parse_storage_key(b"x"), None);
        assert_eq!(parse_storage_key(&[b'h'; 30]), None);
    }
}
