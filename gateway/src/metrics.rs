//! The node's Prometheus metrics (names from docs/REFERENCE.md §4) in one registry owned by the
//! node, plus the standard `process_*` collector. Labels are small fixed sets: never a channel name
//! or a client id.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the gateway exports. Cloning the handles is cheap (they are `Arc`s inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// By `transport`.
    pub connections: IntGaugeVec,
    /// By `transport`.
    pub connections_total: IntCounterVec,
    /// By `reason` and `transport`.
    pub disconnects: IntCounterVec,
    pub subscriptions: IntGauge,
    pub channels: IntGauge,
    pub messages_received: IntCounter,
    pub messages_delivered: IntCounter,
    pub messages_dropped: IntCounterVec,
    pub client_frames: IntCounterVec,
    pub delivery_latency: Histogram,
    pub redis_connected: IntGauge,
    pub redis_reconnects: IntCounter,
    /// Cluster mode: shard connections up.
    pub redis_shards: IntGauge,
    /// Cluster mode: channel subscriptions made again, by `resubscribe_reason`.
    pub redis_resubscribes: IntCounterVec,
    /// Presence entries this node holds for its sessions (and refreshes).
    pub presence_entries: IntGauge,
    /// Presence entries written to Redis: joins and refreshes.
    pub presence_written: IntCounter,
    /// Presence entries removed from Redis, by `presence_removal`.
    pub presence_removed: IntCounterVec,
    /// `join`/`leave` events not sent because the node's bounded event queue was full.
    pub presence_events_dropped: IntCounter,
    /// Control messages received (docs/REFERENCE.md §8), by `control_kind`.
    pub control_messages: IntCounterVec,
}

/// `gateway_presence_entries_removed_total{reason}`: a session left (unsubscribed or
/// closed), or an entry whose node stopped refreshing it expired and was pruned.
pub mod presence_removal {
    pub const LEAVE: &str = "leave";
    pub const EXPIRED: &str = "expired";
    pub const ALL: [&str; 2] = [LEAVE, EXPIRED];
}

/// `gateway_control_messages_total{kind}`: the control message kinds (`control.rs`), and
/// `invalid` for one that did not parse.
pub mod control_kind {
    pub const INVALID: &str = "invalid";
    /// Not handled: the node's control queue was full.
    pub const DROPPED: &str = "dropped";
}

/// Values of the `transport` label of the session counts (`gateway_connections`,
/// `gateway_connections_total`, `gateway_disconnects_total`).
pub mod transport {
    pub const WS: &str = "ws";
    pub const SSE: &str = "sse";

    pub const ALL: [&str; 2] = [WS, SSE];
}

/// Values of the `reason` label of `gateway_disconnects_total`.
pub mod reason {
    pub const CLIENT_CLOSE: &str = "client_close";
    pub const SHUTDOWN: &str = "shutdown";
    pub const SLOW_CONSUMER: &str = "slow_consumer";
    pub const HEARTBEAT_TIMEOUT: &str = "heartbeat_timeout";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const MESSAGE_TOO_BIG: &str = "message_too_big";
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    pub const BINARY_FRAME: &str = "binary_frame";
    pub const INVALID_UTF8: &str = "invalid_utf8";
    pub const MAX_CONNECTIONS: &str = "max_connections";
    pub const MAX_CONNECTIONS_PER_IP: &str = "max_connections_per_ip";
    /// Refused at connect: no token, or a bad or expired one (4401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The session's token expired without a refresh (4401).
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// Refused at connect: unusable parameters such as a bad `client_id` (4400).
    pub const BAD_REQUEST: &str = "bad_request";
    /// Refused at connect: Origin not in `origins` (4403).
    pub const ORIGIN_FORBIDDEN: &str = "origin_forbidden";
    pub const IO_ERROR: &str = "io_error";
    /// `gateway_messages_dropped_total` only: frames still queued when their session ended.
    pub const SESSION_CLOSED: &str = "session_closed";
    /// Closed by the server API's `POST /disconnect` (4409).
    pub const DISCONNECTED: &str = "disconnected";
    /// `gateway_messages_dropped_total` only: a message with history that arrived from Redis
    /// again (an offset the node had already delivered), not delivered twice.
    pub const DUPLICATE: &str = "duplicate";

