//! API tokens (create, list, delete) and join tokens (create).

use std::time::Duration;

use hyper::StatusCode;
use novacron_api::tokens::{
    ApiTokenList, CreateApiToken, CreateJoinToken, CreatedApiToken, DeletedApiToken, JoinToken,
};
use novacron_api::ErrorCode;

use super::http::{read_json, reply, Resp};
use super::{convert, Api, ApiError, Call};
use crate::api::routes::Op;
use crate::secrets;
use crate::store::{ApiTokenRecord, TokenDeleteRefusal};

/// Longest an API token name may be.
pub const MAX_TOKEN_NAME: usize = 63;
/// Shortest and longest join-token lifetime.
pub const JOIN_TTL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30 * 86_400));

/// Handles the token routes.
pub(super) async fn handle(api: &Api, call: Call) -> Result<Resp, ApiError> {
    match call.op {
        Op::CreateApiToken => {
            let body: CreateApiToken = read_json(call.req).await?;
            novacron_shared::spec::check_name(&body.name, MAX_TOKEN_NAME)
                .map_err(|m| ApiError::bad_request(ErrorCode::InvalidBody, format!("name {m}")))?;
            let token = secrets::new_token("nca");
            let hash = secrets::hash(&token);
            let rec = ApiTokenRecord {
                name: body.name,
                role: convert::role_in(body.role),
                created_ms: api.clock.unix_ms(),
            };
            api.store
                .put_api_token(&hash, &rec)
                .map_err(|e| ApiError::internal(&e))?;
            tracing::info!(name = %rec.name, role = ?rec.role, by = %call.actor, "API token created");
            reply(
                StatusCode::CREATED,
                &CreatedApiToken {
                    id: crate::store::token_id(&hash),
                    name: rec.name,
                    role: body.role,
                    created_ms: rec.created_ms,
                    token,
                },
            )
        }
        Op::ListApiTokens => {
            let tokens = api.store.api_tokens().map_err(|e| ApiError::internal(&e))?;
            reply(
                StatusCode::OK,
                &ApiTokenList {
                    tokens: tokens.into_iter().map(convert::api_token).collect(),
                },
            )
        }
        Op::DeleteApiToken => match api
            .store
            .delete_api_token(call.param(0))
            .map_err(|e| ApiError::internal(&e))?
        {
            Ok(t) => reply(
                StatusCode::OK,
                &DeletedApiToken {
                    deleted: convert::api_token(t),
                },
            ),
            Err(e @ TokenDeleteRefusal::Unknown(_)) => Err(ApiError::not_found(e.to_string())),
            Err(e @ TokenDeleteRefusal::LastAdmin(_)) => {
                Err(ApiError::conflict(ErrorCode::LastAdmin, e.to_string()))
            }
        },
        _ => {
            let body: CreateJoinToken = read_json(call.req).await?;
            let ttl = match body.ttl.as_deref() {
                None => Duration::from_secs(3600),
                Some(s) => novacron_shared::duration::parse(s)
                    .map_err(|e| ApiError::bad_request(ErrorCode::InvalidBody, format!("ttl: {e}")))?,
            };
            if ttl < JOIN_TTL.0 || ttl > JOIN_TTL.1 {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidBody,
                    "ttl must be between 1s and 30d",
                ));
            }
            let (token, expires_ms) = api
                .fleet
                .create_join_token(ttl)
                .map_err(|e| ApiError::internal(&e))?;
            reply(StatusCode::CREATED, &JoinToken { token, expires_ms })
        }
    }
}
