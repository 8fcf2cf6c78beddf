//! The web API (HTTP/1.1, JSON, under `/v1`).
//!
//! Routes, with the role each needs, are listed once in [`routes::ROUTES`]
//! and documented in `server/openapi.json` (served at `/v1/openapi.json`;
//! tests hold it to the routes). Request and response bodies are the types
//! of the `novacron-api` crate; [`convert`] maps the fleet's records to
//! them. Every request but `/healthz`, `/metrics` and the OpenAPI document
//! carries a bearer token (stored hashed) of role viewer, operator or admin;
//! each token is rate-limited (429 with `Retry-After`); every mutating
//! request is written to the audit log ([`audit::AuditSink`]) before it runs
//! and its outcome before it is answered. Bodies are size-limited, requests
//! time out, a wrong method gets 405 with `Allow`, and every error is
//! [`novacron_api::ErrorBody`] with a stable code and a message that says
//! what was wrong. `/v1/events` and `/v1/metrics/stream` are server-sent
//! events.
//!
//! This file holds the request pipeline (route, authenticate, limit,
//! authorise, audit, dispatch); one module per resource handles its routes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use novacron_api::ErrorCode;
use novacron_shared::clock::Clock;

use crate::config::ApiConfig;
use crate::fleet::{Fleet, VmError};
use crate::ratelimit::{LogLimiter, TokenBuckets};
use crate::store::{AuditRecord, Role, Store};
use crate::{secrets, warn_limited};

pub mod audit;
mod burst;
pub mod convert;
pub mod doc;
pub mod error;
mod events;
mod ha;
mod hosts;
pub mod http;
mod metrics;
mod operations;
pub mod routes;
mod system;
#[cfg(test)]
mod tests;
mod tokens;
mod vms;

pub use error::ApiError;
pub use hosts::COMMAND_TIMEOUT;
pub use http::{Body, MAX_BODY, SSE_KEEPALIVE};

use audit::AuditSink;
use http::{error_response, Query, Resp};
use routes::{Access, Match, Op, Route};

/// The committed OpenAPI document (`server/openapi.json`), for the tests
/// that hold it to the routes and the generated one; the server serves the
/// document it generates.
#[cfg(test)]
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a client has for the TLS handshake and for its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared state of the API.
#[derive(Debug)]
pub struct Api {
    fleet: Arc<Fleet>,
    store: Store,
    audit: Arc<dyn AuditSink>,
    limiter: LogLimiter,
    buckets: TokenBuckets,
    cfg: ApiConfig,
    clock: Clock,
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

/// One routed request, as a handler gets it.
pub(crate) struct Call {
    /// What the route does.
    op: Op,
    /// The path's parameters, in order.
    params: Vec<String>,
    /// The query string.
    query: Query,
    /// The request (for its body).
    req: Request<Incoming>,
    /// The token name behind it (empty on public routes).
    actor: String,
}

impl Call {
    /// The `i`th path parameter.
    fn param(&self, i: usize) -> &str {
        self.params.get(i).map_or("", String::as_str)
    }
}

impl Api {
    /// The API over the fleet and its store, on the fleet's clock.
    pub fn new(fleet: Arc<Fleet>, store: Store, cfg: ApiConfig) -> Arc<Self> {
        let audit = Arc::new(store.clone());
        let clock = fleet.clock().clone();
        Self::with_audit(fleet, store, audit, cfg, clock)
    }

    /// The API writing its audit entries to `audit` (the store in production).
    pub fn with_audit(
        fleet: Arc<Fleet>,
        store: Store,
        audit: Arc<dyn AuditSink>,
        cfg: ApiConfig,
        clock: Clock,
    ) -> Arc<Self> {
        Arc::new(Self {
            fleet,
            store,
            audit,
            limiter: LogLimiter::with_clock(20, Duration::from_secs(60), clock.clone()),
            buckets: TokenBuckets::new(cfg.rate_limit, cfg.rate_burst),
            cfg,
            clock,
        })
    }

