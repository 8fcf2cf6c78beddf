//! The server's durable state in redb: hosts, join tokens, revocations, API
//! tokens and each host's desired VMs.
//!
//! Every value is stored as `[record version: u8][codec payload]`; a reader
//! that meets an older version migrates it (see [`Record::decode`]), and one
//! that meets a newer version refuses it rather than misreading it.

use std::path::Path;
use std::sync::Arc;

use novacron_shared::codec;
use novacron_shared::ids::{HostId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::protocol::Capacity;
use novacron_shared::spec::DesiredVm;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod journal;
pub use journal::{
    token_id, ApiTokenInfo, AuditRecord, ClaimRefusal, MigrationClaim, OperationKind, OperationRecord,
    OperationState, Progress, TokenDeleteRefusal,
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HOSTS: TableDefinition<u128, &[u8]> = TableDefinition::new("hosts");
const JOIN_TOKENS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("join_tokens");
const REVOKED: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_serials");
const API_TOKENS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("api_tokens");
const VMS: TableDefinition<u128, &[u8]> = TableDefinition::new("vms");
const VM_NAMES: TableDefinition<&str, u128> = TableDefinition::new("vm_names");
const HOST_VMS: TableDefinition<(u128, u128), ()> = TableDefinition::new("host_vms");
const HOST_GENERATION: TableDefinition<u128, u64> = TableDefinition::new("host_generation");
const CORDONS: TableDefinition<u128, u64> = TableDefinition::new("cordons");

/// The layout version of the database as a whole.
pub const SCHEMA_VERSION: u32 = 1;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening the database file failed.
    #[error("cannot open the database at {path}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// redb failed.
    #[error("database operation failed")]
    Db(#[from] redb::Error),
    /// A stored value did not decode.
    #[error("stored {table} record is corrupt")]
    Corrupt {
        /// Which table.
        table: &'static str,
        /// Why.
        #[source]
        source: codec::CodecError,
    },
    /// A stored value is of a newer version than this build understands.
    #[error(
        "stored {table} record has version {found}, newer than this build ({known}); upgrade the server"
    )]
    TooNew {
        /// Which table.
        table: &'static str,
        /// Version found.
        found: u8,
        /// Newest version known.
        known: u8,
    },
    /// The database was written by a newer server.
    #[error("database schema {found} is newer than this build ({SCHEMA_VERSION}); upgrade the server")]
    SchemaTooNew {
        /// Version found.
        found: u32,
    },
    /// Encoding a value failed.
    #[error("encoding a record failed")]
    Encode(#[source] codec::CodecError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A value with a version marker.
pub trait Record: Serialize + DeserializeOwned {
    /// The table name, for errors.
    const TABLE: &'static str;
    /// The current encoding version.
    const VERSION: u8;

    /// Encodes with the version marker.
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = vec![Self::VERSION];
        codec::encode_into(self, &mut out).map_err(StoreError::Encode)?;
        Ok(out)
    }

    /// Decodes an older version's body; records that never changed have none.
    fn decode_old(_version: u8, body: &[u8]) -> Result<Self, StoreError> {
        codec::decode(body).map_err(|source| StoreError::Corrupt {
            table: Self::TABLE,
            source,
        })
    }

    /// Decodes, migrating older versions.
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let (&v, body) = bytes.split_first().ok_or(StoreError::Corrupt {
            table: Self::TABLE,
            source: codec::CodecError::TrailingBytes(0),
        })?;
        if v > Self::VERSION {
            return Err(StoreError::TooNew {
                table: Self::TABLE,
                found: v,
                known: Self::VERSION,
            });
        }
        if v < Self::VERSION {
            return Self::decode_old(v, body);
        }
        codec::decode(body).map_err(|source| StoreError::Corrupt {
            table: Self::TABLE,
            source,
        })
    }
}

/// Where a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    /// Joined, never connected yet.
    Enrolled,
    /// A session is open.
    Online,
    /// No session.
    Offline,
    /// Its certificates are refused.
    Revoked,
}

