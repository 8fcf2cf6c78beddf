//! Enrollment: a host without a certificate presents a join token and a
//! CSR; the server checks the token, signs outside any transaction, and
//! commits signed joins in batches (one fsync per burst), then replies.
//!
//! Owns: the join queue and its writer task. Must not touch: live sessions.

use std::time::Duration;

use novacron_shared::clock::Clock;
use novacron_shared::framing;
use novacron_shared::ids::HostId;
use novacron_shared::pki::{CertInfo, Validity};
use novacron_shared::protocol::{
    self, AgentMessage, Capacity, ErrorCode, JoinReply, JoinRequest, ServerMessage, WireError,
    HANDSHAKE_VERSION, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use tokio::sync::{mpsc, oneshot};

use super::{clean_name, close, version_error, OPEN_TIMEOUT};
use crate::fleet::Fleet;
use crate::secrets;
use crate::store::{HostRecord, HostState, Store, StoreError, TokenRefusal};

/// Largest frame accepted on an enrollment connection.
const JOIN_FRAME_LEN: u32 = 64 * 1024;

/// Joins waiting for the store; past this a join is refused as `Busy`.
pub(super) const JOIN_QUEUE: usize = 1024;

/// Most joins committed in one transaction.
const JOIN_BATCH: usize = 256;

/// A signed join waiting to be committed.
pub(super) struct JoinJob {
    hash: [u8; 32],
    host: HostRecord,
    reply: oneshot::Sender<Result<Result<(), TokenRefusal>, String>>,
}
impl Fleet {
    /// Creates a join token valid for `ttl`; returns it and its expiry (Unix ms).
    pub fn create_join_token(&self, ttl: Duration) -> Result<(String, u64), StoreError> {
        let token = secrets::new_token("ncj");
        let now = self.clock.unix_ms();
        let expires_ms = now + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2);
        self.store.put_join_token(
            &secrets::hash(&token),
            &crate::store::JoinTokenRecord {
                created_ms: now,
                expires_ms,
                used_by: None,
            },
        )?;
        Ok((token, expires_ms))
    }

    pub(super) async fn handle_join(&self, conn: quinn::Connection) {
        let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(OPEN_TIMEOUT, conn.accept_bi()).await else {
            return self.refuse_conn(&conn, ErrorCode::Timeout, "no request within 10s");
        };
        let mut buf = Vec::new();
        let first = tokio::time::timeout(
            OPEN_TIMEOUT,
            framing::read_frame::<AgentMessage>(&mut recv, JOIN_FRAME_LEN, &mut buf),
        )
        .await;
        let req = match first {
            Err(_) => return self.refuse_conn(&conn, ErrorCode::Timeout, "no request within 10s"),
            Ok(Err(e)) => return self.refuse_conn(&conn, e.code(), &e.to_string()),
            Ok(Ok(None)) => return close(&conn, ErrorCode::UnexpectedMessage, "stream ended"),
            Ok(Ok(Some((v, _)))) if v != HANDSHAKE_VERSION => {
                let err = version_error(v);
                return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await;
            }
            Ok(Ok(Some((_, AgentMessage::Join(req))))) => req,
            Ok(Ok(Some(_))) => {
                let err = WireError {
                    code: ErrorCode::Unauthenticated,
                    message: "no client certificate: only a join is allowed; run `novacron-agent join` first"
                        .into(),
                };
                return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await;
            }
        };
        let reply = match self.join(&req, &conn).await {
            Ok(r) => ServerMessage::Joined(r),
            Err(err) => return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await,
        };
        let _ = framing::write_frame(&mut send, HANDSHAKE_VERSION, &reply, &mut buf).await;
        let _ = send.finish();
        // Let the agent read the reply and close; do not hold the slot forever.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }

    async fn join(&self, req: &JoinRequest, conn: &quinn::Connection) -> Result<JoinReply, WireError> {
        if let Err(e) = protocol::negotiate(
            (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
            req.min_version,
            req.max_version,
        ) {
            return Err(WireError {
                code: ErrorCode::UnsupportedVersion,
                message: e.to_string(),
            });
        }
        let hash = secrets::hash(&req.token);
        let host_id = HostId::random();
        let now = self.clock.wall();
        let internal = |e: &dyn std::fmt::Display| WireError {
            code: ErrorCode::Internal,
            message: format!("server could not complete the join: {e}"),
        };
        // Cheap checks first: nobody gets a signature for a bad token.
        match self
            .store
            .check_join_token(&hash, novacron_shared::clock::unix_ms(now))
        {
            Err(e) => {
                tracing::error!(error = %e, "join failed in the store");
                return Err(internal(&e));
            }
            Ok(Err(refusal)) => return Err(token_error(refusal)),
            Ok(Ok(())) => {}
        }
        // Sign outside any store transaction, so joins do not queue behind
        // each other's CPU work.
        let validity = Validity::for_ttl(now, self.policy.cert_ttl);
        let signed = tokio::task::block_in_place(|| {
            let der = self.ca.sign_host_csr(&req.csr_der, host_id, validity)?;
            let info = CertInfo::parse(&der)?;
            Ok::<_, novacron_shared::pki::PkiError>((der, info))
        });
        let (cert, info) = signed.map_err(|e| WireError {
            code: ErrorCode::BadCsr,
            message: format!("the certificate signing request was refused: {e}"),
        })?;
        let host = HostRecord {
            id: host_id,
            name: clean_name(&req.hostname),
            addresses: vec![conn.remote_address().to_string()],
            capacity: Capacity::default(),
            agent_version: clean_name(&req.agent_version),
            first_seen_ms: novacron_shared::clock::unix_ms(now),
            last_seen_ms: novacron_shared::clock::unix_ms(now),
            state: HostState::Enrolled,
            cert_serial: info.serial,
            cert_not_after: info.not_after,
        };
        if conn.close_reason().is_some() {
            // The agent gave up waiting: do not enroll a host nobody holds.
            return Err(internal(&"the agent closed the connection"));
        }
        // Commit in batches: a burst of joins costs one fsync per batch.
        let (reply, committed) = oneshot::channel();
        let job = JoinJob {
            hash,
            host: host.clone(),
            reply,
        };
        if self.sessions.joins.try_send(job).is_err() {
            return Err(WireError {
                code: ErrorCode::Busy,
                message: "the server has too many joins in flight; retry in a few seconds".into(),
            });
        }
        match committed.await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(host_id = %host.id, name = %host.name, "host enrolled");
                Ok(JoinReply {
                    host_id: host.id,
                    cert_der: cert.to_vec(),
                    ca_der: self.ca.cert_der().to_vec(),
                })
            }
            Ok(Ok(Err(refusal))) => Err(token_error(refusal)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "join failed in the store");
                Err(internal(&e))
            }
            Err(_) => Err(internal(&"the join writer stopped")),
        }
    }
}

