#![allow(dead_code, unreachable_pub)]
use std::net::IpAddr;
use std::time::Duration;

use ratewarden::{LimitConfig, ManualClock, Period, Policy, Warden};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn warden(policy: Policy) -> (Warden, ManualClock) {
    let clock = ManualClock::new();
    let w = Warden::builder()
        .policy(policy)
        .clock(clock.clone())
        .build()
        .unwrap();
    (w, clock)
}

pub fn gcra(rate: u64, secs: u64, burst: u64) -> LimitConfig {
    LimitConfig::Gcra {
        rate,
        period: Period(Duration::from_secs(secs)),
        burst,
    }
}

pub fn tokens(n: u64, secs: u64) -> LimitConfig {
    LimitConfig::Tokens {
        tokens: n,
        period: Period(Duration::from_secs(secs)),
        burst: None,
    }
}

/// Classic limits only (behaviour off), no limits configured.
pub fn bare() -> Policy {
    let mut p = Policy::empty();
    p.behavior.enabled = false;
    p
}
