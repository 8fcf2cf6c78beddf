//! The OpenAPI document, generated from the route table ([`ROUTES`]) and
//! the API's types (their utoipa schemas), so it cannot drift from either.
//! `server/openapi.json` is this document as committed; a test fails when
//! they differ, and `NOVACRON_WRITE_OPENAPI=1 cargo test -p novacron-server
//! --lib openapi` rewrites the file.

use std::collections::BTreeMap;

use novacron_api as api;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::routes::{Access, Op, Route, ROUTES};
use crate::store::Role;

/// The component schemas, collected from the types as they are named.
#[derive(Default)]
struct Components(BTreeMap<String, Value>);

impl Components {
    /// Adds `T` (and every type it refers to); returns its `$ref`.
    fn add<T: ToSchema>(&mut self) -> Value {
        let mut all = Vec::new();
        T::schemas(&mut all);
        all.push((T::name().into_owned(), T::schema()));
        for (name, schema) in all {
            let mut v = serde_json::to_value(schema).unwrap_or(Value::Null);
            close_variant_wrappers(&mut v);
            self.0.insert(name, v);
        }
        json!({"$ref": format!("#/components/schemas/{}", T::name())})
    }

    /// Adds a request body type; it is required unless `{}` (what an empty
    /// body reads as) is a valid value of it.
    fn body<T: ToSchema + serde::de::DeserializeOwned>(&mut self) -> Option<(Value, bool)> {
        Some((self.add::<T>(), serde_json::from_str::<T>("{}").is_err()))
    }
}

/// serde reads an externally tagged enum's variant from an object with
/// exactly one key: the `oneOf` alternatives that wrap a variant (one
/// property, required) refuse other keys, as serde does.
fn close_variant_wrappers(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(alts)) = m.get_mut("oneOf") {
                for alt in alts.iter_mut() {
                    let wraps = alt["type"] == "object"
                        && alt["properties"].as_object().is_some_and(|p| p.len() == 1)
                        && alt["required"].as_array().is_some_and(|r| r.len() == 1);
                    if let (true, Some(o)) = (wraps, alt.as_object_mut()) {
                        o.insert("additionalProperties".into(), Value::Bool(false));
                    }
                }
            }
            m.values_mut().for_each(close_variant_wrappers);
        }
        Value::Array(items) => items.iter_mut().for_each(close_variant_wrappers),
        _ => {}
    }
}

