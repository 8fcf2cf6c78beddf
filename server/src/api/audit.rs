//! The audit log: listing it (`/v1/audit`), and the sink every mutating
//! request is written to before it runs.

use hyper::StatusCode;
use novacron_api::audit::AuditList;

use super::http::{reply, Resp};
use super::{convert, Api, ApiError, Call};
use crate::store::{AuditRecord, Store, StoreError};

/// Where the API writes its audit entries: the store in production; a
/// test can give one that fails, to prove nothing runs unaudited.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Appends an entry; returns its sequence number.
    fn append(&self, rec: &AuditRecord) -> Result<u64, StoreError>;
    /// Records the outcome of the entry `seq`.
    fn finish(&self, seq: u64, status: u16, outcome: &str) -> Result<(), StoreError>;
}

impl AuditSink for Store {
    fn append(&self, rec: &AuditRecord) -> Result<u64, StoreError> {
        self.append_audit(rec)
    }

    fn finish(&self, seq: u64, status: u16, outcome: &str) -> Result<(), StoreError> {
        self.finish_audit(seq, status, outcome)
    }
}

/// Lists the audit log, newest first.
pub(super) fn handle(api: &Api, call: &Call) -> Result<Resp, ApiError> {
    let limit = call.query.number("limit", 100, 1, 1000)?;
    let before = match call.query.get("before") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_query(format!("before={v:?} is not a sequence number")))?,
        ),
    };
    let entries = api
        .store
        .audit(before, limit)
        .map_err(|e| ApiError::internal(&e))?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    reply(
        StatusCode::OK,
        &AuditList {
            entries: entries.into_iter().map(convert::audit).collect(),
            next,
        },
    )
}
