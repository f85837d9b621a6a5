//! Response header values: IETF `RateLimit` / `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-
//! headers, Structured Fields syntax), OpenAI-style `x-ratelimit-*`, and `Retry-After`.

use std::fmt::Write;
use std::time::Duration;

use crate::decision::{LimitStatus, RateLimitInfo};

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `Retry-After` in whole seconds, rounded up and never 0; `None` when there is no time at
/// which a retry can succeed.
///
/// # Examples
///
/// ```
/// use ratewarden::retry_after_secs;
/// use std::time::Duration;
/// assert_eq!(retry_after_secs(Some(Duration::from_millis(1))), Some(1));
/// assert_eq!(retry_after_secs(Some(Duration::from_millis(1500))), Some(2));
/// assert_eq!(retry_after_secs(Some(Duration::ZERO)), Some(1));
/// assert_eq!(retry_after_secs(None), None);
/// ```
pub fn retry_after_secs(retry: Option<Duration>) -> Option<u64> {
    retry.map(|d| ceil_secs(d).max(1))
}

/// OpenAI's reset format: `"1s"`, `"6m0s"`, `"1h2m3s"`, or milliseconds below a second.
fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ceil_secs(d);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// A Structured Fields string: printable ASCII with `"` and `\` escaped.
fn sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

/// The header pairs for `info` (lowercase names, as HTTP/2 sends them).
///
/// # Examples
///
/// ```
/// use ratewarden::{rate_limit_headers, RateLimitInfo};
/// assert!(rate_limit_headers(&RateLimitInfo::default()).is_empty());
/// ```
pub fn rate_limit_headers(info: &RateLimitInfo) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(8);
    let items: Vec<(&LimitStatus, &str)> = [
        (info.requests.as_ref(), "request"),
        (info.tokens.as_ref(), "tokens"),
    ]
    .into_iter()
    .filter_map(|(s, u)| s.map(|s| (s, u)))
    .collect();
    if items.is_empty() {
        return out;
    }
    let mut policy = String::new();
    let mut current = String::new();
    for (i, (s, unit)) in items.iter().enumerate() {
        if i > 0 {
            policy.push_str(", ");
            current.push_str(", ");
        }
        sf_string(&mut policy, s.name());
        let _ = write!(
            policy,
            ";q={};qu=\"{unit}\";w={}",
            s.limit,
            ceil_secs(s.window).max(1)
        );
        sf_string(&mut current, s.name());
        let _ = write!(current, ";r={};t={}", s.remaining, ceil_secs(s.reset));
    }
    out.push(("ratelimit-policy", policy));
    out.push(("ratelimit", current));
    if let Some(r) = &info.requests {
        out.push(("x-ratelimit-limit-requests", r.limit.to_string()));
        out.push(("x-ratelimit-remaining-requests", r.remaining.to_string()));
        out.push(("x-ratelimit-reset-requests", openai_duration(r.reset)));
    }
    if let Some(t) = &info.tokens {
        out.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
        out.push(("x-ratelimit-remaining-tokens", t.remaining.to_string()));
        out.push(("x-ratelimit-reset-tokens", openai_duration(t.reset)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_durations() {
        assert_eq!(openai_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(openai_duration(Duration::from_millis(1001)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn sf_escapes() {
        let mut s = String::new();
        sf_string(&mut s, "a\"b\\c\u{e9}");
        assert_eq!(s, "\"a\\\"b\\\\c?\"");
    }
}
