//! Shared by the benches and `examples/profile.rs`: a policy that never refuses.

use std::time::Duration;

use ratewarden::{LimitConfig, Period, Policy};

/// Three subjects, two limits each (the `llm_api` shape, with room so every check allows).
pub(crate) fn full_policy(behavior: bool) -> Policy {
    let mut p = Policy::llm_api();
    p.behavior.enabled = behavior;
    let minute = Period(Duration::from_secs(60));
    for set in [&mut p.api_key, &mut p.org, &mut p.ip_cluster] {
        set.clear();
        set.insert(
            "requests_per_minute".into(),
            LimitConfig::Gcra {
                rate: 1 << 30,
                period: minute,
                burst: 1 << 30,
            },
        );
        set.insert(
            "tokens_per_minute".into(),
            LimitConfig::Tokens {
                tokens: 1 << 32,
                period: minute,
                burst: None,
            },
        );
    }
    p
}
