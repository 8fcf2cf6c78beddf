//! VM collector: libvirt bulk domain stats for all domains in one call.
//!
//! One `virConnectGetAllDomainStats` per tick returns every domain's state,
//! CPU time, vCPUs, balloon, block and interface counters as a flat list of
//! typed parameters (`block.0.name`, `block.0.rd.bytes`, ...). The collector
//! gathers each domain's parameters by device index into a scratch area kept
//! across ticks (device names are copied into reused strings), then pushes
//! them in a stable order. Only NovaCron's domains are reported: whether a
//! domain carries NovaCron's metadata is read once per UUID and cached.

use std::collections::HashMap;

use novacron_shared::ids::VmId;
use novacron_shared::metrics::{BatchBuilder, Metric, Scope};
use virt::connect::Connect;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use crate::domxml::{self, Metadata};
use crate::ffi::{self, StatsParams, TypedValue};

/// The stats groups asked for in every call.
pub const STATS: u32 = sys::VIR_DOMAIN_STATS_STATE
    | sys::VIR_DOMAIN_STATS_CPU_TOTAL
    | sys::VIR_DOMAIN_STATS_BALLOON
    | sys::VIR_DOMAIN_STATS_VCPU
    | sys::VIR_DOMAIN_STATS_INTERFACE
    | sys::VIR_DOMAIN_STATS_BLOCK;

/// Balloon fields (after `balloon.`) and their `kind` labels, in push order.
const MEMORY: [(&str, &str); 6] = [
    ("current", "current"),
    ("maximum", "maximum"),
    ("rss", "rss"),
    ("usable", "usable"),
    ("available", "available"),
    ("unused", "unused"),
];

/// Per-disk fields (after `block.N.`), in push order.
const BLOCK: [(&str, Metric); 4] = [
    ("rd.bytes", Metric::VmBlockReadBytes),
    ("wr.bytes", Metric::VmBlockWriteBytes),
    ("rd.reqs", Metric::VmBlockReads),
    ("wr.reqs", Metric::VmBlockWrites),
];

/// Per-interface fields (after `net.N.`), in push order.
const NET: [(&str, Metric); 4] = [
    ("rx.bytes", Metric::VmNetRxBytes),
    ("tx.bytes", Metric::VmNetTxBytes),
    ("rx.pkts", Metric::VmNetRxPackets),
    ("tx.pkts", Metric::VmNetTxPackets),
];

/// Devices of one kind past this index are ignored.
const MAX_DEVICES: usize = 256;

/// One disk or interface of the domain being gathered.
#[derive(Debug, Default)]
struct Device {
    /// Its name (`vda`, `vnet3`); the capacity is kept across domains.
    name: String,
    /// Whether `name` was set for the current domain.
    named: bool,
    /// Values in [`BLOCK`] or [`NET`] order.
    values: [Option<i64>; 4],
}

/// The disks or interfaces of the domain being gathered, by libvirt index.
#[derive(Debug, Default)]
struct Devices {
    /// Grows to the most devices a domain had; never shrinks.
    slots: Vec<Device>,
    /// Slots the current domain touched.
    used: usize,
}

impl Devices {
    fn reset(&mut self) {
        for d in &mut self.slots[..self.used] {
            d.named = false;
            d.values = [None; 4];
        }
        self.used = 0;
    }

    /// Records `N.suffix` (the part after `block.` or `net.`).
    fn set(&mut self, rest: &str, value: TypedValue<'_>, fields: &[(&str, Metric); 4]) {
        let Some((index, suffix)) = rest.split_once('.') else {
            return;
        };
        let Ok(i) = index.parse::<usize>() else {
            return;
        };
        let slot = if suffix == "name" {
            None
        } else {
            match fields.iter().position(|(f, _)| *f == suffix) {
                Some(k) => Some(k),
                None => return,
            }
        };
        if i >= MAX_DEVICES {
            return;
        }
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, Device::default);
        }
        self.used = self.used.max(i + 1);
        let d = &mut self.slots[i];
        match slot {
            None => {
                if let Some(s) = value.as_str() {
                    d.name.clear();
                    d.name.push_str(s);
                    d.named = true;
                }
            }
            Some(k) => d.values[k] = value.as_i64(),
        }
    }

    /// Pushes every named device's values, in index order.
    fn push(&self, scope: Scope, fields: &[(&str, Metric); 4], b: &mut BatchBuilder) {
        for d in self.slots[..self.used].iter().filter(|d| d.named) {
            for ((_, metric), v) in fields.iter().zip(d.values) {
                if let Some(v) = v {
                    b.push(scope, *metric, Some(&d.name), v);
                }
            }
        }
    }
}

