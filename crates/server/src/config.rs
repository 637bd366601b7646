//! Configuration: defaults, then a TOML file, then `AGORA_*` environment variables, each
//! overriding the one before. `docs/configuration.md` lists every setting.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The longest `projector_linger_ms`.
pub const PROJECTOR_LINGER_MS_MAX: u64 = 60_000;
/// The fewest commands between two snapshots (`snapshot_every_commands`, unless 0): a snapshot
/// stops the sequencer while the state is encoded and hashed.
pub const SNAPSHOT_EVERY_COMMANDS_MIN: u64 = 100;

/// Everything `agora serve` can be told.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Directory for the embedded database and generated secrets.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://…`; the default is `agora.db` in the data directory.
    pub database: Option<String>,
    /// PostgreSQL only: the schema to use (created when missing), so that several servers or
    /// test runs can share one database.
    pub database_schema: Option<String>,
    /// SQLite only: `full` (every commit survives power loss) or `normal` (survives a killed
    /// process).
    pub durability: String,
    /// Sessions, API keys and the first administrator.
    pub auth: AuthConfig,
    /// Request and connection limits.
    pub limits: LimitsConfig,
    /// How often the server moves the core's clock, in milliseconds (expiries, day cut-offs and
    /// 24 h statistics follow it).
    pub clock_tick_ms: u64,
    /// After a projection pass that wrote something, how long the projector lets journal
    /// batches gather before the next, in milliseconds: longer costs less CPU under load and
    /// delays the WebSocket feeds more (a read waiting for its own writes does not wait for it).
    pub projector_linger_ms: u64,
    /// How long an idempotency key is remembered, in seconds.
    pub idempotency_ttl_s: u64,
    /// The core writes a snapshot of its state after this many commands since the last one
    /// (0: never); recovery replays the journal from the newest valid snapshot.
    pub snapshot_every_commands: u64,
}

/// Sessions and keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Secret that signs session tokens (HS256). When absent, one is generated on first start
    /// and kept in `jwt.secret` in the data directory.
    pub jwt_secret: Option<String>,
    /// The `aud` claim sessions carry and the server requires.
    pub audience: String,
    /// How long a session token is valid, in seconds.
    pub session_ttl_s: u64,
    /// How far a signed request's timestamp may be from the server's clock, in seconds.
    pub signature_window_s: u64,
    /// Name of the administrator created on first start.
    pub admin_username: String,
    /// Password of that administrator; when absent one is generated and printed once.
    pub admin_password: Option<String>,
}

/// Limits on requests.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body, in bytes.
    pub body_bytes_max: usize,
    /// Longest time a request may take, in milliseconds.
    pub request_timeout_ms: u64,
    /// Requests served at once; beyond it requests are shed with 503.
    pub requests_in_flight_max: usize,
    /// Requests per second one client address may make (0: no limit).
    pub ip_requests_per_s: u32,
    /// Requests one client address may make in a burst above its rate.
    pub ip_burst: u32,
    /// Requests per second one signed-in user may make (0: no limit).
    pub user_requests_per_s: u32,
    /// Requests one user may make in a burst above its rate.
    pub user_burst: u32,
    /// Messages queued for one WebSocket client; a client that lets it fill is disconnected.
    pub ws_send_buffer_messages: usize,
    /// Messages one WebSocket client may send in a minute.
    pub ws_messages_per_minute: u32,
    /// Reverse proxies (addresses such as `10.0.0.5` or networks such as `10.0.0.0/8`) whose
    /// `X-Forwarded-For` is believed: a request from one of them is counted against the
    /// client address the header names. Empty (the default): the header is ignored.
    pub trusted_proxies: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./agora-data"),
            database: None,
            database_schema: None,
            durability: "full".into(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            clock_tick_ms: 1_000,
            projector_linger_ms: 25,
            idempotency_ttl_s: 24 * 3600,
            snapshot_every_commands: 100_000,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            audience: "agora".into(),
            session_ttl_s: 12 * 3600,
            signature_window_s: 30,
            admin_username: "admin".into(),
            admin_password: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            body_bytes_max: 64 * 1024,
            request_timeout_ms: 10_000,
            requests_in_flight_max: 4_096,
            ip_requests_per_s: 2_000,
            ip_burst: 4_000,
            user_requests_per_s: 1_000,
            user_burst: 2_000,
            ws_send_buffer_messages: 1_024,
            ws_messages_per_minute: crate::ws::limits::MESSAGES_PER_MINUTE,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("{path}: {error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its position.
        error: toml::de::Error,
    },
    /// A setting has a value outside its rule.
    #[error("setting {setting}: {rule}")]
    Invalid {
        /// The setting, as named in the file or the environment.
        setting: String,
        /// The rule it breaks.
        rule: String,
    },
}

