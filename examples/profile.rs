//! A profiling harness for the hot path: small loops that `perf`, `valgrind --tool=callgrind`
//! and interleaved A/B runs of two builds can measure (`benches/README.md` cites it as "the
//! profiling harness"). Criterion (`cargo bench`) stays the reference for the reported numbers.
//!
//! ```text
//! cargo run --release --example profile -- MODE [N]
//! ```
//!
//! Modes (N checks, default 300,000):
//! - `single` / `gov`: N checks of one hot key (one token bucket), ours or governor's; for
//!   callgrind (instructions per check = the inclusive count of `check_one` or `gov_one` / N).
//! - `tsingle` / `tgov`: the same, timed in bursts of 10,000; prints the 10th percentile and
//!   the median ns per check over the bursts.
//! - `full_off` / `full_on`: check + settle of requests with three subjects (100k keys, 10k
//!   orgs, 100k IPv4 clusters) and two limits each, behaviour off / on, timed in bursts of
//!   5,000; prints the 10th percentile and the minimum ns per check (on stderr).
//! - `full_det`: `full_on` with a `ManualClock` (50 µs per check) and a fixed hashing seed, so
//!   that callgrind's count repeats to the instruction.
//! - `lag_off` / `lag_on`: as `full_*`, but each permit is settled 20,000 checks later, as a
//!   gateway settles after the response, when the subjects' entries have left the cache.
//! - `key_off` / `key_on`: the `behavior` bench group's case (100k keys, each from its own
//!   IPv4 address, limits on the key only: a token bucket and a token limit), behaviour off /
//!   on, timed as `full_*`.
//! - `key_det`: `key_on` with a `ManualClock` (1 us per check) and `full_det`'s seed, for
//!   callgrind.
//! - `ev_full` / `ev_key` / `ev_one_address`: N checks of the `full` case, of the `behavior`
//!   case (`key_*`), or of the `behavior` case as it was before the ninth session (every key
//!   from one address), on a `ManualClock` at 1.5 us per check with `full_det`'s seed; prints
//!   the first denial and the level changes (events drained every 1,000 checks) with their
//!   counts. Not timed.

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{Quota, RateLimiter};

#[path = "support/load.rs"]
mod load;
use ratewarden::{Decision, LimitConfig, ManualClock, Period, Policy, Request, Warden};

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 23));
const LIVE: usize = 100_000;

#[inline(never)]
fn check_one(w: &Warden, key: &str) -> bool {
    w.check(&Request::new(black_box(key), "", IP)).is_allowed()
}

#[inline(never)]
fn gov_one(g: &governor::DefaultKeyedRateLimiter<String>, key: &String) -> bool {
    g.check_key(black_box(key)).is_ok()
}

