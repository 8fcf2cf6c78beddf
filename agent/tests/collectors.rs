//! The VM collector against libvirt's test driver (in-process, no daemon):
//! one bulk stats call, NovaCron's domains only, scoped to their VM ids.
//! The test driver reports only `state.*` in its domain stats; real QEMU
//! counters are covered end to end.

#[allow(dead_code)] // each test binary uses its own part of it
mod common;
use common::Host;

use novacron_agent::ffi::{self, TypedValue};
use novacron_agent::metrics::domains::{DomainCollector, STATS};
use novacron_agent::vmops;
use novacron_shared::ids::{OpId, VmId};
use novacron_shared::metrics::{BatchBuilder, Metric, MetricBatch, Scope};
use novacron_shared::spec::{DesiredVm, Power, VmSpec};
use virt::connect::Connect;

/// A private test-driver host with one domain NovaCron did not define
/// (running, as domains of a node file start).
fn host() -> Host {
    common::host("<domain type='test'><name>foreign</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory><os><type>hvm</type></os></domain>")
}

fn ok<T>(r: Result<T, novacron_agent::error::HvError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Defines and starts a NovaCron VM.
fn running_vm(h: &Host, name: &str, id: VmId) {
    let vm = DesiredVm {
        id,
        op_id: OpId(id.0),
        spec: VmSpec::minimal(name, 1, 128),
        power: Power::Running,
        epoch: 0,
    };
    ok(vmops::define(&h.conn, &h.setup, &vm));
    ok(vmops::start(&h.conn, id));
}

/// One tick of the collector, decoded: (scope, metric, label, value).
fn tick(c: &mut DomainCollector, conn: &Connect, ts: u64) -> Vec<(Scope, Metric, Option<String>, i64)> {
    let mut b = BatchBuilder::new(1000);
    b.start_tick(ts);
    c.collect(conn, &mut b).unwrap_or_else(|e| panic!("{e}"));
    b.end_tick();
    decode(b.take().unwrap_or_else(|| panic!("the tick closed no batch")))
}

fn decode(mut batch: MetricBatch) -> Vec<(Scope, Metric, Option<String>, i64)> {
    batch.seq = 1;
    batch.validate().unwrap_or_else(|e| panic!("{e}"));
    let mut vals = Vec::new();
    let mut out = Vec::new();
    for (i, s) in batch.series.iter().enumerate() {
        batch
            .series_values(i, &mut vals)
            .unwrap_or_else(|e| panic!("{e}"));
        let m = Metric::from_id(s.metric).unwrap_or_else(|| panic!("metric {}", s.metric));
        out.push((batch.scope(s), m, batch.label(s).map(str::to_string), vals[0]));
    }
    out
}

fn states(d: &[(Scope, Metric, Option<String>, i64)]) -> Vec<(Scope, i64)> {
    let mut s: Vec<_> = d
        .iter()
        .filter(|x| x.1 == Metric::VmState)
        .map(|x| (x.0, x.3))
        .collect();
    s.sort_by_key(|x| match x.0 {
        Scope::Vm(id) => id.0,
        Scope::Host => 0,
    });
    s
}

#[test]
fn the_bulk_call_sees_every_domain_with_its_uuid() {
    let h = host();
    let a = VmId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    running_vm(&h, "a", a);
    let mut seen = Vec::new();
    ffi::all_domain_stats(&h.conn, STATS, 0, |uuid, params| {
        let mut state = None;
        for (field, value) in params {
            if field == "state.state" {
                // Values borrow from the records: copy what outlives the call.
                assert!(matches!(value, TypedValue::Int(_)), "{value:?}");
                state = value.as_i64();
            }
        }
        seen.push((VmId(u128::from_be_bytes(uuid)).to_string(), state));
    })
    .unwrap_or_else(|e| panic!("{e}"));
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        seen,
        vec![
            ("01234567-89ab-cdef-0011-223344556677".to_string(), Some(1)),
            ("6695eb01-f6a4-8304-79aa-97f2502e193f".to_string(), Some(1)),
        ]
    );
    // A callback that panics still leaves the connection usable (the
    // records are freed by the guard while unwinding).
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = ffi::all_domain_stats(&h.conn, STATS, 0, |_, _| panic!("boom"));
    }));
    assert!(r.is_err());
    assert!(ffi::all_domain_stats(&h.conn, STATS, 0, |_, _| {}).is_ok());
}

#[test]
fn only_novacron_vms_are_collected_with_their_state() {
    let h = host();
    let (a, b) = (VmId(0xa1), VmId(0xb2));
    running_vm(&h, "vm-a", a);
    running_vm(&h, "vm-b", b);
    let mut c = DomainCollector::new();
    let d = tick(&mut c, &h.conn, 1_000);
    // Only the two NovaCron VMs, never the foreign domain.
    assert!(
        d.iter()
            .all(|x| matches!(x.0, Scope::Vm(id) if id == a || id == b)),
        "{d:?}"
    );
    assert_eq!(states(&d), vec![(Scope::Vm(a), 1), (Scope::Vm(b), 1)]);

    // A stopped VM reports 5 (shut off); the other keeps running.
    ok(vmops::destroy(&h.conn, b));
    let d = tick(&mut c, &h.conn, 2_000);
    assert_eq!(states(&d), vec![(Scope::Vm(a), 1), (Scope::Vm(b), 5)]);
    ok(vmops::suspend(&h.conn, a));
    let d = tick(&mut c, &h.conn, 3_000);
    assert_eq!(states(&d), vec![(Scope::Vm(a), 3), (Scope::Vm(b), 5)]);

    // A removed VM disappears; a new one shows up.
    ok(vmops::remove(&h.conn, &h.setup, &a.to_string()));
    running_vm(&h, "vm-c", VmId(0xc3));
    let d = tick(&mut c, &h.conn, 4_000);
    assert_eq!(states(&d), vec![(Scope::Vm(b), 5), (Scope::Vm(VmId(0xc3)), 1)]);
}

#[test]
fn ticks_share_one_layout_while_nothing_changes() {
    let h = host();
    running_vm(&h, "steady", VmId(7));
    let mut c = DomainCollector::new();
    let mut b = BatchBuilder::new(1000);
    for t in 1..=3u64 {
        b.start_tick(t * 1_000);
        c.collect(&h.conn, &mut b).unwrap_or_else(|e| panic!("{e}"));
        b.end_tick();
    }
    let batch = b.take().unwrap_or_else(|| panic!("no batch"));
    assert_eq!(batch.ticks.len(), 3);
    assert_eq!(batch.vms, vec![VmId(7)]);
    assert!(b.take().is_none());
}
