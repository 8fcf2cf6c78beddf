//! Metrics: range queries, latest values, the live stream and the
//! per-host ingest state.

use std::sync::Arc;

use hyper::StatusCode;
use novacron_api::metrics::{LiveMetrics, LiveValue, MetricStreams};
use novacron_api::ErrorCode;
use novacron_shared::metrics::{Metric, Owner as MetricOwner};

use super::http::{parse_id, reply, sse, sse_event, Query, Resp};
use super::{convert, Api, ApiError, Call};
use crate::api::routes::Op;
use crate::metrics::window::Owner;
use crate::metrics::{LiveUpdate, Metrics};

/// Handles the metric routes.
pub(super) async fn handle(api: &Api, call: &Call) -> Result<Resp, ApiError> {
    let m = api.fleet.metrics().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::MetricsUnavailable,
            "metric ingest is not running on this server",
        )
    })?;
    match call.op {
        Op::QueryMetrics => {
            let req = request(&call.query, api.clock.unix_ms())?;
            let owner = req.owner;
            let answer = m.query(&req).map_err(|e| ApiError::internal(&e))?;
            reply(StatusCode::OK, &convert::metrics_answer(answer, owner))
        }
        Op::LatestMetrics => {
            let kind = match call.query.get("owner") {
                None | Some("") | Some("all") => None,
                Some("host") | Some("hosts") => Some(MetricOwner::Host),
                Some("vm") | Some("vms") => Some(MetricOwner::Vm),
                Some(o) => {
                    return Err(ApiError::bad_query(format!(
                        "owner must be host, vm or all, not {o:?}"
                    )))
                }
            };
            reply(StatusCode::OK, &convert::latest(m.latest(kind)))
        }
        Op::StreamMetrics => Ok(stream(m.clone(), owner(&call.query)?)),
        _ => {
            let streams = m
                .stream_states()
                .await
                .into_iter()
                .map(|(h, r)| convert::metric_stream(h, r))
                .collect();
            reply(StatusCode::OK, &MetricStreams { streams })
        }
    }
}

/// A server-sent events stream of one host's or VM's values: one
/// `metrics` event per sampling tick.
fn stream(m: Arc<Metrics>, owner: Owner) -> Resp {
    sse(m.subscribe(), move |up: &LiveUpdate| {
        let values: Vec<_> = up
            .values
            .iter()
            .filter(|(k, _)| k.owner == owner)
            .map(|(k, v)| LiveValue {
                name: k.metric.name().to_string(),
                label: k.label.as_deref().map(str::to_string),
                value: *v,
            })
            .collect();
        if values.is_empty() {
            return None;
        }
        let event = LiveMetrics {
            owner: convert::owner_kind(owner),
            id: owner.id_string(),
            host: up.host,
            ts_ms: up.ts_ms,
            values,
        };
        sse_event(None, "metrics", &event)
    })
}

/// `host=<id>` or `vm=<id>`, exactly one.
fn owner(q: &Query) -> Result<Owner, ApiError> {
    match (q.get("host"), q.get("vm")) {
        (Some(h), None) => Ok(Owner::Host(parse_id(h)?)),
        (None, Some(v)) => Ok(Owner::Vm(parse_id(v)?)),
        _ => Err(ApiError::bad_query(
            "give exactly one of host=<host id> or vm=<VM id>",
        )),
    }
}

/// A time: milliseconds since the epoch, or a duration before now (`15m`, `-2h`).
fn time(k: &str, v: &str, now: u64) -> Result<u64, ApiError> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    let d = novacron_shared::duration::parse(v.trim_start_matches('-')).map_err(|e| {
        ApiError::bad_query(format!(
            "{k}={v:?} is neither milliseconds since the epoch nor a duration before now like 15m: {e}"
        ))
    })?;
    Ok(now.saturating_sub(d.as_millis() as u64))
}

/// The range query a query string asks for, relative to `now` (Unix ms).
fn request(q: &Query, now: u64) -> Result<crate::metrics::query::Request, ApiError> {
    let owner = owner(q)?;
    let from_ms = match q.get("from") {
        Some(v) => time("from", v, now)?,
        None => now.saturating_sub(5 * 60_000),
    };
    let to_ms = match q.get("to") {
        Some(v) => time("to", v, now)?,
        None => now,
    };
    if from_ms > to_ms {
        return Err(ApiError::bad_query(format!(
            "from ({from_ms}) is after to ({to_ms})"
        )));
    }
    let mut metrics = Vec::new();
    for name in q.get("series").unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let m = Metric::from_name(name).ok_or_else(|| {
            ApiError::bad_query(format!(
                "unknown series {name:?}; known: {}",
                Metric::ALL
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let fits = matches!(
            (m.owner(), owner),
            (MetricOwner::Host, Owner::Host(_)) | (MetricOwner::Vm, Owner::Vm(_))
        );
        if !fits {
            return Err(ApiError::bad_query(format!(
                "series {name:?} is not a {} series",
                owner.kind()
            )));
        }
        metrics.push(m);
    }
    let resolution = q
        .get("resolution")
        .unwrap_or("auto")
        .parse()
        .map_err(ApiError::bad_query)?;
    Ok(crate::metrics::query::Request {
        owner,
        metrics,
        from_ms,
        to_ms,
        resolution,
    })
}
