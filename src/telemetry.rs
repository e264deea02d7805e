//! Prometheus metrics: the recorder (installed once per process) and the names signoff
//! records, so every call site uses the same metric and label names.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "signoff_requests_total";
pub const DECISIONS: &str = "signoff_decisions_total";
pub const TIME_TO_DECISION: &str = "signoff_time_to_decision_seconds";
pub const PENDING: &str = "signoff_pending_requests";
pub const OUTBOX_BACKLOG: &str = "signoff_outbox_backlog";
pub const DELIVERY_FAILURES: &str = "signoff_delivery_failures_total";
pub const SWEEP_FAILURES: &str = "signoff_sweep_failures_total";
pub const HTTP_DURATION: &str = "signoff_http_request_duration_seconds";
pub const SHADOW_MATCHES: &str = "signoff_shadow_matches_total";

/// Seconds: from sub-millisecond HTTP answers to hour-long approvals.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
];

/// The process-wide recorder; the first call installs it. `None` if another recorder was
/// installed first (metrics then go there and /metrics says so).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(error) => {
                    tracing::warn!(%error, "Prometheus recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The label for an optional tier or rule.
pub fn label(value: Option<&str>) -> String {
    value.unwrap_or("none").to_string()
}
