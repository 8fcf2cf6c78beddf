//! The web API (HTTP/1.1, JSON, under `/v1`).
//!
//! Every request is authenticated with a bearer token (stored hashed);
//! mutating requests need the admin role. Routes: `GET /healthz`,
//! `GET /v1/hosts[/{id}]`, `POST /v1/hosts/{id}/revoke`,
//! `GET|PUT /v1/hosts/{id}/vms` (desired and observed VMs),
//! `POST /v1/hosts/{id}/commands` (reboot, snapshots, disk resize),
//! `POST /v1/join-tokens`. Bodies are size-limited, requests
//! time out, and every error is JSON with a stable code and a message that
//! says what was wrong.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use novacron_shared::ids::HostId;
use serde::Deserialize;
use serde_json::json;

use crate::fleet::{CommandError, CreateVm, DesiredError, Fleet, RevokeError, VmError, VmRequest};
use crate::ratelimit::LogLimiter;
use crate::store::{Role, Store};
use crate::{secrets, warn_limited};
use novacron_shared::ids::VmId;
use novacron_shared::protocol::CommandKind;
use novacron_shared::spec::Power;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a command request waits for the agent's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(50);

/// Shared state of the API.
#[derive(Debug)]
pub struct Api {
    fleet: Arc<Fleet>,
    store: Store,
    limiter: LogLimiter,
}

/// An API error: HTTP status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn ok<T: serde::Serialize>(status: StatusCode, body: &T) -> Result<Resp, ApiError> {
    serde_json::to_value(body)
        .map(|v| json_response(status, &v))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "encode", e.to_string()))
}

fn error_response(e: &ApiError) -> Resp {
    json_response(
        e.status,
        &json!({"error": {"code": e.code, "message": e.message}}),
    )
}

impl Api {
    /// The API over the fleet and its store.
    pub fn new(fleet: Arc<Fleet>, store: Store) -> Arc<Self> {
        Arc::new(Self {
            fleet,
            store,
            limiter: LogLimiter::new(20, Duration::from_secs(60)),
        })
    }

