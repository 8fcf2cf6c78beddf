//! The drift hash: a short digest recorded in a domain's metadata, so the
//! reconciler can tell whether a definition is stale without reading the
//! domain XML back. Pure; the XML generator records [`domain_hash`] and
//! the reconciler and `vmops::define` compare through [`matches`].
//!
//! The hash covers exactly what `define` turns into the domain and its
//! disks: the VM id (the domain UUID), name, vCPUs, memory, disks, NICs,
//! cloud-init (the seed disk's content), kernel boot, machine type and
//! labels (the domain description). Fields of the spec that are not
//! domain content (the HA flag, `ephemeral`, `ha_priority`; tenancy or
//! burst policy tomorrow) and the placement epoch are left out, so adding
//! or changing them redefines no domain defined under this scheme (the HA
//! flag and the epoch are recorded in the metadata beside the hash and
//! retagged there). [`DomainPart`] is
//! built by destructuring the whole `VmSpec`, so a new spec field does not
//! compile until it is sorted into the domain part or left out here.
//!
//! Domains defined before this scheme carry the hash of the previous one
//! (the whole spec, HA flag included); [`matches`] also accepts that
//! [`legacy_v1_hash`], so an upgrade does not redefine every domain once;
//! such a domain is redefined once when its HA flag changes (the legacy
//! hash covered it), and from then on carries the current hash.

use std::collections::BTreeMap;

use novacron_shared::ids::VmId;
use novacron_shared::spec::{CloudInit, DesiredVm, DiskSpec, KernelBoot, Machine, NicSpec, VmSpec};
use serde::Serialize;

/// The prefix of hashes of the current scheme (legacy hashes have none).
pub const SCHEME_PREFIX: &str = "d2-";

/// The parts of a desired VM that shape its domain, and nothing else.
#[derive(Debug, Serialize)]
pub struct DomainPart<'a> {
    /// The domain UUID.
    pub id: VmId,
    /// The domain name.
    pub name: &'a str,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// The disks (volumes and their order).
    pub disks: &'a [DiskSpec],
    /// The NICs.
    pub nics: &'a [NicSpec],
    /// The cloud-init seed's content.
    pub cloud_init: Option<&'a CloudInit>,
    /// Direct kernel boot.
    pub boot: Option<&'a KernelBoot>,
    /// The machine type.
    pub machine: Machine,
    /// Labels (written into the domain description).
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> DomainPart<'a> {
    /// The domain part of `vm`.
    pub fn of(vm: &'a DesiredVm) -> Self {
        // Exhaustive on purpose: a new spec field must be sorted here.
        let VmSpec {
            name,
            vcpus,
            memory_mib,
            disks,
            nics,
            cloud_init,
            boot,
            machine,
            ha: _, // the server's restart policy; never reaches libvirt
            labels,
            ephemeral: _,   // how the server may restart it; never reaches libvirt
            ha_priority: _, // the server's restart order; never reaches libvirt
        } = &vm.spec;
        Self {
            id: vm.id,
            name,
            vcpus: *vcpus,
            memory_mib: *memory_mib,
            disks,
            nics,
            cloud_init: cloud_init.as_ref(),
            boot: boot.as_ref(),
            machine: *machine,
            labels,
        }
    }
}

/// The drift hash of `vm`: its [`DomainPart`], hashed.
pub fn domain_hash(vm: &DesiredVm) -> String {
    format!("{SCHEME_PREFIX}{}", digest(&DomainPart::of(vm)))
}

/// The spec as the first scheme hashed it: every `VmSpec` field of that
/// version, in its order. Kept only to recognise domains defined before
/// [`domain_hash`]; do not add fields to it.
#[derive(Debug, Serialize)]
struct LegacySpecV1<'a> {
    name: &'a str,
    vcpus: u32,
    memory_mib: u64,
    disks: &'a [DiskSpec],
    nics: &'a [NicSpec],
    cloud_init: Option<&'a CloudInit>,
    boot: Option<&'a KernelBoot>,
    machine: Machine,
    ha: bool,
    labels: &'a BTreeMap<String, String>,
}

/// The hash the first scheme recorded: the encoding of `(id, whole spec)`.
/// For comparison with domains defined by older agents only; new
/// definitions record [`domain_hash`].
pub fn legacy_v1_hash(vm: &DesiredVm) -> String {
    let s = &vm.spec;
    let v1 = LegacySpecV1 {
        name: &s.name,
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        disks: &s.disks,
        nics: &s.nics,
        cloud_init: s.cloud_init.as_ref(),
        boot: s.boot.as_ref(),
        machine: s.machine,
        ha: s.ha,
        labels: &s.labels,
    };
    digest(&(vm.id, v1))
}

