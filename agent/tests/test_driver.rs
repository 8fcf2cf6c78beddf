//! Every VM operation against libvirt's test driver (in-process, no
//! daemon): definitions, storage, lifecycle, snapshots, removal, and bad
//! specs that must leave nothing behind.

mod common;
use common::Host;

use novacron_agent::domxml::VirtType;
use novacron_agent::drift;
use novacron_agent::vmops::{self, Defined};
use novacron_shared::ids::{OpId, VmId};
use novacron_shared::protocol::VmState;
use novacron_shared::spec::{self, CloudInit, DesiredVm, DiskSpec, Power, VmSpec};
use virt::storage_vol::StorageVol;

/// A private test-driver host with one domain NovaCron did not define.
fn host() -> Host {
    common::host(
        "<domain type='test'><name>test</name><memory>65536</memory><os><type>hvm</type></os></domain>",
    )
}

fn vm(name: &str, id: u128) -> DesiredVm {
    let mut spec = VmSpec::minimal(name, 1, 128);
    spec.disks = vec![
        DiskSpec {
            name: "root".into(),
            size_mib: Some(64),
            template: None,
        },
        DiskSpec {
            name: "data".into(),
            size_mib: Some(32),
            template: None,
        },
    ];
    spec.cloud_init = Some(CloudInit {
        user_data: Some("#cloud-config\nruncmd: [\"echo '<hi>' && true\"]\n".into()),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza test@example".into()],
    });
    DesiredVm {
        id: VmId(id),
        op_id: OpId(id),
        spec,
        power: Power::Running,
        epoch: 0,
    }
}

fn volumes(h: &Host) -> Vec<String> {
    let pool = vmops::ensure_pool(&h.conn, &h.setup).unwrap_or_else(|e| panic!("{e}"));
    let mut v: Vec<String> = ok_virt(pool.list_all_volumes(0))
        .iter()
        .map(|v| ok_virt(v.name()))
        .collect();
    v.sort();
    v
}

fn state(h: &Host, id: VmId) -> VmState {
    let d = vmops::lookup(&h.conn, id)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no domain {id}"));
    vmops::state(&d).unwrap_or_else(|e| panic!("{e}"))
}