/// One host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its id (also in its certificate).
    pub id: HostId,
    /// Its name, as the host reported it.
    pub name: String,
    /// Addresses it connected from, most recent first.
    pub addresses: Vec<String>,
    /// What it offers.
    pub capacity: Capacity,
    /// The agent build it runs.
    pub agent_version: String,
    /// Enrollment time, Unix ms.
    pub first_seen_ms: u64,
    /// Last heartbeat or connection, Unix ms.
    pub last_seen_ms: u64,
    /// Where it stands.
    pub state: HostState,
    /// Serial of the newest certificate issued to it (hex).
    pub cert_serial: String,
    /// Expiry of that certificate, Unix seconds.
    pub cert_not_after: i64,
}

impl Record for HostRecord {
    const TABLE: &'static str = "hosts";
    /// 2: capacity gained storage figures.
    const VERSION: u8 = 2;

    fn decode_old(version: u8, body: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |source| StoreError::Corrupt {
            table: Self::TABLE,
            source,
        };
        match version {
            1 => {
                let v1: HostRecordV1 = codec::decode(body).map_err(corrupt)?;
                Ok(HostRecord {
                    id: v1.id,
                    name: v1.name,
                    addresses: v1.addresses,
                    capacity: Capacity {
                        cpus: v1.capacity.0,
                        memory_mib: v1.capacity.1,
                        ..Capacity::default()
                    },
                    agent_version: v1.agent_version,
                    first_seen_ms: v1.first_seen_ms,
                    last_seen_ms: v1.last_seen_ms,
                    state: v1.state,
                    cert_serial: v1.cert_serial,
                    cert_not_after: v1.cert_not_after,
                })
            }
            _ => codec::decode(body).map_err(corrupt),
        }
    }
}

/// [`HostRecord`] as version 1 stored it (capacity was CPUs and MiB only).
#[derive(Deserialize)]
struct HostRecordV1 {
    id: HostId,
    name: String,
    addresses: Vec<String>,
    capacity: (u32, u64),
    agent_version: String,
    first_seen_ms: u64,
    last_seen_ms: u64,
    state: HostState,
    cert_serial: String,
    cert_not_after: i64,
}

fn bump_generation(tx: &redb::WriteTransaction, host: HostId) -> Result<(), StoreError> {
    let mut t = tx.open_table(HOST_GENERATION)?;
    let g = t.get(host.0)?.map_or(0, |g| g.value());
    t.insert(host.0, g + 1)?;
    Ok(())
}

fn put_vm(tx: &redb::WriteTransaction, v: &VmRecord) -> Result<Result<(), NameTaken>, StoreError> {
    let mut names = tx.open_table(VM_NAMES)?;
    let mut vms = tx.open_table(VMS)?;
    if let Some(other) = names.get(v.vm.spec.name.as_str())?.map(|x| x.value()) {
        if other != v.vm.id.0 {
            return Ok(Err(NameTaken(v.vm.spec.name.clone())));
        }
    }
    if let Some(old) = vms
        .get(v.vm.id.0)?
        .map(|x| VmRecord::decode(x.value()))
        .transpose()?
    {
        if old.vm.spec.name != v.vm.spec.name {
            names.remove(old.vm.spec.name.as_str())?;
        }
    }
    names.insert(v.vm.spec.name.as_str(), v.vm.id.0)?;
    vms.insert(v.vm.id.0, v.encode()?.as_slice())?;
    if let Some(h) = v.host() {
        tx.open_table(HOST_VMS)?.insert((h.0, v.vm.id.0), ())?;
    }
    Ok(Ok(()))
}

fn remove_vm(tx: &redb::WriteTransaction, id: u128) -> Result<Option<VmRecord>, StoreError> {
    let old = tx
        .open_table(VMS)?
        .remove(id)?
        .map(|x| VmRecord::decode(x.value()))
        .transpose()?;
    if let Some(o) = &old {
        tx.open_table(VM_NAMES)?.remove(o.vm.spec.name.as_str())?;
        if let Some(h) = o.host() {
            tx.open_table(HOST_VMS)?.remove((h.0, id))?;
        }
    }
    Ok(old)
}

