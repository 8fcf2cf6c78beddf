//! The store's journals and claims: the audit log, long-running
//! operations, live-migration claims and API token management.

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::placement::Placement;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{bump_generation, ApiTokenRecord, Record, Role, Store, StoreError, VmRecord, HOST_VMS, VMS};

pub(super) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
pub(super) const OPERATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("operations");
pub(super) const OPERATION_IDS: TableDefinition<u128, u64> = TableDefinition::new("operation_ids");
pub(super) const MIGRATIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("migrations");

/// One audited API request: who, what, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log (assigned by the store).
    pub seq: u64,
    /// When the request arrived, Unix ms.
    pub at_ms: u64,
    /// The token's name.
    pub actor: String,
    /// The token's id.
    pub token_id: String,
    /// The token's role.
    pub role: Role,
    /// The client address.
    pub remote: String,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// The HTTP status answered; absent while the request runs (or if the
    /// server stopped before answering).
    pub status: Option<u16>,
    /// `ok`, or the error code and message.
    pub outcome: String,
}

impl Record for AuditRecord {
    const TABLE: &'static str = "audit";
    const VERSION: u8 = 1;
}

/// What kind of long-running operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// Live-migrate one VM.
    Migrate,
    /// Cordon a host and live-migrate every VM off it.
    Drain,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Accepted, not started.
    Pending,
    /// Under way.
    Running,
    /// Finished as asked.
    Succeeded,
    /// Finished without doing what was asked; `error` says why.
    Failed,
}

impl OperationState {
    /// Whether the operation has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// How far an operation got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// 0 to 100.
    pub percent: u8,
    /// What it is doing, for people.
    pub message: String,
}

/// A long-running operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRecord {
    /// Its id.
    pub id: OpId,
    /// What it does.
    pub kind: OperationKind,
    /// The VM it moves (migrate).
    pub vm: Option<VmId>,
    /// The host it works on: the migration's source, the drained host.
    pub host: Option<HostId>,
    /// The migration's target.
    pub target: Option<HostId>,
    /// Where it stands.
    pub state: OperationState,
    /// How far it got.
    pub progress: Progress,
    /// Why it failed.
    pub error: Option<String>,
    /// The token name that asked for it.
    pub actor: String,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
}

impl Record for OperationRecord {
    const TABLE: &'static str = "operations";
    const VERSION: u8 = 1;
}

/// A live migration under way: the target's capacity is claimed for the
/// VM and the target's agent is told to leave the arriving domain alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationClaim {
    /// The VM.
    pub vm: VmId,
    /// Where it runs now.
    pub source: HostId,
    /// Where it goes.
    pub target: HostId,
    /// The migrate operation.
    pub op: OpId,
    /// When it started, Unix ms.
    pub started_ms: u64,
}

impl Record for MigrationClaim {
    const TABLE: &'static str = "migrations";
    const VERSION: u8 = 1;
}

/// Why a migration could not be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimRefusal {
    /// No such VM.
    #[error("no VM with id {0}")]
    NoVm(VmId),
    /// The VM moved or is already moving.
    #[error("VM {0} is already being migrated")]
    Busy(VmId),
    /// The VM is not on any host of the fleet (in a cloud, or pending).
    #[error("VM {0} is not on a host of the fleet")]
    NotOnAHost(VmId),
    /// The VM is not on the expected source any more.
    #[error("VM {vm} is on host {actual}, not {expected}")]
    Moved {
        /// The VM.
        vm: VmId,
        /// Where the caller thought it was.
        expected: HostId,
        /// Where it is.
        actual: HostId,
    },
}

/// The id under which an API token is listed: the first 8 bytes of its hash.
pub fn token_id(hash: &[u8; 32]) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// An API token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiTokenInfo {
    /// Its id.
    pub id: String,
    /// Its record.
    #[serde(flatten)]
    pub record: ApiTokenRecord,
}

/// Why a token could not be deleted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenDeleteRefusal {
    /// No such token.
    #[error("no API token with id {0}")]
    Unknown(String),
    /// It is the last admin token.
    #[error("token {0} is the last admin token; create another admin token first")]
    LastAdmin(String),
}

fn next_seq<K>(t: &K) -> Result<u64, StoreError>
where
    K: ReadableTable<u64, &'static [u8]>,
{
    Ok(t.last()?.map_or(1, |(k, _)| k.value() + 1))
}

impl Store {
    /// Appends an audit entry (durably) and returns its sequence number.
    pub fn append_audit(&self, rec: &AuditRecord) -> Result<u64, StoreError> {
        let tx = self.db.begin_write()?;
        let seq;
        {
            let mut t = tx.open_table(AUDIT)?;
            seq = next_seq(&t)?;
            let mut rec = rec.clone();
            rec.seq = seq;
            t.insert(seq, rec.encode()?.as_slice())?;
        }
        tx.commit()?;
        Ok(seq)
    }

