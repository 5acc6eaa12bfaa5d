//! Configuration: one typed struct, loaded in layers and validated completely before anything
//! binds or connects.
//!
//! Layers, later ones win: the defaults below → an optional TOML file (`--config FILE`) → the
//! environment (`PUBLISHER__TICK__INTERVAL_MS=200` sets `tick.interval_ms`; a double underscore
//! separates levels, a single one is part of a key) → command-line flags. Every struct denies
//! unknown fields, so a misspelt key stops start-up with a message naming it, as does a bad
//! value; `cli` turns either into exit code 2.
//!
//! Environment values are never type-guessed: numbers and booleans are parsed from strings by
//! the field's own type, so `PUBLISHER__API_KEY=007` stays the string `007`. The one list key,
//! `redis.cluster_nodes`, is split by its own deserializer ([`comma_list`]): from the
//! environment or a flag, comma-separated or a JSON array of strings (as the gateway's list
//! keys); in a TOML file, an array. No other value is ever split, so
//! `PUBLISHER__API_KEY=007,abc` stays `007,abc`. The `config` crate's own list parsing is not
//! used because it only works together with type guessing.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use deadpool_redis::redis;
use serde::{de, Deserialize, Deserializer, Serialize};

use crate::channel::Channel;

/// Environment variable prefix: `PUBLISHER__REDIS__URL` → `redis.url`.
pub const ENV_PREFIX: &str = "PUBLISHER";

/// The Redis of standalone mode when neither `redis.url` nor `redis.cluster_nodes` is set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The whole publisher configuration. Field docs name the key and its default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `listen` (0.0.0.0:8090): the HTTP API and `/metrics`.
    pub listen: SocketAddr,
    /// `api_key` (unset): when set, `POST` endpoints require `Authorization: Bearer <key>`.
    pub api_key: Option<Secret>,
    /// `max_body_bytes` (65536): larger request bodies get 413.
    pub max_body_bytes: usize,
    /// `max_broadcast_channels` (100): the most channels one `POST /broadcast` may name.
    pub max_broadcast_channels: usize,
    /// `drain_timeout_ms` (5000): how long shutdown waits for in-flight requests and tasks.
    pub drain_timeout_ms: u64,
    pub redis: RedisConfig,
    pub tick: TickConfig,
    pub alerts: AlertsConfig,
    pub lease: LeaseConfig,
    pub tail: TailConfig,
    pub auth: AuthConfig,
    pub history: HistoryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// `history.max_len` (1000): entries kept per channel stream (`XADD MAXLEN ~`, so Redis
    /// trims whole nodes of about 100 entries: a stream may hold somewhat more).
    pub max_len: u64,
    /// `history.ttl_ms` (86400000 = 24 h): a channel's stream and epoch expire this long after
    /// its last message.
    pub ttl_ms: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            max_len: 1000,
            ttl_ms: 24 * 60 * 60 * 1000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `auth.secret` (unset): the gateways' HS256 secret, for `publisher token`. At least 32
    /// bytes; never printed.
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis.url` (unset): a single Redis. Unset means [`DEFAULT_REDIS_URL`], unless
    /// `redis.cluster_nodes` is set; setting both is an error. Kept unset by default so that
    /// "set by the user" can be told from "the default".
    pub url: Option<Secret>,
    /// `redis.cluster_nodes` (empty): seed nodes of a Redis Cluster, e.g.
    /// `PUBLISHER__REDIS__CLUSTER_NODES=redis://r1:7000,redis://r2:7000`. Non-empty = cluster
    /// mode: the rest of the topology is discovered from these, and messages go out with
    /// SPUBLISH. A list key (see the module doc).
    #[serde(deserialize_with = "comma_list")]
    pub cluster_nodes: Vec<Secret>,
    /// `redis.prefix` (empty): prepended to every channel and key the publisher touches; must
    /// match the gateways' `redis.prefix`.
    pub prefix: String,
    /// `redis.connect_timeout_ms` (1000): a connection attempt gives up after this.
    pub connect_timeout_ms: u64,
    /// `redis.response_timeout_ms` (1000): a command without an answer fails after this.
    pub response_timeout_ms: u64,
    /// `redis.pool_size` (16): connections in the pool (standalone mode; in cluster mode the
    /// publisher keeps one multiplexed connection per cluster node).
    pub pool_size: usize,
}

