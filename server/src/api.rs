//! The web API (HTTP/1.1, JSON, under `/v1`).
//!
//! Routes, with the role each needs, are listed once in [`routes::ROUTES`]
//! and documented in `server/openapi.json` (served at `/v1/openapi.json`;
//! a test holds the two together). Every request but `/healthz` and the
//! OpenAPI document carries a bearer token (stored hashed) of role viewer,
//! operator or admin; each token is rate-limited (429 with `Retry-After`);
//! every mutating request is written to the audit log before it runs and
//! its outcome before it is answered. Bodies are size-limited, requests
//! time out, and every error is JSON with a stable code and a message that
//! says what was wrong. `/v1/events` streams server-sent events.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use novacron_shared::ids::{HostId, OpId, VmId};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use crate::config::ApiConfig;
use crate::fleet::{CommandError, CreateVm, DesiredError, Fleet, RevokeError, VmError, VmRequest};
use crate::ratelimit::{LogLimiter, TokenBuckets};
use crate::store::{ApiTokenRecord, AuditRecord, Role, Store, TokenDeleteRefusal};
use crate::{secrets, unix_ms, warn_limited};
use novacron_shared::protocol::CommandKind;
use novacron_shared::spec::Power;

pub mod routes;

use routes::{Access, Match, Op, Route};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a command request waits for the agent's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(50);
/// How often an idle event stream gets a keep-alive comment.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Shared state of the API.
#[derive(Debug)]
pub struct Api {
    fleet: Arc<Fleet>,
    store: Store,
    limiter: LogLimiter,
    buckets: TokenBuckets,
    cfg: ApiConfig,
}

/// The token behind a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// The token's id.
    pub id: String,
    /// Its role.
    pub role: Role,
}

/// An API error: HTTP status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A response body: a whole JSON document or an event stream.
pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type Resp = Response<Body>;

fn json_response(status: StatusCode, body: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn ok<T: serde::Serialize>(status: StatusCode, body: &T) -> Result<Resp, ApiError> {
    serde_json::to_value(body)
        .map(|v| json_response(status, &v))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "encode", e.to_string()))
}

fn error_response(e: &ApiError) -> Resp {
    let mut r = json_response(
        e.status,
        &json!({"error": {"code": e.code, "message": e.message}}),
    );
    if let Some(wait) = e.retry_after {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
    }
    r
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
}

/// A server-sent events body fed by a channel.
struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

