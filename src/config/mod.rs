//! The TOML configuration of PROTOCOL.md ("Running it"), its environment overrides, and the
//! checks that run before anything binds a socket.
//!
//! Precedence, lowest first: built-in defaults, the file, `RINGPUSH_<SECTION>__<KEY>`
//! environment variables. Every key has a default, so an empty file (or none) is a working
//! single-node server. Every error is one line that starts with (or names) the offending key,
//! so `ringpush check-config` output can be acted on without reading code.
//!
//! Secrets (`api_key`, `auth.secret`) never appear in error messages or in `Debug` output.
//!
//! This file owns [`Config`] and its sections, their defaults, and the entry points
//! ([`Config::load`], [`Config::from_parts`], [`Config::validate`]). The rest is split by
//! what it owns; none of it imports from this file (`env` and `error` take the schema as a
//! type parameter), and nothing here imports from the rest of the crate:
//! - `env`: the `RINGPUSH_*` variables, merged into the file's table, named in errors.
//! - `error`: [`ConfigError`], and how a refusal is pinned on a line or a key and worded.
//! - `node_id`: the default `node_id` and its rule; the random `api_key` and `auth.secret`.
//! - `cidr`: [`Cidr`], the networks of `trusted_proxies`.

mod cidr;
mod env;
mod error;
mod node_id;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Deserializer};

pub use cidr::{Cidr, CidrError};
pub use env::ENV_PREFIX;
pub use error::ConfigError;
pub use node_id::{default_node_id, MAX_NODE_ID_LEN};

use env::Overrides;
use error::{io_message, locate, parse_document};
use node_id::{random_hex, valid_node_id};

/// Smallest accepted `limits.max_message_bytes`: the largest control-frame payload (RFC 6455).
pub const MIN_MESSAGE_BYTES: usize = 125;
/// Largest accepted `limits.max_message_bytes` (64 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Smallest accepted `limits.outbound_queue_bytes`.
pub const MIN_OUTBOUND_QUEUE_BYTES: usize = 1024;
/// Shortest accepted `api_key` and `auth.secret`.
pub const MIN_SECRET_LEN: usize = 8;
/// Messages queued per peer by default (`cluster.hwm`).
pub const DEFAULT_HWM: u32 = 100_000;

/// The whole server configuration. Build it with [`Config::load`] (or [`Config::from_parts`]
/// in tests); both apply the environment and run [`Config::validate`].
///
/// Those two also refuse keys the structs do not have; serde does not (no section denies
/// unknown fields, so an unknown key is found by type rather than by serde's wording), and
/// deserializing a `Config` directly skips them.
#[derive(Clone, PartialEq, Deserialize)]
pub struct Config {
    /// This node's name in presence answers, cluster topics and logs. Default:
    /// `<hostname>-<client port>`, unique per host and port without any setup; set it
    /// explicitly when host names are not stable (containers), because peers and stored
    /// presence refer to it. 1-64 chars of `[A-Za-z0-9._:-]`.
    #[serde(default)]
    pub node_id: String,
    /// True when `node_id` was not set and was derived from the host name and port (the
    /// server then re-derives it from the port actually bound when `listen` uses port 0).
    /// Not a TOML key.
    #[serde(skip)]
    pub node_id_generated: bool,
    /// Client listener (`/ws`, `/echo`). Default `0.0.0.0:8080`: every IPv4 interface; use
    /// `[::]:8080` for dual-stack, port 0 in tests.
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Admin listener (`/api/v1`, `/healthz`, `/readyz`, `/metrics`). Default
    /// `127.0.0.1:9091`: loopback only, since it must never face the internet; widen it only
    /// behind a firewall.
    #[serde(default = "default_admin_listen", deserialize_with = "socket_addr")]
    pub admin_listen: SocketAddr,
    /// Number of shards (one thread pinned per core). Default 0 = one per CPU of the process
    /// affinity mask, resolved by the server, not here. Fewer shards leave cores to other
    /// processes; more than the cores available only adds context switches.
    #[serde(default)]
    pub shards: usize,
    /// Bearer key for everything under `/api/`. Default: unset, and a random 32-hex-char key
    /// is generated at start and printed once, which changes on every restart; set it for
    /// anything a backend talks to. At least 8 chars.
    #[serde(default)]
    pub api_key: String,
    /// True when `api_key` was not configured and was generated at start. Not a TOML key.
    #[serde(skip)]
    pub api_key_generated: bool,
    /// Time a client has to send its whole upgrade request. Default 5000 ms: generous for
    /// mobile links; lower it to shed slowloris-style connections sooner.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` is believed, as CIDRs (`10.0.0.0/8`,
    /// `127.0.0.1`, `::1/128`). Default empty: the TCP peer is the client address, which is
    /// right unless a load balancer sits in front. IPv4-mapped IPv6 peers match IPv4 CIDRs.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Accepted `Origin` header values for `/ws`, compared exactly
    /// (`https://chat.example.com`). Default empty = any origin, fine for native apps;
    /// set it when browsers connect, so other sites cannot use a logged-in user's token.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// `[auth]`: client token verification.
    #[serde(default = "AuthConfig::unset")]
    pub auth: AuthConfig,
    /// `[heartbeat]`: liveness of client connections.
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    /// `[limits]`: per-process and per-connection bounds.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[history]`: messages kept per conversation for catch-up.
    #[serde(default)]
    pub history: HistoryConfig,
    /// `[redis]`: shared store. Default absent (`None`): the embedded in-memory store, one
    /// node, nothing survives a restart.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// `[cluster]`: ZeroMQ fan-out between nodes. Default absent (`None`): a single node.
    /// Needs `[redis]`.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// `[webhook]`: events to the backend (offline members, presence). Default absent
    /// (`None`): no webhooks.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// `[diagnostics]`: endpoints for testing and benchmarks, all off by default.
    #[serde(default)]
    pub diagnostics: DiagnosticsConfig,
}