impl Config {
    /// Defaults, then `file` if given, then the `AGORA_*` variables among `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_path_buf(),
                    error,
                })?;
                toml::from_str(&text).map_err(|error| ConfigError::Parse {
                    path: path.to_path_buf(),
                    error,
                })?
            }
        };
        for (name, value) in env {
            config.set_from_env(&name, value)?;
        }
        config.validate()?;
        Ok(config)
    }

    fn set_from_env(&mut self, name: &str, value: String) -> Result<(), ConfigError> {
        fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError> {
            value.parse().map_err(|_| ConfigError::Invalid {
                setting: name.into(),
                rule: format!("must be a whole number, not {value:?}"),
            })
        }
        match name {
            "AGORA_LISTEN" => self.listen = value,
            "AGORA_DATA_DIR" => self.data_dir = PathBuf::from(value),
            "AGORA_DATABASE" => self.database = Some(value),
            "AGORA_DATABASE_SCHEMA" => self.database_schema = Some(value),
            "AGORA_DURABILITY" => self.durability = value,
            "AGORA_JWT_SECRET" => self.auth.jwt_secret = Some(value),
            "AGORA_JWT_AUDIENCE" => self.auth.audience = value,
            "AGORA_SESSION_TTL_S" => self.auth.session_ttl_s = number(name, &value)?,
            "AGORA_ADMIN_USERNAME" => self.auth.admin_username = value,
            "AGORA_ADMIN_PASSWORD" => self.auth.admin_password = Some(value),
            "AGORA_BODY_BYTES_MAX" => self.limits.body_bytes_max = number(name, &value)?,
            "AGORA_REQUEST_TIMEOUT_MS" => self.limits.request_timeout_ms = number(name, &value)?,
            "AGORA_REQUESTS_IN_FLIGHT_MAX" => {
                self.limits.requests_in_flight_max = number(name, &value)?
            }
            "AGORA_IP_REQUESTS_PER_S" => self.limits.ip_requests_per_s = number(name, &value)?,
            "AGORA_IP_BURST" => self.limits.ip_burst = number(name, &value)?,
            "AGORA_USER_REQUESTS_PER_S" => self.limits.user_requests_per_s = number(name, &value)?,
            "AGORA_USER_BURST" => self.limits.user_burst = number(name, &value)?,
            "AGORA_WS_SEND_BUFFER_MESSAGES" => {
                self.limits.ws_send_buffer_messages = number(name, &value)?
            }
            "AGORA_WS_MESSAGES_PER_MINUTE" => {
                self.limits.ws_messages_per_minute = number(name, &value)?
            }
            "AGORA_TRUSTED_PROXIES" => {
                self.limits.trusted_proxies = value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "AGORA_CLOCK_TICK_MS" => self.clock_tick_ms = number(name, &value)?,
            "AGORA_PROJECTOR_LINGER_MS" => self.projector_linger_ms = number(name, &value)?,
            "AGORA_IDEMPOTENCY_TTL_S" => self.idempotency_ttl_s = number(name, &value)?,
            "AGORA_SNAPSHOT_EVERY_COMMANDS" => self.snapshot_every_commands = number(name, &value)?,
            _ => {}
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &str, rule: &str| {
            Err(ConfigError::Invalid {
                setting: setting.into(),
                rule: rule.into(),
            })
        };
        if !matches!(self.durability.as_str(), "full" | "normal") {
            return invalid("durability", "must be full or normal");
        }
        if self.auth.audience.is_empty() {
            return invalid("auth.audience", "must not be empty");
        }
        if !(60..=30 * 24 * 3600).contains(&self.auth.session_ttl_s) {
            return invalid("auth.session_ttl_s", "must be 60 s to 30 days");
        }
        if !(1..=300).contains(&self.auth.signature_window_s) {
            return invalid("auth.signature_window_s", "must be 1 to 300 s");
        }
        if self
            .auth
            .jwt_secret
            .as_ref()
            .is_some_and(|secret| secret.len() < 32)
        {
            return invalid("auth.jwt_secret", "must be at least 32 bytes");
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.limits.body_bytes_max) {
            return invalid("limits.body_bytes_max", "must be 1 KiB to 16 MiB");
        }
        if !(100..=600_000).contains(&self.limits.request_timeout_ms) {
            return invalid("limits.request_timeout_ms", "must be 100 ms to 10 min");
        }
        if self.limits.requests_in_flight_max == 0 {
            return invalid("limits.requests_in_flight_max", "must be at least 1");
        }
        for (setting, rate, burst) in [
            (
                "limits.ip",
                self.limits.ip_requests_per_s,
                self.limits.ip_burst,
            ),
            (
                "limits.user",
                self.limits.user_requests_per_s,
                self.limits.user_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return invalid(
                    &format!("{setting}_burst"),
                    "must be at least 1 when the rate is set",
                );
            }
        }
        if !(1..=1_000_000).contains(&self.limits.ws_send_buffer_messages) {
            return invalid("limits.ws_send_buffer_messages", "must be 1 to 1,000,000");
        }
        if self.limits.ws_messages_per_minute == 0 {
            return invalid("limits.ws_messages_per_minute", "must be at least 1");
        }
        if self.limits.trusted_proxies.len() > crate::limit::TRUSTED_PROXIES_MAX {
            return invalid(
                "limits.trusted_proxies",
                &format!("at most {} entries", crate::limit::TRUSTED_PROXIES_MAX),
            );
        }
        for proxy in &self.limits.trusted_proxies {
            if crate::limit::Network::parse(proxy).is_none() {
                return Err(ConfigError::Invalid {
                    setting: "limits.trusted_proxies".into(),
                    rule: format!("{proxy:?} is not an IP address or a network such as 10.0.0.0/8"),
                });
            }
        }
        if !(10..=60_000).contains(&self.clock_tick_ms) {
            return invalid("clock_tick_ms", "must be 10 ms to 60 s");
        }
        if self.projector_linger_ms > PROJECTOR_LINGER_MS_MAX {
            return invalid("projector_linger_ms", "must be 0 to 60,000 ms");
        }
        if (1..SNAPSHOT_EVERY_COMMANDS_MIN).contains(&self.snapshot_every_commands) {
            return invalid(
                "snapshot_every_commands",
                &format!("must be 0 (never) or at least {SNAPSHOT_EVERY_COMMANDS_MIN}"),
            );
        }
        Ok(())
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        match &self.database {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("agora.db").display()),
        }
    }
}
