//! VM specifications: what an operator asks for, validated at the edge.
//!
//! A [`VmSpec`] is checked once, where it enters the system (API body, wire
//! frame), by [`VmSpec::validate`], which reports every problem at once with
//! the field it concerns. Everything downstream (domain XML, volume names,
//! cloud-init seed) relies on these checks: names are restricted to a small
//! charset, paths are absolute and clean, sizes are bounded.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{OpId, VmId};

/// Longest VM name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Most vCPUs per VM.
pub const MAX_VCPUS: u32 = 256;
/// Least memory per VM, MiB.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most memory per VM, MiB (4 TiB).
pub const MAX_MEMORY_MIB: u64 = 4 << 20;
/// Most disks per VM.
pub const MAX_DISKS: usize = 16;
/// Largest disk, MiB (64 TiB).
pub const MAX_DISK_MIB: u64 = 64 << 20;
/// Most NICs per VM.
pub const MAX_NICS: usize = 8;
/// Largest cloud-init user data, bytes.
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Most SSH keys per VM.
pub const MAX_SSH_KEYS: usize = 32;
/// Most labels per VM.
pub const MAX_LABELS: usize = 64;
/// Longest kernel command line, bytes.
pub const MAX_CMDLINE: usize = 2048;

/// What a VM should be.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name: 1-63 of `a-z 0-9 -`, starting with a letter or digit,
    /// not ending with `-`. Unique in the fleet; also the guest's hostname.
    #[cfg_attr(
        feature = "schema",
        schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)
    )]
    pub name: String,
    /// Virtual CPUs.
    #[cfg_attr(feature = "schema", schema(minimum = 1, maximum = 256))]
    pub vcpus: u32,
    /// Memory, MiB.
    #[cfg_attr(feature = "schema", schema(minimum = 32, maximum = 4194304))]
    pub memory_mib: u64,
    /// Disks, in order (the first is the boot disk, `vda`); their names are
    /// unique within the VM.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(max_items = 16))]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, in order.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(max_items = 8))]
    pub nics: Vec<NicSpec>,
    /// Cloud-init NoCloud data; when present the VM gets a seed disk.
    #[serde(default)]
    pub cloud_init: Option<CloudInit>,
    /// Direct kernel boot instead of booting from the first disk.
    #[serde(default)]
    pub boot: Option<KernelBoot>,
    /// The machine type.
    #[serde(default)]
    pub machine: Machine,
    /// Restart elsewhere when the host dies (high availability). An HA VM's
    /// disks must live on a shared storage pool, unless it is `ephemeral`.
    #[serde(default)]
    pub ha: bool,
    /// Free-form labels (`key = value`), for placement and search.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(schema_with = labels_schema))]
    pub labels: BTreeMap<String, String>,
    /// With `ha`: the disks may be made afresh (from their templates, or
    /// blank) on the host it is restarted on, so it may run on hosts without
    /// shared storage; what was written to them is lost on a failover.
    #[serde(default)]
    pub ephemeral: bool,
    /// With `ha`: restart order after a host loss, higher first.
    #[serde(default)]
    pub ha_priority: u8,
}

/// The JSON schema of a spec's labels: at most 64; keys are 1-63 of
/// lowercase letters, digits and `-_./`; values are at most 255 bytes (the
/// schema says 255 characters) without control characters.
#[cfg(feature = "schema")]
fn labels_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[a-z0-9._/-]{1,63}$")),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(255))
                .pattern(Some("^[^\\u0000-\\u001f\\u007f]*$")),
        ))
        .max_properties(Some(MAX_LABELS))
        .description(Some(
            "Free-form labels (`key = value`), for placement and search.",
        ))
        .build()
}

/// One disk.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The disk's name within the VM (same charset as VM names, at most 32;
    /// not `cidata`, which is the cloud-init seed disk; unique in the VM).
    #[cfg_attr(
        feature = "schema",
        schema(pattern = "^(?!cidata$)[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 32)
    )]
    pub name: String,
    /// Size in MiB. Required for a blank disk; for a clone, at least the
    /// template's size (the overlay is grown to it), or the template's size
    /// when absent.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(minimum = 1, maximum = 67108864))]
    pub size_mib: Option<u64>,
    /// Clone this template volume (a volume in the host's pool) as a qcow2
    /// overlay instead of making a blank disk.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"))]
    pub template: Option<String>,
}