    /// Records how an audited request ended.
    pub fn finish_audit(&self, seq: u64, status: u16, outcome: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(AUDIT)?;
            let rec = t.get(seq)?.map(|v| AuditRecord::decode(v.value())).transpose()?;
            if let Some(mut rec) = rec {
                rec.status = Some(status);
                rec.outcome = outcome.to_string();
                t.insert(seq, rec.encode()?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Audit entries, newest first, older than `before`, at most `limit`.
    pub fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in t.range(..before.unwrap_or(u64::MAX))?.rev() {
            if out.len() >= limit {
                break;
            }
            out.push(AuditRecord::decode(row?.1.value())?);
        }
        Ok(out)
    }

    /// Stores a new operation or a change to one.
    pub fn put_operation(&self, op: &OperationRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut ids = tx.open_table(OPERATION_IDS)?;
            let mut t = tx.open_table(OPERATIONS)?;
            let existing = ids.get(op.id.0)?.map(|v| v.value());
            let seq = match existing {
                Some(s) => s,
                None => {
                    let s = next_seq(&t)?;
                    ids.insert(op.id.0, s)?;
                    s
                }
            };
            t.insert(seq, op.encode()?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// One operation.
    pub fn operation(&self, id: OpId) -> Result<Option<OperationRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let Some(seq) = tx.open_table(OPERATION_IDS)?.get(id.0)?.map(|v| v.value()) else {
            return Ok(None);
        };
        tx.open_table(OPERATIONS)?
            .get(seq)?
            .map(|v| OperationRecord::decode(v.value()))
            .transpose()
    }

    /// Operations, newest first, older than the one with id `before`.
    pub fn operations(&self, before: Option<OpId>, limit: usize) -> Result<Vec<OperationRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let end = match before {
            Some(id) => match tx.open_table(OPERATION_IDS)?.get(id.0)? {
                Some(s) => s.value(),
                None => return Ok(Vec::new()),
            },
            None => u64::MAX,
        };
        let t = tx.open_table(OPERATIONS)?;
        let mut out = Vec::new();
        for row in t.range(..end)?.rev() {
            if out.len() >= limit {
                break;
            }
            out.push(OperationRecord::decode(row?.1.value())?);
        }
        Ok(out)
    }

    /// Operations that have not ended (to resume or fail them at start-up).
    pub fn unfinished_operations(&self) -> Result<Vec<OperationRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OPERATIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let op = OperationRecord::decode(row?.1.value())?;
            if !op.state.is_final() {
                out.push(op);
            }
        }
        Ok(out)
    }

