//! Metrics: the catalog of what agents sample, and the compact batch that
//! carries samples over the wire.
//!
//! Every value travels as an integer in the metric's base unit (nanoseconds,
//! bytes, operations, or a fixed-point gauge: see [`Metric::scale`]). A batch
//! holds one or more sampling ticks that share one layout (the same series in
//! the same order). Values are stored series by series: the first tick's value
//! as is, every later tick as the difference from the one before, so counters
//! that move a little cost one or two bytes each under the variable-length
//! integer encoding. A batch is self-contained: it names its VMs and label
//! values, so it can be spooled, resent after a reconnect or a restart and
//! decoded without any session state.

use serde::{Deserialize, Serialize};

use crate::ids::VmId;

/// How a metric's values behave over time.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Only goes up (until a reset); its rate is what people read.
    Counter,
    /// A level at the sampling instant.
    Gauge,
}

/// Whose series it is.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// The host itself.
    Host,
    /// One VM on it.
    Vm,
}

macro_rules! catalog {
    ($( $(#[$doc:meta])* $variant:ident = $id:literal, $owner:ident, $kind:ident, $name:literal, $unit:literal, $scale:literal, $label:expr, $prom:literal; )*) => {
        /// Every metric NovaCron samples. The numbers are wire values: append
        /// only, never reuse.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum Metric {
            $( $(#[$doc])* $variant = $id, )*
        }

        impl Metric {
            /// All metrics, in id order.
            pub const ALL: &'static [Metric] = &[$(Metric::$variant),*];

            /// The metric with this wire id.
            pub fn from_id(id: u16) -> Option<Metric> {
                match id {
                    $( $id => Some(Metric::$variant), )*
                    _ => None,
                }
            }

            /// The wire id.
            pub fn id(self) -> u16 {
                self as u16
            }

            /// Host or VM.
            pub fn owner(self) -> Owner {
                match self { $( Metric::$variant => Owner::$owner, )* }
            }

            /// Counter or gauge.
            pub fn kind(self) -> Kind {
                match self { $( Metric::$variant => Kind::$kind, )* }
            }

            /// The name used by the API and the CLI (`host.cpu`, `vm.net.rx_bytes`).
            pub fn name(self) -> &'static str {
                match self { $( Metric::$variant => $name, )* }
            }

            /// The unit after [`Metric::scale`] is applied (for counters: the
            /// unit of the total; rates are that per second).
            pub fn unit(self) -> &'static str {
                match self { $( Metric::$variant => $unit, )* }
            }

            /// Multiply the wire integer by this to get [`Metric::unit`].
            pub fn scale(self) -> f64 {
                match self { $( Metric::$variant => $scale, )* }
            }

            /// The name of the label that tells series of this metric apart
            /// (`mode`, `device`, ...), if any.
            pub fn label(self) -> Option<&'static str> {
                match self { $( Metric::$variant => $label, )* }
            }

            /// The Prometheus metric family name.
            pub fn prometheus_name(self) -> &'static str {
                match self { $( Metric::$variant => $prom, )* }
            }

            /// The metric with this API name.
            pub fn from_name(name: &str) -> Option<Metric> {
                match name {
                    $( $name => Some(Metric::$variant), )*
                    _ => None,
                }
            }
        }
    };
}