/// Where the publisher's Redis is, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTarget<'a> {
    /// One Redis at this URL (`redis.url`, or the default).
    Standalone(&'a Secret),
    /// A Redis Cluster, found through these seed nodes (`redis.cluster_nodes`).
    Cluster(&'a [Secret]),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TickConfig {
    /// `tick.enabled` (true): whether this replica competes for the lease and ticks.
    pub enabled: bool,
    /// `tick.interval_ms` (1000): ticks fall on multiples of this since the Unix epoch.
    pub interval_ms: u64,
    /// `tick.channel` (ticks).
    pub channel: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `alerts.channel` (alerts).
    pub channel: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// `lease.ttl_ms` (3000): a dead leader is replaced within about this long.
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TailConfig {
    /// `tail.poll_interval_ms` (200): how often `publisher tail` looks for new lines.
    pub poll_interval_ms: u64,
    /// `tail.max_line_bytes` (65536): a longer line is published in pieces of this size.
    pub max_line_bytes: usize,
    /// `tail.batch_lines` (500): the most lines sent to Redis in one round trip.
    pub batch_lines: usize,
    /// `tail.rotate_grace_ms` (10000): after a rename rotation, how long the old file is
    /// still read (an application may reopen its log late and write to the old file meanwhile).
    pub rotate_grace_ms: u64,
}

/// A string that never appears in `Debug` output or logs (API keys, URLs with passwords).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// A configuration that cannot be used; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file that cannot be read or parsed.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// An unknown key, or a value of the wrong type; `key` is the full dotted path.
    #[error("key `{key}`: {message}")]
    Key { key: String, message: String },
    /// A value of the right type that is out of range or malformed.
    #[error("invalid value for key `{key}`: {message}")]
    Invalid { key: String, message: String },
    /// Two keys that exclude each other are both set.
    #[error("keys `{}` and `{}` cannot both be set: {message}", keys[0], keys[1])]
    Conflict {
        keys: [&'static str; 2],
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, message: impl fmt::Display) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

// === impl Config ===

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8090)),
            api_key: None,
            max_body_bytes: 64 * 1024,
            max_broadcast_channels: 100,
            drain_timeout_ms: 5000,
            redis: RedisConfig::default(),
            tick: TickConfig::default(),
            alerts: AlertsConfig::default(),
            lease: LeaseConfig::default(),
            tail: TailConfig::default(),
            auth: AuthConfig::default(),
            history: HistoryConfig::default(),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster_nodes: Vec::new(),
            prefix: String::new(),
            connect_timeout_ms: 1000,
            response_timeout_ms: 1000,
            pool_size: 16,
        }
    }
}

impl Default for TickConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 1000,
            channel: "ticks".to_owned(),
        }
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            channel: "alerts".to_owned(),
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self { ttl_ms: 3000 }
    }
}

impl Default for TailConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 200,
            max_line_bytes: 64 * 1024,
            batch_lines: 500,
            rotate_grace_ms: 10_000,
        }
    }
}

