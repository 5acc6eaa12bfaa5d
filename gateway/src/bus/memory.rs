//! The in-process bus: a publish goes straight to this node's hub. One node only.

use std::sync::Arc;
use std::time::Instant;

use crate::hub::Hub;
use crate::metrics::Metrics;

pub struct MemoryBus {
    hub: Arc<Hub>,
    metrics: Metrics,
}

impl MemoryBus {
    pub fn new(hub: Arc<Hub>, metrics: Metrics) -> MemoryBus {
        MemoryBus { hub, metrics }
    }

    pub fn publish(&self, channel: &str, payload: &[u8]) {
        self.metrics.messages_received.inc();
        self.hub.publish(channel, payload, None, Instant::now());
    }

    /// A `join`/`leave` frame to `channel`'s subscribers (all of them are on this node).
    pub fn publish_event(&self, channel: &str, frame: &str) {
        self.hub.notify(channel, frame.to_owned());
    }
}