    /// Serves HTTP on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        self.serve_on(listener, None).await;
    }

    /// Serves on `listener` until the task is dropped: HTTPS through `tls`
    /// (the handshake runs in the connection's own task, under the header
    /// timeout), plain HTTP without it. A failed handshake (a client that
    /// does not trust the certificate, a port scanner) is logged,
    /// rate-limited, and affects nothing else.
    pub async fn serve_on(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
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
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = {
                    let api = api.clone();
                    hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req, remote).await) }
                    })
                };
                let http = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .clone();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                            Ok(Err(e)) => {
                                warn_limited!(api.limiter, %remote, error = %e, "API TLS handshake failed");
                            }
                            Err(_) => {
                                warn_limited!(api.limiter, %remote, "API TLS handshake timed out");
                            }
                        }
                    }
                }
            });
        }
    }

    /// Answers one request (never fails: errors become error replies).
    pub async fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> Resp {
        let started = self.clock.now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = match self.handle_inner(req, remote).await {
            Ok(r) => r,
            Err(e) => {
                if e.status.is_server_error() {
                    tracing::error!(%method, %path, code = %e.code, message = %e.message, "API request failed");
                } else {
                    warn_limited!(self.limiter, %remote, %method, %path, code = %e.code, "API request refused");
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
            .observe(self.clock.since(started).as_secs_f64());
        resp
    }

    async fn handle_inner(&self, req: Request<Incoming>, remote: SocketAddr) -> Result<Resp, ApiError> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (route, params) = match routes::find(req.method().as_str(), &segments) {
            Match::Found(r, p) => (r, p.into_iter().map(str::to_string).collect::<Vec<_>>()),
            Match::WrongMethod(m) => {
                let mut e = ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::MethodNotAllowed,
                    format!(
                        "{} is not allowed on {path}; use {}",
                        req.method(),
                        m.join(" or ")
                    ),
                );
                e.allow = Some(m);
                return Err(e);
            }
            Match::NotFound => return Err(ApiError::not_found(format!("no route for {path}"))),
        };
        let caller = match route.access {
            Access::Public => None,
            Access::Role(need) => Some(self.authorise(&req, remote, route, &path, need)?),
        };
        let audit = match (&caller, route.mutating()) {
            (Some(c), true) => Some(self.audit_begin(c, remote, route, &path)?),
            _ => None,
        };
        let call = Call {
            op: route.op,
            params,
            query: Query::parse(req.uri().query()),
            req,
            actor: caller.as_ref().map_or("", |c| c.name.as_str()).to_string(),
        };
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, self.dispatch(call)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::Timeout,
                "the request took too long",
            )),
        };
        if let Some(seq) = audit {
            let (status, outcome) = match &result {
                Ok(r) => (r.status().as_u16(), "ok".to_string()),
                Err(e) => (e.status.as_u16(), format!("{}: {}", e.code, e.message)),
            };
            if let Err(e) = self.audit.finish(seq, status, &outcome) {
                tracing::error!(seq, error = %e, "cannot record a request's outcome in the audit log");
            }
        }
        result
    }

    /// Authenticates, rate-limits and checks the caller's role (a refused
    /// mutation is audited).
    fn authorise(
        &self,
        req: &Request<Incoming>,
        remote: SocketAddr,
        route: &Route,
        path: &str,
        need: Role,
    ) -> Result<Caller, ApiError> {
        let caller = self.authenticate(req)?;
        if let Err(wait) = self.buckets.take(&caller.id, self.clock.now()) {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
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
                ErrorCode::Forbidden,
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
                self.audit_once(&caller, remote, route, path, &e);
            }
            return Err(e);
        }
        Ok(caller)
    }

    /// Hands the request to its resource's module.
    async fn dispatch(&self, call: Call) -> Result<Resp, ApiError> {
        match call.op {
            Op::Healthz | Op::OpenApi | Op::PrometheusMetrics => system::handle(self, &call),
            Op::ListHosts
            | Op::GetHost
            | Op::RevokeHost
            | Op::CordonHost
            | Op::UncordonHost
            | Op::DrainHost
            | Op::SetMaintenance
            | Op::FenceHost
            | Op::GetHostVms
            | Op::PutHostVms
            | Op::HostCommand => hosts::handle(self, call).await,
            Op::CreateVm
            | Op::ListVms
            | Op::GetVm
            | Op::DeleteVm
            | Op::StartVm
            | Op::StopVm
            | Op::SuspendVm
            | Op::ResumeVm
            | Op::RebootVm
            | Op::MigrateVm
            | Op::CreateSnapshot
            | Op::RevertSnapshot
            | Op::DeleteSnapshot => vms::handle(self, call).await,
            Op::ListOperations | Op::GetOperation => operations::handle(self, &call),
            Op::Events => events::handle(self, &call),
            Op::CreateApiToken | Op::ListApiTokens | Op::DeleteApiToken | Op::CreateJoinToken => {
                tokens::handle(self, call).await
            }
            Op::ListAudit => audit::handle(self, &call),
            Op::GetHa | Op::ReleaseHa => ha::handle(self, call).await,
            Op::GetBurst => burst::handle(self, &call),
            Op::QueryMetrics | Op::LatestMetrics | Op::StreamMetrics | Op::MetricStreams => {
                metrics::handle(self, &call).await
            }
        }
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        let unauthenticated =
            |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthenticated, m);
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .ok_or_else(|| unauthenticated("missing `Authorization: Bearer <token>` header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| unauthenticated("the Authorization header must be `Bearer <token>`"))?;
        let hash = secrets::hash(token);
        let rec = self
            .store
            .api_token(&hash)
            .map_err(|e| ApiError::internal(&e))?
            .ok_or_else(|| unauthenticated("unknown API token"))?;
        Ok(Caller {
            name: rec.name,
            id: crate::store::token_id(&hash),
            role: rec.role,
        })
    }

    fn audit_record(&self, c: &Caller, remote: SocketAddr, route: &Route, path: &str) -> AuditRecord {
        AuditRecord {
            seq: 0,
            at_ms: self.clock.unix_ms(),
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
        self.audit
            .append(&self.audit_record(c, remote, route, path))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot write the audit log; refusing the request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::AuditUnavailable,
                    "the audit log cannot be written; nothing was done",
                )
            })
    }

    /// Audits a request refused before it ran.
    fn audit_once(&self, c: &Caller, remote: SocketAddr, route: &Route, path: &str, e: &ApiError) {
        let mut rec = self.audit_record(c, remote, route, path);
        rec.status = Some(e.status.as_u16());
        rec.outcome = format!("{}: {}", e.code, e.message);
        if let Err(err) = self.audit.append(&rec) {
            tracing::error!(error = %err, "cannot write the audit log");
        }
    }
}

fn role_name(r: Role) -> &'static str {
    convert::role_out(r).as_str()
}

/// The API error for a fleet's VM error.
fn vm_error(e: VmError) -> ApiError {
    match e {
        VmError::Invalid(m) => ApiError::bad_request(ErrorCode::InvalidSpec, m),
        e @ VmError::NameTaken(_) => ApiError::conflict(ErrorCode::NameTaken, e.to_string()),
        e @ VmError::NotFound(_) => ApiError::not_found(e.to_string()),
        VmError::NoFit(n) => ApiError::conflict(ErrorCode::NoCapacity, n.to_string()),
        VmError::Busy(m) => ApiError::conflict(ErrorCode::Conflict, m),
        e @ VmError::Stale(_) => ApiError::conflict(ErrorCode::Conflict, e.to_string()),
        VmError::NotConnected(m) => ApiError::conflict(ErrorCode::NotConnected, m),
        VmError::Store(e) => ApiError::internal(&e),
    }
}