    /// Serves HTTP on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn_limited!(self.limiter, error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let api = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(req, remote).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> Resp {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, self.route(req)).await;
        let resp = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if e.status.is_server_error() {
                    tracing::error!(%method, %path, code = e.code, message = %e.message, "API request failed");
                } else {
                    warn_limited!(self.limiter, %remote, %method, %path, code = e.code, "API request refused");
                }
                error_response(&e)
            }
            Err(_) => error_response(&ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the request took too long",
            )),
        };
        tracing::debug!(%method, %path, status = resp.status().as_u16(), "API request");
        resp
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Result<Role, ApiError> {
        let header = req.headers().get(AUTHORIZATION).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "missing `Authorization: Bearer <token>` header",
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "the Authorization header must be `Bearer <token>`",
                )
            })?;
        let rec = self
            .store
            .api_token(&secrets::hash(token))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()))?
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown API token"))?;
        Ok(rec.role)
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Resp, ApiError> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if req.method() == Method::GET && segments == ["healthz"] {
            return Ok(json_response(StatusCode::OK, &json!({"status": "ok"})));
        }
        let role = self.authenticate(&req)?;
        let need_admin = || {
            if role == Role::Admin {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this needs an admin token",
                ))
            }
        };
        let internal = |e: &dyn std::fmt::Display| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
        };
        match (req.method().clone(), segments.as_slice()) {
            (Method::GET, ["v1", "hosts"]) => {
                let hosts = self.fleet.hosts().map_err(|e| internal(&e))?;
                ok(StatusCode::OK, &HostList { hosts })
            }
            (Method::GET, ["v1", "hosts", id]) => {
                let id = parse_host_id(id)?;
                match self.fleet.host(id).map_err(|e| internal(&e))? {
                    Some(h) => ok(StatusCode::OK, &h),
                    None => Err(no_host(id)),
                }
            }
            (Method::POST, ["v1", "hosts", id, "revoke"]) => {
                need_admin()?;
                let id = parse_host_id(id)?;
                match self.fleet.revoke(id) {
                    Ok(h) => ok(StatusCode::OK, &h),
                    Err(RevokeError::UnknownHost(_)) => Err(no_host(id)),
                    Err(e) => Err(internal(&e)),
                }
            }
            (Method::GET, ["v1", "hosts", id, "vms"]) => {
                let id = parse_host_id(id)?;
                match self.fleet.host_vms(id).map_err(|e| internal(&e))? {
                    Some(v) => ok(StatusCode::OK, &v),
                    None => Err(no_host(id)),
                }
            }
            (Method::PUT, ["v1", "hosts", id, "vms"]) => {
                need_admin()?;
                let id = parse_host_id(id)?;
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    vms: Vec<VmRequest>,
                }
                let body: Body = read_json(req).await?;
                match self.fleet.set_desired(id, body.vms) {
                    Ok(rec) => ok(StatusCode::OK, &rec),
                    Err(DesiredError::UnknownHost(_)) => Err(no_host(id)),
                    Err(DesiredError::Invalid(m)) => {
                        Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", m))
                    }
                    Err(e) => Err(internal(&e)),
                }
            }
            (Method::POST, ["v1", "hosts", id, "commands"]) => {
                need_admin()?;
                let id = parse_host_id(id)?;
                let kind: CommandKind = read_json(req).await?;
                self.command(id, kind).await
            }
            (Method::POST, ["v1", "hosts", id, action @ ("cordon" | "uncordon")]) => {
                need_admin()?;
                let id = parse_host_id(id)?;
                if !self
                    .fleet
                    .set_cordon(id, *action == "cordon")
                    .map_err(|e| internal(&e))?
                {
                    return Err(no_host(id));
                }
                match self.fleet.host(id).map_err(|e| internal(&e))? {
                    Some(h) => ok(StatusCode::OK, &h),
                    None => Err(no_host(id)),
                }
            }
            (Method::POST, ["v1", "vms"]) => {
                need_admin()?;
                let body: CreateVm = read_json(req).await?;
                let rec = self.fleet.create_vm(body).map_err(vm_error)?;
                ok(StatusCode::CREATED, &self.fleet.vm_view(rec))
            }
            (Method::GET, ["v1", "vms"]) => {
                let q = Query::parse(req.uri().query());
                let limit = q.number("limit", 100)?.clamp(1, 1000);
                let after = q.get("after").map(parse_vm_id).transpose()?;
                let host = q.get("host").map(parse_host_id).transpose()?;
                let prefix = q.get("name_prefix").unwrap_or("");
                let mut out = Vec::new();
                let mut cursor = after;
                let mut next = None;
                'pages: loop {
                    let page = self.fleet.store().vms(cursor, 1024).map_err(|e| internal(&e))?;
                    let Some(last) = page.last() else { break };
                    cursor = Some(last.vm.id);
                    for r in page {
                        if host.is_some_and(|h| h != r.host) || !r.vm.spec.name.starts_with(prefix) {
                            continue;
                        }
                        if out.len() == limit {
                            next = out.last().map(|v: &crate::fleet::VmView| v.record.vm.id);
                            break 'pages;
                        }
                        out.push(self.fleet.vm_view(r));
                    }
                }
                ok(StatusCode::OK, &json!({"vms": out, "next": next}))
            }
            (Method::GET, ["v1", "vms", id]) => {
                let id = parse_vm_id(id)?;
                let rec = self.fleet.store().vm(id).map_err(|e| internal(&e))?;
                match rec {
                    Some(r) => ok(StatusCode::OK, &self.fleet.vm_view(r)),
                    None => Err(vm_error(VmError::NotFound(id))),
                }
            }
            (Method::DELETE, ["v1", "vms", id]) => {
                need_admin()?;
                let id = parse_vm_id(id)?;
                let rec = self.fleet.delete_vm(id).map_err(vm_error)?;
                ok(StatusCode::OK, &json!({"deleted": rec}))
            }
            (Method::POST, ["v1", "vms", id, action @ ("start" | "stop" | "suspend" | "resume")]) => {
                need_admin()?;
                let id = parse_vm_id(id)?;
                let power = match *action {
                    "stop" => Power::Stopped,
                    "suspend" => Power::Paused,
                    _ => Power::Running,
                };
                let rec = self.fleet.set_power(id, power).map_err(vm_error)?;
                ok(StatusCode::ACCEPTED, &self.fleet.vm_view(rec))
            }
            (Method::POST, ["v1", "vms", id, "reboot"]) => {
                need_admin()?;
                let id = parse_vm_id(id)?;
                self.vm_command(id, CommandKind::Reboot { vm: id }).await
            }
            (Method::POST, ["v1", "vms", id, "snapshots"]) => {
                need_admin()?;
                let id = parse_vm_id(id)?;
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    name: String,
                }
                let body: Body = read_json(req).await?;
                let name = snapshot_name(&body.name)?;
                self.vm_command(id, CommandKind::SnapshotCreate { vm: id, name })
                    .await
            }
            (Method::POST, ["v1", "vms", id, "snapshots", name, "revert"]) => {
                need_admin()?;
                let id = parse_vm_id(id)?;
                let name = snapshot_name(name)?;
                self.vm_command(id, CommandKind::SnapshotRevert { vm: id, name })
                    .await
            }
            (Method::DELETE, ["v1", "vms", id, "snapshots", name]) => {
                need_admin()?;
                let id = parse_vm_id(id)?;
                let name = snapshot_name(name)?;
                self.vm_command(id, CommandKind::SnapshotDelete { vm: id, name })
                    .await
            }
            (Method::POST, ["v1", "join-tokens"]) => {
                need_admin()?;
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    ttl: Option<String>,
                }
                let body: Body = read_json(req).await?;
                let ttl = match body.ttl.as_deref() {
                    None => Duration::from_secs(3600),
                    Some(s) => novacron_shared::duration::parse(s).map_err(|e| {
                        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("ttl: {e}"))
                    })?,
                };
                if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86_400) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_body",
                        "ttl must be between 1s and 30d",
                    ));
                }
                let (token, expires_ms) = self.fleet.create_join_token(ttl).map_err(|e| internal(&e))?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &json!({"token": token, "expires_ms": expires_ms}),
                ))
            }
            (
                _,
                ["v1", "hosts"]
                | ["v1", "hosts", _]
                | ["v1", "hosts", _, "revoke" | "vms" | "commands" | "cordon" | "uncordon"]
                | ["v1", "vms"]
                | ["v1", "vms", _]
                | ["v1", "vms", _, _]
                | ["v1", "vms", _, "snapshots", _]
                | ["v1", "vms", _, "snapshots", _, "revert"]
                | ["v1", "join-tokens"],
            ) => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            )),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {path}"),
            )),
        }
    }
}

