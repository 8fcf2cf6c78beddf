//! The server's durable state in redb: hosts, join tokens, revocations and
//! API tokens here; VMs and each host's desired state in `vms`; the audit
//! log, operations and migration claims in `journal`; lease terms, HA host
//! flags, departed VMs and restart history in `ha`.
//!
//! Every value is stored as `[record version: u8][codec payload]`; a reader
//! that meets an older version migrates it (see [`Record::decode`]), and one
//! that meets a newer version refuses it rather than misreading it.

use std::path::Path;
use std::sync::Arc;

use novacron_shared::codec;
use novacron_shared::ids::HostId;
use novacron_shared::protocol::Capacity;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod burst;
mod ha;
mod journal;
mod vms;
pub use burst::{CloudInstance, CloudRecord, CloudRefusal, CloudState, Repatriation, Spend};
pub use ha::{
    DepartedRecord, HaHostRecord, HaTermsRecord, HaVmRecord, LastRestart, RestartCommit, RestartRefusal,
    Restarted, ReturnRefusal,
};
pub use journal::{
    token_id, ApiTokenInfo, AuditRecord, ClaimRefusal, MigrationClaim, OperationKind, OperationRecord,
    OperationState, Progress, TokenDeleteRefusal,
};
pub use vms::{DesiredRecord, NameTaken, PlacementRules, VmRecord};

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
        codec::decode(body).map_err(Self::corrupt)
    }

    /// A body of this table that does not decode.
    fn corrupt(source: codec::CodecError) -> StoreError {
        StoreError::Corrupt {
            table: Self::TABLE,
            source,
        }
    }

    /// Decodes, migrating older versions.
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let (&v, body) = bytes
            .split_first()
            .ok_or(Self::corrupt(codec::CodecError::TrailingBytes(0)))?;
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
        codec::decode(body).map_err(Self::corrupt)
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
        match version {
            1 => {
                let v1: HostRecordV1 = codec::decode(body).map_err(Self::corrupt)?;
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
            _ => codec::decode(body).map_err(Self::corrupt),
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

fn token_usable(rec: Option<&JoinTokenRecord>, now_ms: u64) -> Result<(), TokenRefusal> {
    match rec {
        None => Err(TokenRefusal::Unknown),
        Some(r) if r.used_by.is_some() => Err(TokenRefusal::Used),
        Some(r) if now_ms >= r.expires_ms => Err(TokenRefusal::Expired),
        Some(_) => Ok(()),
    }
}

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
            tx.open_table(ha::HA_HOSTS)?;
            tx.open_table(ha::DEPARTED)?;
            tx.open_table(ha::HA_VMS)?;
            tx.open_table(burst::CLOUD_VMS)?;
            tx.open_table(burst::BURST_SPEND)?;
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
}
