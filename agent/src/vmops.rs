//! VM, storage and snapshot operations on a libvirt connection. These are
//! blocking calls; they run on the driver thread (see `hypervisor`). Every
//! operation is idempotent: asking for a state that already holds succeeds
//! and changes nothing.
//!
//! Layering: above `error` (its error type), `domxml`, `drift` and `seed`;
//! below `migrate` and `hypervisor`, and imports neither. It converts its
//! [`ObservedVm`] into the reconciler's own [`Observed`].

use std::time::Duration;

use novacron_shared::ids::VmId;
use novacron_shared::protocol::{Capacity, VmState};
use novacron_shared::spec::{self, DesiredVm};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use crate::domxml::{self, Metadata, Placement, VirtType};
use crate::drift;
use crate::error::HvError;
use crate::reconcile::{Managed, Observed};

/// Where this host keeps VM parts.
#[derive(Debug, Clone)]
pub struct HostSetup {
    /// The storage pool's name.
    pub pool: String,
    /// The storage pool's directory.
    pub pool_path: String,
    /// Where serial console logs go.
    pub console_dir: String,
    /// A forced domain type; `None` picks the best from the capabilities.
    pub virt_type: Option<VirtType>,
    /// The URI other hosts migrate VMs here by.
    pub migration_uri: Option<String>,
    /// The host's labels, reported with the inventory.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The host's name, written into each domain it defines (SMBIOS
    /// system serial) so the guest can tell where it was started.
    pub host_name: String,
    /// libvirt's lock manager guards the disks (`vms.disk_locks`).
    pub disk_locks: bool,
}

/// A domain as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedVm {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Its state.
    pub state: VmState,
    /// NovaCron's metadata, when NovaCron defined it.
    pub meta: Option<Metadata>,
    /// Snapshot names.
    pub snapshots: Vec<String>,
}

impl ObservedVm {
    /// What the reconciler needs of this domain to plan.
    pub fn to_observed(&self) -> Observed {
        Observed {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            state: self.state,
            managed: self.meta.as_ref().map(|m| Managed {
                spec_hash: m.spec_hash.clone(),
                ha: m.ha,
                epoch: m.epoch,
            }),
        }
    }
}

/// What `define` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defined {
    /// A new domain (and its volumes).
    Created,
    /// The definition was replaced (the spec changed).
    Updated,
    /// It already matched.
    Unchanged,
}

fn call(op: &'static str) -> impl Fn(VirtError) -> HvError {
    move |e| HvError::Call {
        op,
        message: e.to_string(),
    }
}

fn is(e: &VirtError, n: ErrorNumber) -> bool {
    matches!(e.code(), Enum::Known(c) if c == n)
}

