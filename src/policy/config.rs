//! What users write: serde structs for TOML or JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::behavior::BehaviorPolicy;

/// The whole configuration of a warden, as users write it in TOML or JSON.
///
/// Validate and compile it with [`WardenBuilder::policy`](crate::WardenBuilder::policy) and
/// [`WardenBuilder::build`](crate::WardenBuilder::build), or swap it at runtime with
/// [`Warden::set_policy`](crate::Warden::set_policy).
///
/// Limits of each subject kind are a table from limit name to limit; the name appears in
/// denial reasons (`api_key:requests_per_minute`).
///
/// # Examples
///
/// ```
/// # #[cfg(feature = "toml")] {
/// use ratewarden::Policy;
///
/// let policy = Policy::from_toml_str(r#"
///     [cluster]
///     v4_prefix = 24
///     v6_prefix = 48
///
///     [api_key.requests_per_minute]
///     kind = "gcra"
///     rate = 60
///     period = "1m"
///     burst = 10
///
///     [api_key.tokens_per_minute]
///     kind = "tokens"
///     tokens = 100000
///     period = "1m"
///
///     [[overrides]]
///     kind = "org"
///     id = "org-enterprise"
///     [overrides.limits.requests_per_minute]
///     kind = "gcra"
///     rate = 6000
///     period = "1m"
///     burst = 600
/// "#).unwrap();
/// assert_eq!(policy.api_key.len(), 2);
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// How client addresses are grouped into IP clusters.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Default limits of every API key.
    #[serde(default)]
    pub api_key: BTreeMap<String, LimitConfig>,
    /// Default limits of every organisation.
    #[serde(default)]
    pub org: BTreeMap<String, LimitConfig>,
    /// Default limits of every IP cluster.
    #[serde(default)]
    pub ip_cluster: BTreeMap<String, LimitConfig>,
    /// Limits of the anonymous key of each IP cluster (requests without an API key). When
    /// absent, the `api_key` limits apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<BTreeMap<String, LimitConfig>>,
    /// Per-subject overrides: limits merged over the defaults by name, and exemptions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
    /// Bounds on tracked subjects and idle eviction.
    #[serde(default)]
    pub table: TableConfig,
    /// Behavioural limits: signals, detectors, escalation.
    #[serde(default)]
    pub behavior: BehaviorPolicy,
}

/// IP cluster prefix lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// IPv4 prefix length, 1..=32 (default 24).
    pub v4_prefix: u8,
    /// IPv6 prefix length, 1..=128 (default 48).
    pub v6_prefix: u8,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            v4_prefix: 24,
            v6_prefix: 48,
        }
    }
}

/// One limit, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LimitConfig {
    /// Token bucket (GCRA) over requests: `rate` per `period`, up to `burst` at once.
    Gcra {
        /// Requests per period (> 0).
        rate: u64,
        /// The period, for example `"1m"`.
        period: Period,
        /// Requests that may arrive at once (> 0).
        burst: u64,
    },
    /// Sliding window counter over requests: at most `limit` per `window` (at most `2·limit` in
    /// an unaligned window; see the crate docs).
    SlidingWindow {
        /// Requests per window (1..=1,048,575).
        limit: u64,
        /// The window, for example `"10s"`.
        window: Period,
    },
    /// Requests in flight at once.
    Concurrency {
        /// Maximum in flight (> 0).
        max: u64,
    },
    /// Tokens (input + output) per period. Requests are charged input plus expected output up
    /// front and settled to the actual output afterwards; a debt carries forward.
    Tokens {
        /// Tokens per period (> 0).
        tokens: u64,
        /// The period, for example `"1m"`.
        period: Period,
        /// Capacity in tokens (default: `tokens`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        burst: Option<u64>,
    },
}

/// A named subject with its own limits, or exempt from behavioural escalation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// The subject kind: `api_key`, `org` or `ip_cluster`.
    pub kind: crate::SubjectKind,
    /// The key, the org, or the cluster in CIDR form with the configured prefix length
    /// (`198.51.100.0/24`).
    pub id: String,
    /// Limits merged over the kind's defaults by name (same name replaces, new name adds).
    #[serde(default)]
    pub limits: BTreeMap<String, LimitConfig>,
    /// Exempt from behavioural escalation (a contracted batch customer). Classic limits still
    /// apply.
    #[serde(default)]
    pub exempt_behavior: bool,
}

/// Bounded memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// Most subjects tracked per kind (default 100,000). When full, unseen subjects share one
    /// strict overflow bucket per kind (see the crate docs).
    pub max_subjects: usize,
    /// A subject untouched this long, whose limits are back to their initial state, and that
    /// is not escalated, may be evicted (default `"10m"`).
    pub idle_timeout: Period,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            max_subjects: 100_000,
            idle_timeout: Period(Duration::from_secs(600)),
        }
    }
}