impl Api {
    /// The API over the fleet and its store.
    pub fn new(fleet: Arc<Fleet>, store: Store, cfg: ApiConfig) -> Arc<Self> {
        Arc::new(Self {
            fleet,
            store,
            limiter: LogLimiter::new(20, Duration::from_secs(60)),
            buckets: TokenBuckets::new(cfg.rate_limit, cfg.rate_burst),
            cfg,
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
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = match self.handle_inner(req, remote).await {
            Ok(r) => r,
            Err(e) => {
                if e.status.is_server_error() {
                    tracing::error!(%method, %path, code = e.code, message = %e.message, "API request failed");
                } else {
                    warn_limited!(self.limiter, %remote, %method, %path, code = e.code, "API request refused");
                }
                error_response(&e)
            }
        };
        tracing::debug!(%method, %path, status = resp.status().as_u16(), "API request");
        // Labelled by route, never by raw path: bounded cardinality.
        let segments: Vec<&str> = path
            .trim_end_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let operation = match routes::find(method.as_str(), &segments) {
            Match::Found(r, _) => r.operation_id,
            _ => "unmatched",
        };
        let class = match resp.status().as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        crate::telemetry::TELEMETRY
            .api_duration
            .with_label_values(&[operation, class])
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    async fn handle_inner(&self, req: Request<Incoming>, remote: SocketAddr) -> Result<Resp, ApiError> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (route, params) = match routes::find(req.method().as_str(), &segments) {
            Match::Found(r, p) => (r, p.into_iter().map(str::to_string).collect::<Vec<_>>()),
            Match::WrongMethod(m) => {
                return Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{} is not allowed on {path}; use {}",
                        req.method(),
                        m.join(" or ")
                    ),
                ))
            }
            Match::NotFound => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no route for {path}"),
                ))
            }
        };
        let caller = match route.access {
            Access::Public => None,
            Access::Role(need) => {
                let caller = self.authenticate(&req)?;
                if let Err(wait) = self.buckets.take(&caller.id, Instant::now()) {
                    let mut e = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        format!(
                            "token {:?} is limited to {} requests/s (bursts of {}); retry in {:.1} s",
                            caller.name,
                            self.cfg.rate_limit,
                            self.cfg.rate_burst,
                            wait.as_secs_f64()
                        ),
                    );
                    e.retry_after = Some(wait);
                    return Err(e);
                }
                if caller.role < need {
                    let e = ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        format!(
                            "{} {} needs the {} role; token {:?} is {}",
                            route.method,
                            route.path,
                            role_name(need),
                            caller.name,
                            role_name(caller.role)
                        ),
                    );
                    if route.mutating() {
                        self.audit_once(&caller, remote, route, &path, &e);
                    }
                    return Err(e);
                }
                Some(caller)
            }
        };
        let audit = match (&caller, route.mutating()) {
            (Some(c), true) => Some(self.audit_begin(c, remote, route, &path)?),
            _ => None,
        };
        let caller_name = caller.as_ref().map_or("", |c| c.name.as_str()).to_string();
        let result =
            match tokio::time::timeout(REQUEST_TIMEOUT, self.dispatch(route, &params, req, &caller_name))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "the request took too long",
                )),
            };
        if let Some(seq) = audit {
            let (status, outcome) = match &result {
                Ok(r) => (r.status().as_u16(), "ok".to_string()),
                Err(e) => (e.status.as_u16(), format!("{}: {}", e.code, e.message)),
            };
            if let Err(e) = self.store.finish_audit(seq, status, &outcome) {
                tracing::error!(seq, error = %e, "cannot record a request's outcome in the audit log");
            }
        }
        result
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
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
        let hash = secrets::hash(token);
        let rec = self
            .store
            .api_token(&hash)
            .map_err(|e| internal(&e))?
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown API token"))?;
        Ok(Caller {
            name: rec.name,
            id: crate::store::token_id(&hash),
            role: rec.role,
        })
    }

    fn audit_record(&self, c: &Caller, remote: SocketAddr, route: &Route, path: &str) -> AuditRecord {
        AuditRecord {
            seq: 0,
            at_ms: unix_ms(SystemTime::now()),
            actor: c.name.clone(),
            token_id: c.id.clone(),
            role: c.role,
            remote: remote.to_string(),
            method: route.method.to_string(),
            path: path.to_string(),
            status: None,
            outcome: "running".into(),
        }
    }

    /// Writes the audit entry of a mutating request before it runs; the
    /// request is refused when the log cannot be written.
    fn audit_begin(
        &self,
        c: &Caller,
        remote: SocketAddr,
        route: &Route,
        path: &str,
    ) -> Result<u64, ApiError> {
        self.store
            .append_audit(&self.audit_record(c, remote, route, path))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot write the audit log; refusing the request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "the audit log cannot be written; nothing was done",
                )
            })
    }

    /// Audits a request refused before it ran.
    fn audit_once(&self, c: &Caller, remote: SocketAddr, route: &Route, path: &str, e: &ApiError) {
        let mut rec = self.audit_record(c, remote, route, path);
        rec.status = Some(e.status.as_u16());
        rec.outcome = format!("{}: {}", e.code, e.message);
        if let Err(err) = self.store.append_audit(&rec) {
            tracing::error!(error = %err, "cannot write the audit log");
        }
    }

    async fn dispatch(
        &self,
        route: &Route,
        params: &[String],
        req: Request<Incoming>,
        actor: &str,
    ) -> Result<Resp, ApiError> {
        let p = |i: usize| params.get(i).map_or("", String::as_str);
        let q = Query::parse(req.uri().query());
        match route.op {
            Op::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
            Op::OpenApi => {
                let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())).boxed());
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok(r)
            }
            Op::ListHosts => {
                let hosts = self.fleet.hosts().map_err(|e| internal(&e))?;
                ok(StatusCode::OK, &json!({ "hosts": hosts }))
            }
            Op::GetHost => {
                let id = parse_host_id(p(0))?;
                match self.fleet.host(id).map_err(|e| internal(&e))? {
                    Some(h) => ok(StatusCode::OK, &h),
                    None => Err(no_host(id)),
                }
            }
            Op::RevokeHost => {
                let id = parse_host_id(p(0))?;
                match self.fleet.revoke(id) {
                    Ok(h) => ok(StatusCode::OK, &h),
                    Err(RevokeError::UnknownHost(_)) => Err(no_host(id)),
                    Err(e) => Err(internal(&e)),
                }
            }
            Op::CordonHost | Op::UncordonHost => {
                let id = parse_host_id(p(0))?;
                if !self
                    .fleet
                    .set_cordon(id, route.op == Op::CordonHost)
                    .map_err(|e| internal(&e))?
                {
                    return Err(no_host(id));
                }
                match self.fleet.host(id).map_err(|e| internal(&e))? {
                    Some(h) => ok(StatusCode::OK, &h),
                    None => Err(no_host(id)),
                }
            }
            Op::DrainHost => {
                let id = parse_host_id(p(0))?;
                let _: Empty = read_json(req).await?;
                if self.fleet.host(id).map_err(|e| internal(&e))?.is_none() {
                    return Err(no_host(id));
                }
                let op = self.fleet.drain(id, actor).map_err(vm_error)?;
                ok(StatusCode::ACCEPTED, &json!({ "operation": op }))
            }
            Op::GetHostVms => {
                let id = parse_host_id(p(0))?;
                match self.fleet.host_vms(id).map_err(|e| internal(&e))? {
                    Some(v) => ok(StatusCode::OK, &v),
                    None => Err(no_host(id)),
                }
            }
            Op::PutHostVms => {
                let id = parse_host_id(p(0))?;
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
            Op::HostCommand => {
                let id = parse_host_id(p(0))?;
                let kind: CommandKind = read_json(req).await?;
                if matches!(kind, CommandKind::Migrate { .. }) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_body",
                        "migrations go through POST /v1/vms/{vm}/migrate (they need a capacity claim)",
                    ));
                }
                self.command(id, kind).await
            }
            Op::CreateVm => {
                let body: CreateVm = read_json(req).await?;
                let rec = self.fleet.create_vm(body).map_err(vm_error)?;
                ok(StatusCode::CREATED, &self.fleet.vm_view(rec))
            }
            Op::ListVms => {
                let limit = q.number("limit", 100)?.clamp(1, 1000);
                let after = q.get("after").map(parse_vm_id).transpose()?;
                let host = q.get("host").map(parse_host_id).transpose()?;
                let prefix = q.get("name_prefix").unwrap_or("");
                let (vms, next) = self.list_vms(after, host, prefix, limit)?;
                ok(StatusCode::OK, &json!({"vms": vms, "next": next}))
            }
            Op::GetVm => {
                let id = parse_vm_id(p(0))?;
                let rec = self.fleet.store().vm(id).map_err(|e| internal(&e))?;
                match rec {
                    Some(r) => ok(StatusCode::OK, &self.fleet.vm_view(r)),
                    None => Err(vm_error(VmError::NotFound(id))),
                }
            }
            Op::DeleteVm => {
                let id = parse_vm_id(p(0))?;
                let rec = self.fleet.delete_vm(id).map_err(vm_error)?;
                ok(StatusCode::OK, &json!({"deleted": rec}))
            }
            Op::StartVm | Op::StopVm | Op::SuspendVm | Op::ResumeVm => {
                let id = parse_vm_id(p(0))?;
                let power = match route.op {
                    Op::StopVm => Power::Stopped,
                    Op::SuspendVm => Power::Paused,
                    _ => Power::Running,
                };
                let rec = self.fleet.set_power(id, power).map_err(vm_error)?;
                ok(StatusCode::ACCEPTED, &self.fleet.vm_view(rec))
            }
            Op::RebootVm => {
                let id = parse_vm_id(p(0))?;
                self.vm_command(id, CommandKind::Reboot { vm: id }).await
            }
            Op::MigrateVm => {
                let id = parse_vm_id(p(0))?;
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    #[serde(default)]
                    host: Option<HostId>,
                }
                let body: Body = read_json(req).await?;
                let op = self.fleet.migrate(id, body.host, actor).map_err(vm_error)?;
                ok(StatusCode::ACCEPTED, &json!({ "operation": op }))
            }
            Op::CreateSnapshot => {
                let id = parse_vm_id(p(0))?;
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
            Op::RevertSnapshot => {
                let id = parse_vm_id(p(0))?;
                let name = snapshot_name(p(1))?;
                self.vm_command(id, CommandKind::SnapshotRevert { vm: id, name })
                    .await
            }
            Op::DeleteSnapshot => {
                let id = parse_vm_id(p(0))?;
                let name = snapshot_name(p(1))?;
                self.vm_command(id, CommandKind::SnapshotDelete { vm: id, name })
                    .await
            }
            Op::ListOperations => {
                let limit = q.number("limit", 100)?.clamp(1, 1000);
                let before = q.get("before").map(parse_id::<OpId>).transpose()?;
                let ops = self.store.operations(before, limit).map_err(|e| internal(&e))?;
                let next = (ops.len() == limit).then(|| ops.last().map(|o| o.id)).flatten();
                ok(StatusCode::OK, &json!({"operations": ops, "next": next}))
            }
            Op::GetOperation => {
                let id: OpId = parse_id(p(0))?;
                match self.store.operation(id).map_err(|e| internal(&e))? {
                    Some(op) => ok(StatusCode::OK, &op),
                    None => Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no operation with id {id}"),
                    )),
                }
            }
            Op::Events => {
                let host = q.get("host").map(parse_host_id).transpose()?;
                let vm = q.get("vm").map(parse_vm_id).transpose()?;
                Ok(self.events(host, vm))
            }
            Op::PrometheusMetrics => Ok(self.prometheus()),
            Op::QueryMetrics => {
                let m = self.metrics()?;
                let req = metrics_request(&q)?;
                let answer = m.query(&req).map_err(|e| internal(&e))?;
                ok(StatusCode::OK, &answer)
            }
            Op::LatestMetrics => {
                let m = self.metrics()?;
                let kind = match q.get("owner") {
                    None | Some("") | Some("all") => None,
                    Some("host") | Some("hosts") => Some(novacron_shared::metrics::Owner::Host),
                    Some("vm") | Some("vms") => Some(novacron_shared::metrics::Owner::Vm),
                    Some(o) => return Err(bad_query(format!("owner must be host, vm or all, not {o:?}"))),
                };
                ok(StatusCode::OK, &json!({ "owners": m.latest(kind) }))
            }
            Op::StreamMetrics => {
                let m = self.metrics()?;
                let owner = metrics_owner(&q)?;
                Ok(self.metric_stream(m.clone(), owner))
            }
            Op::MetricStreams => {
                let m = self.metrics()?;
                let streams: Vec<_> = m
                    .stream_states()
                    .await
                    .into_iter()
                    .map(|(h, r)| {
                        json!({
                            "host": h,
                            "epoch": r.epoch,
                            "stored_upto_seq": r.high,
                            "batches": r.batches,
                            "duplicates": r.duplicates,
                            "missing": r.gaps,
                            "agent_dropped": r.agent_dropped,
                            "last_stored_ms": r.last_ms,
                        })
                    })
                    .collect();
                ok(StatusCode::OK, &json!({ "streams": streams }))
            }
            Op::CreateApiToken => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    name: String,
                    role: Role,
                }
                let body: Body = read_json(req).await?;
                novacron_shared::spec::check_name(&body.name, 63).map_err(|m| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("name {m}"))
                })?;
                let token = secrets::new_token("nca");
                let hash = secrets::hash(&token);
                let rec = ApiTokenRecord {
                    name: body.name,
                    role: body.role,
                    created_ms: unix_ms(SystemTime::now()),
                };
                self.store.put_api_token(&hash, &rec).map_err(|e| internal(&e))?;
                tracing::info!(name = %rec.name, role = ?rec.role, by = %actor, "API token created");
                ok(
                    StatusCode::CREATED,
                    &json!({"id": crate::store::token_id(&hash), "name": rec.name, "role": rec.role,
                            "created_ms": rec.created_ms, "token": token}),
                )
            }
            Op::ListApiTokens => {
                let tokens = self.store.api_tokens().map_err(|e| internal(&e))?;
                ok(StatusCode::OK, &json!({ "tokens": tokens }))
            }
            Op::DeleteApiToken => match self.store.delete_api_token(p(0)).map_err(|e| internal(&e))? {
                Ok(t) => ok(StatusCode::OK, &json!({ "deleted": t })),
                Err(e @ TokenDeleteRefusal::Unknown(_)) => {
                    Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()))
                }
                Err(e @ TokenDeleteRefusal::LastAdmin(_)) => {
                    Err(ApiError::new(StatusCode::CONFLICT, "last_admin", e.to_string()))
                }
            },
            Op::CreateJoinToken => {
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
            Op::ListAudit => {
                let limit = q.number("limit", 100)?.clamp(1, 1000);
                let before = match q.get("before") {
                    None => None,
                    Some(v) => Some(v.parse::<u64>().map_err(|_| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_query",
                            format!("before={v:?} is not a sequence number"),
                        )
                    })?),
                };
                let entries = self.store.audit(before, limit).map_err(|e| internal(&e))?;
                let next = (entries.len() == limit)
                    .then(|| entries.last().map(|e| e.seq))
                    .flatten();
                ok(StatusCode::OK, &json!({"entries": entries, "next": next}))
            }
        }
    }

    fn list_vms(
        &self,
        after: Option<VmId>,
        host: Option<HostId>,
        prefix: &str,
        limit: usize,
    ) -> Result<(Vec<crate::fleet::VmView>, Option<VmId>), ApiError> {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let page = self.fleet.store().vms(cursor, 1024).map_err(|e| internal(&e))?;
            let Some(last) = page.last() else { break };
            cursor = Some(last.vm.id);
            for r in page {
                if host.is_some_and(|h| r.host() != Some(h)) || !r.vm.spec.name.starts_with(prefix) {
                    continue;
                }
                if out.len() == limit {
                    let next = out.last().map(|v: &crate::fleet::VmView| v.record.vm.id);
                    return Ok((out, next));
                }
                out.push(self.fleet.vm_view(r));
            }
        }
        Ok((out, None))
    }

    fn metrics(&self) -> Result<&Arc<crate::metrics::Metrics>, ApiError> {
        self.fleet.metrics().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "metrics_unavailable",
                "metric ingest is not running on this server",
            )
        })
    }

    /// The Prometheus exposition: the server's health (prometheus crate
    /// registry), then the fleet's latest values.
    fn prometheus(&self) -> Resp {
        let t = &crate::telemetry::TELEMETRY;
        t.sessions.set(self.fleet.session_count() as i64);
        let mut body = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&t.registry.gather(), &mut body) {
            tracing::error!(error = %e, "cannot encode the server's telemetry");
        }
        if let Some(m) = self.fleet.metrics() {
            m.write_prometheus(&mut body);
            write_spool_drops(m, &mut body);
        }
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    /// A server-sent events stream of one host's or VM's values: one
    /// `metrics` event per sampling tick.
    fn metric_stream(&self, m: Arc<crate::metrics::Metrics>, owner: crate::metrics::window::Owner) -> Resp {
        sse(m.subscribe(), move |up: &crate::metrics::LiveUpdate| {
            let values: Vec<_> = up
                .values
                .iter()
                .filter(|(k, _)| k.owner == owner)
                .map(|(k, v)| json!({"name": k.metric.name(), "label": k.label.as_deref(), "value": v}))
                .collect();
            if values.is_empty() {
                return None;
            }
            let data = json!({"owner": owner.kind(), "id": owner.id_string(), "host": up.host, "ts_ms": up.ts_ms, "values": values});
            Some(Bytes::from(format!("event: metrics\ndata: {data}\n\n")))
        })
    }

    /// A server-sent events stream of the fleet's events, filtered.
    fn events(&self, host: Option<HostId>, vm: Option<VmId>) -> Resp {
        sse(self.fleet.bus.subscribe(), move |ev: &crate::bus::FleetEvent| {
            if !ev.matches(host, vm) {
                return None;
            }
            let data = serde_json::to_string(ev).unwrap_or_default();
            Some(Bytes::from(format!(
                "id: {}\nevent: {}\ndata: {data}\n\n",
                ev.seq,
                ev.kind.as_str()
            )))
        })
    }
}

