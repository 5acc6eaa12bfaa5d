//! The gateway's configuration: one typed struct loaded by the `config` crate from defaults,
//! then an optional TOML file, then `GATEWAY__…` environment variables, then command-line
//! overrides; validated completely before anything binds (docs/REFERENCE.md §4).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol;

/// Keys whose environment values are lists (and only these, so that `auth.secret` and every
/// other value may contain commas): comma-separated, or a JSON array ([`env_list`]).
const LIST_KEYS: &[&str] = &[
    "origins",
    "client_publish",
    "default_channels",
    "auth.secrets",
    "redis.cluster_nodes",
    "presence_channels",
];

/// A list key's environment value: a JSON array of strings when it starts with `[` (so that
/// items may contain commas: any secret `auth.secret` accepts can be an `auth.secrets` item),
/// else comma-separated items, trimmed, empty ones dropped.
fn env_list(key: &'static str, value: &str) -> Result<Vec<String>, ConfigError> {
    if value.trim_start().starts_with('[') {
        return serde_json::from_str(value).map_err(|e| {
            invalid(
                key,
                format!("a value starting with `[` must be a JSON array of strings ({e})"),
            )
        });
    }
    Ok(value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Shortest HS256 secret accepted: RFC 7518 §3.2 requires a key at least as long as the hash.
pub const MIN_SECRET_BYTES: usize = 32;

/// Why the configuration was refused. The message always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public address: `/ws`, the demo page, `/healthz`, `/readyz`.
    pub listen: String,
    /// Operator address: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: String,
    /// Name reported in `welcome` frames; defaults to the host name.
    pub node_name: Option<String>,
    pub redis: RedisConfig,
    /// Emit the `ticks` channel from this node; unset = on with the memory bus only.
    pub ticks: Option<bool>,
    /// Interval of the node's own ticks.
    pub tick_interval_ms: u64,
    /// With Redis, a ticking node takes part in the tick lease (`lease.rs`) with this TTL: a
    /// dead ticker is replaced within about this long.
    pub tick_lease_ttl_ms: u64,
    /// Channel patterns clients may publish to.
    pub client_publish: Vec<String>,
    /// Channels of a session that names none.
    pub default_channels: Vec<String>,
    /// Allowed browser origins: empty = same host only; `*` = any; `*.example.com` patterns.
    pub origins: Vec<String>,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    pub history: HistoryConfig,
    /// Channel patterns whose subscribers the cluster keeps presence of (docs/REFERENCE.md §8).
    pub presence_channels: Vec<String>,
    pub presence: PresenceConfig,
    /// How long shutdown waits for sessions to close.
    pub drain_timeout_ms: u64,
    /// Batch the fan-out's socket writes through io_uring where the kernel allows it
    /// (`outbox::write_all`); false = one vectored write per socket. Applies to the process.
    pub io_uring: bool,
    /// Hold a fan-out's socket writes up to this long, so that a socket gets every message of
    /// the interval in one write (less CPU per delivery, up to this much more latency);
    /// 0 = write at once.
    pub write_delay_ms: u64,
}

/// Recovery from the publisher's per-channel streams (docs/REFERENCE.md §5); Redis bus only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// The most messages one `since` replays per channel; a client that missed more gets
    /// `history_gone` (and nothing replayed) rather than a partial replay with a gap.
    pub max_replay: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig { max_replay: 1000 }
    }
}

/// Presence (docs/REFERENCE.md §8).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// How long an entry lives in Redis unless its node refreshes it (every third of this):
    /// the entries of a node that died vanish within this long.
    pub ttl_ms: u64,
    /// Send `join` and `leave` frames to a presence channel's subscribers.
    pub join_leave: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            ttl_ms: 30_000,
            join_leave: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://…`; unset = the in-process memory bus (single node), unless `cluster_nodes`.
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (list key); non-empty = cluster mode, with sharded
    /// pub/sub (docs/REFERENCE.md §7). Exclusive with `url`.
    pub cluster_nodes: Vec<String>,
    /// Where a cluster-mode node SSUBSCRIBEs: each shard's primary or one of its replicas.
    pub read_from: ReadFrom,
    /// Prefix prepended to every Redis channel name.
    pub prefix: String,
    /// Size of the command pool (client publishes).
    pub pool_size: usize,
    /// How often the pub/sub connection is proven alive with a PING.
    pub ping_interval_ms: u64,
    /// How long a PING, connect or SUBSCRIBE may take before the connection is replaced.
    pub timeout_ms: u64,
    /// Reconnect backoff bounds (exponential, full jitter).
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Delay between the last local subscriber leaving and the UNSUBSCRIBE.
    pub unsubscribe_delay_ms: u64,
    /// Channels per SUBSCRIBE when resubscribing after a reconnect.
    pub resubscribe_batch: usize,
}