    /// Claims a migration of `vm` from `source` to `target`: in one
    /// transaction, checks the VM is still on `source` and not moving,
    /// records the claim and bumps both hosts' generations (both agents are
    /// told to leave the VM's domain alone).
    pub fn claim_migration(&self, claim: &MigrationClaim) -> Result<Result<(), ClaimRefusal>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let rec = tx
                .open_table(VMS)?
                .get(claim.vm.0)?
                .map(|v| VmRecord::decode(v.value()))
                .transpose()?;
            let Some(rec) = rec else {
                return Ok(Err(ClaimRefusal::NoVm(claim.vm)));
            };
            match rec.host() {
                Some(h) if h == claim.source => {}
                Some(actual) => {
                    return Ok(Err(ClaimRefusal::Moved {
                        vm: claim.vm,
                        expected: claim.source,
                        actual,
                    }))
                }
                None => return Ok(Err(ClaimRefusal::NotOnAHost(claim.vm))),
            }
            let mut t = tx.open_table(MIGRATIONS)?;
            if t.get(claim.vm.0)?.is_some() {
                return Ok(Err(ClaimRefusal::Busy(claim.vm)));
            }
            t.insert(claim.vm.0, claim.encode()?.as_slice())?;
        }
        bump_generation(&tx, claim.source)?;
        bump_generation(&tx, claim.target)?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Ends a migration claim: when `moved` the VM now belongs to the
    /// target, otherwise it stays on the source. Both hosts' generations
    /// are bumped. Returns the claim that was ended, if there was one.
    pub fn end_migration(&self, vm: VmId, moved: bool) -> Result<Option<MigrationClaim>, StoreError> {
        let tx = self.db.begin_write()?;
        let claim = tx
            .open_table(MIGRATIONS)?
            .remove(vm.0)?
            .map(|v| MigrationClaim::decode(v.value()))
            .transpose()?;
        if let Some(c) = &claim {
            if moved {
                let mut vms = tx.open_table(VMS)?;
                let rec = vms.get(vm.0)?.map(|v| VmRecord::decode(v.value())).transpose()?;
                if let Some(mut rec) = rec {
                    let mut index = tx.open_table(HOST_VMS)?;
                    let old = rec.host();
                    if let Some(o) = old {
                        index.remove((o.0, vm.0))?;
                    }
                    index.insert((c.target.0, vm.0), ())?;
                    rec.placement = Placement::Host(c.target);
                    if rec.rules.host.is_some() {
                        rec.rules.host = Some(c.target);
                    }
                    vms.insert(vm.0, rec.encode()?.as_slice())?;
                    if let Some(o) = old.filter(|o| *o != c.source) {
                        drop(vms);
                        drop(index);
                        bump_generation(&tx, o)?;
                    }
                }
            }
            bump_generation(&tx, c.source)?;
            bump_generation(&tx, c.target)?;
        }
        tx.commit()?;
        Ok(claim)
    }

    /// Every migration under way.
    pub fn migrations(&self) -> Result<Vec<MigrationClaim>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MIGRATIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(MigrationClaim::decode(row?.1.value())?);
        }
        Ok(out)
    }

    /// The migration of one VM, if under way.
    pub fn migration(&self, vm: VmId) -> Result<Option<MigrationClaim>, StoreError> {
        let tx = self.db.begin_read()?;
        tx.open_table(MIGRATIONS)?
            .get(vm.0)?
            .map(|v| MigrationClaim::decode(v.value()))
            .transpose()
    }

    /// Every API token (without secrets), by id.
    pub fn api_tokens(&self) -> Result<Vec<ApiTokenInfo>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(super::API_TOKENS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(ApiTokenInfo {
                id: token_id(k.value()),
                record: ApiTokenRecord::decode(v.value())?,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Deletes an API token by id; never the last admin token.
    pub fn delete_api_token(&self, id: &str) -> Result<Result<ApiTokenInfo, TokenDeleteRefusal>, StoreError> {
        let tx = self.db.begin_write()?;
        let deleted;
        {
            let mut t = tx.open_table(super::API_TOKENS)?;
            let mut found = None;
            let mut admins = 0;
            for row in t.iter()? {
                let (k, v) = row?;
                let rec = ApiTokenRecord::decode(v.value())?;
                if rec.role == Role::Admin {
                    admins += 1;
                }
                if token_id(k.value()) == id {
                    found = Some((*k.value(), rec));
                }
            }
            let Some((hash, rec)) = found else {
                return Ok(Err(TokenDeleteRefusal::Unknown(id.to_string())));
            };
            if rec.role == Role::Admin && admins <= 1 {
                return Ok(Err(TokenDeleteRefusal::LastAdmin(id.to_string())));
            }
            t.remove(&hash)?;
            deleted = ApiTokenInfo {
                id: id.to_string(),
                record: rec,
            };
        }
        tx.commit()?;
        Ok(Ok(deleted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PlacementRules;
    use novacron_shared::spec::{DesiredVm, Power, VmSpec};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        (dir, s)
    }

    fn vm(id: u128, host: u128) -> VmRecord {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": format!("vm{id}"), "vcpus": 1, "memory_mib": 64
        }))
        .expect("spec");
        VmRecord {
            vm: DesiredVm {
                id: VmId(id),
                op_id: OpId(id),
                spec,
                power: Power::Running,
                epoch: 0,
            },
            placement: Placement::Host(HostId(host)),
            rules: PlacementRules::default(),
            created_ms: 1,
        }
    }

    #[test]
    fn audit_appends_in_order_and_records_outcomes() {
        let (_d, s) = store();
        let rec = AuditRecord {
            seq: 0,
            at_ms: 5,
            actor: "ops".into(),
            token_id: "ab".into(),
            role: Role::Operator,
            remote: "127.0.0.1:1".into(),
            method: "POST".into(),
            path: "/v1/vms".into(),
            status: None,
            outcome: "pending".into(),
        };
        let a = s.append_audit(&rec).expect("append");
        let b = s.append_audit(&rec).expect("append");
        assert_eq!((a, b), (1, 2));
        s.finish_audit(a, 201, "ok").expect("finish");
        let all = s.audit(None, 10).expect("list");
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(all[1].status, Some(201));
        assert_eq!(all[1].outcome, "ok");
        assert_eq!(all[0].status, None);
        assert_eq!(s.audit(Some(2), 10).expect("page").len(), 1);
    }

    #[test]
    fn migration_claim_moves_the_vm_only_on_success() {
        let (_d, s) = store();
        s.put_vm(&vm(1, 10)).expect("put").expect("name");
        let claim = MigrationClaim {
            vm: VmId(1),
            source: HostId(10),
            target: HostId(20),
            op: OpId(9),
            started_ms: 1,
        };
        let g_target = s
            .desired(HostId(20))
            .expect("desired")
            .map_or(0, |d| d.generation);
        s.claim_migration(&claim).expect("claim").expect("accepted");
        assert_eq!(
            s.claim_migration(&claim).expect("claim"),
            Err(ClaimRefusal::Busy(VmId(1)))
        );
        let target = s.desired(HostId(20)).expect("desired").expect("generation");
        assert!(target.generation > g_target);
        assert_eq!(target.migrating, vec![VmId(1)]);
        let source = s.desired(HostId(10)).expect("desired").expect("generation");
        assert_eq!(source.migrating, vec![VmId(1)], "the source leaves it alone too");
        assert_eq!(source.vms.len(), 1);
        assert!(target.vms.is_empty());
        // Failure: the VM stays.
        s.end_migration(VmId(1), false).expect("end");
        assert_eq!(s.vm(VmId(1)).expect("vm").expect("some").host(), Some(HostId(10)));
        assert!(s.desired(HostId(20)).expect("d").expect("g").migrating.is_empty());
        assert!(s.desired(HostId(10)).expect("d").expect("g").migrating.is_empty());
        // Success: the VM moves, both hosts learn it.
        s.claim_migration(&claim).expect("claim").expect("accepted");
        let g_source = s.desired(HostId(10)).expect("d").expect("g").generation;
        s.end_migration(VmId(1), true).expect("end");
        assert_eq!(s.vm(VmId(1)).expect("vm").expect("some").host(), Some(HostId(20)));
        let src = s.desired(HostId(10)).expect("d").expect("g");
        assert!(src.generation > g_source && src.vms.is_empty());
        let dst = s.desired(HostId(20)).expect("d").expect("g");
        assert_eq!(dst.vms.len(), 1);
        assert!(dst.migrating.is_empty());
        let moved_claim = MigrationClaim {
            source: HostId(10),
            ..claim
        };
        assert!(matches!(
            s.claim_migration(&moved_claim).expect("claim"),
            Err(ClaimRefusal::Moved { .. })
        ));
    }

    #[test]
    fn the_last_admin_token_cannot_be_deleted() {
        let (_d, s) = store();
        let put = |secret: &str, role| {
            s.put_api_token(
                &crate::secrets::hash(secret),
                &ApiTokenRecord {
                    name: secret.into(),
                    role,
                    created_ms: 1,
                },
            )
            .expect("put");
            token_id(&crate::secrets::hash(secret))
        };
        let admin = put("a", Role::Admin);
        let viewer = put("v", Role::Viewer);
        assert_eq!(s.api_tokens().expect("list").len(), 2);
        assert_eq!(
            s.delete_api_token(&admin).expect("del"),
            Err(TokenDeleteRefusal::LastAdmin(admin.clone()))
        );
        assert!(s.delete_api_token(&viewer).expect("del").is_ok());
        assert_eq!(
            s.delete_api_token(&viewer).expect("del"),
            Err(TokenDeleteRefusal::Unknown(viewer))
        );
        let admin2 = put("a2", Role::Admin);
        assert!(s.delete_api_token(&admin).expect("del").is_ok());
        assert_eq!(s.api_tokens().expect("list")[0].id, admin2);
    }

    #[test]
    fn operations_list_newest_first() {
        let (_d, s) = store();
        let mut op = OperationRecord {
            id: OpId(5),
            kind: OperationKind::Migrate,
            vm: Some(VmId(1)),
            host: None,
            target: None,
            state: OperationState::Running,
            progress: Progress::default(),
            error: None,
            actor: "a".into(),
            created_ms: 1,
            updated_ms: 1,
        };
        s.put_operation(&op).expect("put");
        op.id = OpId(3);
        s.put_operation(&op).expect("put");
        op.state = OperationState::Failed;
        s.put_operation(&op).expect("update");
        let all = s.operations(None, 10).expect("list");
        assert_eq!(
            all.iter().map(|o| o.id).collect::<Vec<_>>(),
            vec![OpId(3), OpId(5)]
        );
        assert_eq!(
            s.operation(OpId(3)).expect("get").expect("some").state,
            OperationState::Failed
        );
        assert_eq!(s.operations(Some(OpId(3)), 10).expect("page").len(), 1);
        assert_eq!(s.unfinished_operations().expect("unfinished").len(), 1);
    }
}