/// The domain with this id, if it exists.
pub fn lookup(conn: &Connect, id: VmId) -> Result<Option<Domain>, HvError> {
    match conn.lookup_domain_by_uuid_string(&id.to_string()) {
        Ok(d) => Ok(Some(d)),
        Err(e) if is(&e, ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(call("lookup domain")(e)),
    }
}

fn require(conn: &Connect, id: VmId) -> Result<Domain, HvError> {
    lookup(conn, id)?.ok_or_else(|| HvError::Invalid(format!("no VM with id {id} on this host")))
}

/// A domain's state.
pub fn state(dom: &Domain) -> Result<VmState, HvError> {
    match dom.state().map_err(call("domain state"))? {
        (Enum::Known(s), _) => Ok(map_state(s)),
        (Enum::Unknown(_), _) => Ok(VmState::Unknown),
    }
}

fn map_state(s: DomainState) -> VmState {
    match s {
        DomainState::Running | DomainState::Blocked => VmState::Running,
        DomainState::Paused => VmState::Paused,
        DomainState::Shutdown => VmState::ShuttingDown,
        DomainState::Shutoff => VmState::Stopped,
        DomainState::Crashed => VmState::Crashed,
        DomainState::PMSuspended => VmState::Suspended,
        DomainState::NoState => VmState::Unknown,
    }
}

/// The domain type for new VMs.
pub fn virt_type(conn: &Connect, setup: &HostSetup) -> Result<VirtType, HvError> {
    if let Some(t) = setup.virt_type {
        return Ok(t);
    }
    let caps = conn.capabilities().map_err(call("capabilities"))?;
    VirtType::from_capabilities(&caps).ok_or_else(|| {
        HvError::Invalid("the hypervisor offers no kvm, qemu or test domains for x86_64".into())
    })
}

/// The storage pool, defined, built and started if needed.
pub fn ensure_pool(conn: &Connect, setup: &HostSetup) -> Result<StoragePool, HvError> {
    let pool = match conn.lookup_storage_pool_by_name(&setup.pool) {
        Ok(p) => p,
        Err(e) if is(&e, ErrorNumber::NoStoragePool) => {
            std::fs::create_dir_all(&setup.pool_path).map_err(|e| {
                HvError::Invalid(format!(
                    "cannot create the pool directory {}: {e}",
                    setup.pool_path
                ))
            })?;
            let p = conn
                .define_storage_pool_xml(&domxml::dir_pool(&setup.pool, &setup.pool_path), 0)
                .map_err(call("define storage pool"))?;
            p.build(0).map_err(call("build storage pool"))?;
            let _ = p.set_autostart(true);
            tracing::info!(pool = %setup.pool, path = %setup.pool_path, "storage pool defined");
            p
        }
        Err(e) => return Err(call("lookup storage pool")(e)),
    };
    if !pool.is_active().map_err(call("storage pool state"))? {
        pool.create(0).map_err(call("start storage pool"))?;
    }
    Ok(pool)
}

/// Size and free space of the pool, MiB.
pub fn pool_space(pool: &StoragePool) -> Result<(u64, u64), HvError> {
    let info = pool.info().map_err(call("storage pool info"))?;
    Ok((info.capacity >> 20, info.available >> 20))
}

fn volume(pool: &StoragePool, name: &str) -> Result<Option<StorageVol>, HvError> {
    match pool.lookup_storage_vol_by_name(name) {
        Ok(v) => Ok(Some(v)),
        Err(e) if is(&e, ErrorNumber::NoStorageVolume) => Ok(None),
        Err(e) => Err(call("lookup volume")(e)),
    }
}

fn vol_format(vol: &StorageVol) -> Result<String, HvError> {
    let xml = vol.xml_desc(0).map_err(call("volume XML"))?;
    // The first <format type='...'/> is the volume's own (backing stores follow).
    let fmt = xml
        .split("<format type='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or("raw");
    Ok(if fmt.chars().all(|c| c.is_ascii_alphanumeric()) {
        fmt.to_string()
    } else {
        "raw".to_string()
    })
}

/// Creates the VM's volumes that are missing; returns their paths and the
/// names of the volumes this call created (to undo on failure).
fn ensure_volumes(
    pool: &StoragePool,
    vm: &DesiredVm,
    storage: Storage,
    created: &mut Vec<StorageVol>,
) -> Result<Vec<String>, HvError> {
    let mut paths = Vec::with_capacity(vm.spec.disks.len());
    let mut refreshed = false;
    for d in &vm.spec.disks {
        let name = spec::volume_name(&vm.spec.name, &d.name);
        let mut existing = volume(pool, &name)?;
        if existing.is_none() && storage == Storage::Shared && !refreshed {
            // Another host may have created it (the VM ran there): look
            // again with libvirt's view of the directory refreshed, and
            // reuse it rather than make a new one.
            pool.refresh(0).map_err(call("refresh storage pool"))?;
            refreshed = true;
            existing = volume(pool, &name)?;
        }
        if let Some(v) = existing {
            paths.push(v.path().map_err(call("volume path"))?);
            continue;
        }
        let xml = match &d.template {
            None => {
                let size = d.size_mib.unwrap_or(1) << 20;
                domxml::volume(&name, size, "qcow2", None)
            }
            Some(t) => {
                let tv = volume(pool, t)?.ok_or_else(|| {
                    HvError::Invalid(format!(
                        "template volume {t:?} is not in storage pool {:?}",
                        pool.name().unwrap_or_default()
                    ))
                })?;
                let tinfo = tv.info().map_err(call("template info"))?;
                let want = d.size_mib.map_or(tinfo.capacity, |m| m << 20);
                if want < tinfo.capacity {
                    return Err(HvError::Invalid(format!(
                        "disk {:?} asks for {} MiB but template {t:?} is {} MiB; an overlay cannot be smaller",
                        d.name,
                        want >> 20,
                        tinfo.capacity >> 20
                    )));
                }
                let tpath = tv.path().map_err(call("template path"))?;
                domxml::volume(&name, want, "qcow2", Some((&tpath, &vol_format(&tv)?)))
            }
        };
        let v = StorageVol::create_xml(pool, &xml, 0).map_err(call("create volume"))?;
        paths.push(v.path().map_err(call("volume path"))?);
        created.push(v);
    }
    Ok(paths)
}

fn ensure_seed(
    pool: &StoragePool,
    vm: &DesiredVm,
    created: &mut Vec<StorageVol>,
) -> Result<Option<String>, HvError> {
    let Some(ci) = &vm.spec.cloud_init else {
        return Ok(None);
    };
    let iso = crate::seed::build_iso(&vm.spec.name, vm.id, ci).map_err(HvError::Invalid)?;
    let name = spec::seed_volume_name(&vm.spec.name);
    let vol = match volume(pool, &name)? {
        Some(v) => v,
        None => {
            let v = StorageVol::create_xml(pool, &domxml::volume(&name, iso.len() as u64, "raw", None), 0)
                .map_err(call("create seed volume"))?;
            created.push(v.clone());
            v
        }
    };
    let path = vol.path().map_err(call("seed volume path"))?;
    // The pool is a directory: write the image in place, atomically. (It
    // is made from the spec and attached read-only; on a shared pool the
    // host that used it last is fenced or has departed the VM.)
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, &iso)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| HvError::Invalid(format!("cannot write the cloud-init seed {path}: {e}")))?;
    Ok(Some(path))
}