    /// Every reason of `gateway_disconnects_total`.
    pub const DISCONNECTS: [&str; 17] = [
        CLIENT_CLOSE,
        SHUTDOWN,
        SLOW_CONSUMER,
        HEARTBEAT_TIMEOUT,
        RATE_LIMITED,
        MESSAGE_TOO_BIG,
        PROTOCOL_ERROR,
        BINARY_FRAME,
        INVALID_UTF8,
        MAX_CONNECTIONS,
        MAX_CONNECTIONS_PER_IP,
        UNAUTHORIZED,
        TOKEN_EXPIRED,
        BAD_REQUEST,
        ORIGIN_FORBIDDEN,
        IO_ERROR,
        DISCONNECTED,
    ];
}

/// Values of the `type` label of `gateway_client_frames_total`: the client frame types, and
/// `invalid` for a frame that did not parse.
pub mod frame_type {
    pub const SUBSCRIBE: &str = "subscribe";
    pub const UNSUBSCRIBE: &str = "unsubscribe";
    pub const PUBLISH: &str = "publish";
    pub const PING: &str = "ping";
    pub const REFRESH: &str = "refresh";
    pub const PRESENCE: &str = "presence";
    pub const INVALID: &str = "invalid";

    pub const ALL: [&str; 7] = [
        SUBSCRIBE,
        UNSUBSCRIBE,
        PUBLISH,
        PING,
        REFRESH,
        PRESENCE,
        INVALID,
    ];
}