fn token_usable(rec: Option<&JoinTokenRecord>, now_ms: u64) -> Result<(), TokenRefusal> {
    match rec {
        None => Err(TokenRefusal::Unknown),
        Some(r) if r.used_by.is_some() => Err(TokenRefusal::Used),
        Some(r) if now_ms >= r.expires_ms => Err(TokenRefusal::Expired),
        Some(_) => Ok(()),
    }
}

/// The VMs one host should run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRecord {
    /// Increases with every change.
    pub generation: u64,
    /// The VMs.
    pub vms: Vec<DesiredVm>,
    /// VMs in a live migration from or to this host (left alone by its agent).
    #[serde(default)]
    pub migrating: Vec<VmId>,
}

/// One VM: what it should be and where it runs.
///
/// Only a VM placed on a host is in that host's desired state (and in the
/// host index, generations, usage index and migrations); a VM in a cloud
/// provider or pending is listed, but no agent runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM, as its host's agent gets it.
    pub vm: DesiredVm,
    /// Where it is placed.
    pub placement: Placement,
    /// The rules it was placed by (kept for later placements: groups).
    pub rules: PlacementRules,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

impl VmRecord {
    /// The host it is placed on, when it is on one.
    pub fn host(&self) -> Option<HostId> {
        self.placement.host()
    }
}

impl Record for VmRecord {
    const TABLE: &'static str = "vms";
    /// 2: `host` became `placement` (a host, a cloud provider, or pending).
    const VERSION: u8 = 2;

    fn decode_old(version: u8, body: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |source| StoreError::Corrupt {
            table: Self::TABLE,
            source,
        };
        match version {
            1 => {
                let v1: VmRecordV1 = codec::decode(body).map_err(corrupt)?;
                Ok(VmRecord {
                    vm: v1.vm,
                    placement: Placement::Host(v1.host),
                    rules: v1.rules,
                    created_ms: v1.created_ms,
                })
            }
            _ => codec::decode(body).map_err(corrupt),
        }
    }
}

/// [`VmRecord`] as version 1 stored it (every VM was on a host).
#[derive(Deserialize)]
struct VmRecordV1 {
    vm: DesiredVm,
    host: HostId,
    rules: PlacementRules,
    created_ms: u64,
}

/// Placement rules of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementRules {
    /// Put it on this host (skips the scheduler's scoring, not its filters).
    #[serde(default)]
    pub host: Option<HostId>,
    /// Labels the host must carry.
    #[serde(default)]
    pub required_labels: std::collections::BTreeMap<String, String>,
    /// Prefer hosts running VMs of this group.
    #[serde(default)]
    pub affinity: Option<String>,
    /// Never share a host with another VM of this group.
    #[serde(default)]
    pub anti_affinity: Option<String>,
}

impl PlacementRules {
    /// The group this VM belongs to, if any.
    pub fn group(&self) -> Option<&str> {
        self.anti_affinity.as_deref().or(self.affinity.as_deref())
    }
}

/// A VM name is already taken by another VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a VM named {0:?} already exists")]
pub struct NameTaken(pub String);

/// A join token (stored by hash only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Expires, Unix ms.
    pub expires_ms: u64,
    /// Which host used it, if any.
    pub used_by: Option<HostId>,
}

impl Record for JoinTokenRecord {
    const TABLE: &'static str = "join_tokens";
    const VERSION: u8 = 1;
}

/// A revoked certificate serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedRecord {
    /// The host it belonged to.
    pub host_id: HostId,
    /// When, Unix ms.
    pub revoked_ms: u64,
}

impl Record for RevokedRecord {
    const TABLE: &'static str = "revoked_serials";
    const VERSION: u8 = 1;
}

/// What an API token may do (JSON: `viewer`, `operator`, `admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Read and operate VMs.
    Operator,
    /// Everything, including tokens and hosts.
    Admin,
}

/// An API token (stored by hash only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// A name for people.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Created, Unix ms.
    pub created_ms: u64,
}

impl Record for ApiTokenRecord {
    const TABLE: &'static str = "api_tokens";
    const VERSION: u8 = 1;
}