/// Whether the storage pool is this host's alone or shared with others
/// (agent config `vms.storage_shared`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Storage {
    /// Only this host uses the pool.
    #[default]
    Local,
    /// Other hosts use the same directory: a volume missing from libvirt's
    /// view is looked for again after a pool refresh, and reused.
    Shared,
}

/// Defines (or updates) a VM on a local pool; see [`define_on`].
pub fn define(conn: &Connect, setup: &HostSetup, vm: &DesiredVm) -> Result<Defined, HvError> {
    define_on(conn, setup, Storage::Local, vm)
}

/// Defines (or updates) a VM: volumes, cloud-init seed, domain. Existing
/// volumes are reused, never re-created or overwritten. Nothing this call
/// created is left behind when it fails.
pub fn define_on(
    conn: &Connect,
    setup: &HostSetup,
    storage: Storage,
    vm: &DesiredVm,
) -> Result<Defined, HvError> {
    vm.spec.validate().map_err(|e| HvError::Invalid(e.to_string()))?;
    let existing = lookup(conn, vm.id)?;
    if let Some(d) = &existing {
        let name = d.name().map_err(call("domain name"))?;
        if name != vm.spec.name {
            return Err(HvError::Invalid(format!(
                "VM {} is defined here as {name:?}; renaming is not supported",
                vm.id
            )));
        }
        if metadata(d).is_some_and(|m| drift::matches(&m.spec_hash, vm)) {
            return Ok(Defined::Unchanged);
        }
    } else if let Ok(other) = conn.lookup_domain_by_name(&vm.spec.name) {
        let uuid = other.uuid_string().unwrap_or_default();
        return Err(HvError::Invalid(format!(
            "a domain named {:?} already exists here with UUID {uuid}; refusing to touch it",
            vm.spec.name
        )));
    }
    let pool = ensure_pool(conn, setup)?;
    let mut created = Vec::new();
    let result = (|| {
        let disk_paths = ensure_volumes(&pool, vm, storage, &mut created)?;
        let seed_path = ensure_seed(&pool, vm, &mut created)?;
        let placement = Placement {
            virt_type: virt_type(conn, setup)?,
            disk_paths,
            seed_path,
            console_log: format!("{}/{}.console.log", setup.console_dir, vm.spec.name),
            host_name: setup.host_name.clone(),
        };
        let xml = domxml::domain(vm, &placement);
        conn.define_domain_xml_flags(&xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map_err(call("define domain"))
    })();
    match result {
        Ok(_) => Ok(if existing.is_some() {
            Defined::Updated
        } else {
            Defined::Created
        }),
        Err(e) => {
            for v in created {
                let _ = v.delete(0);
            }
            Err(e)
        }
    }
}

/// NovaCron's metadata on a domain, if it has any.
pub fn metadata(dom: &Domain) -> Option<Metadata> {
    dom.metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(domxml::METADATA_NS),
        0,
    )
    .ok()
    .and_then(|x| Metadata::parse(&x))
}

