//! The route table: every route's method, path, role and OpenAPI
//! operation id, in one place. The router, the role checks and the test
//! that holds `openapi.json` to the routes all read it.

use crate::store::Role;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (no token).
    Public,
    /// At least this role.
    Role(Role),
}

/// What a route does.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Healthz,
    OpenApi,
    ListHosts,
    GetHost,
    RevokeHost,
    CordonHost,
    UncordonHost,
    DrainHost,
    SetMaintenance,
    FenceHost,
    GetHa,
    ReleaseHa,
    GetBurst,
    GetHostVms,
    PutHostVms,
    HostCommand,
    CreateVm,
    ListVms,
    GetVm,
    DeleteVm,
    StartVm,
    StopVm,
    SuspendVm,
    ResumeVm,
    RebootVm,
    MigrateVm,
    CreateSnapshot,
    RevertSnapshot,
    DeleteSnapshot,
    ListOperations,
    GetOperation,
    Events,
    CreateApiToken,
    ListApiTokens,
    DeleteApiToken,
    CreateJoinToken,
    ListAudit,
    PrometheusMetrics,
    QueryMetrics,
    LatestMetrics,
    StreamMetrics,
    MetricStreams,
}

/// One route.
#[derive(Debug)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path pattern; `{name}` matches one segment.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// What it does.
    pub op: Op,
    /// Its `operationId` in openapi.json.
    pub operation_id: &'static str,
}

impl Route {
    /// Whether the route changes anything (and so is audited).
    pub fn mutating(&self) -> bool {
        self.method != "GET"
    }
}

const fn r(
    method: &'static str,
    path: &'static str,
    access: Access,
    op: Op,
    operation_id: &'static str,
) -> Route {
    Route {
        method,
        path,
        access,
        op,
        operation_id,
    }
}

const PUBLIC: Access = Access::Public;
const VIEWER: Access = Access::Role(Role::Viewer);
const OPERATOR: Access = Access::Role(Role::Operator);
const ADMIN: Access = Access::Role(Role::Admin);

