//! Configuration: built-in defaults < TOML file < environment, with secrets redacted in Debug.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// A string that never shows up in logs or Debug output.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    /// Environment values that look like numbers or booleans still are secrets.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Integer(i128),
            Float(f64),
            Boolean(bool),
        }
        Ok(Secret(match Scalar::deserialize(deserializer)? {
            Scalar::Text(text) => text,
            Scalar::Integer(number) => number.to_string(),
            Scalar::Float(number) => number.to_string(),
            Scalar::Boolean(flag) => flag.to_string(),
        }))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            formatter.write_str("\"\"")
        } else {
            formatter.write_str("\"[redacted]\"")
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub listen: String,
    pub database_url: Secret,
    pub policy: PathBuf,
    pub public_url: String,
    pub max_body_bytes: usize,
    /// CIDRs agents' callback URLs may reach although they are loopback, private or
    /// otherwise not public (README: HTTP API for agents). A list, or one comma-separated string (handy in
    /// `SIGNOFF_CALLBACK_ALLOWED_NETWORKS`).
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub callback_allowed_networks: Vec<String>,
    /// Connections in the database pool.
    pub database_max_connections: u32,
    /// SQLite only: `full` (default, survives power loss) or `normal` (opt-in, faster).
    pub sqlite_synchronous: String,
    /// How often the sweeper looks for overdue requests, in milliseconds.
    pub sweep_interval_ms: u64,
    /// How often the decision watcher looks for decisions made by other processes, in milliseconds.
    pub watch_interval_ms: u64,
    /// `text` or `json`.
    pub log_format: String,
    /// Bearer token for `POST /admin/reload`; empty: loopback callers only.
    pub admin_token: Secret,
    /// Bearer token for `GET /metrics`; empty: open.
    pub metrics_token: Secret,
    /// More pending requests of one agent are refused (429 `too_many_pending`); 0: no limit.
    pub max_pending_per_agent: u64,
    /// Submissions per second per agent, with a burst of twice that (429 `rate_limited`);
    /// 0: no limit.
    pub agent_rate_limit: u32,
    /// Concurrent long-polls per agent (429 `too_many_waiting`); 0: no limit.
    pub max_waiting_per_agent: u64,
    /// Connections that have not sent a request's headers within this many milliseconds
    /// are closed (10 s by default).
    pub header_read_timeout_ms: u64,
    /// How long an outbox worker's claim holds before another replica may take the
    /// message; renewed while its delivery runs. In milliseconds.
    pub outbox_lease_ms: u64,
    pub slack: SlackConfig,
    pub teams: Option<TeamsConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct SlackConfig {
    pub bot_token: Secret,
    pub signing_secret: Secret,
    pub api_url: String,
    pub command: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct TeamsConfig {
    pub app_id: String,
    pub app_password: Secret,
    pub tenant_id: String,
    pub openid_metadata_url: String,
    pub token_url: String,
    /// Where a conversation's API is reached until the platform says otherwise.
    pub default_service_url: String,
    /// Prefixes of the only service URLs ever called.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub allowed_service_urls: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            database_url: Secret::new("sqlite://signoff.db"),
            policy: PathBuf::from("policy.yaml"),
            public_url: "http://127.0.0.1:8080".into(),
            max_body_bytes: 262_144,
            callback_allowed_networks: Vec::new(),
            database_max_connections: 16,
            sqlite_synchronous: "full".into(),
            sweep_interval_ms: 1000,
            watch_interval_ms: 200,
            log_format: "text".into(),
            admin_token: Secret::default(),
            metrics_token: Secret::default(),
            max_pending_per_agent: 1000,
            agent_rate_limit: 100,
            max_waiting_per_agent: 256,
            header_read_timeout_ms: 10_000,
            outbox_lease_ms: 60_000,
            slack: SlackConfig::default(),
            teams: None,
        }
    }
}

impl Default for SlackConfig {
    fn default() -> Self {
        Self {
            bot_token: Secret::default(),
            signing_secret: Secret::default(),
            api_url: "https://slack.com/api/".into(),
            command: "/signoff".into(),
        }
    }
}

impl Default for TeamsConfig {
    fn default() -> Self {
        Self {
            app_id: String::new(),
            app_password: Secret::default(),
            tenant_id: String::new(),
            openid_metadata_url:
                "https://login.botframework.com/v1/.well-known/openidconfiguration".into(),
            token_url: "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token".into(),
            default_service_url: "https://smba.trafficmanager.net/teams/".into(),
            allowed_service_urls: vec!["https://smba.trafficmanager.net/".into()],
        }
    }
}

