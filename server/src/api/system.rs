//! Unauthenticated routes: `/healthz`, the OpenAPI document and the
//! Prometheus exposition (`/metrics`).

use hyper::body::Bytes;
use hyper::StatusCode;
use novacron_api::{Health, HealthStatus};

use super::http::{bytes_response, reply, Resp};
use super::{Api, ApiError, Call};
use crate::api::routes::Op;

/// Handles the system routes.
pub(super) fn handle(api: &Api, call: &Call) -> Result<Resp, ApiError> {
    match call.op {
        Op::OpenApi => Ok(bytes_response(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(served_document().as_bytes()),
        )),
        Op::PrometheusMetrics => Ok(prometheus(api)),
        _ => reply(
            StatusCode::OK,
            &Health {
                status: HealthStatus::Ok,
            },
        ),
    }
}

/// The Prometheus exposition: the server's health (prometheus crate
/// registry), then the fleet's latest values.
fn prometheus(api: &Api) -> Resp {
    let t = &crate::telemetry::TELEMETRY;
    t.sessions.set(api.fleet.session_count() as i64);
    let mut body = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&t.registry.gather(), &mut body) {
        tracing::error!(error = %e, "cannot encode the server's telemetry");
    }
    if let Some(m) = api.fleet.metrics() {
        m.write_prometheus(&mut body);
        write_spool_drops(m, &mut body);
    }
    bytes_response(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        Bytes::from(body),
    )
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

/// The generated OpenAPI document, built once.
fn served_document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(super::doc::document_text)
}
