//! Publishing: the one place where a message becomes Redis traffic.
//!
//! Ticks, alerts, the HTTP API, the CLI and `tail` all publish through [`Publisher`], so how a
//! message is stored and delivered is decided here alone. Today a message is a plain
//! `PUBLISH <prefix><channel> <payload>`; a batch is one pipeline, so it costs one round trip
//! and keeps its order. History (SPEC §5) replaces the body of [`Publisher::publish_all`] with
//! an atomic stream-append-and-publish script; no caller changes.

use bytes::Bytes;
use deadpool_redis::redis;
use serde::Serialize;

use crate::channel::Channel;
use crate::metrics::Metrics;
use crate::pool::{RedisError, RedisPool};

/// One message: a channel and the exact payload bytes its subscribers receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: Channel,
    pub payload: Bytes,
}

/// Publishes messages and counts them. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    redis: RedisPool,
    metrics: Metrics,
}

// === impl Message ===

impl Message {
    pub fn new(channel: Channel, payload: impl Into<Bytes>) -> Self {
        Self {
            channel,
            payload: payload.into(),
        }
    }

    /// A message whose payload is `value` serialized as compact JSON.
    pub fn json(channel: Channel, value: &impl Serialize) -> Self {
        let payload = serde_json::to_vec(value).expect("serializing plain data cannot fail");
        Self::new(channel, payload)
    }

    /// A message from free text (`publisher publish CHANNEL DATA`): the text itself when it is
    /// valid JSON, otherwise the text as a JSON string, so subscribers always receive JSON.
    pub fn from_text(channel: Channel, text: &str) -> Self {
        if serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok() {
            Self::new(channel, text.to_owned())
        } else {
            Self::json(channel, &text)
        }
    }
}

// === impl Publisher ===

impl Publisher {
    pub fn new(redis: RedisPool, metrics: Metrics) -> Self {
        Self { redis, metrics }
    }

    pub fn redis(&self) -> &RedisPool {
        &self.redis
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Publishes one message.
    pub async fn publish(&self, message: &Message) -> Result<(), RedisError> {
        self.publish_all(std::slice::from_ref(message)).await
    }

    /// Publishes `messages` in order, in one round trip. On error none, some or all of them
    /// may have been published (a pipeline is not a transaction); every message of the batch
    /// counts in `publisher_publish_errors_total`.
    pub async fn publish_all(&self, messages: &[Message]) -> Result<(), RedisError> {
        if messages.is_empty() {
            return Ok(());
        }
        let result = self.send(messages).await;
        match &result {
            Ok(()) => {
                for message in messages {
                    self.metrics.published(&message.channel, 1);
                }
            }
            Err(_) => self
                .metrics
                .publish_errors_total
                .inc_by(messages.len() as u64),
        }
        result
    }

    async fn send(&self, messages: &[Message]) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        for message in messages {
            pipe.cmd("PUBLISH")
                .arg(self.redis.key(message.channel.as_str()))
                .arg(message.payload.as_ref())
                .ignore();
        }
        let mut conn = self.redis.get().await?;
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chan() -> Channel {
        Channel::parse("c").unwrap()
    }

    #[test]
    fn text_is_published_verbatim_when_json_else_as_a_string() {
        let cases = [
            (r#"{"a": 1}"#, r#"{"a": 1}"#),
            ("42", "42"),
            (r#""quoted""#, r#""quoted""#),
            ("hello world", r#""hello world""#),
            (r#"say "hi""#, r#""say \"hi\"""#),
            ("", r#""""#),
            ("{broken", r#""{broken""#),
        ];
        for (text, payload) in cases {
            assert_eq!(Message::from_text(chan(), text).payload, payload, "{text}");
        }
    }
}