/// One network interface.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// What the NIC plugs into.
    pub attach: NicAttach,
    /// A fixed MAC (`52:54:00:..`); libvirt picks one when absent.
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schema(pattern = "^(?!00(:00){5}$)[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$")
    )]
    pub mac: Option<String>,
}

/// Where a NIC is plugged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicAttach {
    /// A libvirt network by name.
    Network(String),
    /// A host bridge by name.
    Bridge(String),
}

/// The JSON schema of [`NicAttach`]: `{"network": NAME}` or `{"bridge": NAME}`,
/// NAME 1-64 of letters, digits, `-_.` (what the spec's validation takes).
#[cfg(feature = "schema")]
impl utoipa::PartialSchema for NicAttach {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Type};
        let one = |key: &str, what: &str| {
            ObjectBuilder::new()
                .property(
                    key,
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[A-Za-z0-9._-]{1,64}$"))
                        .description(Some(what)),
                )
                .required(key)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        };
        OneOfBuilder::new()
            .item(one("network", "A libvirt network by name."))
            .item(one("bridge", "A host bridge by name."))
            .description(Some("Where a NIC is plugged."))
            .into()
    }
}

#[cfg(feature = "schema")]
impl utoipa::ToSchema for NicAttach {}

/// Cloud-init NoCloud data.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// The user-data document (e.g. `#cloud-config ...`), passed verbatim.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(pattern = "^[^\\u0000]*$", max_length = 65536))]
    pub user_data: Option<String>,
    /// OpenSSH public keys for the default user (one line each).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(schema_with = ssh_keys_schema))]
    pub ssh_authorized_keys: Vec<String>,
}

/// The JSON schema of cloud-init's SSH keys: at most 32 OpenSSH public
/// keys, one line each (`ssh-ed25519 AAAA... comment`).
#[cfg(feature = "schema")]
fn ssh_keys_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^(ssh-|ecdsa-|sk-)\\S* +\\S[^\\u0000-\\u001f\\u007f]*$"))
                .max_length(Some(16 * 1024)),
        )
        .max_items(Some(MAX_SSH_KEYS))
        .description(Some("OpenSSH public keys for the default user (one line each)."))
        .build()
}

/// Direct kernel boot.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    /// Absolute path of the kernel on the host.
    #[cfg_attr(
        feature = "schema",
        schema(
            pattern = "^(?!.*/\\.\\.(/|$))/[^\\u0000-\\u001f\\u007f]*$",
            max_length = 4096
        )
    )]
    pub kernel: String,
    /// Absolute path of the initrd on the host.
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schema(
            pattern = "^(?!.*/\\.\\.(/|$))/[^\\u0000-\\u001f\\u007f]*$",
            max_length = 4096
        )
    )]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schema(pattern = "^[^\\u0000-\\u001f\\u007f]*$", max_length = 2048)
    )]
    pub cmdline: String,
}

/// Machine type.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// Q35 with PCIe (the default).
    #[default]
    Q35,
    /// i440FX with PCI, for old guests.
    Pc,
}

impl Machine {
    /// The libvirt machine name.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

/// The power state a VM should be in.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    /// Running.
    #[default]
    Running,
    /// Paused in memory.
    Paused,
    /// Defined but shut off.
    Stopped,
}

/// One VM a host should have, as the server sends it.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DesiredVm {
    /// The VM's id; its libvirt domain UUID.
    pub id: VmId,
    /// The operation that last changed this VM's desired state.
    pub op_id: OpId,
    /// The spec.
    pub spec: VmSpec,
    /// The power state it should be in.
    pub power: Power,
    /// Its placement epoch: raised each time the HA controller restarts it
    /// on another host. An agent never starts a copy of a lower epoch than
    /// one it has seen for the VM.
    #[serde(default)]
    pub epoch: u64,
}

