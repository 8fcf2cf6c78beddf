//! Operations: live migration and drain, each a pure state machine
//! ([`migration::Migration::step`], [`drain::Drain::step`]: no I/O, no clock
//! reads) and one driver (`driver`) that reads the clock, carries the
//! actions out and feeds the outcomes back as events.
//!
//! Owns: the running operations' state. Must not touch: the session table
//! (it asks sessions for inventories, reports and commands) or the usage
//! index (it reserves through the placer).

use std::time::Instant;

use crate::store::{MigrationClaim, OperationKind, OperationRecord};

pub mod drain;
mod driver;
pub mod migration;

/// The time an operation step is taken at, as the driver read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic: deadlines within one server run.
    pub at: Instant,
    /// Wall clock, Unix ms: deadlines stored across restarts.
    pub wall_ms: u64,
}

/// What a restarted server does with an operation a previous run left
/// unfinished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A migration whose claim is still held: decide from both hosts.
    Resolve(MigrationClaim),
    /// Nothing can be resumed: fail it with this reason.
    Fail(String),
}

/// Decides what to do with `op` after a restart; `claim` is the migration
/// claim held for its VM, if any.
pub fn resume(op: &OperationRecord, claim: Option<MigrationClaim>) -> Resume {
    match (op.kind, claim) {
        (OperationKind::Migrate, Some(c)) if c.op == op.id => Resume::Resolve(c),
        (OperationKind::Drain, _) => Resume::Fail(
            "the server restarted during the drain; the host stays cordoned, run the drain again".into(),
        ),
        (OperationKind::Migrate, _) => {
            Resume::Fail("the server restarted before the migration started".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{OperationState, Progress};
    use novacron_shared::ids::{HostId, OpId, VmId};

    fn op(kind: OperationKind) -> OperationRecord {
        OperationRecord {
            id: OpId(1),
            kind,
            vm: Some(VmId(2)),
            host: Some(HostId(3)),
            target: Some(HostId(4)),
            state: OperationState::Running,
            progress: Progress::default(),
            error: None,
            actor: "t".into(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn claim(op: u128) -> MigrationClaim {
        MigrationClaim {
            vm: VmId(2),
            source: HostId(3),
            target: HostId(4),
            op: OpId(op),
            started_ms: 0,
        }
    }

    #[test]
    fn a_restart_resolves_a_claimed_migration_and_fails_the_rest() {
        let m = op(OperationKind::Migrate);
        assert_eq!(resume(&m, Some(claim(1))), Resume::Resolve(claim(1)));
        assert!(matches!(resume(&m, None), Resume::Fail(w) if w.contains("before the migration started")));
        assert!(
            matches!(resume(&m, Some(claim(9))), Resume::Fail(_)),
            "a claim of another operation is not this one's"
        );
        let d = op(OperationKind::Drain);
        assert!(matches!(resume(&d, None), Resume::Fail(w) if w.contains("stays cordoned")));
    }
}