/// Starts a VM (no-op when running; resumes when paused).
pub fn start(conn: &Connect, id: VmId) -> Result<(), HvError> {
    let d = require(conn, id)?;
    match state(&d)? {
        VmState::Running | VmState::ShuttingDown => Ok(()),
        VmState::Paused => d.resume().map(|_| ()).map_err(call("resume")),
        _ => d.create().map(|_| ()).map_err(|e| {
            let message = e.to_string();
            if is(&e, ErrorNumber::ResourceBusy) || is_disk_lock_message(&message) {
                HvError::DiskLocked(message)
            } else {
                HvError::Call { op: "start", message }
            }
        }),
    }
}

/// Whether a failed start's message says a disk is locked elsewhere:
/// virtlockd (libvirt's `lockd` lock manager) refuses with "resource
/// busy: Lockspace resource '…' is locked"; QEMU's own image locking with
/// `Failed to get "write" lock` / "Is another process using the image".
pub fn is_disk_lock_message(message: &str) -> bool {
    const SIGNS: [&str; 4] = [
        "Lockspace resource",
        "Failed to get \"write\" lock",
        "Failed to get shared \"write\" lock",
        "another process using the image",
    ];
    SIGNS.iter().any(|s| message.contains(s))
}

/// Asks the guest to shut down (ACPI power button). A paused VM is resumed
/// first, since a paused guest cannot react.
pub fn request_shutdown(conn: &Connect, id: VmId) -> Result<bool, HvError> {
    let d = require(conn, id)?;
    match state(&d)? {
        VmState::Stopped | VmState::Crashed => Ok(false),
        s => {
            if s == VmState::Paused {
                d.resume().map_err(call("resume"))?;
            }
            // Default mode: with no guest agent channel in the definition,
            // QEMU presses the ACPI power button.
            d.shutdown().map_err(call("shutdown"))?;
            Ok(true)
        }
    }
}

/// Whether the VM is off (or gone).
pub fn is_off(conn: &Connect, id: VmId) -> Result<bool, HvError> {
    match lookup(conn, id)? {
        None => Ok(true),
        Some(d) => Ok(!d.is_active().map_err(call("domain state"))?),
    }
}

/// Powers the VM off at once.
pub fn destroy(conn: &Connect, id: VmId) -> Result<(), HvError> {
    let d = require(conn, id)?;
    if d.is_active().map_err(call("domain state"))? {
        d.destroy().map_err(call("destroy"))?;
    }
    Ok(())
}

/// Reboots a running VM.
pub fn reboot(conn: &Connect, id: VmId) -> Result<(), HvError> {
    let d = require(conn, id)?;
    if state(&d)? != VmState::Running {
        return Err(HvError::Invalid("the VM is not running; start it instead".into()));
    }
    d.reboot(0).map_err(call("reboot"))
}

/// Pauses a running VM.
pub fn suspend(conn: &Connect, id: VmId) -> Result<(), HvError> {
    let d = require(conn, id)?;
    match state(&d)? {
        VmState::Paused => Ok(()),
        VmState::Running => d.suspend().map(|_| ()).map_err(call("suspend")),
        s => Err(HvError::Invalid(format!("cannot pause a VM that is {s:?}"))),
    }
}

/// Resumes a paused VM.
pub fn resume(conn: &Connect, id: VmId) -> Result<(), HvError> {
    let d = require(conn, id)?;
    match state(&d)? {
        VmState::Running => Ok(()),
        VmState::Paused => d.resume().map(|_| ()).map_err(call("resume")),
        s => Err(HvError::Invalid(format!("cannot resume a VM that is {s:?}"))),
    }
}