impl Config {
    /// Loads the layers described in the module doc and validates the result.
    ///
    /// `env` replaces the process environment when given (tests use it); `overrides` are
    /// `(key, value)` pairs from command-line flags, applied last.
    pub fn load(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
        overrides: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(environment(env));
        for (key, value) in overrides {
            builder = builder.set_override(key.as_str(), value.as_str())?;
        }
        let config: Config =
            serde_path_to_error::deserialize(builder.build()?).map_err(|e| ConfigError::Key {
                key: e.path().to_string(),
                message: e.into_inner().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that its type alone does not constrain. [`crate::run`] calls it too,
    /// so a `Config` built in code is held to the same rules as a loaded one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(key) = &self.api_key {
            if key.expose().trim().is_empty() {
                return Err(ConfigError::invalid("api_key", "must not be blank"));
            }
        }
        if let Some(secret) = &self.auth.secret {
            if secret.expose().len() < 32 {
                return Err(ConfigError::invalid(
                    "auth.secret",
                    "an HS256 secret must be at least 32 bytes",
                ));
            }
        }
        in_range("max_body_bytes", self.max_body_bytes, 64, 16 * 1024 * 1024)?;
        in_range(
            "max_broadcast_channels",
            self.max_broadcast_channels,
            1,
            10_000,
        )?;
        in_range("drain_timeout_ms", self.drain_timeout_ms, 0, 600_000)?;

        let redis = &self.redis;
        redis.validate_target()?;
        if !redis.prefix.is_empty() {
            Channel::parse(&redis.prefix).map_err(|e| ConfigError::invalid("redis.prefix", e))?;
        }
        in_range(
            "redis.connect_timeout_ms",
            redis.connect_timeout_ms,
            1,
            60_000,
        )?;
        in_range(
            "redis.response_timeout_ms",
            redis.response_timeout_ms,
            1,
            60_000,
        )?;
        in_range("redis.pool_size", redis.pool_size, 1, 1024)?;

        in_range("tick.interval_ms", self.tick.interval_ms, 10, 86_400_000)?;
        Channel::parse(&self.tick.channel).map_err(|e| ConfigError::invalid("tick.channel", e))?;
        Channel::parse(&self.alerts.channel)
            .map_err(|e| ConfigError::invalid("alerts.channel", e))?;
        // Renewal runs every ttl/3 and must have room for a round trip.
        in_range("lease.ttl_ms", self.lease.ttl_ms, 100, 3_600_000)?;

        in_range(
            "tail.poll_interval_ms",
            self.tail.poll_interval_ms,
            10,
            60_000,
        )?;
        in_range(
            "tail.max_line_bytes",
            self.tail.max_line_bytes,
            16,
            16 * 1024 * 1024,
        )?;
        in_range("tail.batch_lines", self.tail.batch_lines, 1, 100_000)?;
        in_range(
            "tail.rotate_grace_ms",
            self.tail.rotate_grace_ms,
            0,
            3_600_000,
        )?;
        in_range("history.max_len", self.history.max_len, 1, 10_000_000)?;
        in_range(
            "history.ttl_ms",
            self.history.ttl_ms,
            1000,
            365 * 86_400_000,
        )?;
        Ok(())
    }

    pub fn tick_channel(&self) -> Channel {
        Channel::parse(&self.tick.channel).expect("validated: tick.channel")
    }

    pub fn alerts_channel(&self) -> Channel {
        Channel::parse(&self.alerts.channel).expect("validated: alerts.channel")
    }

    pub fn tick_interval(&self) -> Duration {
        Duration::from_millis(self.tick.interval_ms)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease.ttl_ms)
    }
}

// === impl RedisConfig ===

impl RedisConfig {
    /// A single Redis or a Redis Cluster; [`Config::validate`] has made sure it is not both.
    pub fn target(&self) -> RedisTarget<'_> {
        static DEFAULT: std::sync::LazyLock<Secret> =
            std::sync::LazyLock::new(|| Secret::new(DEFAULT_REDIS_URL));
        if self.cluster_nodes.is_empty() {
            RedisTarget::Standalone(self.url.as_ref().unwrap_or(&DEFAULT))
        } else {
            RedisTarget::Cluster(&self.cluster_nodes)
        }
    }

    /// True in cluster mode (`redis.cluster_nodes` is set).
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// `redis.url` and `redis.cluster_nodes` exclude each other; every URL must parse, and the
    /// cluster seeds must agree on credentials and TLS (the redis crate's own checks). Messages
    /// name the key and the position of a bad seed, never its text (it may hold a password).
    fn validate_target(&self) -> Result<(), ConfigError> {
        if self.url.is_some() && self.is_cluster() {
            return Err(ConfigError::Conflict {
                keys: ["redis.url", "redis.cluster_nodes"],
                message: "`redis.url` names a single Redis, `redis.cluster_nodes` the seed nodes \
                          of a Redis Cluster; set only one of them"
                    .to_owned(),
            });
        }
        match self.target() {
            RedisTarget::Standalone(url) => {
                redis::Client::open(url.expose())
                    .map_err(|e| ConfigError::invalid("redis.url", e))?;
            }
            RedisTarget::Cluster(nodes) => {
                for (i, node) in nodes.iter().enumerate() {
                    redis::Client::open(node.expose()).map_err(|e| {
                        ConfigError::invalid(
                            "redis.cluster_nodes",
                            format!("node {} of {}: {e}", i + 1, nodes.len()),
                        )
                    })?;
                }
                redis::cluster::ClusterClientBuilder::new(nodes.iter().map(Secret::expose))
                    .build()
                    .map_err(|e| ConfigError::invalid("redis.cluster_nodes", e))?;
            }
        }
        Ok(())
    }
}

