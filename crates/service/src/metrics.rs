//! The one Prometheus registry of a daemon (`prometheus-client`): counters and gauges
//! are registered once at start-up and updated lock-free; `GET /metrics` answers with
//! [`Metrics::response`] in the Prometheus text format (0.0.4).
//!
//! Names are given as exposed: a counter's name ends in `_total`, as Prometheus
//! requires (the registry adds that suffix itself, so it is taken off here first).

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;

/// Gauges told apart by labels, e.g. `clawos_launcher_vms{state="running"}`: the label
/// set is a list of `(name, value)` pairs.
pub type GaugeFamily = Family<Vec<(&'static str, String)>, Gauge>;

/// `Content-Type` of the answer: the Prometheus text format.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A daemon's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Registry,
}

/// The registry appends a full stop to every help text; ours already end with one.
fn help_text(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

/// A counter's name as the registry wants it: without `_total`, which it appends.
fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a counter exposed as `name` (ending in `_total`).
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.registry
            .register(counter_name(name), help_text(help), c.clone());
        c
    }

    /// Registers a gauge.
    pub fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.registry.register(name, help_text(help), g.clone());
        g
    }

    /// Registers a family of gauges told apart by labels.
    pub fn gauge_family(&mut self, name: &str, help: &str) -> GaugeFamily {
        let f = GaugeFamily::default();
        self.registry.register(name, help_text(help), f.clone());
        f
    }

    /// Registers a counter whose value `read` computes at each scrape, for totals kept
    /// elsewhere (e.g. summed over worker threads' own atomics).
    pub fn counter_fn(
        &mut self,
        name: &str,
        help: &str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(Computed {
            name: counter_name(name).to_owned(),
            help: help.to_owned(),
            read: Arc::new(move || Value::Counter(read())),
        }));
    }

    /// Registers a gauge whose value `read` computes at each scrape.
    pub fn gauge_fn(
        &mut self,
        name: &str,
        help: &str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(Computed {
            name: name.to_owned(),
            help: help.to_owned(),
            read: Arc::new(move || Value::Gauge(read())),
        }));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            // Only a failing writer errs, and a String does not fail.
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// The answer to `GET /metrics`.
    pub fn response(&self) -> Response {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], self.render()).into_response()
    }
}

enum Value {
    Counter(u64),
    Gauge(i64),
}

/// A metric read at scrape time.
struct Computed {
    name: String,
    /// Given to the encoder as is: collectors' help texts get no full stop added.
    help: String,
    read: Arc<dyn Fn() -> Value + Send + Sync>,
}

impl std::fmt::Debug for Computed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Computed")
            .field("name", &self.name)
            .finish()
    }
}

impl Collector for Computed {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match (self.read)() {
            Value::Counter(v) => {
                let c = ConstCounter::new(v);
                c.encode(encoder.encode_descriptor(
                    &self.name,
                    &self.help,
                    None,
                    c.metric_type(),
                )?)
            }
            Value::Gauge(v) => {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(
                    &self.name,
                    &self.help,
                    None,
                    g.metric_type(),
                )?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_keeps_names_and_help_texts_as_given() {
        let mut m = Metrics::new();
        let c = m.counter("a_things_total", "A things.");
        let g = m.gauge("b_bytes", "Bytes waiting.");
        let f = m.gauge_family("c_vms", "VMs by state.");
        m.counter_fn("d_sent_total", "Sent, summed.", || 7);
        m.gauge_fn("e_depth", "Depth.", || -2);
        c.inc_by(3);
        g.set(42);
        f.get_or_create(&vec![("state", "running".to_owned())])
            .set(2);
        let text = m.render();
        for want in [
            "# HELP a_things_total A things.\n# TYPE a_things_total counter\na_things_total 3\n",
            "# HELP b_bytes Bytes waiting.\n# TYPE b_bytes gauge\nb_bytes 42\n",
            "# HELP c_vms VMs by state.\n# TYPE c_vms gauge\nc_vms{state=\"running\"} 2\n",
            "# HELP d_sent_total Sent, summed.\n# TYPE d_sent_total counter\nd_sent_total 7\n",
            "# HELP e_depth Depth.\n# TYPE e_depth gauge\ne_depth -2\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert!(!text.contains(".."), "{text}");
        let resp = m.response();
        assert_eq!(
            resp.headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(CONTENT_TYPE.as_bytes())
        );
    }
}