/// Removes a VM: powers it off, undefines it with its snapshot metadata,
/// and deletes its volumes. Returns the deleted volume names.
pub fn remove(conn: &Connect, setup: &HostSetup, uuid: &str) -> Result<Vec<String>, HvError> {
    remove_with(conn, setup, uuid, true)
}

/// Removes an HA VM that now runs on another host: powers it off and
/// undefines it; deletes its volumes only when `keep_disks` is false (with
/// shared storage they are the other host's disks now). Returns the
/// deleted volume names.
pub fn depart(
    conn: &Connect,
    setup: &HostSetup,
    uuid: &str,
    keep_disks: bool,
) -> Result<Vec<String>, HvError> {
    remove_with(conn, setup, uuid, !keep_disks)
}

fn remove_with(
    conn: &Connect,
    setup: &HostSetup,
    uuid: &str,
    delete_volumes: bool,
) -> Result<Vec<String>, HvError> {
    let d = match conn.lookup_domain_by_uuid_string(uuid) {
        Ok(d) => d,
        Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(Vec::new()),
        Err(e) => return Err(call("lookup domain")(e)),
    };
    if metadata(&d).is_none() {
        return Err(HvError::Invalid(format!(
            "domain {uuid} was not defined by NovaCron; refusing to remove it"
        )));
    }
    let name = d.name().map_err(call("domain name"))?;
    if d.is_active().map_err(call("domain state"))? {
        d.destroy().map_err(call("destroy"))?;
    }
    d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        .map_err(call("undefine"))?;
    if !delete_volumes {
        return Ok(Vec::new());
    }
    let pool = ensure_pool(conn, setup)?;
    let prefix = format!("{name}.");
    let mut removed = Vec::new();
    for v in pool.list_all_volumes(0).map_err(call("list volumes"))? {
        let vname = v.name().map_err(call("volume name"))?;
        if vname.starts_with(&prefix) {
            v.delete(0).map_err(call("delete volume"))?;
            removed.push(vname);
        }
    }
    Ok(removed)
}

/// Rewrites the HA flag and epoch in a domain's metadata (live and
/// persistent), keeping its definition: for a VM whose placement changed
/// but whose domain matches.
pub fn retag(conn: &Connect, vm: &DesiredVm) -> Result<(), HvError> {
    let d = require(conn, vm.id)?;
    let flags = if d.is_active().map_err(call("domain state"))? {
        sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG
    } else {
        sys::VIR_DOMAIN_AFFECT_CONFIG
    };
    d.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(&Metadata::of(vm).element()),
        Some(domxml::METADATA_PREFIX),
        Some(domxml::METADATA_NS),
        flags,
    )
    .map_err(call("set metadata"))
}

/// Takes an internal snapshot (no-op when one with that name exists).
pub fn snapshot_create(conn: &Connect, id: VmId, name: &str) -> Result<(), HvError> {
    spec::check_name(name, spec::MAX_NAME_LEN).map_err(|m| HvError::Invalid(format!("snapshot name {m}")))?;
    let d = require(conn, id)?;
    if Domain::lookup_snapshot_by_name(&d, name, 0).is_ok() {
        return Ok(());
    }
    d.create_snapshot_xml(&domxml::snapshot(name), 0)
        .map(|_| ())
        .map_err(call("create snapshot"))
}

/// Reverts to a snapshot.
pub fn snapshot_revert(conn: &Connect, id: VmId, name: &str) -> Result<(), HvError> {
    let d = require(conn, id)?;
    let s = Domain::lookup_snapshot_by_name(&d, name, 0)
        .map_err(|_| HvError::Invalid(format!("VM has no snapshot named {name:?}")))?;
    s.revert(0).map_err(call("revert snapshot"))
}

/// Deletes a snapshot (no-op when it does not exist).
pub fn snapshot_delete(conn: &Connect, id: VmId, name: &str) -> Result<(), HvError> {
    let d = require(conn, id)?;
    match Domain::lookup_snapshot_by_name(&d, name, 0) {
        Ok(s) => s.delete(0).map_err(call("delete snapshot")),
        Err(e) if is(&e, ErrorNumber::NoDomainSnapshot) => Ok(()),
        Err(e) => Err(call("lookup snapshot")(e)),
    }
}