fn environment(env: Option<HashMap<String, String>>) -> config::Environment {
    // No `try_parsing`: values stay strings (see the module doc).
    config::Environment::with_prefix(ENV_PREFIX)
        .separator("__")
        .ignore_empty(true)
        .source(env)
}

/// Deserializes a list key: a sequence of strings (a TOML array), or one string (the
/// environment, `--set`) that is either a JSON array of strings, when it starts with `[` (how
/// an item can contain a comma), or comma-separated items. Items are trimmed; empty ones are
/// dropped, so an empty string is an empty list.
fn comma_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    struct ListVisitor;

    impl<'de> de::Visitor<'de> for ListVisitor {
        type Value = Vec<Secret>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings, or one string of comma-separated items")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            let items: Vec<String> = if value.trim_start().starts_with('[') {
                serde_json::from_str(value)
                    .map_err(|e| E::custom(format!("not a JSON array of strings: {e}")))?
            } else {
                value.split(',').map(str::to_owned).collect()
            };
            Ok(items
                .iter()
                .map(|item| item.trim())
                .filter(|item| !item.is_empty())
                .map(Secret::new)
                .collect())
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                let item = item.trim();
                if !item.is_empty() {
                    items.push(Secret::new(item));
                }
            }
            Ok(items)
        }
    }

    deserializer.deserialize_any(ListVisitor)
}