impl Config {
    /// Loads the config named by `--config`, else `$SIGNOFF_CONFIG`, else the defaults,
    /// then applies `SIGNOFF_*` (nested with `__`) and the Slack variables.
    pub fn load(explicit_path: Option<&Path>) -> anyhow::Result<Self> {
        let from_environment = std::env::var_os("SIGNOFF_CONFIG").map(PathBuf::from);
        let path = explicit_path.map(Path::to_path_buf).or(from_environment);
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &path {
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            refuse_unknown_keys(path)?;
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(Env::prefixed("SIGNOFF_").split("__").ignore(&["config"]))
            .merge(
                Env::raw()
                    .only(&[
                        "SLACK_BOT_TOKEN",
                        "SLACK_SIGNING_SECRET",
                        "SLACK_API_URL",
                        "TEAMS_APP_ID",
                        "TEAMS_APP_PASSWORD",
                    ])
                    .map(|key| match key.as_str() {
                        "SLACK_BOT_TOKEN" => "slack.bot_token".into(),
                        "SLACK_SIGNING_SECRET" => "slack.signing_secret".into(),
                        "TEAMS_APP_ID" => "teams.app_id".into(),
                        "TEAMS_APP_PASSWORD" => "teams.app_password".into(),
                        _ => "slack.api_url".into(),
                    }),
            );
        let mut config: Config = figment
            .extract()
            .map_err(|error| anyhow::anyhow!("invalid configuration: {error}"))?;
        config.take_secrets_verbatim();
        if let Some(path) = &path {
            config.resolve_relative_paths(path);
        }
        config.validate()?;
        Ok(config)
    }

    /// The environment layer reads `0123` as the number 123; secrets are taken as written.
    fn take_secrets_verbatim(&mut self) {
        let raw = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| std::env::var(name).ok())
                .map(Secret)
        };
        // SLACK_* wins over SIGNOFF_SLACK__*, as in the layering above.
        if let Some(url) = raw(&["SIGNOFF_DATABASE_URL"]) {
            self.database_url = url;
        }
        if let Some(token) = raw(&["SIGNOFF_ADMIN_TOKEN"]) {
            self.admin_token = token;
        }
        if let Some(token) = raw(&["SIGNOFF_METRICS_TOKEN"]) {
            self.metrics_token = token;
        }
        if let Some(token) = raw(&["SLACK_BOT_TOKEN", "SIGNOFF_SLACK__BOT_TOKEN"]) {
            self.slack.bot_token = token;
        }
        if let Some(secret) = raw(&["SLACK_SIGNING_SECRET", "SIGNOFF_SLACK__SIGNING_SECRET"]) {
            self.slack.signing_secret = secret;
        }
        if let Some(password) = raw(&["TEAMS_APP_PASSWORD", "SIGNOFF_TEAMS__APP_PASSWORD"]) {
            if let Some(teams) = &mut self.teams {
                teams.app_password = password;
            }
        }
    }

    /// A relative `policy` path is taken relative to the config file when the file is
    /// there, so a config and its policy can live side by side; otherwise relative to
    /// the working directory.
    fn resolve_relative_paths(&mut self, config_path: &Path) {
        if self.policy.is_relative() {
            if let Some(directory) = config_path.parent() {
                let beside_config = directory.join(&self.policy);
                if beside_config.is_file() {
                    self.policy = beside_config;
                }
            }
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.listen_address()?;
        self.callback_networks()?;
        if self.max_body_bytes < 1024 {
            bail!("max_body_bytes must be at least 1024");
        }
        if !matches!(self.sqlite_synchronous.as_str(), "full" | "normal") {
            bail!("sqlite_synchronous must be \"full\" or \"normal\"");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!("log_format must be \"text\" or \"json\"");
        }
        if self.slack_enabled() {
            if self.slack.signing_secret.is_empty() {
                bail!("slack.bot_token is set but slack.signing_secret is empty: every Slack request must be verified");
            }
            check_outbound_url(&self.slack.api_url)
                .map_err(|error| anyhow::anyhow!("slack.api_url: {error}"))?;
        }
        if let Some(teams) = self.teams_config() {
            if teams.app_password.is_empty() {
                bail!("teams.app_id is set but teams.app_password is empty: the bot cannot get a token to post cards");
            }
            for (key, url) in [
                ("teams.openid_metadata_url", &teams.openid_metadata_url),
                ("teams.token_url", &teams.token_url),
                ("teams.default_service_url", &teams.default_service_url),
            ] {
                check_outbound_url(&url.replace("{tenant}", "tenant"))
                    .map_err(|error| anyhow::anyhow!("{key}: {error}"))?;
            }
            for prefix in &teams.allowed_service_urls {
                check_outbound_url(prefix)
                    .map_err(|error| anyhow::anyhow!("teams.allowed_service_urls: {error}"))?;
            }
        }
        let url = self.database_url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            bail!("database_url must start with sqlite: or postgres://");
        }
        Ok(())
    }

    /// `host:port`, `[::1]:port`, a host name, or `:port` for every interface.
    pub fn listen_address(&self) -> anyhow::Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        let text = match self.listen.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}"),
            None => self.listen.clone(),
        };
        text.to_socket_addrs()
            .ok()
            .and_then(|mut addresses| addresses.next())
            .with_context(|| format!("listen address {:?} is not host:port", self.listen))
    }

    /// `callback_allowed_networks`, parsed. A bare address means just that address.
    pub fn callback_networks(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.callback_allowed_networks
            .iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<ipnet::IpNet>()
                    .map(|network| network.trunc())
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "callback_allowed_networks: {text:?} is not a CIDR such as \"10.0.0.0/8\" or \"fd00::/8\""
                        )
                    })
            })
            .collect()
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms.max(10))
    }

    pub fn watch_interval(&self) -> Duration {
        Duration::from_millis(self.watch_interval_ms.max(10))
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms.max(10))
    }

    pub fn outbox_lease(&self) -> Duration {
        Duration::from_millis(self.outbox_lease_ms.max(100))
    }

    pub fn slack_enabled(&self) -> bool {
        !self.slack.bot_token.is_empty()
    }

    /// The `[teams]` section when it turns Teams on (an app id is set).
    pub fn teams_config(&self) -> Option<&TeamsConfig> {
        self.teams
            .as_ref()
            .filter(|teams| !teams.app_id.trim().is_empty())
    }
}

