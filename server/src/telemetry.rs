//! The server's own health, for Prometheus: one registry with the session,
//! ingest, API and scheduler metrics. Label sets are fixed and small (route
//! operation ids, status classes, outcomes), so its cardinality does not
//! grow with the fleet.

use std::sync::LazyLock;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Every server health metric.
#[derive(Debug)]
pub struct Telemetry {
    /// The registry the exposition encodes.
    pub registry: Registry,
    /// Connected agents.
    pub sessions: IntGauge,
    /// Metric batches stored.
    pub metrics_batches: IntCounter,
    /// Samples stored.
    pub metrics_samples: IntCounter,
    /// Batches received again (resends after a reconnect), not stored twice.
    pub metrics_duplicates: IntCounter,
    /// Sequence numbers never received.
    pub metrics_gaps: IntCounter,
    /// Malformed batches refused.
    pub metrics_refused: IntCounter,
    /// Sample time → in memory, queryable.
    pub metrics_ingest_delay: Histogram,
    /// One group commit of the metrics database.
    pub metrics_commit_duration: Histogram,
    /// Queued for the writer → committed and acknowledged.
    pub metrics_ack_delay: Histogram,
    /// Batches waiting for the writer.
    pub metrics_write_queue: IntGauge,
    /// Series in the in-memory window.
    pub metrics_series: IntGauge,
    /// Points in the in-memory window.
    pub metrics_points: IntGauge,
    /// API request latency by route operation and status class.
    pub api_duration: HistogramVec,
    /// Scheduler decisions by outcome.
    pub scheduler_decisions: IntCounterVec,
    /// HA restarts by outcome (`placed`, `no_fit`).
    pub ha_restarts: IntCounterVec,
    /// Hosts whose lease ran out (entered lease-expired or fenced).
    pub ha_lease_expiries: IntCounter,
    /// Hosts per lease state (set by the HA driver).
    pub ha_hosts: IntGaugeVec,
    /// 1 while the server is held (no restarts), else 0 (set by the HA driver).
    pub ha_held: IntGauge,
    /// From a fenced host's last frame to its VM's restart being placed.
    pub ha_restart_seconds: Histogram,
    /// Burst launches by outcome (`launched`, `adopted`, `failed`).
    pub burst_launches: IntCounterVec,
    /// Provider call errors by kind (`throttled`, `transient`, `permanent`).
    pub burst_errors: IntCounterVec,
    /// Cloud VMs per state (set by the broker, zeros included).
    pub burst_instances: IntGaugeVec,
    /// Cost accrued per burst VM, USD (one series per cloud VM: bounded by
    /// `[burst] max_instances` and the VMs being terminated).
    pub burst_vm_cost: GaugeVec,
    /// The fleet's cloud spend this month, USD.
    pub burst_month_spend: Gauge,
    /// The summed hourly price of the counted instances, USD.
    pub burst_hourly_rate: Gauge,
    /// `[burst] max_usd_per_hour`, for alerts on the hourly rate.
    pub burst_hourly_cap: Gauge,
    /// `[burst] max_usd_per_month`, for alerts on the month's spend.
    pub burst_month_cap: Gauge,
    /// Instances tagged with this fleet that no VM owns.
    pub burst_orphans: IntGauge,
    /// The server's certificates' `not_after`, Unix seconds, by `cert`
    /// (`ca`, `server`).
    pub cert_expiry: GaugeVec,
    /// Their `not_before`.
    pub cert_issued: GaugeVec,
    /// Instances the store knows that the provider no longer has (found).
    pub burst_vanished: IntCounter,
    /// A burst decision → RunInstances issued.
    pub burst_decision_seconds: Histogram,
}

/// The `outcome` label of `novacron_ha_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartOutcome {
    /// Placed on another host.
    Placed,
    /// No host fits.
    NoFit,
}

impl RestartOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::NoFit => "no_fit",
        }
    }
}

/// Exposes a certificate's validity as `cert`.
pub fn set_cert(cert: &str, info: &novacron_shared::pki::CertInfo) {
    TELEMETRY
        .cert_expiry
        .with_label_values(&[cert])
        .set(info.not_after as f64);
    TELEMETRY
        .cert_issued
        .with_label_values(&[cert])
        .set(info.not_before as f64);
}

/// The `state` label of `novacron_ha_hosts` for a lease state.
pub fn lease_state_label(s: crate::ha::lease::HostState) -> &'static str {
    use crate::ha::lease::HostState as S;
    match s {
        S::Online => "online",
        S::Suspect => "suspect",
        S::LeaseExpired => "lease_expired",
        S::Fenced => "fenced",
        S::Returning => "returning",
        S::Maintenance => "maintenance",
    }
}