fn in_range<T>(key: &str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if value < min || value > max {
        return Err(ConfigError::invalid(
            key,
            format!("{value} is outside {min}..={max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn load_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(None, env(pairs), &[])
    }

    #[test]
    fn defaults_are_the_stable_ones() {
        let config = load_env(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8090");
        assert!(
            config.redis.url.is_none(),
            "unset, so that a user's setting shows"
        );
        assert_eq!(
            config.redis.target(),
            RedisTarget::Standalone(&Secret::new("redis://127.0.0.1:6379"))
        );
        assert!(config.redis.cluster_nodes.is_empty());
        assert!(!config.redis.is_cluster());
        assert_eq!(config.redis.prefix, "");
        assert_eq!(config.tick.interval_ms, 1000);
        assert_eq!(config.tick.channel, "ticks");
        assert_eq!(config.alerts.channel, "alerts");
        assert!(config.api_key.is_none());
        assert_eq!(config.lease.ttl_ms, 3000);
    }

    #[test]
    fn environment_sets_nested_keys_and_keeps_strings_verbatim() {
        let config = load_env(&[
            ("PUBLISHER__TICK__INTERVAL_MS", "200"),
            ("PUBLISHER__TICK__ENABLED", "false"),
            ("PUBLISHER__API_KEY", "007,abc"),
            ("PUBLISHER__REDIS__PREFIX", "app1:"),
            ("PUBLISHER__ALERTS__CHANNEL", ""),
            ("PUBLISHER_TICK_CHANNEL", "ignored"),
        ])
        .unwrap();
        assert_eq!(config.tick.interval_ms, 200);
        assert!(!config.tick.enabled);
        assert_eq!(config.api_key.unwrap().expose(), "007,abc");
        assert_eq!(config.redis.prefix, "app1:");
        assert_eq!(config.alerts.channel, "alerts", "empty variables are unset");
        assert_eq!(
            config.tick.channel, "ticks",
            "single underscores are ignored"
        );
    }

    #[test]
    fn flags_override_the_environment() {
        let config = Config::load(
            None,
            env(&[("PUBLISHER__LISTEN", "127.0.0.1:1")]),
            &[("listen".into(), "127.0.0.1:2".into())],
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:2");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("PUBLISHER__BOGUS", "1", "bogus"),
            ("PUBLISHER__TICK__BOGUS", "1", "tick.bogus"),
            ("PUBLISHER__TICK__INTERVAL_MS", "soon", "tick.interval_ms"),
            ("PUBLISHER__TICK__INTERVAL_MS", "0", "tick.interval_ms"),
            ("PUBLISHER__LISTEN", "nowhere", "listen"),
            ("PUBLISHER__TICK__CHANNEL", "a b", "tick.channel"),
            ("PUBLISHER__REDIS__URL", "http://x", "redis.url"),
            (
                "PUBLISHER__REDIS__CLUSTER_NODES",
                "redis://a:7000,http://b:7000",
                "redis.cluster_nodes",
            ),
            ("PUBLISHER__API_KEY", "  ", "api_key"),
            ("PUBLISHER__AUTH__SECRET", "short", "auth.secret"),
        ];
        for (var, value, key) in cases {
            let err = load_env(&[(var, value)]).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{var}={value}: {err:?} should name {key}"
            );
        }
    }

    #[test]
    fn cluster_nodes_are_split_on_commas_and_nothing_else_is() {
        let config = load_env(&[
            (
                "PUBLISHER__REDIS__CLUSTER_NODES",
                " redis://r1:7000, redis://r2:7000 ,,redis://r3:7000",
            ),
            ("PUBLISHER__API_KEY", "007,1"),
            (
                "PUBLISHER__AUTH__SECRET",
                "000000000000000000000000000000000001",
            ),
        ])
        .unwrap();
        let nodes: Vec<&str> = config
            .redis
            .cluster_nodes
            .iter()
            .map(Secret::expose)
            .collect();
        assert_eq!(
            nodes,
            ["redis://r1:7000", "redis://r2:7000", "redis://r3:7000"]
        );
        assert!(config.redis.is_cluster());
        assert!(matches!(config.redis.target(), RedisTarget::Cluster(n) if n.len() == 3));
        assert_eq!(config.api_key.unwrap().expose(), "007,1", "never split");
        assert_eq!(
            config.auth.secret.unwrap().expose(),
            "000000000000000000000000000000000001",
            "never type-guessed into a number"
        );

        // A flag takes the same comma-separated form; a TOML file may use an array.
        let config = Config::load(
            None,
            env(&[]),
            &[(
                "redis.cluster_nodes".into(),
                "redis://a:1,redis://b:2".into(),
            )],
        )
        .unwrap();
        assert_eq!(config.redis.cluster_nodes.len(), 2);
        let dir = std::env::temp_dir().join(format!("publisher-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.toml");
        std::fs::write(
            &file,
            "[redis]\ncluster_nodes = [\"redis://a:1\", \"redis://b:2\"]\n",
        )
        .unwrap();
        let config = Config::load(Some(&file), env(&[]), &[]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.redis.cluster_nodes.len(), 2);

        // A JSON array, as for the gateway's list keys.
        let config = load_env(&[(
            "PUBLISHER__REDIS__CLUSTER_NODES",
            r#"["redis://r1:7000", "redis://r2:7000"]"#,
        )])
        .unwrap();
        assert_eq!(config.redis.cluster_nodes.len(), 2);
        let err = load_env(&[("PUBLISHER__REDIS__CLUSTER_NODES", "[redis://r1:7000")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis.cluster_nodes"), "{err}");

        // Empty means unset: standalone on the default URL.
        let config = load_env(&[("PUBLISHER__REDIS__CLUSTER_NODES", " , ")]).unwrap();
        assert!(!config.redis.is_cluster());
    }

    #[test]
    fn url_and_cluster_nodes_exclude_each_other() {
        let nodes = ("PUBLISHER__REDIS__CLUSTER_NODES", "redis://r1:7000");
        let by_env = load_env(&[nodes, ("PUBLISHER__REDIS__URL", "redis://127.0.0.1:6379")]);
        let by_flag = Config::load(
            None,
            env(&[nodes]),
            &[("redis.url".into(), "redis://127.0.0.1:6379".into())],
        );
        for result in [by_env, by_flag] {
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains("`redis.url`") && err.contains("`redis.cluster_nodes`"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_bad_cluster_node_is_named_by_position_without_its_password() {
        let err = load_env(&[(
            "PUBLISHER__REDIS__CLUSTER_NODES",
            "redis://:hunter2@r1:7000,unix:///tmp/r.sock",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("redis.cluster_nodes"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = load_env(&[(
            "PUBLISHER__REDIS__CLUSTER_NODES",
            "redis://:hunter2@r1:7000,nope://r2",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redis.cluster_nodes") && err.contains("node 2 of 2"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let config = Config {
            api_key: Some(Secret::new("hunter2")),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