fn ok<T>(r: Result<T, novacron_agent::error::HvError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A direct libvirt call's result, or a panic with libvirt's message.
fn ok_virt<T>(r: Result<T, virt::error::Error>) -> T {
    r.unwrap_or_else(|e| panic!("libvirt: {e}"))
}

#[test]
fn define_is_idempotent_and_creates_volumes_and_seed() {
    let h = host();
    let v = vm("web-1", 1);
    assert_eq!(ok(vmops::define(&h.conn, &h.setup, &v)), Defined::Created);
    assert_eq!(ok(vmops::define(&h.conn, &h.setup, &v)), Defined::Unchanged);
    assert_eq!(
        volumes(&h),
        ["web-1.cidata.iso", "web-1.data.qcow2", "web-1.root.qcow2"]
    );
    // The seed was written into the pool directory.
    let seed = std::path::Path::new(&h.setup.pool_path).join("web-1.cidata.iso");
    let iso = std::fs::read(&seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
    assert_eq!(&iso[0x8028..0x802e], b"cidata");
    // libvirt kept our metadata and the test driver's domain type.
    let d = ok(vmops::lookup(&h.conn, v.id)).unwrap_or_else(|| panic!("not defined"));
    let meta = vmops::metadata(&d).unwrap_or_else(|| panic!("no metadata"));
    assert_eq!((meta.vm, meta.op_id), (v.id, v.op_id));
    let xml = ok_virt(d.xml_desc(0));
    assert!(xml.contains("<domain type='test'"), "{xml}");
    assert_eq!(ok(vmops::virt_type(&h.conn, &h.setup)), VirtType::Test);
    // A changed spec updates the definition in place.
    let mut v2 = v.clone();
    v2.spec.memory_mib = 256;
    assert_eq!(ok(vmops::define(&h.conn, &h.setup, &v2)), Defined::Updated);
    let d = ok(vmops::lookup(&h.conn, v.id)).unwrap_or_else(|| panic!("gone after the update"));
    assert_eq!(ok_virt(d.max_memory()), 256 * 1024);
}

/// An agent upgrade does not redefine domains an older agent defined: the
/// older drift hash in their metadata is recognised while it matches.
#[test]
fn domains_defined_under_the_legacy_hash_are_unchanged_after_an_upgrade() {
    let h = host();
    let v = vm("old-1", 11);
    assert_eq!(ok(vmops::define(&h.conn, &h.setup, &v)), Defined::Created);
    // Make it look as an older agent left it: the legacy hash recorded.
    let d = ok(vmops::lookup(&h.conn, v.id)).unwrap_or_else(|| panic!("not defined"));
    let xml = ok_virt(d.xml_desc(0));
    let current = drift::domain_hash(&v);
    assert!(xml.contains(&current), "{xml}");
    let legacy = drift::legacy_v1_hash(&v);
    ok_virt(h.conn.define_domain_xml(&xml.replace(&current, &legacy)));
    let meta = vmops::metadata(&ok(vmops::lookup(&h.conn, v.id)).unwrap_or_else(|| panic!("gone")))
        .unwrap_or_else(|| panic!("no metadata"));
    assert_eq!(meta.spec_hash, legacy);
    assert_eq!(ok(vmops::define(&h.conn, &h.setup, &v)), Defined::Unchanged);
    let mut stopped = v.clone();
    stopped.power = Power::Stopped;
    assert!(plan_for(&h, &stopped).actions.is_empty());
    // A real change is still applied, and records the current scheme.
    let mut bigger = v.clone();
    bigger.spec.memory_mib = 256;
    assert_eq!(ok(vmops::define(&h.conn, &h.setup, &bigger)), Defined::Updated);
    let meta = vmops::metadata(&ok(vmops::lookup(&h.conn, v.id)).unwrap_or_else(|| panic!("gone")))
        .unwrap_or_else(|| panic!("no metadata"));
    assert_eq!(meta.spec_hash, drift::domain_hash(&bigger));
    // From then on a field outside the domain never redefines it; the HA
    // flag is retagged in the metadata.
    let mut ha = bigger.clone();
    ha.spec.ha_priority = 3;
    ha.power = Power::Stopped;
    assert!(plan_for(&h, &ha).actions.is_empty());
    ha.spec.ha = !bigger.spec.ha;
    assert_eq!(
        plan_for(&h, &ha).actions,
        [novacron_agent::reconcile::Action::Retag(ha.clone())]
    );
}

/// The reconciler's plan for `vm` against what the host has now.
fn plan_for(h: &Host, vm: &DesiredVm) -> novacron_agent::reconcile::Plan {
    let (_, vms) = ok(vmops::observe(&h.conn, &h.setup));
    let seen: Vec<_> = vms.iter().map(|o| o.to_observed()).collect();
    let clock = novacron_shared::clock::Clock::system();
    novacron_agent::reconcile::Reconciler::default().plan(clock.now(), std::slice::from_ref(vm), &seen)
}

#[test]
fn the_whole_lifecycle() {
    let h = host();
    let v = vm("app", 2);
    ok(vmops::define(&h.conn, &h.setup, &v));
    assert_eq!(state(&h, v.id), VmState::Stopped);
    ok(vmops::start(&h.conn, v.id));
    ok(vmops::start(&h.conn, v.id)); // idempotent
    assert_eq!(state(&h, v.id), VmState::Running);
    ok(vmops::suspend(&h.conn, v.id));
    ok(vmops::suspend(&h.conn, v.id));
    assert_eq!(state(&h, v.id), VmState::Paused);
    ok(vmops::resume(&h.conn, v.id));
    ok(vmops::resume(&h.conn, v.id));
    assert_eq!(state(&h, v.id), VmState::Running);
    ok(vmops::reboot(&h.conn, v.id));
    assert_eq!(state(&h, v.id), VmState::Running);

    ok(vmops::snapshot_create(&h.conn, v.id, "before"));
    ok(vmops::snapshot_create(&h.conn, v.id, "before")); // idempotent
    ok(vmops::snapshot_create(&h.conn, v.id, "after"));
    let (_, vms) = ok(vmops::observe(&h.conn, &h.setup));
    let o = vms
        .iter()
        .find(|o| o.name == "app")
        .unwrap_or_else(|| panic!("not observed"));
    assert_eq!(o.snapshots, ["before", "after"]);
    ok(vmops::snapshot_revert(&h.conn, v.id, "before"));
    let e = vmops::snapshot_revert(&h.conn, v.id, "nope").unwrap_err();
    assert!(e.to_string().contains("no snapshot named \"nope\""), "{e}");
    ok(vmops::snapshot_delete(&h.conn, v.id, "after"));
    ok(vmops::snapshot_delete(&h.conn, v.id, "after")); // idempotent
    let e = vmops::snapshot_create(&h.conn, v.id, "</name>").unwrap_err();
    assert!(e.to_string().contains("snapshot name"), "{e}");

    // Graceful shutdown: the test driver's guest obeys at once.
    assert!(ok(vmops::request_shutdown(&h.conn, v.id)));
    assert!(ok(vmops::is_off(&h.conn, v.id)));
    assert!(
        !ok(vmops::request_shutdown(&h.conn, v.id)),
        "already off: nothing to ask"
    );
    ok(vmops::start(&h.conn, v.id));
    ok(vmops::destroy(&h.conn, v.id));
    ok(vmops::destroy(&h.conn, v.id));
    assert_eq!(state(&h, v.id), VmState::Stopped);

    // Disks never shrink; the same size is a no-op. (The test driver
    // cannot resize volumes: growing is covered against real libvirtd.)
    ok(vmops::resize_disk(&h.conn, &h.setup, v.id, "data", 32));
    let e = vmops::resize_disk(&h.conn, &h.setup, v.id, "data", 16).unwrap_err();
    assert!(e.to_string().contains("would lose data"), "{e}");
    let e = vmops::resize_disk(&h.conn, &h.setup, v.id, "nope", 16).unwrap_err();
    assert!(e.to_string().contains("no disk"), "{e}");

    // Removal takes the definition, snapshot metadata and every volume.
    ok(vmops::start(&h.conn, v.id));
    let removed = ok(vmops::remove(&h.conn, &h.setup, &v.id.to_string()));
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert!(ok(vmops::lookup(&h.conn, v.id)).is_none());
    assert!(volumes(&h).is_empty(), "{:?}", volumes(&h));
    assert!(ok(vmops::remove(&h.conn, &h.setup, &v.id.to_string())).is_empty());
}

#[test]
fn clones_are_overlays_of_the_template() {
    let h = host();
    let pool = ok(vmops::ensure_pool(&h.conn, &h.setup));
    let tmpl = novacron_agent::domxml::volume("base.qcow2", 256 << 20, "qcow2", None);
    StorageVol::create_xml(&pool, &tmpl, 0).unwrap_or_else(|e| panic!("{e}"));
    let mut v = vm("clone-1", 3);
    v.spec.cloud_init = None;
    v.spec.disks = vec![DiskSpec {
        name: "root".into(),
        size_mib: Some(512),
        template: Some("base.qcow2".into()),
    }];
    ok(vmops::define(&h.conn, &h.setup, &v));
    let vol = pool
        .lookup_storage_vol_by_name("clone-1.root.qcow2")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok_virt(vol.info()).capacity, 512 << 20);
    // Smaller than the template: refused, nothing left behind.
    let mut small = vm("clone-2", 4);
    small.spec.cloud_init = None;
    small.spec.disks = vec![DiskSpec {
        name: "root".into(),
        size_mib: Some(16),
        template: Some("base.qcow2".into()),
    }];
    let e = vmops::define(&h.conn, &h.setup, &small).unwrap_err();
    assert!(e.to_string().contains("cannot be smaller"), "{e}");
    assert!(ok(vmops::lookup(&h.conn, small.id)).is_none());
    assert!(
        !volumes(&h).iter().any(|v| v.starts_with("clone-2.")),
        "{:?}",
        volumes(&h)
    );
}

#[test]
fn a_failed_define_leaves_nothing_half_created() {
    let h = host();
    let mut v = vm("half", 5);
    // The first disk is created, then the missing template fails the define.
    v.spec.disks.push(DiskSpec {
        name: "third".into(),
        size_mib: None,
        template: Some("missing.qcow2".into()),
    });
    let e = vmops::define(&h.conn, &h.setup, &v).unwrap_err();
    assert!(
        e.to_string()
            .contains("template volume \"missing.qcow2\" is not in storage pool"),
        "{e}"
    );
    assert!(ok(vmops::lookup(&h.conn, v.id)).is_none());
    assert!(volumes(&h).is_empty(), "{:?}", volumes(&h));
}

#[test]
fn bad_specs_are_refused_before_libvirt_sees_them() {
    let h = host();
    let mut v = vm("ok", 6);
    v.spec.name = "x'/><evil".into();
    let e = vmops::define(&h.conn, &h.setup, &v).unwrap_err();
    assert!(e.to_string().contains("name: contains '\\''"), "{e}");
    let mut v = vm("big", 7);
    v.spec.memory_mib = u64::MAX;
    v.spec.disks[0].size_mib = Some(u64::MAX);
    let e = vmops::define(&h.conn, &h.setup, &v).unwrap_err();
    assert!(
        e.to_string().contains("memory_mib") && e.to_string().contains("disks[0].size_mib"),
        "{e}"
    );
    assert!(volumes(&h).is_empty());
    let names = ok_virt(h.conn.list_all_domains(0));
    assert_eq!(names.len(), 1, "only the driver's own domain");
}

#[test]
fn metacharacters_in_user_values_reach_libvirt_intact() {
    let h = host();
    let mut v = vm("meta", 8);
    v.spec.labels.insert("note".into(), "a<b & c>'d\"".into());
    v.spec.boot = Some(spec::KernelBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: None,
        cmdline: "x='<y>' & z=\"1\"".into(),
    });
    ok(vmops::define(&h.conn, &h.setup, &v));
    let d = ok(vmops::lookup(&h.conn, v.id)).unwrap_or_else(|| panic!("not defined"));
    let xml = ok_virt(d.xml_desc(0));
    // Whatever quoting libvirt re-serializes with, the values read back intact.
    assert_eq!(
        text_of(&xml, "cmdline").as_deref(),
        Some("x='<y>' & z=\"1\""),
        "{xml}"
    );
    assert_eq!(
        text_of(&xml, "description").as_deref(),
        Some("note=a<b & c>'d\""),
        "{xml}"
    );
    assert_eq!(xml.matches("<devices>").count(), 1);
}

