//! Response header values: IETF `RateLimit` / `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-
//! headers, Structured Fields syntax), OpenAI-style `x-ratelimit-*`, and `Retry-After`.

use std::time::Duration;

use crate::decision::RateLimitInfo;

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

/// Appends `v` in decimal (headers are formatted on every response: this skips the
/// `core::fmt` machinery).
fn push_u64(out: &mut String, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        out.push(char::from(b));
    }
}

/// OpenAI's reset format, appended to `out`: `"1s"`, `"6m0s"`, `"1h2m3s"`, or milliseconds
/// below a second.
fn openai_duration(out: &mut String, d: Duration) {
    let ms = d.as_millis();
    if ms < 1000 {
        push_u64(out, ms as u64);
        out.push_str("ms");
        return;
    }
    let secs = ceil_secs(d);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        push_u64(out, h);
        out.push('h');
    }
    if h > 0 || m > 0 {
        push_u64(out, m);
        out.push('m');
    }
    push_u64(out, s);
    out.push('s');
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
    let mut out = Vec::new();
    visit_rate_limit_headers(info, &mut String::new(), &mut |n, v| {
        out.push((n, v.to_owned()))
    });
    out
}

/// Calls `f` with each header of [`rate_limit_headers`], formatting every value into `buf`
/// (cleared first; reused across headers, so a caller that copies the values, as the tower
/// layer does into `HeaderValue`s, allocates nothing else).
pub(crate) fn visit_rate_limit_headers(
    info: &RateLimitInfo,
    buf: &mut String,
    f: &mut impl FnMut(&'static str, &str),
) {
    let items = [
        (info.requests.as_ref(), "request"),
        (info.tokens.as_ref(), "tokens"),
    ];
    if items.iter().all(|(s, _)| s.is_none()) {
        return;
    }
    let present = || items.iter().filter_map(|&(s, u)| s.map(|s| (s, u)));
    buf.clear();
    for (i, (s, unit)) in present().enumerate() {
        if i > 0 {
            buf.push_str(", ");
        }
        sf_string(buf, s.name());
        buf.push_str(";q=");
        push_u64(buf, s.limit);
        buf.push_str(";qu=\"");
        buf.push_str(unit);
        buf.push_str("\";w=");
        push_u64(buf, ceil_secs(s.window).max(1));
    }
    f("ratelimit-policy", buf);
    buf.clear();
    for (i, (s, _)) in present().enumerate() {
        if i > 0 {
            buf.push_str(", ");
        }
        sf_string(buf, s.name());
        buf.push_str(";r=");
        push_u64(buf, s.remaining);
        buf.push_str(";t=");
        push_u64(buf, ceil_secs(s.reset));
    }
    f("ratelimit", buf);
    let names = [
        (
            info.requests.as_ref(),
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        ),
        (
            info.tokens.as_ref(),
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ),
    ];
    for (s, [limit, remaining, reset]) in names {
        let Some(s) = s else { continue };
        buf.clear();
        push_u64(buf, s.limit);
        f(limit, buf);
        buf.clear();
        push_u64(buf, s.remaining);
        f(remaining, buf);
        buf.clear();
        openai_duration(buf, s.reset);
        f(reset, buf);
    }
}

/// Calls `f` with `Retry-After`, if the denial has one.
pub(crate) fn visit_retry_after(
    retry: Option<Duration>,
    buf: &mut String,
    f: &mut impl FnMut(&'static str, &str),
) {
    if let Some(s) = retry_after_secs(retry) {
        buf.clear();
        push_u64(buf, s);
        f("retry-after", buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_formatting_matches_display() {
        for v in [
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut s = String::new();
            push_u64(&mut s, v);
            assert_eq!(s, v.to_string());
        }
    }

    #[test]
    fn openai_durations() {
        let d = |v: Duration| {
            let mut s = String::new();
            openai_duration(&mut s, v);
            s
        };
        assert_eq!(d(Duration::from_millis(250)), "250ms");
        assert_eq!(d(Duration::from_millis(1001)), "2s");
        assert_eq!(d(Duration::from_secs(360)), "6m0s");
        assert_eq!(d(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(d(Duration::from_secs(3605)), "1h0m5s");
    }

    #[test]
    fn sf_escapes() {
        let mut s = String::new();
        sf_string(&mut s, "a\"b\\c\u{e9}");
        assert_eq!(s, "\"a\\\"b\\\\c?\"");
    }
}