/// Every route of the API.
pub static ROUTES: &[Route] = &[
    r("GET", "/healthz", PUBLIC, Op::Healthz, "healthz"),
    r("GET", "/v1/openapi.json", PUBLIC, Op::OpenApi, "getOpenApi"),
    r(
        "GET",
        "/metrics",
        PUBLIC,
        Op::PrometheusMetrics,
        "getPrometheusMetrics",
    ),
    r("GET", "/v1/metrics", VIEWER, Op::QueryMetrics, "queryMetrics"),
    r(
        "GET",
        "/v1/metrics/latest",
        VIEWER,
        Op::LatestMetrics,
        "getLatestMetrics",
    ),
    r(
        "GET",
        "/v1/metrics/stream",
        VIEWER,
        Op::StreamMetrics,
        "streamMetrics",
    ),
    r(
        "GET",
        "/v1/metrics/streams",
        VIEWER,
        Op::MetricStreams,
        "listMetricStreams",
    ),
    r("GET", "/v1/hosts", VIEWER, Op::ListHosts, "listHosts"),
    r("GET", "/v1/hosts/{host}", VIEWER, Op::GetHost, "getHost"),
    r(
        "POST",
        "/v1/hosts/{host}/revoke",
        ADMIN,
        Op::RevokeHost,
        "revokeHost",
    ),
    r(
        "POST",
        "/v1/hosts/{host}/cordon",
        OPERATOR,
        Op::CordonHost,
        "cordonHost",
    ),
    r(
        "POST",
        "/v1/hosts/{host}/uncordon",
        OPERATOR,
        Op::UncordonHost,
        "uncordonHost",
    ),
    r(
        "POST",
        "/v1/hosts/{host}/drain",
        OPERATOR,
        Op::DrainHost,
        "drainHost",
    ),
    r(
        "POST",
        "/v1/hosts/{host}/maintenance",
        OPERATOR,
        Op::SetMaintenance,
        "setHostMaintenance",
    ),
    r(
        "POST",
        "/v1/hosts/{host}/fence",
        ADMIN,
        Op::FenceHost,
        "fenceHost",
    ),
    r("GET", "/v1/ha", VIEWER, Op::GetHa, "getHa"),
    r("POST", "/v1/ha/release", ADMIN, Op::ReleaseHa, "releaseHa"),
    r("GET", "/v1/burst", VIEWER, Op::GetBurst, "getBurst"),
    r(
        "GET",
        "/v1/hosts/{host}/vms",
        VIEWER,
        Op::GetHostVms,
        "getHostVms",
    ),
    r("PUT", "/v1/hosts/{host}/vms", ADMIN, Op::PutHostVms, "putHostVms"),
    r(
        "POST",
        "/v1/hosts/{host}/commands",
        ADMIN,
        Op::HostCommand,
        "runHostCommand",
    ),
    r("POST", "/v1/vms", OPERATOR, Op::CreateVm, "createVm"),
    r("GET", "/v1/vms", VIEWER, Op::ListVms, "listVms"),
    r("GET", "/v1/vms/{vm}", VIEWER, Op::GetVm, "getVm"),
    r("DELETE", "/v1/vms/{vm}", OPERATOR, Op::DeleteVm, "deleteVm"),
    r("POST", "/v1/vms/{vm}/start", OPERATOR, Op::StartVm, "startVm"),
    r("POST", "/v1/vms/{vm}/stop", OPERATOR, Op::StopVm, "stopVm"),
    r(
        "POST",
        "/v1/vms/{vm}/suspend",
        OPERATOR,
        Op::SuspendVm,
        "suspendVm",
    ),
    r("POST", "/v1/vms/{vm}/resume", OPERATOR, Op::ResumeVm, "resumeVm"),
    r("POST", "/v1/vms/{vm}/reboot", OPERATOR, Op::RebootVm, "rebootVm"),
    r(
        "POST",
        "/v1/vms/{vm}/migrate",
        OPERATOR,
        Op::MigrateVm,
        "migrateVm",
    ),
    r(
        "POST",
        "/v1/vms/{vm}/snapshots",
        OPERATOR,
        Op::CreateSnapshot,
        "createSnapshot",
    ),
    r(
        "POST",
        "/v1/vms/{vm}/snapshots/{name}/revert",
        OPERATOR,
        Op::RevertSnapshot,
        "revertSnapshot",
    ),
    r(
        "DELETE",
        "/v1/vms/{vm}/snapshots/{name}",
        OPERATOR,
        Op::DeleteSnapshot,
        "deleteSnapshot",
    ),
    r(
        "GET",
        "/v1/operations",
        VIEWER,
        Op::ListOperations,
        "listOperations",
    ),
    r(
        "GET",
        "/v1/operations/{op}",
        VIEWER,
        Op::GetOperation,
        "getOperation",
    ),
    r("GET", "/v1/events", VIEWER, Op::Events, "streamEvents"),
    r(
        "POST",
        "/v1/api-tokens",
        ADMIN,
        Op::CreateApiToken,
        "createApiToken",
    ),
    r("GET", "/v1/api-tokens", ADMIN, Op::ListApiTokens, "listApiTokens"),
    r(
        "DELETE",
        "/v1/api-tokens/{token}",
        ADMIN,
        Op::DeleteApiToken,
        "deleteApiToken",
    ),
    r(
        "POST",
        "/v1/join-tokens",
        ADMIN,
        Op::CreateJoinToken,
        "createJoinToken",
    ),
    r("GET", "/v1/audit", ADMIN, Op::ListAudit, "listAudit"),
];

/// The result of looking a request up.
#[derive(Debug)]
pub enum Match<'a> {
    /// This route, with the path's parameters in order.
    Found(&'static Route, Vec<&'a str>),
    /// The path exists, not with this method; the methods it has.
    WrongMethod(Vec<&'static str>),
    /// No such path.
    NotFound,
}