/// `redis.read_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadFrom {
    Primary,
    Replica,
}

impl RedisConfig {
    /// Whether the node uses Redis at all (standalone or cluster), rather than the memory bus.
    pub fn enabled(&self) -> bool {
        self.url.is_some() || self.is_cluster()
    }

    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }
}

/// Client authentication (`auth.rs`). No key configured = auth off.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret (`GATEWAY__AUTH__SECRET`; never split on commas).
    pub secret: Option<Secret>,
    /// More HS256 secrets, any of which verifies (rotation); a list key.
    pub secrets: Vec<Secret>,
    /// PEM public key (RSA → RS256, EC P-256 → ES256) for tokens signed elsewhere.
    pub public_key_file: Option<PathBuf>,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        self.secret.is_some() || !self.secrets.is_empty() || self.public_key_file.is_some()
    }

    /// The token verifier these keys make (None = auth off); the key file is read here.
    pub fn verifier(&self) -> Result<Option<crate::auth::Verifier>, crate::auth::KeyError> {
        let secrets = self.secret.iter().chain(&self.secrets).map(Secret::expose);
        crate::auth::Verifier::from_keys(secrets, self.public_key_file.as_deref())
    }
}

/// A string kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    /// Sessions per client IP address; 0 = no limit. Behind a proxy every client has the
    /// proxy's address: limit at the proxy instead.
    pub max_connections_per_ip: usize,
    /// A connection must complete its HTTP request head (the upgrade) within this long.
    pub handshake_timeout_ms: u64,
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub send_queue_bytes: usize,
    /// Client publishes per second (token bucket refill).
    pub publish_rate: f64,
    /// Token bucket size.
    pub publish_burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Heartbeat {
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "0.0.0.0:9091".into(),
            node_name: None,
            redis: RedisConfig::default(),
            ticks: None,
            tick_interval_ms: 1000,
            tick_lease_ttl_ms: 3000,
            client_publish: vec!["chat:*".into()],
            default_channels: vec!["ticks".into()],
            origins: Vec::new(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            heartbeat: Heartbeat::default(),
            history: HistoryConfig::default(),
            presence_channels: vec!["chat:*".into()],
            presence: PresenceConfig::default(),
            drain_timeout_ms: 10_000,
            io_uring: true,
            write_delay_ms: 0,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            cluster_nodes: Vec::new(),
            read_from: ReadFrom::Primary,
            prefix: String::new(),
            pool_size: 16,
            ping_interval_ms: 3000,
            timeout_ms: 2000,
            backoff_min_ms: 100,
            backoff_max_ms: 5000,
            unsubscribe_delay_ms: 1000,
            resubscribe_batch: 500,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_connections_per_ip: 0,
            handshake_timeout_ms: 10_000,
            max_message_bytes: 65_536,
            max_subscriptions: 128,
            send_queue_bytes: 1_048_576,
            publish_rate: 20.0,
            publish_burst: 40,
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            ping_interval_ms: 25_000,
            ping_timeout_ms: 60_000,
        }
    }
}

// === impl Config ===