/// One domain's values, gathered before they are pushed in order.
#[derive(Debug, Default)]
struct Scratch {
    state: Option<i64>,
    cpu: Option<i64>,
    vcpus: Option<i64>,
    memory: [Option<i64>; MEMORY.len()],
    block: Devices,
    net: Devices,
}

impl Scratch {
    fn reset(&mut self) {
        self.state = None;
        self.cpu = None;
        self.vcpus = None;
        self.memory = [None; MEMORY.len()];
        self.block.reset();
        self.net.reset();
    }

    fn set(&mut self, field: &str, value: TypedValue<'_>) {
        match field {
            "state.state" => self.state = value.as_i64(),
            "cpu.time" => self.cpu = value.as_i64(),
            "vcpu.current" => self.vcpus = value.as_i64(),
            _ => {
                if let Some(rest) = field.strip_prefix("balloon.") {
                    if let Some(k) = MEMORY.iter().position(|(f, _)| *f == rest) {
                        self.memory[k] = value.as_i64();
                    }
                } else if let Some(rest) = field.strip_prefix("block.") {
                    self.block.set(rest, value, &BLOCK);
                } else if let Some(rest) = field.strip_prefix("net.") {
                    self.net.set(rest, value, &NET);
                }
            }
        }
    }

    /// State, CPU, vCPUs, memory kinds, disks, interfaces.
    fn push(&self, scope: Scope, b: &mut BatchBuilder) {
        if let Some(v) = self.state {
            b.push(scope, Metric::VmState, None, v);
        }
        if let Some(v) = self.cpu {
            b.push(scope, Metric::VmCpu, None, v);
        }
        if let Some(v) = self.vcpus {
            b.push(scope, Metric::VmVcpus, None, v);
        }
        for ((_, kind), v) in MEMORY.iter().zip(self.memory) {
            if let Some(v) = v {
                b.push(scope, Metric::VmMemory, Some(kind), v);
            }
        }
        self.block.push(scope, &BLOCK, b);
        self.net.push(scope, &NET, b);
    }
}

/// Samples every NovaCron VM with one bulk libvirt call per tick (see the
/// module docs).
#[derive(Debug, Default)]
pub struct DomainCollector {
    /// Whether a domain is NovaCron's, by UUID, with the call it was last
    /// seen in.
    managed: HashMap<[u8; 16], (bool, u64)>,
    /// Counts calls; entries of the cache not seen in the latest are dropped.
    generation: u64,
    scratch: Scratch,
}

impl DomainCollector {
    /// A collector with nothing cached.
    pub fn new() -> DomainCollector {
        DomainCollector::default()
    }

    /// One bulk call for all domains ([`STATS`], every domain). Pushes for
    /// every NovaCron-managed domain, scoped to its VM (the domain UUID is
    /// the VM id): `VmState` (`state.state`), `VmCpu` (`cpu.time`, ns),
    /// `VmVcpus` (`vcpu.current`), `VmMemory` by kind (`balloon.*`, KiB),
    /// then per disk (label: `block.N.name`) the `VmBlock*` counters and
    /// per interface (label: `net.N.name`) the `VmNet*` counters, devices
    /// in libvirt's index order. Fields libvirt does not report are not
    /// pushed. Domains come in libvirt's order. Fails when the bulk call
    /// fails; nothing is pushed then.
    pub fn collect(&mut self, conn: &Connect, b: &mut BatchBuilder) -> Result<(), String> {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let DomainCollector { managed, scratch, .. } = self;
        ffi::all_domain_stats(conn, STATS, 0, |uuid, params: &mut StatsParams<'_>| {
            if !is_managed(conn, managed, uuid, generation) {
                return;
            }
            scratch.reset();
            for (field, value) in params {
                scratch.set(field, value);
            }
            scratch.push(Scope::Vm(VmId(u128::from_be_bytes(uuid))), b);
        })?;
        managed.retain(|_, (_, seen)| *seen == generation);
        Ok(())
    }
}