catalog! {
    /// Host CPU time by state (/proc/stat), nanoseconds, summed over CPUs.
    HostCpu = 1, Host, Counter, "host.cpu", "seconds", 1e-9, Some("mode"), "novacron_host_cpu_seconds_total";
    /// Host memory (/proc/meminfo): total, available, free, cached, swap_total, swap_free; bytes.
    HostMemory = 2, Host, Gauge, "host.memory", "bytes", 1.0, Some("kind"), "novacron_host_memory_bytes";
    /// Load average (1m, 5m, 15m), thousandths.
    HostLoad = 3, Host, Gauge, "host.load", "tasks", 1e-3, Some("period"), "novacron_host_load";
    /// Pressure stall information, share of the last 10 s stalled
    /// (cpu_some, memory_some, memory_full, io_some, io_full), in hundredths of a percent.
    HostPressure = 4, Host, Gauge, "host.pressure", "ratio", 1e-4, Some("resource"), "novacron_host_pressure_ratio";
    /// Pressure stall totals, microseconds.
    HostPressureStall = 5, Host, Counter, "host.pressure_stall", "seconds", 1e-6, Some("resource"), "novacron_host_pressure_stall_seconds_total";
    /// Bytes read per block device (/proc/diskstats).
    HostDiskReadBytes = 6, Host, Counter, "host.disk.read_bytes", "bytes", 1.0, Some("device"), "novacron_host_disk_read_bytes_total";
    /// Bytes written per block device.
    HostDiskWriteBytes = 7, Host, Counter, "host.disk.write_bytes", "bytes", 1.0, Some("device"), "novacron_host_disk_written_bytes_total";
    /// Reads completed per block device.
    HostDiskReads = 8, Host, Counter, "host.disk.reads", "operations", 1.0, Some("device"), "novacron_host_disk_reads_total";
    /// Writes completed per block device.
    HostDiskWrites = 9, Host, Counter, "host.disk.writes", "operations", 1.0, Some("device"), "novacron_host_disk_writes_total";
    /// Time spent doing I/O per block device, milliseconds.
    HostDiskIoTime = 10, Host, Counter, "host.disk.io_time", "seconds", 1e-3, Some("device"), "novacron_host_disk_io_time_seconds_total";
    /// Bytes received per network interface (/proc/net/dev).
    HostNetRxBytes = 11, Host, Counter, "host.net.rx_bytes", "bytes", 1.0, Some("device"), "novacron_host_network_receive_bytes_total";
    /// Bytes sent per network interface.
    HostNetTxBytes = 12, Host, Counter, "host.net.tx_bytes", "bytes", 1.0, Some("device"), "novacron_host_network_transmit_bytes_total";
    /// Packets received per network interface.
    HostNetRxPackets = 13, Host, Counter, "host.net.rx_packets", "packets", 1.0, Some("device"), "novacron_host_network_receive_packets_total";
    /// Packets sent per network interface.
    HostNetTxPackets = 14, Host, Counter, "host.net.tx_packets", "packets", 1.0, Some("device"), "novacron_host_network_transmit_packets_total";
    /// Number of online CPUs.
    HostCpus = 15, Host, Gauge, "host.cpus", "cpus", 1.0, None, "novacron_host_cpus";
    /// VM CPU time (libvirt cpu.time), nanoseconds.
    VmCpu = 32, Vm, Counter, "vm.cpu", "seconds", 1e-9, None, "novacron_vm_cpu_seconds_total";
    /// VM vCPUs (libvirt vcpu.current).
    VmVcpus = 33, Vm, Gauge, "vm.vcpus", "cpus", 1.0, None, "novacron_vm_vcpus";
    /// VM memory from the balloon driver (current, maximum, rss, usable, available, unused), KiB.
    VmMemory = 34, Vm, Gauge, "vm.memory", "bytes", 1024.0, Some("kind"), "novacron_vm_memory_bytes";
    /// Bytes read per VM disk.
    VmBlockReadBytes = 35, Vm, Counter, "vm.block.read_bytes", "bytes", 1.0, Some("device"), "novacron_vm_disk_read_bytes_total";
    /// Bytes written per VM disk.
    VmBlockWriteBytes = 36, Vm, Counter, "vm.block.write_bytes", "bytes", 1.0, Some("device"), "novacron_vm_disk_written_bytes_total";
    /// Read requests per VM disk.
    VmBlockReads = 37, Vm, Counter, "vm.block.reads", "operations", 1.0, Some("device"), "novacron_vm_disk_reads_total";
    /// Write requests per VM disk.
    VmBlockWrites = 38, Vm, Counter, "vm.block.writes", "operations", 1.0, Some("device"), "novacron_vm_disk_writes_total";
    /// Bytes received per VM interface.
    VmNetRxBytes = 39, Vm, Counter, "vm.net.rx_bytes", "bytes", 1.0, Some("device"), "novacron_vm_network_receive_bytes_total";
    /// Bytes sent per VM interface.
    VmNetTxBytes = 40, Vm, Counter, "vm.net.tx_bytes", "bytes", 1.0, Some("device"), "novacron_vm_network_transmit_bytes_total";
    /// Packets received per VM interface.
    VmNetRxPackets = 41, Vm, Counter, "vm.net.rx_packets", "packets", 1.0, Some("device"), "novacron_vm_network_receive_packets_total";
    /// Packets sent per VM interface.
    VmNetTxPackets = 42, Vm, Counter, "vm.net.tx_packets", "packets", 1.0, Some("device"), "novacron_vm_network_transmit_packets_total";
    /// libvirt domain state (1 running, 3 paused, 5 shut off, ...).
    VmState = 43, Vm, Gauge, "vm.state", "state", 1.0, None, "novacron_vm_state";
}