impl Config {
    /// Load from defaults, then `file` (TOML), then `GATEWAY__…` environment variables, then
    /// `overrides` (key, value) pairs from the command line; then validate.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Config, ConfigError> {
        Self::load_from_env(file, overrides, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests use this to check a
    /// compose file's variables through the real loader).
    pub fn load_from_env(
        file: Option<&Path>,
        overrides: &[(&str, String)],
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        // Values stay strings (no `try_parsing`): serde turns "7" into a number where the
        // field is one, while a secret or a node name that merely looks numeric ("1e5",
        // "000123") is kept exactly as written. The list keys are split here instead.
        let vars: std::collections::HashMap<String, String> =
            env.unwrap_or_else(|| std::env::vars().collect());
        let environment = config::Environment::with_prefix("GATEWAY")
            .prefix_separator("__")
            .separator("__")
            .ignore_empty(true)
            .source(Some(vars.clone().into_iter().collect()));
        builder = builder.add_source(environment);
        for key in LIST_KEYS {
            let var = format!("GATEWAY__{}", key.replace('.', "__").to_uppercase());
            if let Some(value) = vars.get(&var).filter(|v| !v.is_empty()) {
                builder = builder.set_override(*key, env_list(key, value)?)?;
            }
        }
        for (key, value) in overrides {
            builder = builder.set_override(*key, value.clone())?;
        }
        let config: Config = builder.build()?.try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    /// Check every value; the first problem found is reported with its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("listen", &self.listen)?;
        parse_addr("admin_listen", &self.admin_listen)?;
        if let Some(name) = &self.node_name {
            if name.is_empty() || name.len() > 128 {
                return Err(invalid("node_name", "must be 1-128 characters"));
            }
        }
        if self.redis.url.is_some() && self.redis.is_cluster() {
            return Err(invalid(
                "redis.cluster_nodes",
                "set either redis.url (one Redis) or redis.cluster_nodes (a Redis Cluster), not both",
            ));
        }
        if let Some(url) = &self.redis.url {
            redis_url("redis.url", url)?;
        }
        for url in &self.redis.cluster_nodes {
            if url.starts_with("unix://") {
                return Err(invalid(
                    "redis.cluster_nodes",
                    format!("`{url}`: cluster nodes are reached over TCP"),
                ));
            }
            redis_url("redis.cluster_nodes", url)?;
        }
        if self.redis.read_from == ReadFrom::Replica && !self.redis.is_cluster() {
            return Err(invalid(
                "redis.read_from",
                "`replica` applies to a Redis Cluster (`redis.cluster_nodes`); a standalone \
                 node subscribes on `redis.url`",
            ));
        }
        if self.redis.is_cluster() && self.ticks == Some(true) {
            return Err(invalid(
                "ticks",
                "a gateway does not tick on a Redis Cluster; let the publisher tick",
            ));
        }
        if self.redis.prefix.len() > 64 {
            return Err(invalid("redis.prefix", "must be at most 64 characters"));
        }
        positive("redis.pool_size", self.redis.pool_size as u64)?;
        positive("history.max_replay", self.history.max_replay as u64)?;
        positive("redis.ping_interval_ms", self.redis.ping_interval_ms)?;
        positive("redis.timeout_ms", self.redis.timeout_ms)?;
        positive("redis.backoff_min_ms", self.redis.backoff_min_ms)?;
        if self.redis.backoff_max_ms < self.redis.backoff_min_ms {
            return Err(invalid(
                "redis.backoff_max_ms",
                "must be at least redis.backoff_min_ms",
            ));
        }
        positive(
            "redis.resubscribe_batch",
            self.redis.resubscribe_batch as u64,
        )?;
        positive("tick_interval_ms", self.tick_interval_ms)?;
        // Renewal runs every ttl/3 and must have room for a round trip.
        if !(100..=3_600_000).contains(&self.tick_lease_ttl_ms) {
            return Err(invalid(
                "tick_lease_ttl_ms",
                "must be between 100 and 3600000",
            ));
        }
        for pattern in &self.client_publish {
            let literal = pattern.replace('*', "x");
            if pattern.is_empty() || !protocol::valid_channel(&literal) {
                return Err(invalid(
                    "client_publish",
                    format!("`{pattern}` is not a channel pattern"),
                ));
            }
        }
        for pattern in &self.presence_channels {
            if !protocol::valid_pattern(pattern) {
                return Err(invalid(
                    "presence_channels",
                    format!("`{pattern}` is not a channel pattern"),
                ));
            }
        }
        if self.write_delay_ms > 1000 {
            return Err(invalid(
                "write_delay_ms",
                "must be between 0 (off) and 1000",
            ));
        }
        // Refreshed every third of it: room for a slow round trip, and not a busy loop.
        if !(300..=3_600_000).contains(&self.presence.ttl_ms) {
            return Err(invalid(
                "presence.ttl_ms",
                "must be between 300 and 3600000",
            ));
        }
        for channel in &self.default_channels {
            if !protocol::valid_channel(channel) {
                return Err(invalid(
                    "default_channels",
                    format!("`{channel}` is not a valid channel name"),
                ));
            }
        }
        for origin in &self.origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(invalid(
                    "origins",
                    format!("`{origin}` must be `*` or start with http:// or https://"),
                ));
            }
        }
        self.validate_auth()?;
        positive("limits.max_connections", self.limits.max_connections as u64)?;
        positive(
            "limits.handshake_timeout_ms",
            self.limits.handshake_timeout_ms,
        )?;
        if self.limits.max_message_bytes < 128 {
            return Err(invalid("limits.max_message_bytes", "must be at least 128"));
        }
        if self.limits.send_queue_bytes < 1024 {
            return Err(invalid("limits.send_queue_bytes", "must be at least 1024"));
        }
        if !(self.limits.publish_rate.is_finite() && self.limits.publish_rate > 0.0) {
            return Err(invalid("limits.publish_rate", "must be a positive number"));
        }
        positive("limits.publish_burst", u64::from(self.limits.publish_burst))?;
        positive(
            "heartbeat.ping_interval_ms",
            self.heartbeat.ping_interval_ms,
        )?;
        if self.heartbeat.ping_timeout_ms <= self.heartbeat.ping_interval_ms {
            return Err(invalid(
                "heartbeat.ping_timeout_ms",
                "must be larger than heartbeat.ping_interval_ms",
            ));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        let secrets = auth
            .secret
            .iter()
            .map(|s| ("auth.secret", s))
            .chain(auth.secrets.iter().map(|s| ("auth.secrets", s)));
        for (key, secret) in secrets {
            if secret.expose().len() < MIN_SECRET_BYTES {
                return Err(invalid(
                    key,
                    format!("an HS256 secret must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
        }
        auth.verifier()
            .map_err(|e| invalid(e.key, e.message))
            .map(|_| ())
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.handshake_timeout_ms)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        parse_addr("listen", &self.listen).expect("validated")
    }

    pub fn admin_listen_addr(&self) -> SocketAddr {
        parse_addr("admin_listen", &self.admin_listen).expect("validated")
    }

    /// The node's name: configured, else the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(host_name)
    }

    /// Whether this node emits ticks itself.
    pub fn ticks_enabled(&self) -> bool {
        self.ticks.unwrap_or(!self.redis.enabled())
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat.ping_interval_ms)
    }

    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat.ping_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// `url` with its user-info hidden, for messages and logs:
/// `redis://:secret@host:6379` → `redis://***@host:6379`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end], &rest[at..]),
        None => url.to_owned(),
    }
}