/// `[auth]`: how client tokens (HS256 JWTs) are checked.
#[derive(Clone, PartialEq, Deserialize)]
pub struct AuthConfig {
    /// Shared HS256 secret the backend signs client tokens with. Default: unset, and a random
    /// one is generated, so no token verifies and `ringpush token` refuses to run; set it to
    /// anything real. At least 8 chars; use 32+ random bytes in production.
    #[serde(default)]
    pub secret: String,
    /// True when `secret` was not configured and was generated at start. Not a TOML key.
    #[serde(skip)]
    pub secret_generated: bool,
    /// Clock skew allowed on both `exp` and `nbf`, in seconds. Default 0: strict; raise it
    /// (a few seconds) when backend and server clocks are not NTP-synchronised, at the cost of
    /// accepting tokens that long after they expire.
    #[serde(default)]
    pub leeway_secs: u64,
}

/// `[heartbeat]`: how dead connections are noticed.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct HeartbeatConfig {
    /// Interval between server pings on an otherwise quiet connection. Default 25000 ms:
    /// under the ~30 s idle cut of common proxies and NATs; lower costs more wake-ups and
    /// mobile battery per idle socket.
    pub ping_interval_ms: u64,
    /// A connection from which nothing (not even a pong) arrived for this long is closed.
    /// Default 60000 ms, room for two missed pings; must exceed `ping_interval_ms`. Lower
    /// frees dead sockets sooner but drops clients on slow links.
    pub idle_timeout_ms: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig { ping_interval_ms: 25_000, idle_timeout_ms: 60_000 }
    }
}

/// `[limits]`: bounds that keep one client, or too many, from exhausting the process.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Open client connections per process; over it, upgrades get `503`. Default 1000000:
    /// sized for many idle sockets; it must stay under the file-descriptor limit.
    pub max_connections: usize,
    /// Largest client message (after reassembly), in bytes. Default 65536: ample for chat;
    /// larger raises the memory one connection can pin. 125 to 64 MiB.
    pub max_message_bytes: usize,
    /// Bytes waiting to be written to one connection before it is dropped as a slow
    /// consumer. Default 1048576 (1 MiB): rides out short stalls; multiplied by the number
    /// of slow connections it bounds memory. At least 1024.
    pub outbound_queue_bytes: usize,
    /// Client messages per second per connection; bursts of twice that pass. Default 50:
    /// faster than people type, slow enough to blunt floods.
    pub send_rate_per_sec: u32,
    /// How long a client message id is remembered to drop retransmitted duplicates.
    /// Default 300000 ms (5 min): covers reconnect-and-resend; longer costs memory per
    /// active conversation.
    pub dedupe_window_ms: u64,
    /// New connections per second the node accepts (upgrades past it get `503` with a
    /// `Retry-After`), shared evenly by the shards, bursts of one second's worth. Default
    /// 0 = no limit; set it below what the node and its store can absorb, so a
    /// reconnect storm after an outage is spread out instead of taking the node down.
    pub connect_rate_per_sec: u32,
    /// Open connections per client address; past it, upgrades get `503` with a
    /// `Retry-After`. Counted per shard, as `ceil(max / shards)` each (connections of
    /// one address spread evenly over the shards). Default 0 = no limit; mind carrier
    /// NAT, where thousands of phones share an address.
    pub max_connections_per_ip: u32,
    /// On a drain, each client is told (in the 1001 close reason,
    /// `reconnect_after_ms=N`) to wait a random 0..N ms before reconnecting. Default 10000:
    /// a fleet comes back over ten seconds instead of at once.
    pub reconnect_spread_ms: u64,
    /// Largest `signal` body (its JSON text), in bytes. Default 1024: room for "typing",
    /// "recording" and a few fields; signals are fanned out to every member online.
    pub max_signal_bytes: usize,
    /// `signal`s per second per connection; bursts of twice that pass. Default 5: a typing
    /// indicator needs one every few seconds.
    pub signal_rate_per_sec: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1_000_000,
            max_message_bytes: 65_536,
            outbound_queue_bytes: 1_048_576,
            send_rate_per_sec: 50,
            dedupe_window_ms: 300_000,
            connect_rate_per_sec: 0,
            max_connections_per_ip: 0,
            reconnect_spread_ms: 10_000,
            max_signal_bytes: 1024,
            signal_rate_per_sec: 5,
        }
    }
}

