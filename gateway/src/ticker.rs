//! The node's own tick (used with the memory bus, where no publisher runs): SPEC §3's
//! `{"time","unix_ms","seq"}` on `ticks`, aligned to the interval on the wall clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::bus::Bus;

pub const CHANNEL: &str = "ticks";

/// The tick payload for wall-clock time `now`.
pub fn payload(now: SystemTime, seq: u64) -> String {
    let unix_ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        r#"{{"time":"{}","unix_ms":{unix_ms},"seq":{seq}}}"#,
        humantime::format_rfc3339_millis(now)
    )
}

/// Publish a tick at every multiple of `interval` (no drift: each deadline is computed from
/// the wall clock, not from when the previous tick finished).
pub async fn run(bus: Bus, interval: Duration, shutdown: CancellationToken) {
    let step = interval.as_millis().max(1) as u64;
    let mut seq = 0;
    loop {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let next_ms = (now_ms / step + 1) * step;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(next_ms - now_ms)) => {}
        }
        seq += 1;
        let at = UNIX_EPOCH + Duration::from_millis(next_ms);
        if let Err(e) = bus.publish(CHANNEL, payload(at, seq).as_bytes()).await {
            tracing::warn!(error = %e, "tick not published");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn payload_shape() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let v: serde_json::Value = serde_json::from_str(&super::payload(at, 7)).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["unix_ms"], 1_700_000_000_123u64);
        assert_eq!(v["seq"], 7);
    }
}