/// One problem with a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as a path (`disks[1].size_mib`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError(pub Vec<FieldError>);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid VM spec: ")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Checks a name: 1..=`max` of `a-z 0-9 -`, starting with a letter or
/// digit, not ending with `-`.
pub fn check_name(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!("is {} characters long; the limit is {max}", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "contains {c:?}; use only lowercase letters, digits and '-'"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must not start or end with '-'".into());
    }
    Ok(())
}

/// Checks a MAC: six hex pairs, unicast, not all zero.
pub fn check_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address like 52:54:00:12:34:56");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (slot, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *slot = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!(
            "{s} is a multicast address; the first octet must be even"
        ));
    }
    if mac == [0; 6] {
        return Err("the all-zero MAC is not allowed".into());
    }
    Ok(mac)
}

/// Checks a path: absolute, at most 4096 bytes, no control characters,
/// no `..`.
pub fn check_path(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err(format!("{s:?} must be an absolute path"));
    }
    if s.len() > 4096 {
        return Err("path is longer than 4096 bytes".into());
    }
    if s.chars().any(char::is_control) {
        return Err("path contains control characters".into());
    }
    if s.split('/').any(|c| c == "..") {
        return Err(format!("{s:?} must not contain '..'"));
    }
    Ok(())
}

fn check_ifname(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err("must be 1-64 characters".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("contains {c:?}; use letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn check_ssh_key(s: &str) -> Result<(), String> {
    if s.len() > 16 * 1024 {
        return Err("longer than 16 KiB".into());
    }
    if s.chars().any(char::is_control) {
        return Err("must be one line without control characters".into());
    }
    let kind = s.split_whitespace().next().unwrap_or("");
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    if !known || s.split_whitespace().count() < 2 {
        return Err("is not an OpenSSH public key (expected e.g. \"ssh-ed25519 AAAA... comment\")".into());
    }
    Ok(())
}

/// Checks a libvirt URI another host's libvirtd may be pointed at
/// (`scheme://rest`, scheme of letters, digits and `+`; at most 256 bytes;
/// no whitespace or control characters).
pub fn check_libvirt_uri(u: &str) -> Result<(), String> {
    let scheme_ok = u.split_once("://").is_some_and(|(s, rest)| {
        !s.is_empty() && !rest.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '+')
    });
    if !scheme_ok || u.len() > 256 || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{u:?} is not a libvirt URI like qemu+tls://host/system"));
    }
    Ok(())
}

/// Most labels per host.
pub const MAX_HOST_LABELS: usize = 64;

/// Checks one label (of a VM or a host): key charset and length, value
/// length and no control characters.
pub fn check_label(k: &str, v: &str) -> Result<(), String> {
    check_label_key(k)?;
    if v.len() > 255 || v.chars().any(char::is_control) {
        return Err("values must be at most 255 bytes without control characters".into());
    }
    Ok(())
}

fn check_label_key(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err("label keys must be 1-63 characters".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(format!(
            "label key contains {c:?}; use lowercase letters, digits, '-', '_', '.' and '/'"
        ));
    }
    Ok(())
}

impl VmSpec {
    /// A minimal spec (for tests and examples): no disks, no NICs.
    pub fn minimal(name: &str, vcpus: u32, memory_mib: u64) -> Self {
        Self {
            name: name.into(),
            vcpus,
            memory_mib,
            disks: Vec::new(),
            nics: Vec::new(),
            cloud_init: None,
            boot: None,
            machine: Machine::default(),
            ha: false,
            labels: BTreeMap::new(),
            ephemeral: false,
            ha_priority: 0,
        }
    }