/// Every lease state, for the HA driver to set each gauge (zeros included).
pub const LEASE_STATES: [crate::ha::lease::HostState; 6] = [
    crate::ha::lease::HostState::Online,
    crate::ha::lease::HostState::Suspect,
    crate::ha::lease::HostState::LeaseExpired,
    crate::ha::lease::HostState::Fenced,
    crate::ha::lease::HostState::Returning,
    crate::ha::lease::HostState::Maintenance,
];

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Only reachable through a bad name or a double registration in
        // this file: a programming error caught by the unit test.
        Err(e) => panic!("telemetry setup: {e}"),
    }
}

fn delay_buckets() -> Vec<f64> {
    vec![
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Telemetry {
    fn new() -> Telemetry {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = must($m);
                must(registry.register(Box::new(m.clone())));
                m
            }};
        }
        Telemetry {
            sessions: reg!(IntGauge::new("novacron_agent_sessions", "Agents connected now.")),
            metrics_batches: reg!(IntCounter::new(
                "novacron_metrics_batches_total",
                "Metric batches from agents stored."
            )),
            metrics_samples: reg!(IntCounter::new(
                "novacron_metrics_samples_total",
                "Metric samples from agents stored."
            )),
            metrics_duplicates: reg!(IntCounter::new(
                "novacron_metrics_duplicate_batches_total",
                "Metric batches received again after they were stored (resends); not stored twice."
            )),
            metrics_gaps: reg!(IntCounter::new(
                "novacron_metrics_missing_batches_total",
                "Metric batch sequence numbers never received (see novacron_agent_spool_dropped_batches_total)."
            )),
            metrics_refused: reg!(IntCounter::new(
                "novacron_metrics_refused_batches_total",
                "Malformed metric batches refused."
            )),
            metrics_ingest_delay: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "novacron_metrics_ingest_delay_seconds",
                    "From a batch's last sample to the moment it is queryable on the server."
                )
                .buckets(delay_buckets())
            )),
            metrics_commit_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "novacron_metrics_commit_duration_seconds",
                    "One group commit of the metrics database."
                )
                .buckets(delay_buckets())
            )),
            metrics_ack_delay: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "novacron_metrics_ack_delay_seconds",
                    "From a batch queued for the writer to its acknowledgement (ingest lag)."
                )
                .buckets(delay_buckets())
            )),
            metrics_write_queue: reg!(IntGauge::new(
                "novacron_metrics_write_queue_batches",
                "Metric batches waiting for the database writer."
            )),
            metrics_series: reg!(IntGauge::new(
                "novacron_metrics_window_series",
                "Series held in the in-memory recent window."
            )),
            metrics_points: reg!(IntGauge::new(
                "novacron_metrics_window_points",
                "Points held in the in-memory recent window."
            )),
            api_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "novacron_api_request_duration_seconds",
                    "API request latency by route (OpenAPI operation id) and status class."
                )
                .buckets(delay_buckets()),
                &["operation", "status"]
            )),
            scheduler_decisions: reg!(IntCounterVec::new(
                Opts::new(
                    "novacron_scheduler_decisions_total",
                    "Scheduler placements by outcome."
                ),
                &["outcome"]
            )),
            ha_restarts: reg!(IntCounterVec::new(
                Opts::new(
                    "novacron_ha_restarts_total",
                    "HA VM restarts on another host, by outcome (placed, no_fit)."
                ),
                &["outcome"]
            )),
            ha_lease_expiries: reg!(IntCounter::new(
                "novacron_ha_lease_expiries_total",
                "Hosts whose lease ran out (lease expired or fenced)."
            )),
            ha_hosts: reg!(IntGaugeVec::new(
                Opts::new("novacron_ha_hosts", "Hosts per lease state."),
                &["state"]
            )),
            ha_held: reg!(IntGauge::new(
                "novacron_ha_held",
                "1 while the mass-failure guard holds all restarts, else 0."
            )),
            ha_restart_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "novacron_ha_restart_seconds",
                    "From a fenced host's last frame to its HA VM being placed elsewhere."
                )
                .buckets(vec![1.0, 2.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0])
            )),
            burst_launches: reg!(IntCounterVec::new(
                Opts::new(
                    "novacron_burst_launches_total",
                    "Cloud burst launches by outcome (launched, adopted after a lookup by tag, failed)."
                ),
                &["outcome"]
            )),
            burst_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "novacron_burst_provider_errors_total",
                    "Cloud provider call errors by kind (throttled, transient, permanent)."
                ),
                &["kind"]
            )),
            burst_instances: reg!(IntGaugeVec::new(
                Opts::new("novacron_burst_vms", "VMs with a cloud side, per state."),
                &["state"]
            )),
            burst_vm_cost: reg!(GaugeVec::new(
                Opts::new(
                    "novacron_burst_vm_cost_dollars",
                    "Cost accrued in the cloud per burst VM, USD."
                ),
                &["vm"]
            )),
            burst_month_spend: reg!(Gauge::new(
                "novacron_burst_month_spend_dollars",
                "The fleet's cloud spend in the current calendar month (UTC), USD."
            )),
            burst_hourly_rate: reg!(Gauge::new(
                "novacron_burst_hourly_rate_dollars",
                "The summed hourly price of the fleet's counted cloud instances, USD per hour."
            )),
            burst_hourly_cap: reg!(Gauge::new(
                "novacron_burst_hourly_cap_dollars",
                "The configured cap on the summed hourly price of cloud instances ([burst] max_usd_per_hour), USD per hour."
            )),
            burst_month_cap: reg!(Gauge::new(
                "novacron_burst_month_cap_dollars",
                "The configured cap on the month's cloud spend ([burst] max_usd_per_month), USD."
            )),
            cert_expiry: reg!(GaugeVec::new(
                Opts::new(
                    "novacron_certificate_expiry_timestamp_seconds",
                    "When a certificate of the server stops being valid (not_after), Unix seconds."
                ),
                &["cert"]
            )),
            cert_issued: reg!(GaugeVec::new(
                Opts::new(
                    "novacron_certificate_issued_timestamp_seconds",
                    "When a certificate of the server became valid (not_before), Unix seconds."
                ),
                &["cert"]
            )),
            burst_orphans: reg!(IntGauge::new(
                "novacron_burst_orphans",
                "Instances tagged with this fleet that no VM owns."
            )),
            burst_vanished: reg!(IntCounter::new(
                "novacron_burst_vanished_instances_total",
                "Instances the store knew that the provider no longer had (their VMs went back to pending)."
            )),
            burst_decision_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "novacron_burst_decision_to_launch_seconds",
                    "From a VM's burst decision to its RunInstances call."
                )
                .buckets(delay_buckets())
            )),
            registry,
        }
    }
}