/// A `redis://` (or `rediss://`, `unix://`) URL the redis crate accepts.
fn redis_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
    {
        return Err(invalid(key, format!("`{url}` is not a redis:// URL")));
    }
    deadpool_redis::redis::Client::open(url)
        .map(drop)
        .map_err(|e| invalid(key, e.to_string()))
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address like 0.0.0.0:8080"),
        )
    })
}

fn positive(key: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = Config::load_from_env(None, &[], env(&[])).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert_eq!(c.admin_listen, "0.0.0.0:9091");
        assert_eq!(c.client_publish, vec!["chat:*"]);
        assert_eq!(c.default_channels, vec!["ticks"]);
        assert_eq!(c.limits.max_connections, 100_000);
        assert_eq!(c.limits.send_queue_bytes, 1_048_576);
        assert!(c.ticks_enabled());
    }

    #[test]
    fn environment_overrides_and_lists() {
        let c = Config::load_from_env(
            None,
            &[],
            env(&[
                ("GATEWAY__REDIS__URL", "redis://127.0.0.1:6379"),
                ("GATEWAY__LIMITS__MAX_CONNECTIONS", "7"),
                (
                    "GATEWAY__ORIGINS",
                    "https://a.example.com,https://*.example.com",
                ),
                ("GATEWAY__NODE_NAME", "gw,1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(c.limits.max_connections, 7);
        assert_eq!(c.origins.len(), 2);
        assert_eq!(c.node_name.as_deref(), Some("gw,1"));
        assert!(!c.ticks_enabled());
    }

    #[test]
    fn errors_name_the_key() {
        let e =
            Config::load_from_env(None, &[], env(&[("GATEWAY__LIMITS__NOPE", "1")])).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = Config::load_from_env(None, &[], env(&[("GATEWAY__LIMITS__MAX_CONNECTIONS", "x")]))
            .unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
        let e =
            Config::load_from_env(None, &[], env(&[("GATEWAY__LISTEN", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }

    #[test]
    fn auth_keys() {
        let secret = "s3cret,with,commas-and-at-least-32-bytes";
        let c = Config::load_from_env(
            None,
            &[],
            env(&[
                ("GATEWAY__AUTH__SECRET", secret),
                (
                    "GATEWAY__AUTH__SECRETS",
                    "old-secret-of-at-least-thirty-two-bytes,older-secret-of-at-least-32-bytes",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.auth.secret.as_ref().unwrap().expose(), secret);
        assert_eq!(c.auth.secrets.len(), 2);
        assert!(!format!("{c:?}").contains("s3cret"));
        let e = Config::load_from_env(None, &[], env(&[("GATEWAY__AUTH__SECRET", "short")]))
            .unwrap_err();
        assert!(e.to_string().contains("auth.secret"), "{e}");
        let e = Config::load_from_env(
            None,
            &[],
            env(&[("GATEWAY__AUTH__PUBLIC_KEY_FILE", "/nonexistent.pem")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("auth.public_key_file"), "{e}");
    }

    #[test]
    fn list_keys_take_json_arrays_from_the_environment() {
        let old = "old,secret,with,commas-and-32-bytes-or-more";
        let c = Config::load_from_env(
            None,
            &[],
            env(&[
                (
                    "GATEWAY__AUTH__SECRETS",
                    &format!(r#"["{old}", " spaced-secret-of-at-least-32-bytes "]"#),
                ),
                ("GATEWAY__ORIGINS", r#"["https://a.example.com"]"#),
            ]),
        )
        .unwrap();
        let secrets: Vec<&str> = c.auth.secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, [old, " spaced-secret-of-at-least-32-bytes "]);
        assert_eq!(c.origins, ["https://a.example.com"]);
        let e = Config::load_from_env(
            None,
            &[],
            env(&[("GATEWAY__AUTH__SECRETS", r#"["unterminated"#)]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("auth.secrets"), "{e}");
        assert!(
            !e.to_string().contains("unterminated"),
            "no secret in the message: {e}"
        );
    }

    #[test]
    fn the_example_file_loads() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.toml");
        let c = Config::load_from_env(Some(&file), &[], env(&[])).unwrap();
        assert_eq!(c.limits.publish_burst, 40);
        assert_eq!(c.heartbeat.ping_timeout_ms, 60_000);
        assert_eq!(c.presence_channels, vec!["chat:*"]);
        assert_eq!(c.presence.ttl_ms, 30_000);
    }

    #[test]
    fn presence_keys_are_validated() {
        let c = Config::load_from_env(
            None,
            &[],
            env(&[("GATEWAY__PRESENCE_CHANNELS", "chat:*,room:*")]),
        )
        .unwrap();
        assert_eq!(c.presence_channels, vec!["chat:*", "room:*"]);
        for (var, value, key) in [
            (
                "GATEWAY__PRESENCE_CHANNELS",
                "bad pattern",
                "presence_channels",
            ),
            ("GATEWAY__PRESENCE__TTL_MS", "10", "presence.ttl_ms"),
            ("GATEWAY__WRITE_DELAY_MS", "5000", "write_delay_ms"),
            ("GATEWAY__WRITE_DELAY_MS", "soon", "write_delay_ms"),
        ] {
            let e = Config::load_from_env(None, &[], env(&[(var, value)])).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn numeric_looking_strings_stay_as_written() {
        let c = Config::load_from_env(
            None,
            &[],
            env(&[
                ("GATEWAY__NODE_NAME", "1e5"),
                ("GATEWAY__REDIS__PREFIX", "007"),
                ("GATEWAY__TICKS", "true"),
                ("GATEWAY__LIMITS__PUBLISH_RATE", "2.5"),
                ("GATEWAY__DEFAULT_CHANNELS", "123"),
            ]),
        )
        .unwrap();
        assert_eq!(c.node_name.as_deref(), Some("1e5"));
        assert_eq!(c.redis.prefix, "007");
        assert_eq!(c.ticks, Some(true));
        assert_eq!(c.limits.publish_rate, 2.5);
        assert_eq!(c.default_channels, vec!["123"]);
    }
}