/// A duration written as an integer and a unit: `"250ms"`, `"30s"`, `"1m"`, `"2h"`, `"1d"`.
///
/// # Examples
///
/// ```
/// use ratewarden::Period;
/// use std::time::Duration;
/// assert_eq!("90s".parse::<Period>().unwrap().0, Duration::from_secs(90));
/// assert_eq!(Period(Duration::from_secs(60)).to_string(), "1m");
/// assert!("1 fortnight".parse::<Period>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period(pub Duration);

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid duration `{s}`: expected an integer and a unit such as \"60s\"")
        })?;
        let ms = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "invalid duration unit `{other}`: use ms, s, m, h or d"
                ))
            }
        };
        n.checked_mul(ms)
            .map(|ms| Period(Duration::from_millis(ms)))
            .ok_or_else(|| format!("duration `{s}` is too large"))
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms != 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Policy {
    /// An empty policy: no limits, default table and behaviour settings.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ratewarden::Policy::empty().api_key.is_empty());
    /// ```
    pub fn empty() -> Self {
        Self {
            cluster: ClusterConfig::default(),
            api_key: BTreeMap::new(),
            org: BTreeMap::new(),
            ip_cluster: BTreeMap::new(),
            anonymous: None,
            overrides: Vec::new(),
            table: TableConfig::default(),
            behavior: BehaviorPolicy::default(),
        }
    }

    /// The `llm_api` preset (numbers from `TRACE_FORMAT.md`), with behavioural limits on:
    ///
    /// | subject | limits |
    /// |---|---|
    /// | api key | 120 requests/min (burst 20); 400,000 tokens/min |
    /// | org | 1,500 requests/min (burst 150); 4,000,000 tokens/min |
    /// | ip cluster (v4 /24, v6 /48) | 3,000 requests/min (burst 300) |
    ///
    /// # Examples
    ///
    /// ```
    /// let p = ratewarden::Policy::llm_api();
    /// assert_eq!(p.api_key.len(), 2);
    /// assert_eq!(p.ip_cluster.len(), 1);
    /// ```
    pub fn llm_api() -> Self {
        let minute = Period(Duration::from_secs(60));
        let rpm = |rate, burst| LimitConfig::Gcra {
            rate,
            period: minute,
            burst,
        };
        let tpm = |tokens| LimitConfig::Tokens {
            tokens,
            period: minute,
            burst: None,
        };
        let mut p = Self::empty();
        p.api_key.insert("requests_per_minute".into(), rpm(120, 20));
        p.api_key.insert("tokens_per_minute".into(), tpm(400_000));
        p.org.insert("requests_per_minute".into(), rpm(1_500, 150));
        p.org.insert("tokens_per_minute".into(), tpm(4_000_000));
        p.ip_cluster
            .insert("requests_per_minute".into(), rpm(3_000, 300));
        p
    }

    /// The `llm_api` preset with the behavioural layer off (classic limits only).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(!ratewarden::Policy::llm_api_limits_only().behavior.enabled);
    /// ```
    pub fn llm_api_limits_only() -> Self {
        let mut p = Self::llm_api();
        p.behavior.enabled = false;
        p
    }

    /// Parses and validates a TOML policy.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`](crate::ConfigError::Parse) with the path of the offending field for
    /// syntax errors, unknown fields and wrong types; the validation errors of
    /// [`Policy::validate`] otherwise.
    #[cfg(feature = "toml")]
    pub fn from_toml_str(s: &str) -> Result<Self, crate::ConfigError> {
        let de = toml::Deserializer::new(s);
        let p: Policy =
            serde_path_to_error::deserialize(de).map_err(|e| crate::ConfigError::Parse {
                path: e.path().to_string(),
                message: e.inner().message().to_string(),
            })?;
        p.validate()?;
        Ok(p)
    }

    /// Parses and validates a JSON policy.
    ///
    /// # Errors
    ///
    /// As for [`Policy::from_toml_str`].
    ///
    /// # Examples
    ///
    /// ```
    /// let err = ratewarden::Policy::from_json_str(r#"{"table":{"max_subjets":5}}"#).unwrap_err();
    /// assert!(err.to_string().starts_with("table"), "{err}");
    /// ```
    #[cfg(feature = "json")]
    pub fn from_json_str(s: &str) -> Result<Self, crate::ConfigError> {
        let mut de = serde_json::Deserializer::from_str(s);
        let p: Policy =
            serde_path_to_error::deserialize(&mut de).map_err(|e| crate::ConfigError::Parse {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        p.validate()?;
        Ok(p)
    }

    /// Checks every field without building a warden.
    ///
    /// # Errors
    ///
    /// The first invalid field, as a [`ConfigError`](crate::ConfigError) naming its path.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        super::compile::compile(self, 0, 0, None).map(|_| ())
    }
}