/// The `state` label of `novacron_burst_vms`.
pub fn cloud_state_label(s: crate::store::CloudState) -> &'static str {
    use crate::store::CloudState as S;
    match s {
        S::Launching => "launching",
        S::Running => "running",
        S::Stopping => "stopping",
        S::Stopped => "stopped",
        S::Starting => "starting",
        S::Terminating => "terminating",
    }
}

/// Every cloud state, for the broker to set each gauge (zeros included).
pub const CLOUD_STATES: [crate::store::CloudState; 6] = [
    crate::store::CloudState::Launching,
    crate::store::CloudState::Running,
    crate::store::CloudState::Stopping,
    crate::store::CloudState::Stopped,
    crate::store::CloudState::Starting,
    crate::store::CloudState::Terminating,
];

/// The process's telemetry.
pub static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(Telemetry::new);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_encodes() {
        TELEMETRY.metrics_batches.inc();
        TELEMETRY
            .api_duration
            .with_label_values(&["listVms", "2xx"])
            .observe(0.01);
        let families = TELEMETRY.registry.gather();
        // Vectors appear once they have a child; everything else at once.
        assert!(families.len() >= 13, "{}", families.len());
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&families, &mut out)
            .expect("encode");
        assert!(out.contains("novacron_metrics_batches_total"));
        assert!(out.contains("operation=\"listVms\""));
    }

    #[test]
    fn certificate_validity_and_burst_caps_are_exposed() {
        let info = novacron_shared::pki::CertInfo {
            serial: "01".into(),
            common_name: "server".into(),
            not_before: 1_000,
            not_after: 4_600,
        };
        // The registry is global and other tests set these too: a label
        // of this test's own, and the caps only by name.
        set_cert("telemetry-test", &info);
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&TELEMETRY.registry.gather(), &mut out)
            .unwrap();
        for line in [
            "novacron_certificate_expiry_timestamp_seconds{cert=\"telemetry-test\"} 4600",
            "novacron_certificate_issued_timestamp_seconds{cert=\"telemetry-test\"} 1000",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in {out}");
        }
        for name in [
            "novacron_burst_hourly_cap_dollars ",
            "novacron_burst_month_cap_dollars ",
        ] {
            assert!(
                out.lines().any(|l| l.starts_with(name)),
                "{name} missing in {out}"
            );
        }
    }

    #[test]
    fn ha_metrics_have_their_names_and_labels() {
        TELEMETRY
            .ha_restarts
            .with_label_values(&[RestartOutcome::NoFit.as_str()])
            .inc();
        for s in LEASE_STATES {
            TELEMETRY
                .ha_hosts
                .with_label_values(&[lease_state_label(s)])
                .set(0);
        }
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&TELEMETRY.registry.gather(), &mut out)
            .expect("encode");
        for name in [
            "novacron_ha_restarts_total{outcome=\"no_fit\"}",
            "novacron_ha_lease_expiries_total",
            "novacron_ha_hosts{state=\"lease_expired\"}",
            "novacron_ha_held",
            "novacron_ha_restart_seconds_bucket",
        ] {
            assert!(out.contains(name), "{name}");
        }
    }
}