fn token_error(refusal: TokenRefusal) -> WireError {
    let (code, message) = match refusal {
        TokenRefusal::Unknown => (
            ErrorCode::TokenInvalid,
            "unknown join token; create one with `novacron-server token create`",
        ),
        TokenRefusal::Expired => (
            ErrorCode::TokenExpired,
            "the join token has expired; create a new one",
        ),
        TokenRefusal::Used => (
            ErrorCode::TokenUsed,
            "the join token was already used; each token enrolls one host",
        ),
    };
    WireError {
        code,
        message: message.into(),
    }
}

/// Commits signed joins in batches: whatever queued while the previous
/// batch was being written goes into the next transaction.
pub(super) async fn join_writer(store: Store, mut rx: mpsc::Receiver<JoinJob>, clock: Clock) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < JOIN_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let items: Vec<([u8; 32], HostRecord)> = batch.iter().map(|j| (j.hash, j.host.clone())).collect();
        let s = store.clone();
        let now = clock.unix_ms();
        let result = tokio::task::spawn_blocking(move || s.enroll(&items, now)).await;
        match result {
            Ok(Ok(outcomes)) => {
                tracing::debug!(joins = batch.len(), "join batch committed");
                for (j, o) in batch.into_iter().zip(outcomes) {
                    let _ = j.reply.send(Ok(o));
                }
            }
            Ok(Err(e)) => {
                for j in batch {
                    let _ = j.reply.send(Err(e.to_string()));
                }
            }
            Err(e) => {
                for j in batch {
                    let _ = j.reply.send(Err(format!("join writer task failed: {e}")));
                }
            }
        }
    }
}