impl Api {
    /// Runs a command on a host's agent and answers with its outcome.
    async fn command(&self, host: HostId, kind: CommandKind) -> Result<Resp, ApiError> {
        match self.fleet.command(host, kind, COMMAND_TIMEOUT).await {
            Ok((op_id, outcome)) => ok(StatusCode::OK, &json!({"op_id": op_id, "outcome": outcome})),
            Err(e @ CommandError::NotConnected(_)) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_connected",
                e.to_string(),
            )),
            Err(e @ CommandError::Timeout { .. }) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                e.to_string(),
            )),
        }
    }

    /// Runs a command on the agent of the VM's host.
    async fn vm_command(&self, id: VmId, kind: CommandKind) -> Result<Resp, ApiError> {
        let rec = self
            .fleet
            .store()
            .vm(id)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()))?
            .ok_or_else(|| vm_error(VmError::NotFound(id)))?;
        self.command(rec.host, kind).await
    }
}

fn vm_error(e: VmError) -> ApiError {
    match e {
        VmError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", m),
        e @ VmError::NameTaken(_) => ApiError::new(StatusCode::CONFLICT, "name_taken", e.to_string()),
        e @ VmError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        VmError::NoFit(n) => ApiError::new(StatusCode::CONFLICT, "no_capacity", n.to_string()),
        VmError::Store(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

fn snapshot_name(s: &str) -> Result<String, ApiError> {
    novacron_shared::spec::check_name(s, novacron_shared::spec::MAX_NAME_LEN)
        .map(|()| s.to_string())
        .map_err(|m| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_name",
                format!("snapshot name {m}"),
            )
        })
}

fn parse_vm_id(s: &str) -> Result<VmId, ApiError> {
    parse_id(s)
}

/// A parsed query string (values are ids, numbers and names: no
/// percent-decoding needed, and anything else is refused by the parsers).
struct Query<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Query<'a> {
    fn parse(q: Option<&'a str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&'a str> {
        self.0.iter().find(|(key, _)| *key == k).map(|(_, v)| *v)
    }

    fn number(&self, k: &str, default: usize) -> Result<usize, ApiError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("{k}={v:?} is not a number"),
                )
            }),
        }
    }
}

#[derive(serde::Serialize)]
struct HostList {
    hosts: Vec<crate::fleet::HostView>,
}

fn no_host(id: HostId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no host with id {id}"),
    )
}

fn parse_host_id(s: &str) -> Result<HostId, ApiError> {
    parse_id(s)
}

fn parse_id<T: std::str::FromStr<Err = novacron_shared::ids::ParseIdError>>(s: &str) -> Result<T, ApiError> {
    s.parse().map_err(|e: novacron_shared::ids::ParseIdError| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", e.to_string())
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request bodies are limited to {MAX_BODY} bytes"),
            )
        })?
        .to_bytes();
    let bytes = if body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        body
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("request body is not valid JSON for this call: {e}"),
        )
    })
}