/// What one route takes and answers, beyond its method, path and role.
struct OpDoc {
    summary: &'static str,
    query: Vec<Value>,
    body: Option<(Value, bool)>,
    status: u16,
    reply: Value,
    errors: Vec<u16>,
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn id_schema(c: &mut Components, what: &str) -> Value {
    match what {
        "host" => c.add::<novacron_shared::ids::HostId>(),
        "vm" => c.add::<novacron_shared::ids::VmId>(),
        _ => c.add::<novacron_shared::ids::OpId>(),
    }
}

fn limit() -> Value {
    query(
        "limit",
        "Page size (default 100)",
        json!({"type": "integer", "minimum": 1, "maximum": 1000}),
    )
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// The metric series names, as a comma-separated list.
fn series_pattern() -> String {
    let names: Vec<String> = novacron_shared::metrics::Metric::ALL
        .iter()
        .map(|m| m.name().replace('.', "\\."))
        .collect();
    let one = format!("({})", names.join("|"));
    format!("^{one}(,{one})*$")
}

const TIME: &str = "^([0-9]{1,15}|-?[1-9][0-9]{0,3}(ms|s|m|h|d))$";

/// A route's summary, query parameters, body (and whether it is
/// required), success status and reply content.
type Parts = (&'static str, Vec<Value>, Option<(Value, bool)>, u16, Value);

fn doc(route: &Route, c: &mut Components) -> OpDoc {
    let (summary, query_params, body, status, reply): Parts = match route.op {
        Op::Healthz => ("Liveness: the server answers", vec![], None, 200, json_content(c.add::<api::Health>())),
        Op::OpenApi => ("This document", vec![], None, 200, json_content(json!({"type": "object"}))),
        Op::PrometheusMetrics => (
            "The Prometheus exposition: the server's own health, then the fleet's latest values",
            vec![],
            None,
            200,
            json!({"text/plain": {"schema": {"type": "string"}}}),
        ),
        Op::QueryMetrics => (
            "One host's or VM's series over a time range (give exactly one of host or vm; from at most to)",
            vec![
                query("host", "The host's id", id_schema(c, "host")),
                query("vm", "The VM's id", id_schema(c, "vm")),
                query("series", "Comma-separated metric names; all when absent", json!({"type": "string", "pattern": series_pattern()})),
                query("from", "Start: ms since the epoch, or a duration before now (15m); default 5m", json!({"type": "string", "pattern": TIME})),
                query("to", "End: ms since the epoch, or a duration before now; default now", json!({"type": "string", "pattern": TIME})),
                query("resolution", "auto, raw or 1m", json!({"type": "string", "enum": ["auto", "raw", "1m"]})),
            ],
            None,
            200,
            json_content(c.add::<api::metrics::MetricsAnswer>()),
        ),
        Op::LatestMetrics => (
            "The latest value of every series of every host and VM",
            vec![query("owner", "host, vm or all (default all)", json!({"type": "string", "enum": ["host", "hosts", "vm", "vms", "all"]}))],
            None,
            200,
            json_content(c.add::<api::metrics::LatestMetrics>()),
        ),
        Op::StreamMetrics => (
            "Server-sent events: one `metrics` event per sampling tick of one host or VM (give exactly one)",
            vec![
                query("host", "The host's id", id_schema(c, "host")),
                query("vm", "The VM's id", id_schema(c, "vm")),
            ],
            None,
            200,
            json!({"text/event-stream": {"schema": {"type": "string"}, "x-event-schema": c.add::<api::metrics::LiveMetrics>()}}),
        ),
        Op::MetricStreams => ("Each host's metric stream as the server stored it", vec![], None, 200, json_content(c.add::<api::metrics::MetricStreams>())),
        Op::ListHosts => ("Every host with its live status", vec![], None, 200, json_content(c.add::<api::hosts::HostList>())),
        Op::GetHost => ("One host", vec![], None, 200, json_content(c.add::<api::hosts::Host>())),
        Op::RevokeHost => ("Revoke a host: its certificates are refused and its session closed", vec![], None, 200, json_content(c.add::<api::hosts::Host>())),
        Op::CordonHost => ("Cordon a host: no new VMs are placed on it", vec![], None, 200, json_content(c.add::<api::hosts::Host>())),
        Op::UncordonHost => ("Uncordon a host", vec![], None, 200, json_content(c.add::<api::hosts::Host>())),
        Op::DrainHost => (
            "Cordon a host and live-migrate every VM off it (an operation)",
            vec![],
            c.body::<api::Empty>(),
            202,
            json_content(c.add::<api::operations::OperationAccepted>()),
        ),
        Op::SetMaintenance => (
            "Put a host into maintenance (never fenced, its VMs never restarted elsewhere) or take it out",
            vec![],
            c.body::<api::ha::SetMaintenance>(),
            200,
            json_content(c.add::<api::hosts::Host>()),
        ),
        Op::FenceHost => (
            "Run the host's hardware fence command now (status or off; admin, audited); the answer carries its exit and output",
            vec![],
            c.body::<api::ha::FenceRequest>(),
            200,
            json_content(c.add::<api::ha::FenceReply>()),
        ),
        Op::GetHa => (
            "High availability: every host's lease and hardware fence, the VMs of fenced hosts (restarting, waiting or lost), restarted VMs waiting on their disk lock, the mass-failure guard and the peer witness",
            vec![],
            None,
            200,
            json_content(c.add::<api::ha::HaOverview>()),
        ),
        Op::ReleaseHa => (
            "Leave held now: the HA VMs of every fenced host are restarted elsewhere (only when those hosts are known to be down)",
            vec![],
            c.body::<api::Empty>(),
            200,
            json_content(c.add::<api::ha::HaOverview>()),
        ),
        Op::GetBurst => (
            "Cloud burst: the caps and what is used of them (instances, $/h, this month's spend), every VM with a cloud side (instance, state, cost, last error, repatriation), the VMs waiting with their reasons, and instances of this fleet no VM owns",
            vec![],
            None,
            200,
            json_content(c.add::<api::burst::BurstStatus>()),
        ),
        Op::GetHostVms => ("A host's VMs: desired, observed, the last reconcile report and recent events", vec![], None, 200, json_content(c.add::<api::hosts::HostVms>())),
        Op::PutHostVms => (
            "Replace a host's desired VMs",
            vec![],
            c.body::<api::hosts::PutHostVms>(),
            200,
            json_content(c.add::<api::hosts::HostDesired>()),
        ),
        Op::HostCommand => (
            "Run a command on the host's agent and wait for its outcome",
            vec![],
            c.body::<api::hosts::HostCommand>(),
            200,
            json_content(c.add::<api::hosts::CommandReply>()),
        ),
        Op::CreateVm => (
            "Create a VM: validated, placed by the scheduler, stored, pushed to its host",
            vec![],
            c.body::<api::vms::CreateVm>(),
            201,
            json_content(c.add::<api::vms::Vm>()),
        ),
        Op::ListVms => (
            "List VMs (id order), filtered and paged",
            vec![
                query("host", "Only VMs placed on this host", id_schema(c, "host")),
                query("name_prefix", "Only VMs whose name starts with this", json!({"type": "string"})),
                limit(),
                query("after", "VMs after this VM id (the previous page's `next`)", id_schema(c, "vm")),
            ],
            None,
            200,
            json_content(c.add::<api::vms::VmList>()),
        ),
        Op::GetVm => ("One VM with what its host reports", vec![], None, 200, json_content(c.add::<api::vms::Vm>())),
        Op::DeleteVm => ("Delete a VM (its host removes it with its volumes)", vec![], None, 200, json_content(c.add::<api::vms::DeletedVm>())),
        Op::StartVm => ("Set a VM's power to running", vec![], None, 202, json_content(c.add::<api::vms::Vm>())),
        Op::StopVm => ("Set a VM's power to stopped", vec![], None, 202, json_content(c.add::<api::vms::Vm>())),
        Op::SuspendVm => ("Set a VM's power to paused", vec![], None, 202, json_content(c.add::<api::vms::Vm>())),
        Op::ResumeVm => ("Set a VM's power to running (from paused)", vec![], None, 202, json_content(c.add::<api::vms::Vm>())),
        Op::RebootVm => ("Reboot a VM (a command on its host's agent)", vec![], None, 200, json_content(c.add::<api::hosts::CommandReply>())),
        Op::MigrateVm => (
            "Live-migrate a VM (to the given host or one the scheduler picks): an operation",
            vec![],
            c.body::<api::vms::MigrateVm>(),
            202,
            json_content(c.add::<api::operations::OperationAccepted>()),
        ),
        Op::CreateSnapshot => (
            "Take a snapshot of a VM",
            vec![],
            c.body::<api::vms::CreateSnapshot>(),
            200,
            json_content(c.add::<api::hosts::CommandReply>()),
        ),
        Op::RevertSnapshot => ("Revert a VM to a snapshot", vec![], None, 200, json_content(c.add::<api::hosts::CommandReply>())),
        Op::DeleteSnapshot => ("Delete a snapshot", vec![], None, 200, json_content(c.add::<api::hosts::CommandReply>())),
        Op::ListOperations => (
            "Operations, newest first, paged",
            vec![limit(), query("before", "Operations before this id (the previous page's `next`)", id_schema(c, "op"))],
            None,
            200,
            json_content(c.add::<api::operations::OperationList>()),
        ),
        Op::GetOperation => ("One operation", vec![], None, 200, json_content(c.add::<api::operations::Operation>())),
        Op::Events => (
            "Server-sent events of the fleet (the SSE event name is the event's type; `lagged` when the client fell behind)",
            vec![
                query("host", "Only events about this host", id_schema(c, "host")),
                query("vm", "Only events about this VM", id_schema(c, "vm")),
            ],
            None,
            200,
            json!({"text/event-stream": {"schema": {"type": "string"}, "x-event-schema": c.add::<api::events::Event>(), "x-lagged-schema": c.add::<api::events::Lagged>()}}),
        ),
        Op::CreateApiToken => (
            "Create an API token (its secret is in this reply only)",
            vec![],
            c.body::<api::tokens::CreateApiToken>(),
            201,
            json_content(c.add::<api::tokens::CreatedApiToken>()),
        ),
        Op::ListApiTokens => ("Every API token (never the secrets)", vec![], None, 200, json_content(c.add::<api::tokens::ApiTokenList>())),
        Op::DeleteApiToken => ("Delete an API token (not the last admin token)", vec![], None, 200, json_content(c.add::<api::tokens::DeletedApiToken>())),
        Op::CreateJoinToken => (
            "Create a one-time join token for a new host",
            vec![],
            c.body::<api::tokens::CreateJoinToken>(),
            201,
            json_content(c.add::<api::tokens::JoinToken>()),
        ),
        Op::ListAudit => (
            "The audit log, newest first, paged",
            vec![limit(), query("before", "Entries before this sequence number", json!({"type": "integer", "minimum": 0}))],
            None,
            200,
            json_content(c.add::<api::audit::AuditList>()),
        ),
    };
    let mut errors = vec![];
    if route.path.contains('{') || !query_params.is_empty() || body.is_some() {
        errors.push(400);
    }
    if let Access::Role(_) = route.access {
        errors.extend([401, 403, 404, 429, 504]);
        if route.mutating() {
            errors.extend([409, 503]);
        }
    }
    if body.is_some() {
        errors.push(413);
    }
    if matches!(
        route.op,
        Op::QueryMetrics | Op::LatestMetrics | Op::StreamMetrics | Op::MetricStreams
    ) {
        errors.push(503);
    }
    errors.sort_unstable();
    errors.dedup();
    OpDoc {
        summary,
        query: query_params,
        body,
        status,
        reply,
        errors,
    }
}

fn role_name(a: Access) -> &'static str {
    match a {
        Access::Public => "none",
        Access::Role(Role::Viewer) => "viewer",
        Access::Role(Role::Operator) => "operator",
        Access::Role(Role::Admin) => "admin",
    }
}

fn error_description(code: u16) -> &'static str {
    match code {
        400 => "Bad request: the body, an id, a name or the query is invalid (the message names the field)",
        401 => "No token, or an unknown one",
        403 => "The token's role is not enough",
        404 => "No such resource",
        409 => "Conflict: a name is taken, nothing fits, something is busy or not connected",
        413 => "The body is larger than the server accepts",
        429 => "Rate-limited: retry after `Retry-After` seconds",
        503 => "The audit log cannot be written (nothing was done), or metric ingest is not running",
        _ => "The request or the agent took too long",
    }
}

/// A path parameter's schema.
fn path_param(name: &str, c: &mut Components) -> Value {
    let schema = match name {
        "host" => id_schema(c, "host"),
        "vm" => id_schema(c, "vm"),
        "op" => id_schema(c, "op"),
        "token" => json!({"type": "string", "pattern": "^[0-9a-f]{16}$"}),
        _ => json!({"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", "maxLength": 63}),
    };
    json!({"name": name, "in": "path", "required": true, "schema": schema})
}

/// Rules between fields that the types' schemas cannot carry.
fn cross_field_rules(c: &mut Components) {
    // A blank disk needs a size; a clone may take its template's.
    if let Some(Value::Object(disk)) = c.0.get_mut("DiskSpec") {
        disk.insert(
            "anyOf".into(),
            json!([
                {"required": ["size_mib"], "properties": {"size_mib": {"type": "integer"}}},
                {"required": ["template"], "properties": {"template": {"type": "string"}}}
            ]),
        );
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut c = Components::default();
    let error = c.add::<api::ErrorBody>();
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for route in ROUTES {
        let d = doc(route, &mut c);
        let mut params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| path_param(p, &mut c))
            .collect();
        params.extend(d.query);
        let mut responses = Map::new();
        responses.insert(
            d.status.to_string(),
            json!({"description": d.summary, "content": d.reply}),
        );
        for code in d.errors {
            responses.insert(
                code.to_string(),
                json!({"$ref": format!("#/components/responses/E{code}")}),
            );
        }
        let mut op = Map::new();
        op.insert("operationId".into(), json!(route.operation_id));
        op.insert("summary".into(), json!(d.summary));
        op.insert("x-required-role".into(), json!(role_name(route.access)));
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Access::Role(_) = route.access {
            op.insert("security".into(), json!([{"bearer": []}]));
        } else {
            op.insert("security".into(), json!([]));
        }
        if let Some((b, required)) = d.body {
            op.insert(
                "requestBody".into(),
                json!({"required": required, "content": json_content(b)}),
            );
        }
        op.insert("responses".into(), Value::Object(responses));
        paths
            .entry(route.path)
            .or_default()
            .insert(route.method.to_lowercase(), Value::Object(op));
    }
    cross_field_rules(&mut c);
    let mut responses = Map::new();
    for code in [400u16, 401, 403, 404, 409, 413, 429, 503, 504] {
        responses.insert(
            format!("E{code}"),
            json!({"description": error_description(code), "content": json_content(error.clone())}),
        );
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "NovaCron API",
            "version": "1",
            "description": "The NovaCron fleet manager's web API. Bearer tokens with roles viewer < operator < admin (`x-required-role`); every mutating request is audited before it runs; each token is rate-limited (api.rate_limit / api.rate_burst). Errors are {\"error\": {\"code\", \"message\"}}; a wrong method gets 405 with `Allow`. Ids are 128-bit hex, hyphenated like UUIDs. Generated from the server's route table and the novacron-api types."
        },
        "servers": [{"url": "http://127.0.0.1:7080"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": responses,
            "schemas": c.0,
        },
    })
}