/// A misspelt key would silently fall back to its default (a different database!), so
/// keys the file does not need to have, it must not have wrong.
fn refuse_unknown_keys(path: &Path) -> anyhow::Result<()> {
    use figment::value::{Dict, Value};
    let file: Dict = Figment::from(Toml::file(path))
        .extract()
        .map_err(|error| anyhow::anyhow!("config file {}: {error}", path.display()))?;
    let known = |section: &str| -> &'static [&'static str] {
        match section {
            "" => &[
                "listen",
                "database_url",
                "policy",
                "public_url",
                "max_body_bytes",
                "callback_allowed_networks",
                "database_max_connections",
                "sqlite_synchronous",
                "sweep_interval_ms",
                "watch_interval_ms",
                "max_pending_per_agent",
                "agent_rate_limit",
                "max_waiting_per_agent",
                "header_read_timeout_ms",
                "outbox_lease_ms",
                "log_format",
                "admin_token",
                "metrics_token",
                "slack",
                "teams",
            ],
            "slack" => &["bot_token", "signing_secret", "api_url", "command"],
            "teams" => &[
                "app_id",
                "app_password",
                "tenant_id",
                "openid_metadata_url",
                "token_url",
                "default_service_url",
                "allowed_service_urls",
            ],
            _ => &[],
        }
    };
    let mut unknown = Vec::new();
    for (key, value) in &file {
        if !known("").contains(&key.as_str()) {
            unknown.push(key.clone());
        } else if let Value::Dict(_, section) = value {
            for inner in section.keys() {
                if !known(key).contains(&inner.as_str()) {
                    unknown.push(format!("{key}.{inner}"));
                }
            }
        }
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        bail!(
            "config file {}: unknown key(s): {}",
            path.display(),
            unknown.join(", ")
        )
    }
}