/// Who a series belongs to, inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The sending host.
    Host,
    /// A VM on it.
    Vm(VmId),
}

/// One series of a batch: indexes into the batch's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeriesRef {
    /// 0 for the host, `i + 1` for `vms[i]`.
    pub scope: u32,
    /// [`Metric`] wire id.
    pub metric: u16,
    /// 0 for none, `i + 1` for `labels[i]`.
    pub label: u32,
}

/// A sequenced batch of samples from one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricBatch {
    /// Names the agent's spool; sequence numbers start at 1 in each epoch.
    pub epoch: u64,
    /// Per-epoch sequence number, increasing by one per batch.
    pub seq: u64,
    /// Batches the agent's spool has dropped so far in this epoch (full spool).
    pub dropped: u64,
    /// The sampling interval, milliseconds.
    pub interval_ms: u32,
    /// VMs the series refer to.
    pub vms: Vec<VmId>,
    /// Label values the series refer to (`user`, `vda`, `eth0`, ...).
    pub labels: Vec<String>,
    /// The layout: one entry per series.
    pub series: Vec<SeriesRef>,
    /// Tick timestamps: the first in milliseconds since the Unix epoch, every
    /// later one as milliseconds after the previous one.
    pub ticks: Vec<u64>,
    /// `series.len() × ticks.len()` values, series by series; in each series
    /// the first value as is and the rest as differences from the previous tick.
    pub values: Vec<i64>,
}

/// Why a batch is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// `values` does not hold one value per series and tick.
    #[error("batch has {values} values for {series} series × {ticks} ticks")]
    Shape {
        /// Values present.
        values: usize,
        /// Series in the layout.
        series: usize,
        /// Ticks.
        ticks: usize,
    },
    /// A series points outside the batch's tables or names an unknown metric.
    #[error("series {index} is invalid: {why}")]
    Series {
        /// Index in the layout.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A timestamp overflowed or a later tick is not after the one before.
    #[error("tick {0} is not after the one before it")]
    Ticks(usize),
    /// Sequence numbers start at 1.
    #[error("sequence number 0 is not valid")]
    ZeroSeq,
}

impl MetricBatch {
    /// Checks the batch and returns the absolute tick timestamps.
    pub fn validate(&self) -> Result<Vec<u64>, BatchError> {
        if self.seq == 0 {
            return Err(BatchError::ZeroSeq);
        }
        let want = self.series.len().checked_mul(self.ticks.len());
        if want != Some(self.values.len()) {
            return Err(BatchError::Shape {
                values: self.values.len(),
                series: self.series.len(),
                ticks: self.ticks.len(),
            });
        }
        for (index, s) in self.series.iter().enumerate() {
            let Some(metric) = Metric::from_id(s.metric) else {
                return Err(BatchError::Series {
                    index,
                    why: "unknown metric",
                });
            };
            match (metric.owner(), s.scope) {
                (Owner::Host, 0) => {}
                (Owner::Host, _) => {
                    return Err(BatchError::Series {
                        index,
                        why: "host metric on a VM",
                    })
                }
                (Owner::Vm, 0) => {
                    return Err(BatchError::Series {
                        index,
                        why: "VM metric without a VM",
                    })
                }
                (Owner::Vm, i) if i as usize > self.vms.len() => {
                    return Err(BatchError::Series {
                        index,
                        why: "VM index out of range",
                    })
                }
                (Owner::Vm, _) => {}
            }
            match (metric.label(), s.label) {
                (None, 0) => {}
                (None, _) => {
                    return Err(BatchError::Series {
                        index,
                        why: "label on a metric without one",
                    })
                }
                (Some(_), 0) => {
                    return Err(BatchError::Series {
                        index,
                        why: "missing label",
                    })
                }
                (Some(_), l) if l as usize > self.labels.len() => {
                    return Err(BatchError::Series {
                        index,
                        why: "label index out of range",
                    })
                }
                (Some(_), _) => {}
            }
        }
        let mut out = Vec::with_capacity(self.ticks.len());
        let mut t = 0u64;
        for (i, d) in self.ticks.iter().enumerate() {
            t = if i == 0 {
                *d
            } else {
                t.checked_add(*d).ok_or(BatchError::Ticks(i))?
            };
            if i > 0 && *d == 0 {
                return Err(BatchError::Ticks(i));
            }
            out.push(t);
        }
        Ok(out)
    }

