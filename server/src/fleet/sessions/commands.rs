//! One-off commands to an agent, awaited by op id: the command goes out
//! through the session's outbox, the agent's progress reports and its
//! result come back through the session loop.
//!
//! Owns: nothing but the pending entries it adds to a session (and removes
//! on a timeout). Must not touch: the session table but through
//! [`Fleet::live`].

use std::time::Duration;

use novacron_shared::ids::{HostId, OpId};
use novacron_shared::protocol::{Command, CommandKind, CommandOutcome, ServerMessage};
use tokio::sync::{mpsc, oneshot};

use crate::fleet::{lock, Fleet};

/// A command waiting for its agent's answer.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) done: oneshot::Sender<CommandOutcome>,
    pub(super) progress: Option<mpsc::UnboundedSender<(u8, String)>>,
}

/// A command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The host has no open session.
    #[error("host {0} is not connected")]
    NotConnected(HostId),
    /// The agent did not answer in time.
    #[error("the agent did not finish op {op_id} within {timeout:?}; it may still complete")]
    Timeout {
        /// The operation.
        op_id: OpId,
        /// How long we waited.
        timeout: Duration,
    },
    /// A snapshot revert may start an HA VM, and the host does not hold
    /// its HA lease now.
    #[error(
        "host {0} does not hold its HA lease now; an HA VM's snapshot is reverted only on a host that does"
    )]
    NoLease(HostId),
}

impl Fleet {
    /// Sends a command to a connected agent and waits for its outcome.
    pub async fn command(
        &self,
        host: HostId,
        kind: CommandKind,
        timeout: Duration,
    ) -> Result<(OpId, CommandOutcome), CommandError> {
        self.command_with_progress(host, OpId::random(), kind, timeout, None)
            .await
    }

    /// Like [`Self::command`], with a given op id and the agent's progress
    /// reports forwarded to `progress`.
    pub async fn command_with_progress(
        &self,
        host: HostId,
        op_id: OpId,
        kind: CommandKind,
        timeout: Duration,
        progress: Option<mpsc::UnboundedSender<(u8, String)>>,
    ) -> Result<(OpId, CommandOutcome), CommandError> {
        let session = self.live(host).ok_or(CommandError::NotConnected(host))?;
        if let CommandKind::SnapshotRevert { vm, .. } = &kind {
            // Reverting to a running snapshot starts the VM past the
            // agent's lease gate. A store error refuses too.
            let ha = match self.store.vm(*vm) {
                Ok(r) => r.is_some_and(|r| r.vm.spec.ha),
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "cannot read the VM for a snapshot revert; refused");
                    true
                }
            };
            if ha && self.lease_state(host) != Some(crate::ha::lease::HostState::Online) {
                return Err(CommandError::NoLease(host));
            }
        }
        let (tx, rx) = oneshot::channel();
        lock(&session.pending).insert(op_id, Pending { done: tx, progress });
        if session
            .outbox
            .send(ServerMessage::Command(Command { op_id, kind }))
            .await
            .is_err()
        {
            lock(&session.pending).remove(&op_id);
            return Err(CommandError::NotConnected(host));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => Ok((op_id, outcome)),
            Ok(Err(_)) => Err(CommandError::NotConnected(host)),
            Err(_) => {
                lock(&session.pending).remove(&op_id);
                Err(CommandError::Timeout { op_id, timeout })
            }
        }
    }

    /// Sends a message to a host's live session, if it has one.
    pub fn send_to(&self, id: HostId, msg: ServerMessage) -> bool {
        let s = self.live(id);
        s.is_some_and(|s| s.outbox.try_send(msg).is_ok())
    }
}
