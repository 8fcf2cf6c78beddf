//! Operations (migrations, drains): list and show.

use hyper::StatusCode;
use novacron_api::operations::OperationList;
use novacron_shared::ids::OpId;

use super::http::{parse_id, reply, Resp};
use super::{convert, Api, ApiError, Call};
use crate::api::routes::Op;

/// Handles the operation routes.
pub(super) fn handle(api: &Api, call: &Call) -> Result<Resp, ApiError> {
    if call.op == Op::ListOperations {
        let limit = call.query.number("limit", 100, 1, 1000)?;
        let before: Option<OpId> = call.query.id("before")?;
        let ops = api
            .store
            .operations(before, limit)
            .map_err(|e| ApiError::internal(&e))?;
        let next = (ops.len() == limit).then(|| ops.last().map(|o| o.id)).flatten();
        return reply(
            StatusCode::OK,
            &OperationList {
                operations: ops.into_iter().map(convert::operation).collect(),
                next,
            },
        );
    }
    let id: OpId = parse_id(call.param(0))?;
    match api.store.operation(id).map_err(|e| ApiError::internal(&e))? {
        Some(op) => reply(StatusCode::OK, &convert::operation(op)),
        None => Err(ApiError::not_found(format!("no operation with id {id}"))),
    }
}
