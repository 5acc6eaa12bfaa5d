//! Prometheus metrics of one publisher process (names from docs/REFERENCE.md §4) and their text
//! rendering.
//!
//! Each [`Metrics`] owns its own registry, so several publishers can run in one test process
//! without their counters mixing.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::channel::Channel;

/// The label value for every channel that is not one of the configured well-known ones.
pub const OTHER_CHANNEL: &str = "other";

/// Counters and gauges, cheap to clone (every metric is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `publisher_ticks_total`: ticks published by this process.
    pub ticks_total: IntCounter,
    /// `publisher_alerts_total`: alerts published by this process.
    pub alerts_total: IntCounter,
    /// `publisher_published_total{channel}`: messages published, by channel.
    ///
    /// The label is bounded: house style forbids a raw, client-chosen channel name as a label
    /// (every new channel would be a new time series). Only the configured tick and alert
    /// channels keep their own name; every other channel is counted under `other`.
    published_total: IntCounterVec,
    /// `publisher_publish_errors_total`: messages whose publishing failed (Redis down, timeout…);
    /// a failed batch counts each of its messages.
    pub publish_errors_total: IntCounter,
    /// `publisher_leader`: 1 while this process holds the tick lease, else 0.
    pub leader: IntGauge,
    /// Channels that are their own `channel` label value; see `published_total`.
    labelled: Vec<String>,
}

impl Metrics {
    /// Creates the metrics and registers them, with the standard `process_*` collector, in a
    /// fresh registry. `labelled` are the channels that get their own label value.
    pub fn new(labelled: &[Channel]) -> Self {
        let registry = Registry::new();
        let ticks_total =
            IntCounter::new("publisher_ticks_total", "Ticks published.").expect("valid metric");
        let alerts_total =
            IntCounter::new("publisher_alerts_total", "Alerts published.").expect("valid metric");
        let published_total = IntCounterVec::new(
            Opts::new(
                "publisher_published_total",
                "Messages published, by channel (well-known channels by name, the rest as \"other\").",
            ),
            &["channel"],
        )
        .expect("valid metric");
        let publish_errors_total = IntCounter::new(
            "publisher_publish_errors_total",
            "Messages whose publishing failed.",
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "publisher_leader",
            "1 while this process holds the tick lease.",
        )
        .expect("valid metric");

        for metric in [
            Box::new(ticks_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(alerts_total.clone()),
            Box::new(published_total.clone()),
            Box::new(publish_errors_total.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(metric).expect("unique metric names");
        }
        // Linux-only in the prometheus crate; elsewhere the process metrics are simply absent.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric names");

        let labelled: Vec<String> = labelled.iter().map(|c| c.as_str().to_owned()).collect();
        // Pre-create the well-known series so dashboards see 0 rather than no data.
        for channel in labelled.iter().map(String::as_str).chain([OTHER_CHANNEL]) {
            published_total.with_label_values(&[channel]);
        }
        Self {
            registry,
            ticks_total,
            alerts_total,
            published_total,
            publish_errors_total,
            leader,
            labelled,
        }
    }

    /// Counts `n` messages published on `channel`, under its bounded label.
    pub fn published(&self, channel: &Channel, n: u64) {
        let label = self
            .labelled
            .iter()
            .find(|known| known.as_str() == channel.as_str())
            .map_or(OTHER_CHANNEL, String::as_str);
        self.published_total.with_label_values(&[label]).inc_by(n);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_label_is_bounded() {
        let ticks = Channel::parse("ticks").unwrap();
        let metrics = Metrics::new(std::slice::from_ref(&ticks));
        metrics.published(&ticks, 2);
        metrics.published(&Channel::parse("user:42").unwrap(), 1);
        metrics.published(&Channel::parse("room:7").unwrap(), 1);
        let text = metrics.render();
        assert!(text.contains("publisher_published_total{channel=\"ticks\"} 2"));
        assert!(text.contains("publisher_published_total{channel=\"other\"} 2"));
        assert!(!text.contains("user:42"));
        assert!(text.contains("publisher_leader 0"));
    }
}