fn snapshot_names(d: &Domain) -> Vec<String> {
    fn field(xml: &str, open: &str) -> Option<String> {
        let rest = xml.split(open).nth(1)?;
        Some(rest.split('<').next()?.trim().to_string())
    }
    // (name, parent, creation time); creation times have one-second
    // resolution, so ties are broken by ancestry.
    let snaps: Vec<(String, Option<String>, i64)> = d
        .list_all_snapshots(0)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| {
            let xml = s.xml_desc(0).unwrap_or_default();
            let name = s.name().ok()?;
            let parent = xml.split("<parent>").nth(1).and_then(|p| field(p, "<name>"));
            let t = field(&xml, "<creationTime>")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            Some((name, parent, t))
        })
        .collect();
    let parents: std::collections::HashMap<&str, &str> = snaps
        .iter()
        .filter_map(|(n, p, _)| Some((n.as_str(), p.as_deref()?)))
        .collect();
    fn depth<'a>(parents: &std::collections::HashMap<&'a str, &'a str>, mut n: &'a str) -> usize {
        let mut k = 0;
        while let Some(p) = parents.get(n) {
            n = p;
            k += 1;
            if k > parents.len() {
                break;
            }
        }
        k
    }
    let mut keyed: Vec<(i64, usize, String)> = snaps
        .iter()
        .map(|(n, _, t)| (*t, depth(&parents, n), n.clone()))
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, _, n)| n).collect()
}

/// Grows a disk to `size_mib` (no-op at that size; never shrinks).
pub fn resize_disk(
    conn: &Connect,
    setup: &HostSetup,
    id: VmId,
    disk: &str,
    size_mib: u64,
) -> Result<(), HvError> {
    let d = require(conn, id)?;
    let name = d.name().map_err(call("domain name"))?;
    let pool = ensure_pool(conn, setup)?;
    let vname = spec::volume_name(&name, disk);
    let vol =
        volume(&pool, &vname)?.ok_or_else(|| HvError::Invalid(format!("VM {name} has no disk {disk:?}")))?;
    let cur = vol.info().map_err(call("volume info"))?.capacity;
    let want = size_mib
        .checked_mul(1 << 20)
        .filter(|b| *b <= spec::MAX_DISK_MIB << 20)
        .ok_or_else(|| HvError::Invalid(format!("{size_mib} MiB is too large")))?;
    if want < cur {
        return Err(HvError::Invalid(format!(
            "disk {disk:?} is {} MiB; shrinking to {size_mib} MiB would lose data",
            cur >> 20
        )));
    }
    if want == cur {
        return Ok(());
    }
    if d.is_active().map_err(call("domain state"))? {
        let path = vol.path().map_err(call("volume path"))?;
        d.block_resize(&path, want, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            .map_err(call("block resize"))
    } else {
        vol.resize(want, 0).map_err(call("resize volume"))
    }
}

/// Capacity and every domain.
pub fn observe(conn: &Connect, setup: &HostSetup) -> Result<(Capacity, Vec<ObservedVm>), HvError> {
    let info = conn.node_info().map_err(call("node_info"))?;
    let (storage_mib, storage_free_mib) = match ensure_pool(conn, setup).and_then(|p| pool_space(&p)) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "storage pool unavailable; reporting no storage");
            (0, 0)
        }
    };
    let domains = conn.list_all_domains(0).map_err(call("list_all_domains"))?;
    let mut vms = Vec::with_capacity(domains.len());
    for dom in domains {
        let name = dom.name().map_err(call("domain name"))?;
        let uuid = dom.uuid_string().map_err(call("domain uuid"))?;
        let meta = metadata(&dom);
        let snapshots = if meta.is_some() {
            snapshot_names(&dom)
        } else {
            Vec::new()
        };
        vms.push(ObservedVm {
            state: state(&dom)?,
            name,
            uuid,
            meta,
            snapshots,
        });
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((
        Capacity {
            cpus: info.cpus,
            memory_mib: info.memory / 1024,
            storage_mib,
            storage_free_mib,
        },
        vms,
    ))
}

/// How long to wait between state polls while a guest shuts down.
pub const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