fn params<'a>(pattern: &str, segments: &[&'a str]) -> Option<Vec<&'a str>> {
    let pat: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    if pat.len() != segments.len() {
        return None;
    }
    let mut out = Vec::new();
    for (p, s) in pat.iter().zip(segments) {
        if p.starts_with('{') {
            out.push(*s);
        } else if p != s {
            return None;
        }
    }
    Some(out)
}

/// Finds the route for `method` and the path's `segments`.
pub fn find<'a>(method: &str, segments: &[&'a str]) -> Match<'a> {
    let mut methods = Vec::new();
    for route in ROUTES {
        if let Some(p) = params(route.path, segments) {
            if route.method == method {
                return Match::Found(route, p);
            }
            methods.push(route.method);
        }
    }
    if methods.is_empty() {
        Match::NotFound
    } else {
        Match::WrongMethod(methods)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn seg(p: &str) -> Vec<&str> {
        p.split('/').filter(|s| !s.is_empty()).collect()
    }

    #[test]
    fn routes_match_with_parameters_and_methods() {
        match find("POST", &seg("/v1/vms/abc/snapshots/s1/revert")) {
            Match::Found(r, p) => {
                assert_eq!(r.op, Op::RevertSnapshot);
                assert_eq!(p, vec!["abc", "s1"]);
            }
            other => panic!("{other:?}"),
        }
        match find("PATCH", &seg("/v1/vms")) {
            Match::WrongMethod(m) => assert_eq!(m, vec!["POST", "GET"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(find("GET", &seg("/v1/nope")), Match::NotFound));
        assert!(matches!(find("GET", &seg("/v1/vms/a/b/c/d/e")), Match::NotFound));
    }

    #[test]
    fn every_route_is_unique_and_every_mutation_needs_an_operator_at_least() {
        let mut seen = BTreeSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.method, r.path)),
                "duplicate {} {}",
                r.method,
                r.path
            );
            if r.mutating() {
                assert!(
                    matches!(r.access, Access::Role(Role::Operator | Role::Admin)),
                    "{} {} mutates but is open to {:?}",
                    r.method,
                    r.path,
                    r.access
                );
            }
        }
        let ids: BTreeSet<_> = ROUTES.iter().map(|r| r.operation_id).collect();
        assert_eq!(ids.len(), ROUTES.len(), "operation ids are unique");
    }

    /// openapi.json documents exactly these routes, with their roles.
    #[test]
    fn the_openapi_document_matches_the_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(super::super::OPENAPI).unwrap_or_else(|e| panic!("openapi.json: {e}"));
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        let mut documented = BTreeSet::new();
        let paths = doc["paths"].as_object().unwrap_or_else(|| panic!("no paths"));
        for (path, item) in paths {
            let item = item.as_object().unwrap_or_else(|| panic!("{path}"));
            for (method, op) in item {
                if method == "parameters" {
                    continue;
                }
                let role = op["x-required-role"].as_str().unwrap_or("none").to_string();
                let id = op["operationId"].as_str().unwrap_or("").to_string();
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path} documents no responses"
                );
                documented.insert((method.to_uppercase(), path.clone(), id, role));
            }
        }
        let routes: BTreeSet<_> = ROUTES
            .iter()
            .map(|r| {
                let role = match r.access {
                    Access::Public => "none",
                    Access::Role(Role::Viewer) => "viewer",
                    Access::Role(Role::Operator) => "operator",
                    Access::Role(Role::Admin) => "admin",
                };
                (
                    r.method.to_string(),
                    r.path.to_string(),
                    r.operation_id.to_string(),
                    role.to_string(),
                )
            })
            .collect();
        let missing: Vec<_> = routes.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "openapi.json is out of date.\nroutes not documented (or documented differently): {missing:#?}\ndocumented but not routed: {extra:#?}"
        );
    }
}