/// `[history]`: the per-conversation window clients catch up from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct HistoryConfig {
    /// Messages kept per conversation. Default 1000: a day of a busy group chat; more costs
    /// memory (or Redis space) per conversation, fewer forces clients to the backend sooner.
    pub max_per_conv: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig { max_per_conv: 1000 }
    }
}

/// `[redis]`: the shared store; its presence switches from the in-memory store.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// Connection URL. Default `redis://127.0.0.1:6379/0`: a local instance; use
    /// `rediss://` across untrusted networks.
    pub url: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig { url: "redis://127.0.0.1:6379/0".to_owned() }
    }
}

/// `[cluster]`: node-to-node fan-out over ZeroMQ PUB/SUB; its presence makes this node
/// part of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    /// Where this node's PUB socket binds. Default `tcp://0.0.0.0:7001`: every interface;
    /// narrow it to the cluster network.
    pub pub_listen: String,
    /// The address peers connect to for this node's PUB socket. Default
    /// `tcp://127.0.0.1:7001`: only right for several nodes on one host; set it to a
    /// routable address otherwise.
    pub advertise: String,
    /// Fixed peer PUB endpoints. Default empty = discover peers through Redis, which
    /// follows nodes coming and going; a fixed list suits static deployments.
    pub peers: Vec<String>,
    /// Messages ZeroMQ queues per peer (send and receive high-water marks) before it
    /// drops. Default 100000: a peer may stall for a second or two at full rate without
    /// loss; what is dropped past it is repaired from Redis, at the cost of a read.
    pub hwm: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            pub_listen: "tcp://0.0.0.0:7001".to_owned(),
            advertise: "tcp://127.0.0.1:7001".to_owned(),
            peers: Vec::new(),
            hwm: DEFAULT_HWM,
        }
    }
}

/// `[webhook]`: signed, batched HTTP POSTs of events to the backend (PROTOCOL.md,
/// "Webhooks").
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct WebhookConfig {
    /// Where events are POSTed (`http://` or `https://`). Required.
    pub url: String,
    /// The HMAC-SHA256 key of `X-Ringpush-Signature`. Required, at least 8 chars.
    pub secret: String,
    /// How long after a message (or a user's last disconnect) the event is decided.
    /// Default 3000 ms: a phone that reconnects or a user who reads on another device
    /// within it causes no event.
    pub offline_delay_ms: u64,
    /// A request with no answer within this is a failure and is retried. Default 5000.
    pub timeout_ms: u64,
    /// Most events per request. Default 100.
    pub max_batch: usize,
    /// Attempts per batch before it is dropped (logged and counted). Default 8 (about 2 min
    /// of backoff).
    pub max_attempts: u32,
    /// Events waiting to be sent; past it the oldest are dropped and counted. Default 100000.
    pub queue_max: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            secret: String::new(),
            offline_delay_ms: 3000,
            timeout_ms: 5000,
            max_batch: 100,
            max_attempts: 8,
            queue_max: 100_000,
        }
    }
}

/// `[diagnostics]`: endpoints for conformance tests, benchmarks and demos.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DiagnosticsConfig {
    /// Serve `/echo` (no auth, plain RFC 6455 echo) on the client listener. Default false:
    /// it is an unauthenticated endpoint.
    pub echo: bool,
    /// Serve the `/demo` try-it page and its dev-only token endpoint. Default false: the
    /// token endpoint hands out tokens to anyone.
    pub demo: bool,
}

impl AuthConfig {
    /// The state before the secret is filled in by [`Config::from_parts`].
    fn unset() -> AuthConfig {
        AuthConfig { secret: String::new(), secret_generated: false, leeway_secs: 0 }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9091))
}