    /// Number of samples (series × ticks).
    pub fn samples(&self) -> usize {
        self.values.len()
    }

    /// The absolute values of series `index`, one per tick, written into
    /// `out` (cleared first). Call [`MetricBatch::validate`] first.
    pub fn series_values(&self, index: usize, out: &mut Vec<i64>) -> Result<(), BatchError> {
        out.clear();
        let n = self.ticks.len();
        let Some(chunk) = self.values.get(index * n..(index + 1) * n) else {
            return Err(BatchError::Series {
                index,
                why: "out of range",
            });
        };
        let mut v = 0i64;
        for (i, d) in chunk.iter().enumerate() {
            // Deltas are taken with wrapping arithmetic, so they are undone
            // the same way: every i64 sequence round-trips exactly.
            v = if i == 0 { *d } else { v.wrapping_add(*d) };
            out.push(v);
        }
        Ok(())
    }

    /// The scope of a series (valid after [`MetricBatch::validate`]).
    pub fn scope(&self, s: &SeriesRef) -> Scope {
        match s.scope {
            0 => Scope::Host,
            i => Scope::Vm(self.vms[i as usize - 1]),
        }
    }

    /// The label value of a series, if it has one (valid after validate).
    pub fn label(&self, s: &SeriesRef) -> Option<&str> {
        match s.label {
            0 => None,
            i => Some(self.labels[i as usize - 1].as_str()),
        }
    }
}

/// What [`BatchBuilder::end_tick`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum TickOutcome {
    /// The tick joined the batch being built.
    Added,
    /// The tick's layout differs: the ticks gathered so far must be sent
    /// first ([`BatchBuilder::take`]); the tick starts the next batch.
    LayoutChanged,
}

/// Builds batches tick by tick, reusing its buffers: collectors push values
/// in a stable order, and as long as the order stays the same each tick costs
/// no allocation.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    interval_ms: u32,
    vms: Vec<VmId>,
    labels: Vec<String>,
    label_index: std::collections::HashMap<String, u32>,
    /// The layout of the ticks gathered so far.
    layout: Vec<SeriesRef>,
    /// Tick-major values of the gathered ticks.
    gathered: Vec<i64>,
    ticks: Vec<u64>,
    /// The tick being sampled.
    cur_ts: u64,
    cur_layout: Vec<SeriesRef>,
    cur_values: Vec<i64>,
    last_vm: Option<(VmId, u32)>,
    /// Table sizes when the current tick started.
    tick_start_tables: (usize, usize),
    /// Ticks of an old layout that are waiting to be taken.
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    vms: Vec<VmId>,
    labels: Vec<String>,
    layout: Vec<SeriesRef>,
    gathered: Vec<i64>,
    ticks: Vec<u64>,
}

impl BatchBuilder {
    /// A builder for ticks `interval_ms` apart.
    pub fn new(interval_ms: u32) -> BatchBuilder {
        BatchBuilder {
            interval_ms,
            ..BatchBuilder::default()
        }
    }

    /// Starts a tick sampled at `ts_ms`.
    pub fn start_tick(&mut self, ts_ms: u64) {
        self.cur_ts = ts_ms;
        self.tick_start_tables = (self.vms.len(), self.labels.len());
        self.cur_layout.clear();
        self.cur_values.clear();
    }

