//! Bytes per tracked subject, measured with a counting global allocator: fills a warden with
//! N distinct 30-byte API keys (one org, one address, so only the key table grows) and
//! reports the heap growth per key, for classic limits only and with the full behavioural
//! state, at 100,000 and 1,000,000 keys.
//!
//! ```text
//! cargo run --release --example memory
//! ```

use std::alloc::System;

use ratewarden::{ManualClock, Policy, Request, Warden};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn live() -> isize {
    let s = GLOBAL.stats();
    (s.bytes_allocated as isize - s.bytes_deallocated as isize) + s.bytes_reallocated
}

fn measure(policy: Policy, n: usize) -> f64 {
    let clock = ManualClock::new();
    let w = Warden::builder()
        .policy(policy)
        .clock(clock.clone())
        .build()
        .expect("valid policy");
    let ip = "198.51.100.7".parse().expect("address");
    // Warm the org and cluster entries so only keys grow.
    let _ = w.check(&Request::new("warm", "org-1", ip));
    let mut key = String::with_capacity(32);
    let before = live();
    let _region = Region::new(GLOBAL);
    for i in 0..n {
        use std::fmt::Write;
        key.clear();
        let _ = write!(key, "sk-proj-{i:022}");
        let _ = w.check(&Request::new(&key, "org-1", ip).requests(0));
    }
    let after = live();
    assert_eq!(w.stats().tracked[0], n + 1);
    (after - before) as f64 / n as f64
}

fn main() {
    println!(
        "{:<12} {:>28} {:>28}",
        "keys", "classic limits (B/key)", "with behaviour (B/key)"
    );
    for n in [100_000usize, 1_000_000] {
        let mut classic = Policy::llm_api_limits_only();
        classic.table.max_subjects = n + 10;
        let mut full = Policy::llm_api();
        full.table.max_subjects = n + 10;
        // requests(0) keeps every key under its limits; behaviour still records each check.
        println!(
            "{:<12} {:>28.1} {:>28.1}",
            n,
            measure(classic, n),
            measure(full, n)
        );
    }
}