/// `gateway_redis_resubscribes_total{reason}` values: after the node's own reconnect, after a
/// shard's connection dropped (a failover, a restart), after the server moved a slot.
pub mod resubscribe_reason {
    pub const ALL: [&str; 3] = ["reconnect", "failover", "moved"];
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            connections: IntGaugeVec::new(
                Opts::new("gateway_connections", "Open client sessions, by transport"),
                &["transport"],
            )
            .unwrap(),
            connections_total: IntCounterVec::new(
                Opts::new("gateway_connections_total", "Client sessions accepted, by transport"),
                &["transport"],
            )
            .unwrap(),
            disconnects: IntCounterVec::new(
                Opts::new("gateway_disconnects_total", "Sessions ended, by reason and transport"),
                &["reason", "transport"],
            )
            .unwrap(),
            subscriptions: IntGauge::new("gateway_subscriptions", "Session subscriptions on this node")
                .unwrap(),
            channels: IntGauge::new("gateway_channels", "Redis channels this node is subscribed to")
                .unwrap(),
            messages_received: IntCounter::new("gateway_messages_received_total", "Messages from the bus")
                .unwrap(),
            messages_delivered: IntCounter::new(
                "gateway_messages_delivered_total",
                "Message frames queued to sessions",
            )
            .unwrap(),
            messages_dropped: IntCounterVec::new(
                Opts::new("gateway_messages_dropped_total", "Message frames dropped, by reason"),
                &["reason"],
            )
            .unwrap(),
            client_frames: IntCounterVec::new(
                Opts::new("gateway_client_frames_total", "Frames received from clients, by type"),
                &["type"],
            )
            .unwrap(),
            delivery_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "gateway_delivery_latency_seconds",
                    "Publish time (when known, else arrival at the node) to frame written to the socket",
                )
                // 100 µs … ~13 s.
                .buckets(exponential_buckets(0.0001, 2.0, 18).unwrap()),
            )
            .unwrap(),
            redis_connected: IntGauge::new("gateway_redis_connected", "1 while the Redis pub/sub connection is up")
                .unwrap(),
            redis_reconnects: IntCounter::new("gateway_redis_reconnects_total", "Redis pub/sub reconnections")
                .unwrap(),
            redis_shards: IntGauge::new(
                "gateway_redis_shards",
                "Redis Cluster mode: shard pub/sub connections up",
            )
            .unwrap(),
            redis_resubscribes: IntCounterVec::new(
                Opts::new(
                    "gateway_redis_resubscribes_total",
                    "Redis Cluster mode: channel subscriptions made again, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            presence_entries: IntGauge::new(
                "gateway_presence_entries",
                "Presence entries this node holds for its sessions and refreshes",
            )
            .unwrap(),
            presence_written: IntCounter::new(
                "gateway_presence_entries_written_total",
                "Presence entries written to Redis (joins and refreshes)",
            )
            .unwrap(),
            presence_removed: IntCounterVec::new(
                Opts::new(
                    "gateway_presence_entries_removed_total",
                    "Presence entries removed from Redis, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            presence_events_dropped: IntCounter::new(
                "gateway_presence_events_dropped_total",
                "join/leave events not sent: the node's event queue was full",
            )
            .unwrap(),
            control_messages: IntCounterVec::new(
                Opts::new(
                    "gateway_control_messages_total",
                    "Control messages received from the server API, by kind",
                ),
                &["kind"],
            )
            .unwrap(),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.connections.clone()),
            Box::new(m.connections_total.clone()),
            Box::new(m.disconnects.clone()),
            Box::new(m.subscriptions.clone()),
            Box::new(m.channels.clone()),
            Box::new(m.messages_received.clone()),
            Box::new(m.messages_delivered.clone()),
            Box::new(m.messages_dropped.clone()),
            Box::new(m.client_frames.clone()),
            Box::new(m.delivery_latency.clone()),
            Box::new(m.redis_connected.clone()),
            Box::new(m.redis_reconnects.clone()),
            Box::new(m.redis_shards.clone()),
            Box::new(m.redis_resubscribes.clone()),
            Box::new(m.presence_entries.clone()),
            Box::new(m.presence_written.clone()),
            Box::new(m.presence_removed.clone()),
            Box::new(m.presence_events_dropped.clone()),
            Box::new(m.control_messages.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        // Every known label value exists from the start, at zero (as Prometheus recommends),
        // so that rate() and alerts see a series before its first event.
        for r in [
            reason::SLOW_CONSUMER,
            reason::SESSION_CLOSED,
            reason::DUPLICATE,
        ] {
            m.messages_dropped.with_label_values(&[r]);
        }
        for t in transport::ALL {
            m.connections.with_label_values(&[t]);
            m.connections_total.with_label_values(&[t]);
            for r in reason::DISCONNECTS {
                m.disconnects.with_label_values(&[r, t]);
            }
        }
        for t in frame_type::ALL {
            m.client_frames.with_label_values(&[t]);
        }
        for r in resubscribe_reason::ALL {
            m.redis_resubscribes.with_label_values(&[r]);
        }
        for r in presence_removal::ALL {
            m.presence_removed.with_label_values(&[r]);
        }
        // The control kinds themselves are `control.rs`'s: it registers them when it starts.
        m.control_messages
            .with_label_values(&[control_kind::INVALID]);
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on a malformed metric family, which cannot happen here.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_exist_before_their_first_event() {
        let text = Metrics::new().render();
        for t in frame_type::ALL {
            let series = format!("gateway_client_frames_total{{type=\"{t}\"}} 0");
            assert!(text.contains(&series), "missing {series}");
        }
        for t in transport::ALL {
            for r in reason::DISCONNECTS {
                let series =
                    format!("gateway_disconnects_total{{reason=\"{r}\",transport=\"{t}\"}} 0");
                assert!(text.contains(&series), "missing {series}");
            }
            let series = format!("gateway_connections{{transport=\"{t}\"}} 0");
            assert!(text.contains(&series), "missing {series}");
        }
        for r in [
            reason::SLOW_CONSUMER,
            reason::SESSION_CLOSED,
            reason::DUPLICATE,
        ] {
            let series = format!("gateway_messages_dropped_total{{reason=\"{r}\"}} 0");
            assert!(text.contains(&series), "missing {series}");
        }
    }
}
