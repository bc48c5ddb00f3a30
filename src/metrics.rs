//! The node's metrics, served as Prometheus text on the admin port's `/metrics`.
//!
//! One registry per process, reached through [`get`]. Metrics are cross-cutting — the
//! supervisor, the store, the authenticator and the control plane each bump their own —
//! and a node process runs exactly one of each, so a process-wide registry is simpler than
//! threading a handle through every layer (the `prometheus-client` families are lock-free
//! to update and cheap to clone).
//!
//! Names (all prefixed `unibus_`):
//! - `ctl_requests_total{op,outcome}` and `ctl_request_seconds{op}`: control-plane requests
//!   by operation and outcome (`ok` or the error kind);
//! - `auth_decisions_total{result,reason}`: callout decisions; `result` is `admitted`,
//!   `denied`, `would_deny` (bus-auth soft) or `forwarded` (a starting node passed a
//!   peer's answer on);
//! - `nats_restarts_total`: nats-server restarts by the supervisor;
//! - `store_op_seconds{op}` and `store_errors_total{op,kind}`: store calls;
//! - `bucket_replica_lag{bucket}`: replicas wanted minus replicas current, per KV bucket;
//! - `reconciler_repairs_total{kind}`: repairs of interrupted two-bucket writes.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

// Labels are `&'static str` where every value is a fixed name (an operation, an outcome,
// an error kind): these families are looked up several times per request, and a `String`
// per label was an allocation and a free each time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOutcome {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpKind {
    pub op: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Decision {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Bucket {
    pub bucket: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~3.3 s, doubling: control-plane and store calls live in this range.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 16,
    ))
}

pub struct Metrics {
    registry: Registry,
    pub ctl_requests: Family<OpOutcome, Counter>,
    pub ctl_latency: Family<Op, Histogram, fn() -> Histogram>,
    pub auth_decisions: Family<Decision, Counter>,
    pub nats_restarts: Counter,
    pub store_latency: Family<Op, Histogram, fn() -> Histogram>,
    pub store_errors: Family<OpKind, Counter>,
    pub bucket_lag: Family<Bucket, Gauge>,
    pub reconciler_repairs: Family<Kind, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("unibus");
        let m = Metrics {
            ctl_requests: Family::default(),
            ctl_latency: Family::new_with_constructor(latency_histogram),
            auth_decisions: Family::default(),
            nats_restarts: Counter::default(),
            store_latency: Family::new_with_constructor(latency_histogram),
            store_errors: Family::default(),
            bucket_lag: Family::default(),
            reconciler_repairs: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ctl_requests",
            "Control-plane requests by operation and outcome",
            m.ctl_requests.clone(),
        );
        registry.register(
            "ctl_request_seconds",
            "Control-plane request latency",
            m.ctl_latency.clone(),
        );
        registry.register(
            "auth_decisions",
            "Auth callout decisions by result and reason",
            m.auth_decisions.clone(),
        );
        registry.register(
            "nats_restarts",
            "nats-server restarts by the supervisor",
            m.nats_restarts.clone(),
        );
        registry.register(
            "store_op_seconds",
            "Store call latency",
            m.store_latency.clone(),
        );
        registry.register(
            "store_errors",
            "Store call errors by operation and kind",
            m.store_errors.clone(),
        );
        registry.register(
            "bucket_replica_lag",
            "KV bucket replicas wanted minus current",
            m.bucket_lag.clone(),
        );
        registry.register(
            "reconciler_repairs",
            "Reconciler repairs by kind",
            m.reconciler_repairs.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The whole registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn ctl_request(&self, op: &'static str, outcome: &'static str, took: Duration) {
        self.ctl_requests
            .get_or_create(&OpOutcome { op, outcome })
            .inc();
        self.ctl_latency
            .get_or_create(&Op { op })
            .observe(took.as_secs_f64());
    }

    pub fn auth_decision(&self, result: &'static str, reason: &'static str) {
        self.auth_decisions
            .get_or_create(&Decision { result, reason })
            .inc();
    }

    pub fn store_op(&self, op: &'static str, took: Duration, error: Option<&'static str>) {
        self.store_latency
            .get_or_create(&Op { op })
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.store_errors.get_or_create(&OpKind { op, kind }).inc();
        }
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_text_format() {
        let m = get();
        m.ctl_request("rooms.create", "ok", Duration::from_millis(3));
        m.auth_decision("denied", "unknown_key");
        m.nats_restarts.inc();
        let text = m.encode();
        assert!(
            text.contains("unibus_ctl_requests_total{op=\"rooms.create\",outcome=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("unibus_auth_decisions_total{result=\"denied\",reason=\"unknown_key\"}"),
            "{text}"
        );
        assert!(text.contains("unibus_nats_restarts_total"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