    /// Adds one value to the current tick.
    pub fn push(&mut self, scope: Scope, metric: Metric, label: Option<&str>, value: i64) {
        let scope = match scope {
            Scope::Host => 0,
            Scope::Vm(id) => match self.last_vm {
                Some((last, i)) if last == id => i,
                _ => {
                    let i = match self.vms.iter().position(|v| *v == id) {
                        Some(p) => p as u32 + 1,
                        None => {
                            self.vms.push(id);
                            self.vms.len() as u32
                        }
                    };
                    self.last_vm = Some((id, i));
                    i
                }
            },
        };
        let label = match label {
            None => 0,
            Some(l) => match self.label_index.get(l) {
                Some(i) => *i,
                None => {
                    self.labels.push(l.to_string());
                    let i = self.labels.len() as u32;
                    self.label_index.insert(l.to_string(), i);
                    i
                }
            },
        };
        self.cur_layout.push(SeriesRef {
            scope,
            metric: metric.id(),
            label,
        });
        self.cur_values.push(value);
    }

    /// Ends the current tick.
    pub fn end_tick(&mut self) -> TickOutcome {
        let same = !self.ticks.is_empty() && self.cur_layout == self.layout && self.cur_ts > self.last_ts();
        let outcome = if same || self.ticks.is_empty() {
            TickOutcome::Added
        } else {
            // Park the gathered ticks with the tables they refer to; the new
            // layout starts from fresh tables holding only what it uses.
            let held = Held {
                vms: std::mem::take(&mut self.vms),
                labels: std::mem::take(&mut self.labels),
                layout: std::mem::take(&mut self.layout),
                gathered: std::mem::take(&mut self.gathered),
                ticks: std::mem::take(&mut self.ticks),
            };
            let mut held = held;
            self.reindex(&held);
            // Entries this tick added are not the old layout's.
            held.vms.truncate(self.tick_start_tables.0);
            held.labels.truncate(self.tick_start_tables.1);
            self.held = Some(held);
            TickOutcome::LayoutChanged
        };
        if self.ticks.is_empty() {
            self.layout.clear();
            self.layout.extend_from_slice(&self.cur_layout);
        }
        self.ticks.push(self.cur_ts);
        self.gathered.extend_from_slice(&self.cur_values);
        outcome
    }

    fn last_ts(&self) -> u64 {
        self.ticks.last().copied().unwrap_or(0)
    }

    /// Rebuilds this tick's tables from the parked ones, keeping only what
    /// the current tick uses.
    fn reindex(&mut self, held: &Held) {
        self.label_index.clear();
        self.last_vm = None;
        for s in self.cur_layout.iter_mut() {
            if s.scope != 0 {
                let id = held.vms[s.scope as usize - 1];
                s.scope = match self.vms.iter().position(|v| *v == id) {
                    Some(p) => p as u32 + 1,
                    None => {
                        self.vms.push(id);
                        self.vms.len() as u32
                    }
                };
            }
            if s.label != 0 {
                let l = &held.labels[s.label as usize - 1];
                s.label = match self.label_index.get(l.as_str()) {
                    Some(i) => *i,
                    None => {
                        self.labels.push(l.clone());
                        let i = self.labels.len() as u32;
                        self.label_index.insert(l.clone(), i);
                        i
                    }
                };
            }
        }
    }

    /// Ticks gathered and not yet taken (including parked ones).
    pub fn pending_ticks(&self) -> usize {
        self.ticks.len() + self.held.as_ref().map_or(0, |h| h.ticks.len())
    }

    /// Takes the oldest complete batch: parked ticks of an older layout if
    /// there are any, else everything gathered. `None` when nothing is
    /// waiting. The caller fills in `epoch`, `seq` and `dropped`.
    pub fn take(&mut self) -> Option<MetricBatch> {
        if let Some(h) = self.held.take() {
            return Some(encode(
                self.interval_ms,
                h.vms,
                h.labels,
                &h.layout,
                &h.gathered,
                &h.ticks,
            ));
        }
        if self.ticks.is_empty() {
            return None;
        }
        let b = encode(
            self.interval_ms,
            self.vms.clone(),
            self.labels.clone(),
            &self.layout,
            &self.gathered,
            &self.ticks,
        );
        self.gathered.clear();
        self.ticks.clear();
        Some(b)
    }
}