    /// Checks every field; reports all problems at once.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut e = Errors(Vec::new());
        if let Err(m) = check_name(&self.name, MAX_NAME_LEN) {
            e.add("name", m);
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            e.add("vcpus", format!("{} is outside 1..={MAX_VCPUS}", self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            e.add(
                "memory_mib",
                format!(
                    "{} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            );
        }
        if self.disks.len() > MAX_DISKS {
            e.add(
                "disks",
                format!("{} disks; the limit is {MAX_DISKS}", self.disks.len()),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let f = |k: &str| format!("disks[{i}].{k}");
            if let Err(m) = check_name(&d.name, 32) {
                e.add(f("name"), m);
            } else if d.name == "cidata" {
                e.add(f("name"), "\"cidata\" is reserved for the cloud-init seed disk");
            } else if !names.insert(d.name.as_str()) {
                e.add(f("name"), format!("{:?} is used by two disks", d.name));
            }
            match (d.size_mib, &d.template) {
                (None, None) => e.add(f("size_mib"), "a blank disk needs a size"),
                (Some(s), _) if s == 0 || s > MAX_DISK_MIB => {
                    e.add(f("size_mib"), format!("{s} is outside 1..={MAX_DISK_MIB} MiB"))
                }
                _ => {}
            }
            if let Some(t) = &d.template {
                if let Err(m) = check_template_name(t) {
                    e.add(f("template"), m);
                }
            }
        }
        if self.nics.len() > MAX_NICS {
            e.add(
                "nics",
                format!("{} NICs; the limit is {MAX_NICS}", self.nics.len()),
            );
        }
        for (i, n) in self.nics.iter().enumerate() {
            let (k, v) = match &n.attach {
                NicAttach::Network(v) => ("network", v),
                NicAttach::Bridge(v) => ("bridge", v),
            };
            if let Err(m) = check_ifname(v) {
                e.add(format!("nics[{i}].attach.{k}"), m);
            }
            if let Some(mac) = &n.mac {
                if let Err(m) = check_mac(mac) {
                    e.add(format!("nics[{i}].mac"), m);
                }
            }
        }
        if let Some(ci) = &self.cloud_init {
            if let Some(u) = &ci.user_data {
                if u.len() > MAX_USER_DATA {
                    e.add(
                        "cloud_init.user_data",
                        format!("{} bytes; the limit is {MAX_USER_DATA}", u.len()),
                    );
                }
                if u.contains('\0') {
                    e.add("cloud_init.user_data", "must not contain NUL bytes");
                }
            }
            if ci.ssh_authorized_keys.len() > MAX_SSH_KEYS {
                e.add(
                    "cloud_init.ssh_authorized_keys",
                    format!("the limit is {MAX_SSH_KEYS} keys"),
                );
            }
            for (i, k) in ci.ssh_authorized_keys.iter().enumerate() {
                if let Err(m) = check_ssh_key(k) {
                    e.add(format!("cloud_init.ssh_authorized_keys[{i}]"), m);
                }
            }
        }
        if let Some(b) = &self.boot {
            if let Err(m) = check_path(&b.kernel) {
                e.add("boot.kernel", m);
            }
            if let Some(i) = &b.initrd {
                if let Err(m) = check_path(i) {
                    e.add("boot.initrd", m);
                }
            }
            if b.cmdline.len() > MAX_CMDLINE || b.cmdline.chars().any(char::is_control) {
                e.add(
                    "boot.cmdline",
                    format!("must be at most {MAX_CMDLINE} bytes without control characters"),
                );
            }
        }
        if self.labels.len() > MAX_LABELS {
            e.add(
                "labels",
                format!("{} labels; the limit is {MAX_LABELS}", self.labels.len()),
            );
        }
        for (k, v) in &self.labels {
            if let Err(m) = check_label(k, v) {
                e.add(format!("labels.{k}"), m);
            }
        }
        if !self.ha && self.ephemeral {
            e.add(
                "ephemeral",
                "applies to HA VMs only (set ha too, or drop ephemeral)",
            );
        }
        if !self.ha && self.ha_priority != 0 {
            e.add(
                "ha_priority",
                "applies to HA VMs only (set ha too, or drop ha_priority)",
            );
        }
        if e.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError(e.0))
        }
    }
}

/// Checks a template volume name: 1-128 of letters, digits, `-_.`, not
/// starting with `.`.
pub fn check_template_name(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 128 {
        return Err("template names are 1-128 characters".into());
    }
    if t.starts_with('.') {
        return Err("template names must not start with '.'".into());
    }
    if let Some(c) = t
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "template name contains {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The storage volume name of a VM's disk (`.` cannot occur in VM or disk
/// names, so these never collide).
pub fn volume_name(vm: &str, disk: &str) -> String {
    format!("{vm}.{disk}.qcow2")
}

/// The storage volume name of a VM's cloud-init seed.
pub fn seed_volume_name(vm: &str) -> String {
    format!("{vm}.cidata.iso")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(s: &VmSpec) -> Vec<String> {
        s.validate()
            .err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_full_spec_is_valid_and_round_trips() {
        let mut s = VmSpec::minimal("web-1", 2, 1024);
        s.disks.push(DiskSpec {
            name: "root".into(),
            size_mib: Some(10240),
            template: Some("debian-12.qcow2".into()),
        });
        s.nics.push(NicSpec {
            attach: NicAttach::Network("default".into()),
            mac: Some("52:54:00:aa:bb:cc".into()),
        });
        s.cloud_init = Some(CloudInit {
            user_data: Some("#cloud-config\npackages: [nginx]\n".into()),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza me@laptop".into()],
        });
        s.labels.insert("tier".into(), "web".into());
        assert_eq!(s.validate(), Ok(()));
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert!(json.contains(r#""attach":{"network":"default"}"#), "{json}");
        let back: VmSpec = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, s);
        let bin = crate::codec::encode(&s).unwrap_or_default();
        let back: VmSpec = crate::codec::decode(&bin).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, s);
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for bad in [
            "",
            "Web",
            "a_b",
            "-a",
            "a-",
            "a.b",
            "<x>",
            "a'b",
            "a\"b&",
            &"x".repeat(64),
        ] {
            let s = VmSpec::minimal(bad, 1, 128);
            let e = s.validate().unwrap_err();
            assert_eq!(e.0[0].field, "name", "{bad:?}");
        }
        let e = VmSpec::minimal("a<b>", 1, 128).validate().unwrap_err();
        assert!(e.to_string().contains("contains '<'"), "{e}");
        assert!(VmSpec::minimal(&"x".repeat(63), 1, 128).validate().is_ok());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut s = VmSpec::minimal("ok", 0, 1 << 40);
        s.disks.push(DiskSpec {
            name: "root".into(),
            size_mib: None,
            template: None,
        });
        s.disks.push(DiskSpec {
            name: "root".into(),
            size_mib: Some(u64::MAX),
            template: None,
        });
        s.nics.push(NicSpec {
            attach: NicAttach::Bridge("br0; rm".into()),
            mac: Some("01:00:5e:00:00:01".into()),
        });
        s.boot = Some(KernelBoot {
            kernel: "vmlinuz".into(),
            initrd: Some("/boot/../etc/shadow".into()),
            cmdline: "console=ttyS0\n".into(),
        });
        s.cloud_init = Some(CloudInit {
            user_data: Some("x".repeat(MAX_USER_DATA + 1)),
            ssh_authorized_keys: vec!["not a key".into()],
        });
        s.labels.insert("Bad Key".into(), "v".into());
        assert_eq!(
            fields(&s),
            [
                "vcpus",
                "memory_mib",
                "disks[0].size_mib",
                "disks[1].name",
                "disks[1].size_mib",
                "nics[0].attach.bridge",
                "nics[0].mac",
                "cloud_init.user_data",
                "cloud_init.ssh_authorized_keys[0]",
                "boot.kernel",
                "boot.initrd",
                "boot.cmdline",
                "labels.Bad Key",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<VmSpec>(r#"{"name":"a","vcpus":1,"memory_mib":128,"cpus":2}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `cpus`"), "{e}");
    }

    #[test]
    fn volume_names_cannot_collide() {
        // "a-b" + "c" and "a" + "b-c" would collide with a '-' separator.
        assert_ne!(volume_name("a-b", "c"), volume_name("a", "b-c"));
        assert_eq!(volume_name("web", "root"), "web.root.qcow2");
    }
}
