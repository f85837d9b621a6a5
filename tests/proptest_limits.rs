//! Property tests against simple reference models.

mod common;
use common::*;

use std::time::Duration;

use proptest::prelude::*;
use ratewarden::{Decision, LimitConfig, Period, Request};

const SEC: u64 = 1_000_000_000;

/// A token bucket in exact integer arithmetic, the textbook way: a level in nanoseconds of
/// credit, refilled by elapsed time, capped at the capacity.
struct RefBucket {
    t: u64,
    cap: u64,
    level: u64,
    last: u64,
}

impl RefBucket {
    fn new(rate: u64, period: u64, burst: u64) -> Self {
        let t = period.div_ceil(rate);
        Self {
            t,
            cap: burst * t,
            level: burst * t,
            last: 0,
        }
    }
    fn take(&mut self, now: u64, cost: u64) -> bool {
        self.level = (self.level + (now - self.last)).min(self.cap);
        self.last = now;
        let need = cost * self.t;
        if cost > 0 && need <= self.level {
            self.level -= need;
            true
        } else {
            cost == 0
        }
    }
}

fn times() -> impl Strategy<Value = Vec<(u64, u64)>> {
    // (gap in ms, cost) pairs → non-decreasing times.
    prop::collection::vec((0u64..400, 0u64..4), 1..250)
}

fn run_key(limit: LimitConfig, steps: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut p = bare();
    p.api_key.insert("l".into(), limit);
    let (w, clock) = warden(p);
    let mut now = 0;
    steps
        .iter()
        .map(|&(gap, cost)| {
            now += gap * 1_000_000;
            clock.set_nanos(now);
            let ok = w
                .check(&Request::new("k", "", ip("10.0.0.1")).requests(cost))
                .is_allowed();
            (now, cost, ok)
        })
        .collect()
}

/// Largest admitted cost in any interval [a, b] of the log, against `bound(b − a)`.
fn check_intervals(
    log: &[(u64, u64, bool)],
    bound: impl Fn(u64) -> u64,
) -> Result<(), TestCaseError> {
    for i in 0..log.len() {
        let mut sum = 0;
        for j in i..log.len() {
            if log[j].2 {
                sum += log[j].1;
            }
            let len = log[j].0 - log[i].0;
            prop_assert!(
                sum <= bound(len),
                "admitted {sum} in {len} ns > {}",
                bound(len)
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn gcra_agrees_exactly_with_the_reference_bucket(rate in 1u64..50, burst in 1u64..10, steps in times()) {
        let log = run_key(gcra(rate, 1, burst), &steps);
        let mut r = RefBucket::new(rate, SEC, burst);
        for &(now, cost, ok) in &log {
            prop_assert_eq!(ok, r.take(now, cost), "at {} cost {}", now, cost);
        }
    }

    #[test]
    fn gcra_admits_at_most_burst_plus_rate_times_length(rate in 1u64..50, burst in 1u64..10, steps in times()) {
        let log = run_key(gcra(rate, 1, burst), &steps);
        let t = SEC.div_ceil(rate);
        check_intervals(&log, |len| burst + len / t)?;
    }

    #[test]
    fn sliding_window_admits_at_most_twice_the_limit_per_window(limit in 1u64..20, win_ms in 100u64..3000, steps in times()) {
        let w = win_ms * 1_000_000;
        let log = run_key(LimitConfig::SlidingWindow { limit, window: Period(Duration::from_millis(win_ms)) }, &steps);
        // Any interval shorter than a window: at most 2·limit. Any aligned window: at most limit.
        check_intervals(&log, |len| if len < w { 2 * limit } else { limit * (len / w + 2) })?;
        let mut per_window = std::collections::HashMap::new();
        for &(now, cost, ok) in &log {
            if ok {
                *per_window.entry(now / w).or_insert(0) += cost;
            }
        }
        prop_assert!(per_window.values().all(|&c| c <= limit));
    }

    #[test]
    fn token_limit_admits_at_most_capacity_plus_rate(tokens_per_s in 100u64..5000, steps in prop::collection::vec((0u64..400, 0u64..300), 1..200)) {
        let mut p = bare();
        p.api_key.insert("t".into(), LimitConfig::Tokens { tokens: tokens_per_s, period: Period(Duration::from_secs(1)), burst: None });
        let (w, clock) = warden(p);
        let mut now = 0;
        let mut log = Vec::new();
        for &(gap, cost) in &steps {
            now += gap * 1_000_000;
            clock.set_nanos(now);
            let req = Request::new("k", "", ip("10.0.0.1")).input_tokens(cost);
            let ok = match w.check(&req) {
                Decision::Allow(p) => { p.settle(0); true }
                Decision::Deny(_) => false,
            };
            log.push((now, cost, ok));
        }
        let t = SEC.div_ceil(tokens_per_s);
        check_intervals(&log, |len| tokens_per_s + len / t)?;
    }

    #[test]
    fn settling_never_loses_debt(est in 0u64..500, actual in 0u64..5000) {
        // Whatever the estimate, after settling the bucket holds exactly the actual usage.
        let mut p = bare();
        p.api_key.insert("t".into(), tokens(10_000, 60));
        let (w, _clock) = warden(p);
        let req = Request::new("k", "", ip("10.0.0.1")).input_tokens(100).expected_output_tokens(est);
        let Decision::Allow(pm) = w.check(&req) else { unreachable!() };
        pm.settle(actual);
        let remaining = match w.check(&Request::new("k", "", ip("10.0.0.1"))) {
            Decision::Allow(p) => p.rate_limit().tokens.unwrap().remaining,
            Decision::Deny(d) => d.rate_limit().tokens.unwrap().remaining,
        };
        prop_assert_eq!(remaining, 10_000u64.saturating_sub(100 + actual));
    }
}