/// Why a join token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Already used.
    Used,
}

/// The redb database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the database and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| {
                let b = v.value();
                u32::from_le_bytes([
                    b.first().copied().unwrap_or(0),
                    b.get(1).copied().unwrap_or(0),
                    b.get(2).copied().unwrap_or(0),
                    b.get(3).copied().unwrap_or(0),
                ])
            });
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(StoreError::SchemaTooNew { found: v }),
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())?;
                }
            }
            tx.open_table(HOSTS)?;
            tx.open_table(JOIN_TOKENS)?;
            tx.open_table(REVOKED)?;
            tx.open_table(API_TOKENS)?;
            tx.open_table(VMS)?;
            tx.open_table(VM_NAMES)?;
            tx.open_table(HOST_VMS)?;
            tx.open_table(HOST_GENERATION)?;
            tx.open_table(CORDONS)?;
            tx.open_table(journal::AUDIT)?;
            tx.open_table(journal::OPERATIONS)?;
            tx.open_table(journal::OPERATION_IDS)?;
            tx.open_table(journal::MIGRATIONS)?;
        }
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Adds a join token by hash.
    pub fn put_join_token(&self, hash: &[u8; 32], rec: &JoinTokenRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(JOIN_TOKENS)?
            .insert(hash, rec.encode()?.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Whether a join token can be used now (a read; [`Store::enroll`]
    /// checks again when it commits).
    pub fn check_join_token(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(JOIN_TOKENS)?;
        let rec = t
            .get(hash)?
            .map(|v| JoinTokenRecord::decode(v.value()))
            .transpose()?;
        Ok(token_usable(rec.as_ref(), now_ms))
    }

    /// Enrolls hosts: for each `(token hash, host)`, consumes the token and
    /// creates the host, all in one transaction (one fsync for a burst of
    /// joins). Each item gets its own outcome; a refused token changes
    /// nothing for that item.
    pub fn enroll(
        &self,
        items: &[([u8; 32], HostRecord)],
        now_ms: u64,
    ) -> Result<Vec<Result<(), TokenRefusal>>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut out = Vec::with_capacity(items.len());
        {
            let mut tokens = tx.open_table(JOIN_TOKENS)?;
            let mut hosts = tx.open_table(HOSTS)?;
            for (hash, host) in items {
                let rec = tokens
                    .get(hash)?
                    .map(|v| JoinTokenRecord::decode(v.value()))
                    .transpose()?;
                match (token_usable(rec.as_ref(), now_ms), rec) {
                    (Ok(()), Some(rec)) => {
                        let used = JoinTokenRecord {
                            used_by: Some(host.id),
                            ..rec
                        };
                        tokens.insert(hash, used.encode()?.as_slice())?;
                        hosts.insert(host.id.0, host.encode()?.as_slice())?;
                        out.push(Ok(()));
                    }
                    (Ok(()), None) => out.push(Err(TokenRefusal::Unknown)),
                    (Err(r), _) => out.push(Err(r)),
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Writes host records (one transaction for all of them).
    pub fn put_hosts(&self, hosts: &[HostRecord]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(HOSTS)?;
            for h in hosts {
                t.insert(h.id.0, h.encode()?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Applies `f` to each of the given hosts that exists, in one write
    /// transaction (read-modify-write; unknown ids are skipped).
    pub fn update_hosts(
        &self,
        ids: Vec<HostId>,
        mut f: impl FnMut(&mut HostRecord),
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(HOSTS)?;
            for id in ids {
                let Some(mut h) = t.get(id.0)?.map(|v| HostRecord::decode(v.value())).transpose()? else {
                    continue;
                };
                f(&mut h);
                t.insert(id.0, h.encode()?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// One host.
    pub fn host(&self, id: HostId) -> Result<Option<HostRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOSTS)?;
        t.get(id.0)?.map(|v| HostRecord::decode(v.value())).transpose()
    }

    /// A host's desired VMs (generation 0 and none if never set).
    pub fn desired(&self, id: HostId) -> Result<Option<DesiredRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let generation = tx.open_table(HOST_GENERATION)?.get(id.0)?.map(|g| g.value());
        let Some(generation) = generation else {
            return Ok(None);
        };
        let vms = tx.open_table(VMS)?;
        let mut out = Vec::new();
        for row in tx.open_table(HOST_VMS)?.range((id.0, 0)..=(id.0, u128::MAX))? {
            let (k, _) = row?;
            if let Some(v) = vms.get(k.value().1)? {
                out.push(VmRecord::decode(v.value())?.vm);
            }
        }
        let mut migrating = Vec::new();
        for row in tx.open_table(journal::MIGRATIONS)?.iter()? {
            let c = MigrationClaim::decode(row?.1.value())?;
            if c.target == id || c.source == id {
                migrating.push(c.vm);
            }
        }
        Ok(Some(DesiredRecord {
            generation,
            vms: out,
            migrating,
        }))
    }

    /// Replaces the VMs placed on `host` with `vms` (pinned there), in one
    /// transaction: VMs of the host not listed are deleted. Returns the
    /// host's new desired state.
    pub fn replace_host_vms(
        &self,
        host: HostId,
        vms: Vec<VmRecord>,
    ) -> Result<Result<DesiredRecord, NameTaken>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let keep: std::collections::HashSet<u128> = vms.iter().map(|v| v.vm.id.0).collect();
            let current: Vec<u128> = tx
                .open_table(HOST_VMS)?
                .range((host.0, 0)..=(host.0, u128::MAX))?
                .map(|r| r.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for id in current.into_iter().filter(|id| !keep.contains(id)) {
                remove_vm(&tx, id)?;
            }
            for v in vms {
                if let Err(e) = put_vm(&tx, &v)? {
                    return Ok(Err(e));
                }
            }
            bump_generation(&tx, host)?;
        }
        tx.commit()?;
        Ok(Ok(self.desired(host)?.unwrap_or_default()))
    }

    /// Adds or replaces one VM; returns its host's new desired state (none
    /// when it is not on a host). A VM that moved hosts (or off a host) is
    /// removed from the old host's state too (that host's generation is
    /// bumped as well).
    pub fn put_vm(&self, v: &VmRecord) -> Result<Result<Option<DesiredRecord>, NameTaken>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let old = tx
                .open_table(VMS)?
                .get(v.vm.id.0)?
                .map(|x| VmRecord::decode(x.value()))
                .transpose()?;
            if let Err(e) = put_vm(&tx, v)? {
                return Ok(Err(e));
            }
            if let Some(old_host) = old.and_then(|o| o.host()).filter(|h| Some(*h) != v.host()) {
                tx.open_table(HOST_VMS)?.remove((old_host.0, v.vm.id.0))?;
                bump_generation(&tx, old_host)?;
            }
            if let Some(h) = v.host() {
                bump_generation(&tx, h)?;
            }
        }
        tx.commit()?;
        match v.host() {
            Some(h) => Ok(Ok(Some(self.desired(h)?.unwrap_or_default()))),
            None => Ok(Ok(None)),
        }
    }

    /// Deletes a VM; returns its record (and so its placement) if it existed.
    pub fn delete_vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_write()?;
        let old = remove_vm(&tx, id.0)?;
        if let Some(h) = old.as_ref().and_then(VmRecord::host) {
            bump_generation(&tx, h)?;
        }
        tx.commit()?;
        Ok(old)
    }

    /// One VM.
    pub fn vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VMS)?;
        t.get(id.0)?.map(|v| VmRecord::decode(v.value())).transpose()
    }

    /// One VM, by name.
    pub fn vm_by_name(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let Some(id) = tx.open_table(VM_NAMES)?.get(name)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let t = tx.open_table(VMS)?;
        t.get(id)?.map(|v| VmRecord::decode(v.value())).transpose()
    }

    /// VMs in id order, starting after `after`, at most `limit`.
    pub fn vms(&self, after: Option<VmId>, limit: usize) -> Result<Vec<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VMS)?;
        let mut out = Vec::new();
        let iter = match after {
            Some(a) if a.0 == u128::MAX => return Ok(out),
            Some(a) => t.range(a.0 + 1..)?,
            None => t.range(0..)?,
        };
        for row in iter {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            out.push(VmRecord::decode(v.value())?);
        }
        Ok(out)
    }

    /// Cordons or uncordons a host. Returns false for an unknown host.
    pub fn set_cordon(&self, id: HostId, cordoned: bool, now_ms: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        if tx.open_table(HOSTS)?.get(id.0)?.is_none() {
            return Ok(false);
        }
        {
            let mut t = tx.open_table(CORDONS)?;
            if cordoned {
                t.insert(id.0, now_ms)?;
            } else {
                t.remove(id.0)?;
            }
        }
        tx.commit()?;
        Ok(true)
    }

    /// Cordoned hosts.
    pub fn cordons(&self) -> Result<std::collections::HashSet<HostId>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CORDONS)?;
        let mut out = std::collections::HashSet::new();
        for row in t.iter()? {
            out.insert(HostId(row?.0.value()));
        }
        Ok(out)
    }

    /// All hosts, by id.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOSTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(HostRecord::decode(v.value())?);
        }
        Ok(out)
    }

    /// Revokes a host: marks it revoked and records its current serial, in
    /// one transaction. Returns the updated record, or `None` if unknown.
    pub fn revoke_host(&self, id: HostId, now_ms: u64) -> Result<Option<HostRecord>, StoreError> {
        let tx = self.db.begin_write()?;
        let updated = {
            let mut hosts = tx.open_table(HOSTS)?;
            let Some(mut host) = hosts
                .get(id.0)?
                .map(|v| HostRecord::decode(v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            host.state = HostState::Revoked;
            hosts.insert(id.0, host.encode()?.as_slice())?;
            let rec = RevokedRecord {
                host_id: id,
                revoked_ms: now_ms,
            };
            tx.open_table(REVOKED)?
                .insert(host.cert_serial.as_str(), rec.encode()?.as_slice())?;
            host
        };
        tx.commit()?;
        Ok(Some(updated))
    }

    /// Every revoked serial.
    pub fn revoked_serials(&self) -> Result<Vec<(String, RevokedRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REVOKED)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), RevokedRecord::decode(v.value())?));
        }
        Ok(out)
    }

    /// Adds an API token by hash.
    pub fn put_api_token(&self, hash: &[u8; 32], rec: &ApiTokenRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(API_TOKENS)?
            .insert(hash, rec.encode()?.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Looks up an API token by hash.
    pub fn api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiTokenRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(API_TOKENS)?;
        t.get(hash)?
            .map(|v| ApiTokenRecord::decode(v.value()))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: u128) -> HostRecord {
        HostRecord {
            id: HostId(id),
            name: format!("h{id}"),
            addresses: vec![],
            capacity: Capacity::default(),
            agent_version: "0.1.0".into(),
            first_seen_ms: 1,
            last_seen_ms: 1,
            state: HostState::Enrolled,
            cert_serial: format!("{id:x}"),
            cert_not_after: 0,
        }
    }

    #[test]
    fn a_batch_of_joins_commits_each_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let tok = |expires_ms| JoinTokenRecord {
            created_ms: 0,
            expires_ms,
            used_by: None,
        };
        s.put_join_token(&[1; 32], &tok(100)).unwrap();
        s.put_join_token(&[2; 32], &tok(10)).unwrap();
        let out = s
            .enroll(
                &[
                    ([1; 32], host(1)),
                    ([1; 32], host(2)),
                    ([2; 32], host(3)),
                    ([3; 32], host(4)),
                ],
                50,
            )
            .unwrap();
        assert_eq!(
            out,
            [
                Ok(()),
                Err(TokenRefusal::Used),
                Err(TokenRefusal::Expired),
                Err(TokenRefusal::Unknown)
            ]
        );
        let ids: Vec<u128> = s.hosts().unwrap().iter().map(|h| h.id.0).collect();
        assert_eq!(ids, [1], "only the accepted join created a host");
        assert_eq!(s.check_join_token(&[1; 32], 50).unwrap(), Err(TokenRefusal::Used));
    }

    #[test]
    fn a_version_1_host_record_still_decodes() {
        // The exact field order version 1 wrote, capacity as (cpus, MiB).
        #[derive(Serialize)]
        struct V1<'a>(
            HostId,
            &'a str,
            Vec<String>,
            (u32, u64),
            &'a str,
            u64,
            u64,
            HostState,
            &'a str,
            i64,
        );
        let old = V1(
            HostId(9),
            "h9",
            vec!["10.0.0.9:1".into()],
            (8, 4096),
            "0.1.0",
            1,
            2,
            HostState::Online,
            "ab",
            77,
        );
        let mut bytes = vec![1u8];
        codec::encode_into(&old, &mut bytes).unwrap();
        let r = HostRecord::decode(&bytes).unwrap();
        assert_eq!(r.name, "h9");
        assert_eq!(
            (r.capacity.cpus, r.capacity.memory_mib, r.capacity.storage_mib),
            (8, 4096, 0)
        );
        assert_eq!((r.state, r.cert_not_after), (HostState::Online, 77));
        // And the current version round-trips.
        assert_eq!(HostRecord::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn join_token_is_single_use_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let h = [7u8; 32];
        {
            let s = Store::open(&path).unwrap();
            s.put_join_token(
                &h,
                &JoinTokenRecord {
                    created_ms: 0,
                    expires_ms: 100,
                    used_by: None,
                },
            )
            .unwrap();
            assert_eq!(s.check_join_token(&h, 50).unwrap(), Ok(()));
            let r = s.enroll(&[(h, host(1))], 50).unwrap();
            assert_eq!(r, [Ok(())]);
            let again = s.enroll(&[(h, host(2))], 50).unwrap();
            assert_eq!(again, [Err(TokenRefusal::Used)]);
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.hosts().unwrap().len(), 1);
        assert!(s.host(HostId(2)).unwrap().is_none());
    }

    #[test]
    fn expired_and_unknown_tokens_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let h = [1u8; 32];
        s.put_join_token(
            &h,
            &JoinTokenRecord {
                created_ms: 0,
                expires_ms: 100,
                used_by: None,
            },
        )
        .unwrap();
        assert_eq!(
            s.check_join_token(&[2u8; 32], 0).unwrap(),
            Err(TokenRefusal::Unknown)
        );
        let r = s.enroll(&[([2u8; 32], host(1))], 0).unwrap();
        assert_eq!(r, [Err(TokenRefusal::Unknown)]);
        assert_eq!(s.check_join_token(&h, 100).unwrap(), Err(TokenRefusal::Expired));
        let r = s.enroll(&[(h, host(1))], 100).unwrap();
        assert_eq!(r, [Err(TokenRefusal::Expired)]);
        assert!(s.hosts().unwrap().is_empty());
        // Before expiry the same token still works: nothing above used it.
        assert_eq!(s.check_join_token(&h, 10).unwrap(), Ok(()));
    }

    #[test]
    fn revoke_marks_host_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        s.put_hosts(&[host(5)]).unwrap();
        let h = s.revoke_host(HostId(5), 9).unwrap();
        assert_eq!(h.map(|h| h.state), Some(HostState::Revoked));
        let serials = s.revoked_serials().unwrap();
        assert_eq!(serials.len(), 1);
        assert_eq!(serials[0].0, "5");
        assert!(s.revoke_host(HostId(6), 9).unwrap().is_none());
    }

    #[test]
    fn newer_record_version_is_refused() {
        let mut bytes = host(1).encode().unwrap();
        bytes[0] = 9;
        assert!(matches!(
            HostRecord::decode(&bytes),
            Err(StoreError::TooNew { found: 9, .. })
        ));
    }

    fn vm(id: u128, placement: Placement) -> VmRecord {
        VmRecord {
            vm: DesiredVm {
                id: VmId(id),
                op_id: novacron_shared::ids::OpId(id),
                spec: novacron_shared::spec::VmSpec::minimal(&format!("v{id}"), 1, 64),
                power: novacron_shared::spec::Power::Running,
            },
            placement,
            rules: PlacementRules::default(),
            created_ms: 5,
        }
    }

    #[test]
    fn a_version_1_vm_record_decodes_as_placed_on_its_host() {
        // Version 1's exact layout: the VM, then its host id.
        #[derive(Serialize)]
        struct V1<'a>(&'a DesiredVm, HostId, &'a PlacementRules, u64);
        let current = vm(3, Placement::Host(HostId(42)));
        let rules = PlacementRules {
            anti_affinity: Some("web".into()),
            ..PlacementRules::default()
        };
        let mut bytes = vec![1u8];
        codec::encode_into(&V1(&current.vm, HostId(42), &rules, 77), &mut bytes).unwrap();
        let r = VmRecord::decode(&bytes).unwrap();
        assert_eq!(r.placement, Placement::Host(HostId(42)));
        assert_eq!(r.vm, current.vm);
        assert_eq!(r.rules, rules);
        assert_eq!(r.created_ms, 77);
        // Rewritten, it is version 2 and round-trips.
        let again = r.encode().unwrap();
        assert_eq!(again[0], 2);
        assert_eq!(VmRecord::decode(&again).unwrap(), r);
    }

    #[test]
    fn a_version_1_vm_record_in_the_database_is_found_on_its_host() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        s.put_vm(&vm(1, Placement::Host(HostId(7)))).unwrap().unwrap();
        // Overwrite the stored value with version 1's bytes for the same VM.
        #[derive(Serialize)]
        struct V1<'a>(&'a DesiredVm, HostId, &'a PlacementRules, u64);
        let v = vm(1, Placement::Host(HostId(7)));
        let mut bytes = vec![1u8];
        codec::encode_into(&V1(&v.vm, HostId(7), &v.rules, 5), &mut bytes).unwrap();
        {
            let tx = s.db.begin_write().unwrap();
            tx.open_table(VMS).unwrap().insert(1, bytes.as_slice()).unwrap();
            tx.commit().unwrap();
        }
        assert_eq!(s.vm(VmId(1)).unwrap().unwrap(), v);
        let d = s.desired(HostId(7)).unwrap().unwrap();
        assert_eq!(d.vms, vec![v.vm]);
    }

    #[test]
    fn cloud_and_pending_vms_are_listed_but_on_no_host() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let on_host = s.put_vm(&vm(1, Placement::Host(HostId(7)))).unwrap().unwrap();
        assert_eq!(on_host.map(|d| d.vms.len()), Some(1));
        let g = s.desired(HostId(7)).unwrap().unwrap().generation;
        let cloud = Placement::Cloud {
            provider: "aws".into(),
            instance: "i-1".into(),
        };
        assert_eq!(s.put_vm(&vm(2, cloud.clone())).unwrap().unwrap(), None);
        let pending = Placement::Pending {
            reason: "no host fits".into(),
        };
        assert_eq!(s.put_vm(&vm(3, pending)).unwrap().unwrap(), None);
        let d = s.desired(HostId(7)).unwrap().unwrap();
        assert_eq!(d.generation, g, "a VM on no host changes no host's generation");
        assert_eq!(d.vms.iter().map(|v| v.id).collect::<Vec<_>>(), [VmId(1)]);
        assert_eq!(s.vms(None, 10).unwrap().len(), 3);
        assert_eq!(s.vm(VmId(2)).unwrap().unwrap().placement, cloud);
        // Moving the host's VM to the cloud takes it off the host.
        let d = s.put_vm(&vm(1, cloud)).unwrap().unwrap();
        assert_eq!(d, None);
        let d = s.desired(HostId(7)).unwrap().unwrap();
        assert!(d.vms.is_empty());
        assert!(d.generation > g);
        // Deleting a cloud VM touches no host.
        let g = d.generation;
        assert!(s.delete_vm(VmId(2)).unwrap().is_some());
        assert_eq!(s.desired(HostId(7)).unwrap().unwrap().generation, g);
        assert!(s.vm_by_name("v2").unwrap().is_none());
    }
}