fn encode(
    interval_ms: u32,
    vms: Vec<VmId>,
    labels: Vec<String>,
    layout: &[SeriesRef],
    gathered: &[i64],
    ticks: &[u64],
) -> MetricBatch {
    let n = layout.len();
    let mut values = Vec::with_capacity(gathered.len());
    for s in 0..n {
        let mut prev = 0i64;
        for t in 0..ticks.len() {
            let v = gathered[t * n + s];
            values.push(if t == 0 { v } else { v.wrapping_sub(prev) });
            prev = v;
        }
    }
    let mut tick_deltas = Vec::with_capacity(ticks.len());
    let mut prev = 0u64;
    for (i, t) in ticks.iter().enumerate() {
        tick_deltas.push(if i == 0 { *t } else { t - prev });
        prev = *t;
    }
    MetricBatch {
        epoch: 0,
        seq: 0,
        dropped: 0,
        interval_ms,
        vms,
        labels,
        series: layout.to_vec(),
        ticks: tick_deltas,
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(n: u128) -> VmId {
        VmId(n)
    }

    fn tick(b: &mut BatchBuilder, ts: u64, vms: &[u128], base: i64) -> TickOutcome {
        b.start_tick(ts);
        b.push(Scope::Host, Metric::HostCpu, Some("user"), base * 10);
        b.push(Scope::Host, Metric::HostMemory, Some("total"), 1 << 40);
        for v in vms {
            b.push(Scope::Vm(vm(*v)), Metric::VmCpu, None, base * (*v as i64));
            b.push(Scope::Vm(vm(*v)), Metric::VmNetRxBytes, Some("vnet0"), base);
        }
        b.end_tick()
    }

    /// (scope, metric id, label, points) per series.
    type Decoded = Vec<(Scope, u16, Option<String>, Vec<(u64, i64)>)>;

    fn decoded(b: &MetricBatch) -> Decoded {
        let mut b = b.clone();
        b.seq = 1;
        let ts = b.validate().expect("valid");
        let mut out = Vec::new();
        let mut vals = Vec::new();
        for (i, s) in b.series.iter().enumerate() {
            b.series_values(i, &mut vals).expect("values");
            out.push((
                b.scope(s),
                s.metric,
                b.label(s).map(str::to_string),
                ts.iter().copied().zip(vals.iter().copied()).collect(),
            ));
        }
        out
    }

    #[test]
    fn ticks_with_one_layout_round_trip_delta_encoded() {
        let mut b = BatchBuilder::new(100);
        for i in 0..5 {
            assert_eq!(
                tick(&mut b, 1_000 + i * 100, &[7, 9], 1_000 + i as i64),
                TickOutcome::Added
            );
        }
        let batch = b.take().expect("batch");
        assert!(b.take().is_none());
        assert_eq!(batch.ticks, vec![1_000, 100, 100, 100, 100]);
        // Counters moving by one are stored as 1 after the first tick.
        assert_eq!(&batch.values[1..5], &[10, 10, 10, 10]);
        let d = decoded(&batch);
        assert_eq!(d.len(), 6);
        assert_eq!(d[2].0, Scope::Vm(vm(7)));
        assert_eq!(
            d[2].3,
            (0..5)
                .map(|i| (1_000 + i * 100, (1_000 + i as i64) * 7))
                .collect::<Vec<_>>()
        );
        assert_eq!(d[3].2.as_deref(), Some("vnet0"));
        assert_eq!(d[1].3[4], (1_400, 1 << 40));
        // Through the codec: smaller than 8 bytes a sample.
        let bytes = crate::codec::encode(&batch).expect("encode");
        assert!(bytes.len() < batch.samples() * 4, "{} bytes", bytes.len());
        assert_eq!(
            crate::codec::decode::<MetricBatch>(&bytes).expect("decode"),
            batch
        );
    }

    #[test]
    fn a_layout_change_parks_the_old_ticks_with_their_own_tables() {
        let mut b = BatchBuilder::new(1000);
        assert_eq!(tick(&mut b, 1_000, &[1, 2], 5), TickOutcome::Added);
        assert_eq!(tick(&mut b, 2_000, &[1, 2], 6), TickOutcome::Added);
        // VM 1 went away, VM 3 arrived.
        assert_eq!(tick(&mut b, 3_000, &[2, 3], 7), TickOutcome::LayoutChanged);
        assert_eq!(b.pending_ticks(), 3);
        let old = b.take().expect("old");
        assert_eq!(old.vms, vec![vm(1), vm(2)]);
        assert_eq!(decoded(&old)[2].3, vec![(1_000, 5), (2_000, 6)]);
        let new = b.take().expect("new");
        assert_eq!(new.vms, vec![vm(2), vm(3)]);
        let d = decoded(&new);
        assert_eq!(d[2].0, Scope::Vm(vm(2)));
        assert_eq!(d[2].3, vec![(3_000, 14)]);
        assert_eq!(d[4].0, Scope::Vm(vm(3)));
        assert_eq!(d[4].3, vec![(3_000, 21)]);
        assert!(b.take().is_none());
        // The next tick with the same layout reuses the tables.
        assert_eq!(tick(&mut b, 4_000, &[2, 3], 8), TickOutcome::Added);
        assert_eq!(b.take().expect("next").vms, vec![vm(2), vm(3)]);
    }

    #[test]
    fn counter_resets_and_negative_gauges_survive() {
        let mut b = BatchBuilder::new(1000);
        for (i, v) in [i64::MAX, 0, -5, i64::MIN, 3].into_iter().enumerate() {
            b.start_tick(10 + i as u64);
            b.push(Scope::Host, Metric::HostCpus, None, v);
            b.end_tick();
        }
        let batch = b.take().expect("batch");
        let mut vals = Vec::new();
        batch.series_values(0, &mut vals).expect("values");
        assert_eq!(vals, vec![i64::MAX, 0, -5, i64::MIN, 3]);
        let mut b = BatchBuilder::new(1000);
        for (i, v) in [500i64, 3, -2, 7].into_iter().enumerate() {
            b.start_tick(10 + i as u64);
            b.push(Scope::Host, Metric::HostCpus, None, v);
            b.end_tick();
        }
        let batch = b.take().expect("batch");
        batch.series_values(0, &mut vals).expect("values");
        assert_eq!(vals, vec![500, 3, -2, 7]);
    }

    #[test]
    fn hostile_batches_are_refused() {
        let mut b = BatchBuilder::new(1000);
        tick(&mut b, 1_000, &[1], 5);
        let mut good = b.take().expect("batch");
        good.seq = 1;
        good.validate().expect("valid");
        let mut bad = good.clone();
        bad.values.pop();
        assert!(matches!(bad.validate(), Err(BatchError::Shape { .. })));
        let mut bad = good.clone();
        bad.series[2].scope = 9;
        assert!(matches!(bad.validate(), Err(BatchError::Series { .. })));
        let mut bad = good.clone();
        bad.series[0].label = 99;
        assert!(matches!(bad.validate(), Err(BatchError::Series { .. })));
        let mut bad = good.clone();
        bad.series[0].metric = 999;
        assert!(matches!(bad.validate(), Err(BatchError::Series { .. })));
        let mut bad = good.clone();
        bad.series[0].scope = 1;
        assert!(matches!(bad.validate(), Err(BatchError::Series { .. })));
        let mut bad = good.clone();
        bad.seq = 0;
        assert_eq!(bad.validate(), Err(BatchError::ZeroSeq));
        let mut bad = good;
        bad.seq = 1;
        bad.ticks = vec![u64::MAX, 5];
        bad.values = bad.values.iter().chain(bad.values.iter()).copied().collect();
        assert_eq!(bad.validate(), Err(BatchError::Ticks(1)));
    }

    #[test]
    fn catalog_names_and_ids_are_unique_and_round_trip() {
        let mut names = std::collections::HashSet::new();
        let mut proms = std::collections::HashSet::new();
        for m in Metric::ALL {
            assert_eq!(Metric::from_id(m.id()), Some(*m));
            assert_eq!(Metric::from_name(m.name()), Some(*m));
            assert!(names.insert(m.name()));
            assert!(proms.insert(m.prometheus_name()));
            assert_eq!(
                m.kind() == Kind::Counter,
                m.prometheus_name().ends_with("_total"),
                "{m:?}"
            );
            let prefix = match m.owner() {
                Owner::Host => "host.",
                Owner::Vm => "vm.",
            };
            assert!(m.name().starts_with(prefix));
        }
    }
}
