//! Configuration (serde structs users write), presets, and validation into runtime types.

mod compile;
mod config;

#[cfg(test)]
#[cfg(all(test, feature = "tower"))]
pub(crate) use compile::intern as intern_name;
pub(crate) use compile::{compile, Compiled, LimitRt, LimitSet};
pub use config::{ClusterConfig, LimitConfig, Override, Period, Policy, TableConfig};

/// A policy that cannot be built. Each variant names the path of the bad field, for example
/// `api_key.requests_per_minute.burst` or `overrides[2].id`.
///
/// # Examples
///
/// ```
/// use ratewarden::{ConfigError, Policy};
/// let mut p = Policy::llm_api();
/// p.cluster.v4_prefix = 40;
/// let err = p.validate().unwrap_err();
/// assert!(matches!(err, ConfigError::Invalid { ref path, .. } if path == "cluster.v4_prefix"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The text is not a valid policy: a syntax error, an unknown field, or a wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// Path of the field where parsing failed (empty for the document root).
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A value that must be positive is zero.
    #[error("{path}: must be greater than zero")]
    Zero {
        /// Path of the field.
        path: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {reason}")]
    Invalid {
        /// Path of the field.
        path: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
}