/// A list of strings, or one string of comma-separated items (environment variables).
fn list_or_comma_separated<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrText::deserialize(deserializer)? {
        ListOrText::List(items) => items,
        ListOrText::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// Outbound URLs (Slack and Teams base URLs, agents' callback URLs) must be https; plain
/// http is allowed only to loopback addresses, for local receivers and test fakes.
pub fn check_outbound_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|error| format!("{text:?} is not a URL: {error}"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(url::Host::Ipv4(address)) => address.is_loopback(),
        Some(url::Host::Ipv6(address)) => address.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(format!(
            "{text:?} must be https (plain http only to loopback addresses)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_secrets() {
        let mut config = Config::default();
        config.slack.bot_token = Secret::new("xoxb-very-secret");
        config.database_url = Secret::new("postgres://user:hunter2@db/signoff");
        config.admin_token = Secret::new("admin-very-secret");
        config.metrics_token = Secret::new("scrape-very-secret");
        let printed = format!("{config:?}");
        assert!(!printed.contains("xoxb-very-secret"));
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains("admin-very-secret"));
        assert!(!printed.contains("scrape-very-secret"));
        assert!(printed.contains("[redacted]"));
    }

    #[test]
    fn outbound_urls_are_https_or_loopback() {
        let table = [
            ("https://hooks.example.com/signoff", true),
            ("http://127.0.0.1:9000/hook", true),
            ("http://localhost/hook", true),
            ("http://[::1]:80/", true),
            ("http://example.com/hook", false),
            ("http://10.0.0.5/hook", false),
            ("ftp://example.com", false),
            ("not a url", false),
        ];
        for (url, allowed) in table {
            assert_eq!(check_outbound_url(url).is_ok(), allowed, "{url}");
        }
    }

    #[test]
    fn misspelt_keys_are_refused() {
        let directory = std::env::temp_dir().join(format!("signoff-config-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("signoff.toml");
        std::fs::write(
            &path,
            "databse_url = \"sqlite://x.db\"\n[slack]\nbot_tokn = \"x\"\n",
        )
        .unwrap();
        let error = refuse_unknown_keys(&path).unwrap_err().to_string();
        assert!(
            error.contains("databse_url") && error.contains("slack.bot_tokn"),
            "{error}"
        );
        std::fs::write(
            &path,
            "database_url = \"sqlite://x.db\"\n[slack]\nbot_token = \"x\"\n",
        )
        .unwrap();
        assert!(refuse_unknown_keys(&path).is_ok());
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn teams_needs_a_secret_and_calls_only_https_or_loopback() {
        let teams = |change: fn(&mut TeamsConfig)| {
            let mut teams = TeamsConfig {
                app_id: "app".into(),
                app_password: Secret::new("secret"),
                ..TeamsConfig::default()
            };
            change(&mut teams);
            Config {
                teams: Some(teams),
                ..Config::default()
            }
        };
        assert!(teams(|_| {}).validate().is_ok());
        assert!(teams(|_| {}).teams_config().is_some());
        assert!(teams(|teams| teams.app_id = " ".into())
            .teams_config()
            .is_none());
        let refused: [fn(&mut TeamsConfig); 3] = [
            |teams| teams.app_password = Secret::default(),
            |teams| teams.allowed_service_urls = vec!["http://smba.example.com/".into()],
            |teams| teams.openid_metadata_url = "http://login.example.com/openid".into(),
        ];
        for change in refused {
            assert!(teams(change).validate().is_err());
        }
        let printed = format!("{:?}", teams(|_| {}));
        assert!(!printed.contains("\"secret\""), "{printed}");
    }

    #[test]
    fn callback_allowed_networks_are_cidrs() {
        let directory =
            std::env::temp_dir().join(format!("signoff-networks-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("signoff.toml");
        std::fs::write(
            &path,
            "callback_allowed_networks = [\"127.0.0.0/8\", \"::1/128\", \"10.1.2.3\"]\n",
        )
        .unwrap();
        let config = Config::load(Some(&path)).unwrap();
        let networks: Vec<String> = config
            .callback_networks()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(networks, ["127.0.0.0/8", "::1/128", "10.1.2.3/32"]);
        // One comma-separated string, as an environment variable would give it.
        std::fs::write(
            &path,
            "callback_allowed_networks = \"127.0.0.0/8, fd00::/8\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.callback_networks().unwrap().len(), 2);
        std::fs::write(
            &path,
            "callback_allowed_networks = [\"127.0.0.0/8\", \"10.0.0.0/33\"]\n",
        )
        .unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("callback_allowed_networks") && error.contains("10.0.0.0/33"),
            "{error}"
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn quota_and_timeout_defaults_are_the_documented_ones() {
        let config = Config::default();
        assert_eq!(config.max_pending_per_agent, 1000);
        assert_eq!(config.agent_rate_limit, 100);
        assert_eq!(config.max_waiting_per_agent, 256);
        assert_eq!(config.header_read_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn rejects_bad_values() {
        let config = Config {
            sqlite_synchronous: "off".into(),
            ..Config::default()
        };
        assert!(config.validate().is_err());
        let config = Config {
            database_url: Secret::new("mysql://x"),
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