/// Whether a hash recorded on a domain says its definition matches `vm`
/// (under the current scheme, or the legacy one for older definitions).
pub fn matches(recorded: &str, vm: &DesiredVm) -> bool {
    if recorded.starts_with(SCHEME_PREFIX) {
        recorded == domain_hash(vm)
    } else {
        recorded == legacy_v1_hash(vm)
    }
}

/// The first 16 hex digits of the SHA-256 of the value's encoding.
fn digest<T: Serialize + std::fmt::Debug>(value: &T) -> String {
    let bytes = match novacron_shared::codec::encode(value) {
        Ok(b) => b,
        // Our spec types always encode; should that ever break, hash the
        // same fields through their debug form rather than hash nothing.
        Err(_) => format!("{value:?}").into_bytes(),
    };
    novacron_shared::pki::sha256_hex(&bytes)[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domxml::tests::full_vm;
    use novacron_shared::spec::{NicAttach, Power};

    #[test]
    fn fields_that_never_reach_libvirt_do_not_change_the_hash() {
        let a = full_vm();
        let mut b = a.clone();
        b.spec.ha = !a.spec.ha;
        b.power = Power::Stopped;
        b.op_id = novacron_shared::ids::OpId(0x99);
        // The placement epoch is not domain content either (the metadata
        // records it beside the hash; a retag, not a redefinition).
        b.epoch = 42;
        b.spec.ephemeral = true;
        b.spec.ha_priority = 9;
        assert_eq!(domain_hash(&a), domain_hash(&b));
        assert!(matches(&domain_hash(&a), &b));
    }

    #[test]
    fn every_domain_field_changes_the_hash() {
        let base = full_vm();
        type Change = (&'static str, fn(&mut DesiredVm));
        let changes: Vec<Change> = vec![
            ("id", |v| v.id = VmId(0x12)),
            ("name", |v| v.spec.name = "web-2".into()),
            ("vcpus", |v| v.spec.vcpus += 1),
            ("memory", |v| v.spec.memory_mib += 1),
            ("disk size", |v| v.spec.disks[1].size_mib = Some(1024)),
            ("disk template", |v| v.spec.disks[0].template = None),
            ("disk added", |v| {
                v.spec.disks.push(DiskSpec {
                    name: "logs".into(),
                    size_mib: Some(64),
                    template: None,
                })
            }),
            ("nic attach", |v| {
                v.spec.nics[1].attach = NicAttach::Bridge("br1".into())
            }),
            ("nic mac", |v| {
                v.spec.nics[1].mac = Some("52:54:00:00:00:02".into())
            }),
            ("nic removed", |v| {
                v.spec.nics.pop();
            }),
            ("cloud-init", |v| v.spec.cloud_init = None),
            ("boot cmdline", |v| {
                if let Some(b) = v.spec.boot.as_mut() {
                    b.cmdline.push_str(" debug");
                }
            }),
            ("boot removed", |v| v.spec.boot = None),
            ("machine", |v| v.spec.machine = Machine::Pc),
            ("labels", |v| {
                v.spec.labels.insert("zone".into(), "b".into());
            }),
        ];
        let h0 = domain_hash(&base);
        for (what, change) in changes {
            let mut v = base.clone();
            change(&mut v);
            assert_ne!(domain_hash(&v), h0, "{what} did not change the hash");
            assert!(!matches(&h0, &v), "{what}: a stale definition matched");
        }
    }

    /// Hashes the first scheme recorded for these specs, taken from the
    /// agent before the domain-only hash (`sha256(encode((id, spec)))`).
    #[test]
    fn legacy_hashes_of_older_agents_are_recognised() {
        let full = full_vm();
        let mut tiny = full.clone();
        tiny.spec = VmSpec::minimal("tiny", 1, 128);
        assert_eq!(legacy_v1_hash(&full), "65004a25c3728ac8");
        assert_eq!(legacy_v1_hash(&tiny), "adcba6a35e3f7ae9");
        assert!(matches("65004a25c3728ac8", &full));
        assert!(matches("adcba6a35e3f7ae9", &tiny));
        // A legacy hash of another spec is still drift.
        assert!(!matches("65004a25c3728ac8", &tiny));
        let mut bigger = full.clone();
        bigger.spec.vcpus += 1;
        assert!(!matches("65004a25c3728ac8", &bigger));
        // New definitions record the current scheme, never the legacy one.
        assert!(domain_hash(&full).starts_with(SCHEME_PREFIX));
        assert_ne!(domain_hash(&full), legacy_v1_hash(&full));
    }
}