/// Whether the domain is NovaCron's: from the cache, or read from its
/// metadata the first time its UUID shows up. A domain that vanished or
/// whose metadata could not be read is skipped this time and asked again
/// next time.
fn is_managed(
    conn: &Connect,
    cache: &mut HashMap<[u8; 16], (bool, u64)>,
    uuid: [u8; 16],
    generation: u64,
) -> bool {
    if let Some((managed, seen)) = cache.get_mut(&uuid) {
        *seen = generation;
        return *managed;
    }
    let id = VmId(u128::from_be_bytes(uuid));
    let dom = match crate::vmops::lookup(conn, id) {
        Ok(Some(d)) => d,
        Ok(None) => return false,
        Err(e) => {
            tracing::debug!(vm = %id, error = %e, "cannot look up a domain for metrics");
            return false;
        }
    };
    let managed = match dom.metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(domxml::METADATA_NS),
        0,
    ) {
        Ok(xml) => Metadata::parse(&xml).is_some(),
        Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomainMetadata)) => false,
        Err(e) => {
            tracing::debug!(vm = %id, error = %e, "cannot read a domain's metadata for metrics");
            return false;
        }
    };
    cache.insert(uuid, (managed, generation));
    managed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gather(params: &[(&str, TypedValue<'_>)]) -> Vec<(Metric, Option<String>, i64)> {
        let mut s = Scratch::default();
        // A previous, bigger domain leaves nothing behind.
        s.set("block.2.name", TypedValue::Str("vdc"));
        s.set("block.2.rd.bytes", TypedValue::UInt(9));
        s.set("state.state", TypedValue::Int(3));
        s.reset();
        for (f, v) in params {
            s.set(f, *v);
        }
        let mut b = BatchBuilder::new(1000);
        b.start_tick(1);
        s.push(Scope::Vm(VmId(7)), &mut b);
        b.end_tick();
        let Some(mut batch) = b.take() else {
            return Vec::new();
        };
        batch.seq = 1;
        batch.validate().expect("valid");
        let mut vals = Vec::new();
        let mut out = Vec::new();
        for (i, sr) in batch.series.iter().enumerate() {
            assert_eq!(batch.scope(sr), Scope::Vm(VmId(7)));
            batch.series_values(i, &mut vals).expect("values");
            out.push((
                Metric::from_id(sr.metric).expect("metric"),
                batch.label(sr).map(str::to_string),
                vals[0],
            ));
        }
        out
    }

    #[test]
    fn params_are_pushed_in_a_stable_order() {
        use TypedValue::*;
        let got = gather(&[
            ("net.0.name", Str("vnet3")),
            ("net.0.rx.bytes", UInt(100)),
            ("net.0.tx.pkts", UInt(4)),
            ("block.count", UInt(2)),
            ("block.1.name", Str("vdb")),
            ("block.1.wr.reqs", UInt(5)),
            ("block.0.name", Str("vda")),
            ("block.0.rd.bytes", UInt(1 << 20)),
            ("block.0.wr.bytes", UInt(u64::MAX)),
            ("block.0.path", Str("/x")),
            ("balloon.rss", UInt(300)),
            ("balloon.current", UInt(1024)),
            ("vcpu.current", UInt(2)),
            ("vcpu.0.state", Int(1)),
            ("cpu.time", UInt(123_456_789)),
            ("cpu.user", UInt(1)),
            ("state.reason", Int(1)),
            ("state.state", Int(1)),
            ("block.9.rd.bytes", UInt(1)), // no name: not pushed
            ("net.x.rx.bytes", UInt(1)),
            ("net.999999.name", Str("huge")),
        ]);
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            got,
            vec![
                (Metric::VmState, None, 1),
                (Metric::VmCpu, None, 123_456_789),
                (Metric::VmVcpus, None, 2),
                (Metric::VmMemory, s("current"), 1024),
                (Metric::VmMemory, s("rss"), 300),
                (Metric::VmBlockReadBytes, s("vda"), 1 << 20),
                (Metric::VmBlockWriteBytes, s("vda"), i64::MAX),
                (Metric::VmBlockWrites, s("vdb"), 5),
                (Metric::VmNetRxBytes, s("vnet3"), 100),
                (Metric::VmNetTxPackets, s("vnet3"), 4),
            ]
        );
        assert!(gather(&[]).is_empty());
    }
}