/// Runs `n` iterations of `step` in bursts and returns per-iteration nanoseconds of each burst,
/// sorted.
fn bursts(n: usize, burst: usize, mut step: impl FnMut(usize)) -> Vec<f64> {
    let mut out: Vec<f64> = (0..n / burst)
        .map(|b| {
            let t = Instant::now();
            (b * burst..(b + 1) * burst).for_each(&mut step);
            t.elapsed().as_nanos() as f64 / burst as f64
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// Runs `n` checks (`check(j)` for the `j`-th) and prints the first denial and every level
/// change by subject kind, levels and reasons, with counts. Permits are settled, as `full`
/// settles them, or dropped unsettled, as `behavior` drops them.
fn tally_events<'w>(
    w: &'w Warden,
    n: usize,
    settle: bool,
    mut check: impl FnMut(usize) -> Decision<'w>,
) {
    let mut denied = 0u64;
    let mut first = None;
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    let drain = |seen: &mut std::collections::BTreeMap<String, u64>| {
        for e in w.drain_events() {
            let reasons: Vec<&str> = e.reasons.iter().map(|r| &*r.detector).collect();
            let k = format!(
                "{:?} {:?} -> {:?} {reasons:?}",
                e.subject_kind, e.from, e.to
            );
            *seen.entry(k).or_default() += 1;
        }
    };
    for j in 0..n {
        match check(j) {
            Decision::Allow(p) if settle => p.settle(700),
            Decision::Allow(p) => drop(p),
            Decision::Deny(d) => {
                denied += 1;
                first.get_or_insert((j, d.reason().to_string()));
            }
        }
        if j % 1_000 == 0 {
            drain(&mut seen);
        }
    }
    drain(&mut seen);
    println!(
        "{n} checks, {denied} denied; first denial: {first:?}; events dropped: {}",
        w.stats().events_dropped
    );
    for (k, c) in seen {
        println!("{c:>9}  {k}");
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    let key = "sk-proj-0123456789abcdefghijkl".to_string();
    let mut allowed = 0u64;
    match mode.as_str() {
        "single" | "gov" | "tsingle" | "tgov" => {
            let mut p = Policy::empty();
            p.behavior.enabled = false;
            p.api_key.insert(
                "rps".into(),
                LimitConfig::Gcra {
                    rate: 1_000_000_000,
                    period: Period(Duration::from_secs(1)),
                    burst: 1_000_000_000,
                },
            );
            let w = Warden::builder().policy(p).build().unwrap();
            let g = RateLimiter::keyed(
                Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap())
                    .allow_burst(NonZeroU32::new(1_000_000_000).unwrap()),
            );
            let ours = !mode.ends_with("gov");
            let one = || {
                u64::from(if ours {
                    check_one(&w, &key)
                } else {
                    gov_one(&g, &key)
                })
            };
            if mode.starts_with('t') {
                let b = bursts(n, 10_000, |_| allowed += one());
                println!("{:.2} {:.2} {allowed}", b[b.len() / 10], b[b.len() / 2]);
            } else {
                (0..n).for_each(|_| allowed += one());
                println!("{allowed}");
            }
        }
        "full_off" | "full_on" | "full_det" | "lag_off" | "lag_on" | "key_off" | "key_on"
        | "key_det" | "ev_full" | "ev_key" | "ev_one_address" => {
            let events = mode.starts_with("ev_");
            let one_address = mode == "ev_one_address";
            let key_only = mode.starts_with("key") || mode == "ev_key" || one_address;
            let det = mode.ends_with("det") || events;
            let mut p = load::full_policy(mode.ends_with("on") || det);
            if key_only {
                p.org.clear();
                p.ip_cluster.clear();
            }
            let clock = ManualClock::new();
            let mut b = Warden::builder().policy(p);
            if det {
                b = b.clock(clock.clone()).seed(5);
            }
            let w = b.build().unwrap();
            let keys: Vec<String> = (0..LIVE)
                .map(|i| format!("sk-proj-{:022}", i.wrapping_mul(2_654_435_761)))
                .collect();
            let orgs: Vec<String> = (0..LIVE / 10).map(|i| format!("org-{i:08}")).collect();
            let ips: Vec<IpAddr> = (0..LIVE)
                .map(|i| IpAddr::V4(Ipv4Addr::from((i as u32).wrapping_mul(2_654_435_761))))
                .collect();
            let req = |i: usize| {
                let r = if one_address {
                    Request::new(&keys[i], "", IP)
                } else if key_only {
                    Request::new(&keys[i], "", ips[i])
                } else {
                    Request::new(&keys[i], &orgs[i / 10], ips[i])
                };
                r.input_tokens(400)
                    .expected_output_tokens(800)
                    .prompt_fp(i as u64 * 0x9E37_79B9)
                    .prompt_simhash(if one_address {
                        // The old `behavior` case's SimHashes, all within a few bits.
                        i as u64 ^ 0xABCD
                    } else {
                        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    })
                    .template_fp(i as u64 % 97)
            };
            // `key_det` and the event modes step at about the real pace of the `behavior` and
            // `full` benches' loops; `full_det` keeps 50 us so that its counts stay comparable
            // with earlier sessions'.
            let step = Duration::from_nanos(match (events, key_only) {
                (true, _) => 1_500,
                (false, true) => 1_000,
                (false, false) => 50_000,
            });
            let tick = || {
                if det {
                    clock.advance(step);
                }
            };
            for i in 0..LIVE {
                tick();
                if let Decision::Allow(p) = w.check(&req(i)) {
                    p.settle(700);
                }
            }
            if events {
                tally_events(&w, n, !key_only, |j| {
                    tick();
                    w.check(&req(j.wrapping_mul(7919) % LIVE))
                });
                return;
            }
            let lag = mode.starts_with("lag");
            let mut pending = VecDeque::new();
            let b = bursts(n, 5_000, |j| {
                let i = j.wrapping_mul(7919) % LIVE;
                tick();
                match w.check(&req(i)) {
                    Decision::Allow(p) if key_only => drop(p),
                    Decision::Allow(p) if lag => pending.push_back(p),
                    Decision::Allow(p) => p.settle(black_box(700)),
                    Decision::Deny(d) => panic!("the harness must not deny: {}", d.reason()),
                }
                allowed += 1;
                if pending.len() > 20_000 {
                    if let Some(p) = pending.pop_front() {
                        p.settle(black_box(700));
                    }
                }
            });
            eprintln!("{:.1} ns/check p10 {:.1} min", b[b.len() / 10], b[0]);
            println!("{allowed}");
        }
        _ => {
            eprintln!(
                "usage: profile MODE [N]; modes are listed at the top of examples/profile.rs"
            );
            std::process::exit(2);
        }
    }
}