fn default_handshake_timeout_ms() -> u64 {
    5000
}

fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid socket address {text:?} (expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\")"
        ))
    })
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("shards", &self.shards)
            .field("api_key", &Redacted)
            .field("api_key_generated", &self.api_key_generated)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("allowed_origins", &self.allowed_origins)
            .field("auth", &self.auth)
            .field("heartbeat", &self.heartbeat)
            .field("limits", &self.limits)
            .field("history", &self.history)
            .field("redis", &self.redis)
            .field("cluster", &self.cluster)
            .field("diagnostics", &self.diagnostics)
            .finish()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &Redacted)
            .field("secret_generated", &self.secret_generated)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

/// Stands in for a secret in `Debug` output, so logging a config never leaks one.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for Config {
    /// The configuration of an empty file and no environment: `from_parts("", [])`.
    ///
    /// # Panics
    /// If `/dev/urandom` cannot be read (the generated `api_key` and `auth.secret` need it);
    /// [`Config::from_parts`] reports that as an error instead.
    fn default() -> Self {
        match Config::from_parts("", Vec::new()) {
            Ok(config) => config,
            Err(e) => panic!("default configuration: {e}"),
        }
    }
}

impl Config {
    /// File (optional) + environment overrides + validation. The one entry point main uses.
    ///
    /// Environment variables outside `RINGPUSH_*` are ignored; a `RINGPUSH_*` one whose
    /// value is not UTF-8 is an error naming it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            None => String::new(),
            Some(path) => std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: io_message(&e),
            })?,
        };
        Config::from_parts(&text, env::vars()?)
    }

    /// Same as [`Config::load`], from the file's text and an explicit environment (testable
    /// without touching the process environment). Names outside `RINGPUSH_*` are ignored.
    pub fn from_parts(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = parse_document(toml_text)?;
        let overrides = Overrides::apply::<Config>(&mut table, env)?;
        Config::from_table(table)
            .and_then(|config| config.validate().map(|()| config))
            .map_err(|e| overrides.attribute(e))
    }

    /// Checks the rules of every key; the error names the first key that breaks one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(valid_node_id(&self.node_id), "node_id", || {
            format!("must be 1-{MAX_NODE_ID_LEN} characters of [A-Za-z0-9._:-], got {:?}", self.node_id)
        })?;
        check(self.listen != self.admin_listen || self.listen.port() == 0, "admin_listen", || {
            format!("must differ from listen ({})", self.listen)
        })?;
        check(self.api_key.chars().count() >= MIN_SECRET_LEN, "api_key", || {
            format!("must be at least {MIN_SECRET_LEN} characters")
        })?;
        check(self.handshake_timeout_ms > 0, "handshake_timeout_ms", || "must be greater than 0".to_owned())?;
        if let Some(i) = self.allowed_origins.iter().position(|o| o.trim().is_empty()) {
            return Err(ConfigError::invalid("allowed_origins", format!("entry {i} must not be empty")));
        }
        check(self.auth.secret.chars().count() >= MIN_SECRET_LEN, "auth.secret", || {
            format!("must be at least {MIN_SECRET_LEN} characters")
        })?;
        let heartbeat = &self.heartbeat;
        check(heartbeat.ping_interval_ms > 0, "heartbeat.ping_interval_ms", || {
            "must be greater than 0".to_owned()
        })?;
        check(heartbeat.idle_timeout_ms > heartbeat.ping_interval_ms, "heartbeat.idle_timeout_ms", || {
            format!("must be greater than heartbeat.ping_interval_ms ({})", heartbeat.ping_interval_ms)
        })?;
        let limits = &self.limits;
        check(limits.max_connections > 0, "limits.max_connections", || "must be greater than 0".to_owned())?;
        check(
            (MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&limits.max_message_bytes),
            "limits.max_message_bytes",
            || format!("must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES} (64 MiB)"),
        )?;
        check(
            limits.outbound_queue_bytes >= MIN_OUTBOUND_QUEUE_BYTES,
            "limits.outbound_queue_bytes",
            || format!("must be at least {MIN_OUTBOUND_QUEUE_BYTES}"),
        )?;
        check(limits.send_rate_per_sec > 0, "limits.send_rate_per_sec", || {
            "must be greater than 0".to_owned()
        })?;
        check(limits.max_signal_bytes > 0, "limits.max_signal_bytes", || {
            "must be greater than 0".to_owned()
        })?;
        check(limits.signal_rate_per_sec > 0, "limits.signal_rate_per_sec", || {
            "must be greater than 0".to_owned()
        })?;
        if let Some(w) = &self.webhook {
            let scheme = w.url.starts_with("http://") || w.url.starts_with("https://");
            check(scheme && w.url.len() > 8, "webhook.url", || {
                format!("{:?} is not an http:// or https:// URL", w.url)
            })?;
            check(w.secret.chars().count() >= MIN_SECRET_LEN, "webhook.secret", || {
                format!("must be at least {MIN_SECRET_LEN} characters")
            })?;
            check(w.timeout_ms > 0, "webhook.timeout_ms", || "must be greater than 0".to_owned())?;
            check(w.max_batch > 0, "webhook.max_batch", || "must be greater than 0".to_owned())?;
            check(w.max_attempts > 0, "webhook.max_attempts", || "must be at least 1".to_owned())?;
            check(w.queue_max > 0, "webhook.queue_max", || "must be greater than 0".to_owned())?;
        }
        check(self.history.max_per_conv > 0, "history.max_per_conv", || "must be greater than 0".to_owned())?;
        if let Some(redis) = &self.redis {
            check(redis::Client::open(redis.url.as_str()).is_ok(), "redis.url", || {
                format!("{:?} is not a Redis URL (redis://host:port/db or rediss://...)", redis.url)
            })?;
        }
        if let Some(cluster) = &self.cluster {
            let endpoint = |e: &str| e.starts_with("tcp://") && e.len() > 6;
            check(endpoint(&cluster.pub_listen), "cluster.pub_listen", || {
                format!("{:?} is not a ZeroMQ TCP endpoint (tcp://addr:port)", cluster.pub_listen)
            })?;
            check(endpoint(&cluster.advertise), "cluster.advertise", || {
                format!("{:?} is not a ZeroMQ TCP endpoint (tcp://host:port)", cluster.advertise)
            })?;
            if let Some(bad) = cluster.peers.iter().find(|p| !endpoint(p)) {
                let reason = format!("{bad:?} is not a ZeroMQ TCP endpoint (tcp://host:port)");
                return Err(ConfigError::invalid("cluster.peers", reason));
            }
            check(cluster.hwm > 0, "cluster.hwm", || "must be at least 1".to_owned())?;
        }
        check(self.cluster.is_none() || self.redis.is_some(), "cluster", || {
            "requires a [redis] section (nodes share state through Redis)".to_owned()
        })?;
        Ok(())
    }

    /// Deserializes the merged table and fills in what depends on other keys or on
    /// randomness: `node_id`, a generated `api_key` and `auth.secret`.
    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        let has_node_id = table.contains_key("node_id");
        let has_api_key = table.contains_key("api_key");
        let has_secret = matches!(
            table.get("auth"),
            Some(toml::Value::Table(auth)) if auth.contains_key("secret")
        );
        let mut config: Config = match error::deserialize(table.clone()) {
            Ok(config) => config,
            Err(rejection) => return Err(locate::<Config>(&table, rejection)),
        };
        if !has_node_id {
            config.node_id_generated = true;
            config.node_id = default_node_id(config.listen.port());
        }
        if !has_api_key {
            config.api_key = random_hex("api_key")?;
            config.api_key_generated = true;
        }
        if !has_secret {
            config.auth.secret = random_hex("auth.secret")?;
            config.auth.secret_generated = true;
        }
        Ok(config)
    }
}