/// The document as served and committed: pretty JSON with a final newline.
pub fn document_text() -> String {
    let mut s = serde_json::to_string_pretty(&document()).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `server/openapi.json` is the generated document; set
    /// `NOVACRON_WRITE_OPENAPI=1` to rewrite it after changing a type or a route.
    #[test]
    fn openapi_json_is_the_generated_document() {
        let generated = document_text();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        if std::env::var_os("NOVACRON_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        let committed = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            committed == generated,
            "server/openapi.json differs from the document the types and routes give; \
             regenerate it with NOVACRON_WRITE_OPENAPI=1 cargo test -p novacron-server --lib openapi"
        );
    }

    /// Every `$ref` points at a schema the types gave.
    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let responses = doc["components"]["responses"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for part in text.split("\"$ref\":\"").skip(1) {
            let r = part.split('"').next().unwrap_or("");
            let ok = match r.rsplit_once('/') {
                Some(("#/components/schemas", n)) => schemas.contains_key(n),
                Some(("#/components/responses", n)) => responses.contains_key(n),
                _ => false,
            };
            assert!(ok, "dangling reference {r}");
        }
    }

    /// The schemas state the limits the server enforces.
    #[test]
    fn names_ids_and_limits_carry_their_rules() {
        let doc = document();
        let s = &doc["components"]["schemas"];
        assert_eq!(s["VmSpec"]["properties"]["vcpus"]["maximum"], 256);
        assert_eq!(s["VmSpec"]["properties"]["memory_mib"]["minimum"], 32);
        assert!(s["VmSpec"]["properties"]["name"]["pattern"].is_string());
        assert_eq!(s["VmId"]["pattern"], novacron_shared::ids::ID_PATTERN);
        assert_eq!(s["VmState"]["enum"][0], "stopped");
        assert_eq!(s["Power"]["enum"][0], "running");
        assert_eq!(s["DiskSpec"]["anyOf"][0]["required"][0], "size_mib");
        let list = &doc["paths"]["/v1/vms"]["get"]["parameters"];
        let limit = list
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "limit"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(limit["schema"]["maximum"], 1000);
    }
}