/// Streams a broadcast channel as server-sent events: `render` turns an
/// item into an event (or skips it); keep-alives every 15 s and a `lagged`
/// event when the client falls behind.
fn sse<T: Send + Sync + 'static>(
    mut sub: broadcast::Receiver<Arc<T>>,
    render: impl Fn(&T) -> Option<Bytes> + Send + 'static,
) -> Resp {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if tx.send(Bytes::from_static(b": connected\n\n")).await.is_err() {
            return;
        }
        loop {
            let chunk = match tokio::time::timeout(SSE_KEEPALIVE, sub.recv()).await {
                Err(_) => Bytes::from_static(b": keep-alive\n\n"),
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    Bytes::from(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"))
                }
                Ok(Ok(item)) => match render(&item) {
                    Some(b) => b,
                    None => continue,
                },
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(SseBody { rx }.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An empty JSON object body (or none).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Admin => "admin",
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
        let host = rec
            .host()
            .ok_or_else(|| vm_error(VmError::Invalid(format!("VM {id} is not on a host of the fleet"))))?;
        self.command(host, kind).await
    }
}

fn vm_error(e: VmError) -> ApiError {
    match e {
        VmError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", m),
        e @ VmError::NameTaken(_) => ApiError::new(StatusCode::CONFLICT, "name_taken", e.to_string()),
        e @ VmError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        VmError::NoFit(n) => ApiError::new(StatusCode::CONFLICT, "no_capacity", n.to_string()),
        VmError::Busy(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
        VmError::NotConnected(m) => ApiError::new(StatusCode::CONFLICT, "not_connected", m),
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
/// Query parameters, percent-decoded (`+` is a space).
struct Query<'a>(Vec<(&'a str, std::borrow::Cow<'a, str>)>);

/// Percent-decodes a query value (`+` is a space); a malformed escape is
/// kept as it is.
fn decode_query(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(v);
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

impl<'a> Query<'a> {
    fn parse(q: Option<&'a str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k, decode_query(v))
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_ref())
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

fn bad_query(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

/// `host=<id>` or `vm=<id>`, exactly one.
fn metrics_owner(q: &Query<'_>) -> Result<crate::metrics::window::Owner, ApiError> {
    use crate::metrics::window::Owner;
    match (q.get("host"), q.get("vm")) {
        (Some(h), None) => Ok(Owner::Host(parse_host_id(h)?)),
        (None, Some(v)) => Ok(Owner::Vm(parse_vm_id(v)?)),
        _ => Err(bad_query(
            "give exactly one of host=<host id> or vm=<VM id>".into(),
        )),
    }
}

/// A time: milliseconds since the epoch, or a duration before now (`15m`, `-2h`).
fn metrics_time(k: &str, v: &str, now: u64) -> Result<u64, ApiError> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    let d = novacron_shared::duration::parse(v.trim_start_matches('-')).map_err(|e| {
        bad_query(format!(
            "{k}={v:?} is neither milliseconds since the epoch nor a duration before now like 15m: {e}"
        ))
    })?;
    Ok(now.saturating_sub(d.as_millis() as u64))
}

fn metrics_request(q: &Query<'_>) -> Result<crate::metrics::query::Request, ApiError> {
    let owner = metrics_owner(q)?;
    let now = unix_ms(SystemTime::now());
    let from_ms = match q.get("from") {
        Some(v) => metrics_time("from", v, now)?,
        None => now.saturating_sub(5 * 60_000),
    };
    let to_ms = match q.get("to") {
        Some(v) => metrics_time("to", v, now)?,
        None => now,
    };
    if from_ms > to_ms {
        return Err(bad_query(format!("from ({from_ms}) is after to ({to_ms})")));
    }
    let mut metrics = Vec::new();
    for name in q.get("series").unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let m = novacron_shared::metrics::Metric::from_name(name).ok_or_else(|| {
            bad_query(format!(
                "unknown series {name:?}; known: {}",
                novacron_shared::metrics::Metric::ALL
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let fits = matches!(
            (m.owner(), owner),
            (
                novacron_shared::metrics::Owner::Host,
                crate::metrics::window::Owner::Host(_)
            ) | (
                novacron_shared::metrics::Owner::Vm,
                crate::metrics::window::Owner::Vm(_)
            )
        );
        if !fits {
            return Err(bad_query(format!(
                "series {name:?} is not a {} series",
                owner.kind()
            )));
        }
        metrics.push(m);
    }
    let resolution = q.get("resolution").unwrap_or("auto").parse().map_err(bad_query)?;
    Ok(crate::metrics::query::Request {
        owner,
        metrics,
        from_ms,
        to_ms,
        resolution,
    })
}

/// Agents' spool drops, per host (reported by the agents with each batch).
fn write_spool_drops(m: &crate::metrics::Metrics, out: &mut String) {
    use std::fmt::Write as _;
    let states = m.stream_states_now();
    if states.is_empty() {
        return;
    }
    out.push_str("# HELP novacron_agent_spool_dropped_batches_total Metric batches an agent's full spool dropped (this spool epoch), as reported by the agent.\n");
    out.push_str("# TYPE novacron_agent_spool_dropped_batches_total counter\n");
    for (h, r) in states {
        let _ = writeln!(
            out,
            "novacron_agent_spool_dropped_batches_total{{host=\"{h}\"}} {}",
            r.agent_dropped
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let q = Query::parse(Some("series=host.cpu%2Chost.memory&from=15m&name=a+b&bad=%zz%4"));
        assert_eq!(q.get("series"), Some("host.cpu,host.memory"));
        assert_eq!(q.get("from"), Some("15m"));
        assert_eq!(q.get("name"), Some("a b"));
        assert_eq!(q.get("bad"), Some("%zz%4"));
        assert_eq!(q.get("none"), None);
    }
}