fn check(ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(key, message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_parts(text, Vec::new())
    }

    /// A config with every secret set, plus `extra`.
    fn with(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!("api_key = \"0123456789\"\n{extra}\n[auth]\nsecret = \"abcdefghij\"\n"))
    }

    fn err_key(result: Result<Config, ConfigError>) -> (Option<String>, String) {
        let e = result.expect_err("expected an error");
        let text = e.to_string();
        assert!(!text.contains('\n'), "not one line: {text}");
        (e.key().map(str::to_owned), text)
    }

    #[track_caller]
    fn assert_refused(result: Result<Config, ConfigError>, key: &str) {
        let (got, text) = err_key(result);
        assert_eq!(got.as_deref(), Some(key), "{text}");
        assert!(text.contains(key), "{text}");
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9091".parse().unwrap());
        assert_eq!(c.shards, 0);
        assert!(c.node_id.ends_with("-8080"), "{}", c.node_id);
        assert!(valid_node_id(&c.node_id));
        assert_eq!(c.api_key.len(), 32);
        assert!(c.api_key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(c.api_key_generated);
        assert_eq!(c.auth.secret.len(), 32);
        assert!(c.auth.secret_generated);
        assert_ne!(c.api_key, c.auth.secret);
        assert_eq!(c.auth.leeway_secs, 0);
        assert_eq!(c.handshake_timeout_ms, 5000);
        assert!(c.trusted_proxies.is_empty());
        assert!(c.allowed_origins.is_empty());
        assert_eq!(c.heartbeat, HeartbeatConfig::default());
        assert_eq!(c.heartbeat.ping_interval_ms, 25_000);
        assert_eq!(c.heartbeat.idle_timeout_ms, 60_000);
        assert_eq!(c.limits.max_connections, 1_000_000);
        assert_eq!(c.limits.max_message_bytes, 65_536);
        assert_eq!(c.limits.outbound_queue_bytes, 1_048_576);
        assert_eq!(c.limits.send_rate_per_sec, 50);
        assert_eq!(c.limits.dedupe_window_ms, 300_000);
        assert_eq!(c.history.max_per_conv, 1000);
        assert_eq!(c.redis, None);
        assert_eq!(c.cluster, None);
        assert_eq!(c.diagnostics, DiagnosticsConfig::default());
        assert!(!c.diagnostics.echo && !c.diagnostics.demo);

        let d = Config::default();
        assert!(d.api_key_generated && d.auth.secret_generated);
        assert_eq!(d.limits, c.limits);
    }

    #[test]
    fn full_file_of_protocol_md() {
        let c = parse(
            r#"
node_id = "n1"
listen = "0.0.0.0:8080"
admin_listen = "127.0.0.1:9091"
shards = 0
api_key = "change-me"
handshake_timeout_ms = 5000
trusted_proxies = ["10.0.0.0/8", "::1/128"]
allowed_origins = ["https://chat.example.com"]

[auth]
secret = "change-me-too"
leeway_secs = 0

[heartbeat]
ping_interval_ms = 25000
idle_timeout_ms = 60000

[limits]
max_connections = 1000000
max_message_bytes = 65536
outbound_queue_bytes = 1048576
send_rate_per_sec = 50
dedupe_window_ms = 300000
max_signal_bytes = 1024
signal_rate_per_sec = 5

[history]
max_per_conv = 1000

[redis]
url = "redis://127.0.0.1:6379/0"

[cluster]
pub_listen = "tcp://0.0.0.0:7001"
advertise = "tcp://127.0.0.1:7001"
peers = []

[webhook]
url = "http://127.0.0.1:8000/ringpush/events"
secret = "change-me-three"
offline_delay_ms = 3000

[diagnostics]
echo = true
demo = false
"#,
        )
        .unwrap();
        assert_eq!(c.node_id, "n1");
        assert_eq!(c.api_key, "change-me");
        assert!(!c.api_key_generated);
        assert_eq!(c.auth.secret, "change-me-too");
        assert!(!c.auth.secret_generated);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert_eq!(c.redis, Some(RedisConfig::default()));
        assert_eq!(c.cluster, Some(ClusterConfig::default()));
        assert!(c.diagnostics.echo);
    }

    #[test]
    fn empty_sections_take_defaults() {
        let c = with("[redis]\n[cluster]\n[limits]\n").unwrap();
        assert_eq!(c.redis.unwrap().url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.cluster.unwrap().advertise, "tcp://127.0.0.1:7001");
        assert_eq!(c.limits, LimitsConfig::default());
    }

    #[test]
    fn node_id_follows_listen_port() {
        let c = with("listen = \"127.0.0.1:9000\"").unwrap();
        assert!(c.node_id.ends_with("-9000"), "{}", c.node_id);
    }

    #[test]
    fn env_overrides_string_number_bool_array() {
        let c = Config::from_parts(
            "[auth]\nsecret = \"from-the-file\"\n",
            env(&[
                ("RINGPUSH_AUTH__SECRET", "from-the-env"),
                ("RINGPUSH_LISTEN", "127.0.0.1:0"),
                ("RINGPUSH_LIMITS__MAX_CONNECTIONS", "42"),
                ("RINGPUSH_DIAGNOSTICS__ECHO", "true"),
                ("RINGPUSH_ALLOWED_ORIGINS", r#"["https://a.example","https://b.example"]"#),
                ("RINGPUSH_TRUSTED_PROXIES", r#"["10.0.0.0/8"]"#),
                ("PATH", "/usr/bin"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.auth.secret, "from-the-env");
        assert!(!c.auth.secret_generated);
        assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.limits.max_connections, 42);
        assert!(c.diagnostics.echo);
        assert_eq!(c.allowed_origins, ["https://a.example", "https://b.example"]);
        assert_eq!(c.trusted_proxies, ["10.0.0.0/8".parse::<Cidr>().unwrap()]);
        // Other limits keep their defaults when one is overridden.
        assert_eq!(c.limits.max_message_bytes, 65_536);
    }

    #[test]
    fn env_numeric_or_boolean_string_for_a_string_key() {
        let c = Config::from_parts(
            "",
            env(&[
                ("RINGPUSH_AUTH__SECRET", "12345678"),
                ("RINGPUSH_API_KEY", "3.14159265"),
                ("RINGPUSH_NODE_ID", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(c.auth.secret, "12345678");
        assert_eq!(c.api_key, "3.14159265");
        assert_eq!(c.node_id, "7");
    }

    #[test]
    fn redis_and_cluster_addresses_are_checked() {
        assert_refused(with("[redis]\nurl = \"true\"\n"), "redis.url");
        let cluster = |body: &str| with(&format!("[redis]\n[cluster]\n{body}\n"));
        assert_refused(cluster("pub_listen = \"0.0.0.0:7001\""), "cluster.pub_listen");
        assert_refused(cluster("advertise = \"\""), "cluster.advertise");
        assert_refused(cluster("peers = [\"tcp://a:1\", \"b:2\"]"), "cluster.peers");
        assert_refused(cluster("hwm = 0"), "cluster.hwm");
        assert_eq!(cluster("hwm = 10").unwrap().cluster.unwrap().hwm, 10);
    }

    #[test]
    fn env_creates_a_section() {
        let c = Config::from_parts("", env(&[("RINGPUSH_REDIS__URL", "redis://10.1.2.3:6379/2")])).unwrap();
        assert_eq!(c.redis.unwrap().url, "redis://10.1.2.3:6379/2");
        let c = Config::from_parts(
            "[redis]\n",
            env(&[("RINGPUSH_CLUSTER__PEERS", r#"["tcp://10.0.0.2:7001"]"#)]),
        )
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.peers, ["tcp://10.0.0.2:7001"]);
        assert_eq!(cluster.pub_listen, "tcp://0.0.0.0:7001");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = Config::from_parts("", env(&[("RINGPUSH_LIMITS__FOO", "1")])).unwrap_err();
        assert!(
            matches!(&e, ConfigError::UnknownEnv { var, key }
            if var == "RINGPUSH_LIMITS__FOO" && key == "limits.foo"),
            "{e}"
        );
        assert!(e.to_string().contains("RINGPUSH_LIMITS__FOO"), "{e}");
        for var in ["RINGPUSH_NOPE", "RINGPUSH_NOPE__X", "RINGPUSH_A__B__C", "RINGPUSH_", "RINGPUSH___X"] {
            let e = Config::from_parts("", env(&[(var, "1")])).unwrap_err();
            assert!(matches!(&e, ConfigError::UnknownEnv { .. }), "{var}: {e}");
            assert!(e.to_string().starts_with(var), "{e}");
        }
        let e = Config::from_parts("", env(&[("RINGPUSH_LISTEN", "abc")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "listen: invalid socket address \"abc\" (expected IP:PORT, e.g. \"0.0.0.0:8080\" \
             or \"[::1]:8080\") (set by RINGPUSH_LISTEN)"
        );
        let e = Config::from_parts("", env(&[("RINGPUSH_HEARTBEAT__PING_INTERVAL_MS", "0")])).unwrap_err();
        assert_eq!(e.key(), Some("heartbeat.ping_interval_ms"));
        assert!(e.to_string().ends_with("(set by RINGPUSH_HEARTBEAT__PING_INTERVAL_MS)"), "{e}");
        let e = Config::from_parts("auth = 5\n", env(&[("RINGPUSH_AUTH__SECRET", "x")])).unwrap_err();
        assert!(e.to_string().starts_with("RINGPUSH_AUTH__SECRET: "), "{e}");
    }

    #[test]
    fn unknown_keys() {
        let (key, text) = err_key(with("[limits]\nfoo = 1\n"));
        assert_eq!(key.as_deref(), Some("limits.foo"));
        assert_eq!(text, "unknown key \"limits.foo\"");
        let (key, _) = err_key(with("colour = \"blue\""));
        assert_eq!(key.as_deref(), Some("colour"));
        let (key, _) = err_key(with("[nope]\na = 1\n"));
        assert_eq!(key.as_deref(), Some("nope"));
        let (key, _) = err_key(with("api_key_generated = true"));
        assert_eq!(key.as_deref(), Some("api_key_generated"));
        let (key, _) = err_key(parse("[auth]\nsecret_generated = true\n"));
        assert_eq!(key.as_deref(), Some("auth.secret_generated"));
    }

    #[test]
    fn type_errors_name_the_key() {
        let (_, text) = err_key(with("listen = \"abc\""));
        assert!(text.starts_with("listen: invalid socket address \"abc\""), "{text}");
        assert_refused(with("[limits]\nmax_connections = \"many\"\n"), "limits.max_connections");
        assert_refused(with("[limits]\nmax_connections = -1\n"), "limits.max_connections");
        assert_refused(with("shards = 1.5"), "shards");
        assert_refused(with("trusted_proxies = [\"10.0.0.0/33\"]"), "trusted_proxies");
        assert_refused(with("trusted_proxies = \"10.0.0.0/8\""), "trusted_proxies");
        assert_refused(with("heartbeat = 3"), "heartbeat");
        assert_refused(with("listen = { port = 1 }"), "listen");
        assert_refused(with("[diagnostics]\necho = \"yes\"\n"), "diagnostics.echo");
    }

    #[test]
    fn missing_file() {
        let e = Config::load(Some(Path::new("/nonexistent/ringpush.toml"))).unwrap_err();
        assert_eq!(e.to_string(), "file /nonexistent/ringpush.toml: No such file or directory");
    }

    #[test]
    fn each_validation_rule_names_its_key() {
        assert_refused(with("node_id = \"\""), "node_id");
        assert_refused(with("node_id = \"has space\""), "node_id");
        assert_refused(with(&format!("node_id = \"{}\"", "n".repeat(65))), "node_id");
        assert!(with(&format!("node_id = \"{}\"", "n".repeat(64))).is_ok());
        assert!(with("node_id = \"a-b_c.d:e9\"").is_ok());
        assert_refused(
            with("listen = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7000\""),
            "admin_listen",
        );
        assert!(with("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"").is_ok());
        assert_refused(parse("api_key = \"short\"\n[auth]\nsecret = \"abcdefghij\"\n"), "api_key");
        assert_refused(parse("api_key = \"0123456789\"\n[auth]\nsecret = \"\"\n"), "auth.secret");
        assert_refused(with("handshake_timeout_ms = 0"), "handshake_timeout_ms");
        assert_refused(with("allowed_origins = [\"https://a\", \"\"]"), "allowed_origins");
        assert_refused(with("[heartbeat]\nping_interval_ms = 0\n"), "heartbeat.ping_interval_ms");
        assert_refused(
            with("[heartbeat]\nping_interval_ms = 1000\nidle_timeout_ms = 1000\n"),
            "heartbeat.idle_timeout_ms",
        );
        assert!(with("[heartbeat]\nping_interval_ms = 1000\nidle_timeout_ms = 1001\n").is_ok());
        assert_refused(with("[limits]\nmax_connections = 0\n"), "limits.max_connections");
        assert_refused(with("[limits]\nmax_message_bytes = 124\n"), "limits.max_message_bytes");
        assert!(with("[limits]\nmax_message_bytes = 125\n").is_ok());
        assert!(with("[limits]\nmax_message_bytes = 67108864\n").is_ok());
        assert_refused(with("[limits]\nmax_message_bytes = 67108865\n"), "limits.max_message_bytes");
        assert_refused(with("[limits]\noutbound_queue_bytes = 1023\n"), "limits.outbound_queue_bytes");
        assert!(with("[limits]\noutbound_queue_bytes = 1024\n").is_ok());
        assert_refused(with("[limits]\nsend_rate_per_sec = 0\n"), "limits.send_rate_per_sec");
        assert_refused(with("[limits]\nsignal_rate_per_sec = 0\n"), "limits.signal_rate_per_sec");
        assert_refused(with("[limits]\nmax_signal_bytes = 0\n"), "limits.max_signal_bytes");
        assert_refused(with("[webhook]\nsecret = \"whsecret1\"\n"), "webhook.url");
        assert_refused(with("[webhook]\nurl = \"ftp://x/y\"\nsecret = \"whsecret1\"\n"), "webhook.url");
        assert_refused(with("[webhook]\nurl = \"http://h/e\"\nsecret = \"short\"\n"), "webhook.secret");
        assert!(with("[webhook]\nurl = \"http://h/e\"\nsecret = \"whsecret1\"\n").is_ok());
        assert_refused(with("[history]\nmax_per_conv = 0\n"), "history.max_per_conv");
        assert_refused(with("[cluster]\n"), "cluster");
        assert!(with("[redis]\n[cluster]\n").is_ok());

        let (_, text) = err_key(with("[heartbeat]\nping_interval_ms = 0\n"));
        assert_eq!(text, "heartbeat.ping_interval_ms: must be greater than 0");
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let c = parse("api_key = \"api-key-value\"\n[auth]\nsecret = \"secret-value\"\n").unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("api-key-value") && !debug.contains("secret-value"), "{debug}");
        let (_, text) = err_key(parse("api_key = \"tiny\"\n[auth]\nsecret = \"secret-value\"\n"));
        assert!(!text.contains("tiny"), "{text}");
    }
}