fn text_of(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(
        xml[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

#[test]
fn a_foreign_domain_with_the_same_name_is_never_touched() {
    let h = host();
    // The node file holds a running domain called "test".
    let v = vm("test", 9);
    let e = vmops::define(&h.conn, &h.setup, &v).unwrap_err();
    assert!(e.to_string().contains("already exists here"), "{e}");
    let foreign = h
        .conn
        .lookup_domain_by_name("test")
        .unwrap_or_else(|e| panic!("{e}"));
    let uuid = ok_virt(foreign.uuid_string());
    let e = vmops::remove(&h.conn, &h.setup, &uuid).unwrap_err();
    assert!(e.to_string().contains("not defined by NovaCron"), "{e}");
    assert!(ok_virt(foreign.is_active()), "the foreign domain was stopped");
    assert!(volumes(&h).is_empty());
}

/// libvirt's own schema validator accepts every golden XML.
#[test]
fn golden_xml_passes_virt_xml_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut checked = 0;
    for (file, schema) in [
        ("domain-kvm.xml", "domain"),
        ("domain-qemu-minimal.xml", "domain"),
    ] {
        let out = std::process::Command::new("virt-xml-validate")
            .arg(dir.join(file))
            .arg(schema)
            .output()
            .unwrap_or_else(|e| panic!("virt-xml-validate (package libvirt-clients) is required: {e}"));
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    // The storage golden file holds several documents: validate each.
    let all = std::fs::read_to_string(dir.join("storage.xml")).unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (root, schema) in [
        ("pool", "storagepool"),
        ("volume", "storagevol"),
        ("domainsnapshot", "domainsnapshot"),
    ] {
        let open = format!("<{root}");
        let close = format!("</{root}>");
        let mut rest = all.as_str();
        while let Some(start) = rest.find(&open) {
            let end = rest[start..]
                .find(&close)
                .map(|e| start + e + close.len())
                .unwrap_or_else(|| panic!("storage.xml: a <{root}> without {close}"));
            let path = tmp.path().join(format!("{root}-{checked}.xml"));
            std::fs::write(&path, &rest[start..end]).unwrap_or_else(|e| panic!("{e}"));
            let out = std::process::Command::new("virt-xml-validate")
                .arg(&path)
                .arg(schema)
                .output()
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                out.status.success(),
                "{root}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
            rest = &rest[end..];
        }
    }
    assert_eq!(checked, 6);
}

// ---- HA: fencing, departed VMs, retagging, shared storage ----

use novacron_agent::ha::{self, LeaseHandle};
use novacron_agent::hypervisor::Hypervisor;
use novacron_agent::lease::FenceMode;
use novacron_agent::reconcile::{Action, Gate, Reconciler};
use novacron_shared::lease::LeaseTiming;
use novacron_shared::protocol::Departed;
use std::time::Duration;

/// The agent's driver on a private test-driver host (with the foreign,
/// running domain "test"), on `storage`.
fn driver_host(storage: vmops::Storage) -> (Hypervisor, tempfile::TempDir) {
    common::warm_up_schema();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let uri = common::node_uri(
        dir.path(),
        "<domain type='test'><name>test</name><memory>65536</memory><os><type>hvm</type></os></domain>",
    );
    let (hv, _events) = ok(Hypervisor::start(
        &uri,
        Duration::from_secs(20),
        common::setup_in(dir.path()),
    ));
    (hv.with_storage(storage), dir)
}

fn lease_handle() -> LeaseHandle {
    let (h, _driver) = LeaseHandle::new(
        LeaseTiming::new(Duration::from_secs(5)),
        FenceMode::Kill,
        novacron_shared::clock::Clock::system(),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    h
}

async fn running(hv: &Hypervisor) -> Vec<String> {
    let (_, vms) = ok(hv.observe().await);
    let mut names: Vec<String> = vms
        .into_iter()
        .filter(|o| o.state == VmState::Running)
        .map(|o| o.name)
        .collect();
    names.sort();
    names
}

async fn fence_test(mode: FenceMode) {
    let (hv, _dir) = driver_host(vmops::Storage::Local);
    let mut by_meta = vm("ha-meta", 21);
    by_meta.spec.ha = true;
    let plain = vm("plain", 22);
    // HA only by the desired state (defined when it was not HA).
    let by_desired = vm("ha-desired", 23);
    let mut stopped_ha = vm("ha-off", 24);
    stopped_ha.spec.ha = true;
    for v in [&by_meta, &plain, &by_desired, &stopped_ha] {
        ok(hv.define(v.clone()).await);
    }
    for v in [&by_meta, &plain, &by_desired] {
        ok(hv.start_vm(v.id).await);
    }
    assert_eq!(running(&hv).await, ["ha-desired", "ha-meta", "plain", "test"]);
    let lease = lease_handle();
    lease.set_ha_vms([by_desired.id]);
    ha::fence(&lease, &hv, mode).await;
    assert_eq!(
        running(&hv).await,
        ["plain", "test"],
        "HA domains stopped; the non-HA and the foreign domain untouched"
    );
    // Stopped, not removed: the definitions and disks stay.
    for v in [&by_meta, &by_desired, &stopped_ha] {
        assert!(ok(hv.observe().await).1.iter().any(|o| o.name == v.spec.name));
    }
}

#[tokio::test]
async fn the_fence_kills_ha_domains_and_leaves_the_others_running() {
    fence_test(FenceMode::Kill).await;
}

#[tokio::test]
async fn the_fence_by_shutdown_stops_ha_domains_only() {
    fence_test(FenceMode::ShutdownThenKill {
        grace: Duration::from_secs(1),
    })
    .await;
}

#[test]
fn departed_vms_are_removed_keeping_or_deleting_their_disks() {
    let h = host();
    let kept = vm("moved-shared", 31);
    let deleted = vm("moved-local", 32);
    let stays = vm("stays", 33);
    for v in [&kept, &deleted, &stays] {
        ok(vmops::define(&h.conn, &h.setup, v));
        ok(vmops::start(&h.conn, v.id));
    }
    let departed = [
        Departed {
            vm: kept.id,
            keep_disks: true,
        },
        Departed {
            vm: deleted.id,
            keep_disks: false,
        },
    ];
    let (_, vms) = ok(vmops::observe(&h.conn, &h.setup));
    let seen: Vec<_> = vms.iter().map(|o| o.to_observed()).collect();
    let clock = novacron_shared::clock::Clock::system();
    // Planned without a lease (a returning host has none yet).
    let plan = Reconciler::default().plan_with(
        clock.now(),
        std::slice::from_ref(&stays),
        &departed,
        &seen,
        Gate::closed("fenced"),
    );
    assert_eq!(plan.actions.len(), 2, "{plan:?}");
    for a in plan.actions {
        let Action::Depart { uuid, keep_disks, .. } = a else {
            panic!("not a departure: {a:?}")
        };
        ok(vmops::depart(&h.conn, &h.setup, &uuid, keep_disks));
    }
    assert!(ok(vmops::lookup(&h.conn, kept.id)).is_none());
    assert!(ok(vmops::lookup(&h.conn, deleted.id)).is_none());
    assert_eq!(state(&h, stays.id), VmState::Running);
    assert_eq!(
        volumes(&h),
        [
            "moved-shared.cidata.iso",
            "moved-shared.data.qcow2",
            "moved-shared.root.qcow2",
            "stays.cidata.iso",
            "stays.data.qcow2",
            "stays.root.qcow2",
        ]
    );
    // Gone already: nothing to do, no error.
    assert!(ok(vmops::depart(&h.conn, &h.setup, &kept.id.to_string(), false)).is_empty());
}

#[test]
fn a_retag_rewrites_live_and_persistent_metadata_without_a_redefinition() {
    let h = host();
    let v = vm("tagged", 41);
    ok(vmops::define(&h.conn, &h.setup, &v));
    ok(vmops::start(&h.conn, v.id));
    let mut moved = v.clone();
    moved.spec.ha = true;
    moved.epoch = 3;
    ok(vmops::retag(&h.conn, &moved));
    let d = ok(vmops::lookup(&h.conn, v.id)).unwrap_or_else(|| panic!("gone"));
    let meta = vmops::metadata(&d).unwrap_or_else(|| panic!("no metadata"));
    assert!(meta.ha && meta.epoch == 3, "{meta:?}");
    assert_eq!(meta.spec_hash, drift::domain_hash(&v));
    let inactive = ok_virt(d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE));
    assert!(
        inactive.contains("<novacron:epoch>3</novacron:epoch>"),
        "{inactive}"
    );
    assert_eq!(state(&h, v.id), VmState::Running, "a retag does not restart it");
    // The definition matches: nothing more to do, with the lease.
    let (_, vms) = ok(vmops::observe(&h.conn, &h.setup));
    let seen: Vec<_> = vms.iter().map(|o| o.to_observed()).collect();
    let clock = novacron_shared::clock::Clock::system();
    let plan = Reconciler::default().plan_with(
        clock.now(),
        std::slice::from_ref(&moved),
        &[],
        &seen,
        Gate::open(),
    );
    assert!(plan.converged(), "{plan:?}");
    assert_eq!(ok(vmops::define(&h.conn, &h.setup, &moved)), Defined::Unchanged);
}

#[test]
fn a_shared_pool_reuses_the_volumes_another_host_made() {
    let h = host();
    let pool = ok(vmops::ensure_pool(&h.conn, &h.setup));
    // "Another host" made the root disk (bigger than this spec says).
    let root = novacron_agent::domxml::volume("shared-1.root.qcow2", 100 << 20, "qcow2", None);
    ok_virt(StorageVol::create_xml(&pool, &root, 0));
    let v = vm("shared-1", 51);
    assert_eq!(
        ok(vmops::define_on(&h.conn, &h.setup, vmops::Storage::Shared, &v)),
        Defined::Created
    );
    let vol = ok_virt(pool.lookup_storage_vol_by_name("shared-1.root.qcow2"));
    assert_eq!(
        ok_virt(vol.info()).capacity,
        100 << 20,
        "re-created over the other host's disk"
    );
    assert_eq!(
        volumes(&h),
        [
            "shared-1.cidata.iso",
            "shared-1.data.qcow2",
            "shared-1.root.qcow2"
        ]
    );
    // A failed define on a shared pool deletes only what it created.
    let mut bad = vm("shared-2", 52);
    let other = novacron_agent::domxml::volume("shared-2.root.qcow2", 64 << 20, "qcow2", None);
    ok_virt(StorageVol::create_xml(&pool, &other, 0));
    bad.spec.disks.push(DiskSpec {
        name: "third".into(),
        size_mib: None,
        template: Some("missing.qcow2".into()),
    });
    assert!(vmops::define_on(&h.conn, &h.setup, vmops::Storage::Shared, &bad).is_err());
    assert!(
        volumes(&h).contains(&"shared-2.root.qcow2".to_string()),
        "{:?}",
        volumes(&h)
    );
    assert!(!volumes(&h).contains(&"shared-2.data.qcow2".to_string()));
}

#[tokio::test]
async fn the_inventory_names_the_shared_pool() {
    let (hv, dir) = driver_host(vmops::Storage::Shared);
    let inv = ok(hv.inventory().await);
    assert_eq!(
        inv.shared_storage.as_deref(),
        Some(dir.path().join("pool").to_string_lossy().as_ref())
    );
    let (local, _dir) = driver_host(vmops::Storage::Local);
    assert_eq!(ok(local.inventory().await).shared_storage, None);
}

/// The VM loop on a test-driver host: an HA VM is defined but not started
/// without a lease (the report says why), and starts as soon as a lease is
/// acquired, without waiting for the periodic resync; a non-HA VM starts at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vm_loop_starts_ha_vms_only_under_a_lease_and_as_soon_as_one_comes() {
    use novacron_agent::converge::{self, ConvergeConfig};
    use novacron_agent::lease::Event;
    use novacron_shared::protocol::{AgentMessage, DesiredState};
    let (hv, _dir) = driver_host(vmops::Storage::Local);
    let lease = lease_handle();
    let mut ha_vm = vm("ha-web", 61);
    ha_vm.spec.ha = true;
    ha_vm.spec.cloud_init = None;
    let mut plain = vm("plain-web", 62);
    plain.spec.cloud_init = None;
    let (desired_tx, desired_rx) = tokio::sync::watch::channel(None);
    let (_events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (outbox_tx, mut outbox) = tokio::sync::mpsc::channel(1024);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let cfg = ConvergeConfig {
        // Far away: nothing here may rely on the periodic resync.
        resync_every: Duration::from_secs(3600),
        lease: Some(lease.clone()),
        ..Default::default()
    };
    let clock = novacron_shared::clock::Clock::system();
    tokio::spawn(converge::run(
        hv.clone(),
        cfg,
        clock.clone(),
        desired_rx,
        events_rx,
        outbox_tx,
        stop_rx,
    ));
    desired_tx.send_replace(Some(DesiredState {
        generation: 1,
        vms: vec![ha_vm.clone(), plain.clone()],
        migrating: vec![],
        departed: vec![],
    }));
    let limit = Duration::from_secs(20);
    let start = clock.now();
    let waiting = loop {
        assert!(clock.since(start) < limit, "no report about the HA VM waiting");
        match tokio::time::timeout(limit, outbox.recv()).await {
            Ok(Some(AgentMessage::Reconciled(r))) if r.drift.iter().any(|d| d.vm == "ha-web") => break r,
            Ok(Some(_)) => {}
            other => panic!("the VM loop stopped reporting: {other:?}"),
        }
    };
    assert!(!waiting.converged);
    assert_eq!(
        waiting
            .drift
            .iter()
            .map(|d| d.message.as_str())
            .collect::<Vec<_>>(),
        ["waiting for the HA lease (state no lease)"]
    );
    assert_eq!(running(&hv).await, ["plain-web", "test"]);
    // A lease: the HA VM starts now.
    lease.step(Event::SessionStarted);
    lease.step(Event::HeartbeatSent { seq: 1 });
    lease.step(Event::AckReceived { seq: 1 });
    loop {
        assert!(
            clock.since(start) < limit,
            "the HA VM did not start under the lease"
        );
        match tokio::time::timeout(limit, outbox.recv()).await {
            Ok(Some(AgentMessage::Reconciled(r))) if r.converged => break,
            Ok(Some(_)) => {}
            other => panic!("the VM loop stopped reporting: {other:?}"),
        }
    }
    assert_eq!(running(&hv).await, ["ha-web", "plain-web", "test"]);
}
