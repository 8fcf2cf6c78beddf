//! Metrics: `/v1/metrics` (a range query), `/v1/metrics/latest`,
//! `/v1/metrics/stream` (server-sent events) and `/v1/metrics/streams`.

use novacron_shared::ids::HostId;
pub use novacron_shared::metrics::{Kind, Owner};
use serde::{Deserialize, Serialize};

/// The answer to a range query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricsAnswer {
    /// `host` or `vm`.
    pub owner: Owner,
    /// Its id.
    pub id: String,
    /// Range start (ms).
    pub from_ms: u64,
    /// Range end (ms).
    pub to_ms: u64,
    /// `raw` or `1m`.
    pub resolution: String,
    /// The series, by name then label.
    pub series: Vec<Series>,
}

/// One series of a range query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Series {
    /// Metric name (`host.cpu`).
    pub name: String,
    /// The label's name (`mode`, `device`), if the metric has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_name: Option<String>,
    /// The label's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `counter` or `gauge`.
    pub kind: Kind,
    /// Unit of the values: a gauge's unit, or a counter's unit per second.
    pub unit: String,
    /// Raw: `[ts_ms, value]`; 1m: `[minute_start_ms, avg, min, max]`.
    pub points: Vec<Vec<f64>>,
}

/// `GET /v1/metrics/latest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LatestMetrics {
    /// Every host's and VM's latest values.
    pub owners: Vec<LatestOwner>,
}

/// The latest values of one host or VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LatestOwner {
    /// `host` or `vm`.
    pub owner: Owner,
    /// Its id.
    pub id: String,
    /// The host that reported last.
    pub host: Option<String>,
    /// Values.
    pub values: Vec<LatestValue>,
}

/// One latest value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LatestValue {
    /// Metric name.
    pub name: String,
    /// Label value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Unit (counters: per second).
    pub unit: String,
    /// Sample time.
    pub ts_ms: u64,
    /// Level or rate.
    pub value: f64,
}

/// One `metrics` event of `/v1/metrics/stream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveMetrics {
    /// `host` or `vm`.
    pub owner: Owner,
    /// Its id.
    pub id: String,
    /// The host that reported.
    pub host: HostId,
    /// Sample time.
    pub ts_ms: u64,
    /// Values.
    pub values: Vec<LiveValue>,
}

/// One value of a [`LiveMetrics`] event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveValue {
    /// Metric name.
    pub name: String,
    /// Label value.
    pub label: Option<String>,
    /// Level or rate.
    pub value: f64,
}

/// `GET /v1/metrics/streams`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricStreams {
    /// One per host that ever sent metrics.
    pub streams: Vec<MetricStream>,
}

/// What the server knows about one host's metric stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricStream {
    /// The host.
    pub host: HostId,
    /// The agent spool's epoch.
    pub epoch: u64,
    /// The highest sequence number stored in this epoch.
    pub stored_upto_seq: u64,
    /// Batches stored (all epochs).
    pub batches: u64,
    /// Batches received again after they were stored.
    pub duplicates: u64,
    /// Sequence numbers skipped (never received).
    pub missing: u64,
    /// Batches the agent reports its spool dropped (this epoch).
    pub agent_dropped: u64,
    /// When the last batch was stored, ms since the epoch.
    pub last_stored_ms: u64,
}
