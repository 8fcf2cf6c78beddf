//! The drift hash: a short digest of a desired VM recorded in its domain's
//! metadata, so the reconciler can tell whether a definition is stale
//! without reading the domain XML back. Pure; the reconciler, the XML
//! generator and `vmops::define` all compare through [`matches`].

use novacron_shared::spec::DesiredVm;

/// A stable hash of everything that shapes a VM's definition.
pub fn spec_hash(vm: &DesiredVm) -> String {
    let bytes = novacron_shared::codec::encode(&(&vm.id, &vm.spec)).unwrap_or_default();
    novacron_shared::pki::sha256_hex(&bytes)[..16].to_string()
}

/// Whether a hash recorded on a domain says its definition matches `vm`.
pub fn matches(recorded: &str, vm: &DesiredVm) -> bool {
    recorded == spec_hash(vm)
}
