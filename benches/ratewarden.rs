// criterion's macros define undocumented `pub fn`s.
#![allow(missing_docs)]
//! The criterion suite: one entry, a group per concern, governor side by side where the two
//! are comparable. See `benches/README.md` for how to run it and the latest numbers.

#[path = "../examples/support/decimal.rs"]
mod decimal;
#[path = "../examples/support/eval.rs"]
mod eval;
#[path = "../examples/support/load.rs"]
mod load;
#[path = "../examples/support/replay.rs"]
mod replay;
#[path = "../examples/support/sim.rs"]
mod sim;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use governor::{Quota, RateLimiter};
use ratewarden::{Clock, ClusterConfig, Decision, LimitConfig, Period, Policy, Request, Warden};

/// A generous quota: every check in a benchmark is an allow, on both sides.
const RATE_PER_SEC: u32 = 1_000_000_000;
const BURST: u32 = 1_000_000_000;

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(RATE_PER_SEC).unwrap())
        .allow_burst(NonZeroU32::new(BURST).unwrap())
}

fn gcra() -> LimitConfig {
    LimitConfig::Gcra {
        rate: u64::from(RATE_PER_SEC),
        period: Period(Duration::from_secs(1)),
        burst: u64::from(BURST),
    }
}

/// One token bucket per API key, nothing else tracked.
fn keyed_policy() -> Policy {
    let mut p = Policy::empty();
    p.behavior.enabled = false;
    p.api_key.insert("rps".into(), gcra());
    p
}

/// One token bucket per client address (exact /32 and /128 clusters).
fn ip_policy() -> Policy {
    let mut p = Policy::empty();
    p.behavior.enabled = false;
    p.cluster = ClusterConfig {
        v4_prefix: 32,
        v6_prefix: 128,
    };
    p.ip_cluster.insert("rps".into(), gcra());
    p
}

fn warden(p: Policy) -> Warden {
    Warden::builder().policy(p).build().unwrap()
}

/// `n` realistic 30-byte API keys (`sk-proj-` + 22 base62 characters).
fn api_keys(n: usize) -> Vec<String> {
    let mut rng = sim::Rng::new(42);
    (0..n)
        .map(|_| {
            let mut k = String::from("sk-proj-");
            rng.base62(22, &mut k);
            k
        })
        .collect()
}

fn v4s(n: usize) -> Vec<IpAddr> {
    let mut rng = sim::Rng::new(7);
    (0..n)
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32)))
        .collect()
}

fn v6s(n: usize) -> Vec<IpAddr> {
    let mut rng = sim::Rng::new(9);
    (0..n)
        .map(|_| {
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()),
            ))
        })
        .collect()
}

/// A pseudo-random visiting order, so successive checks do not hit neighbouring cache lines.
fn order(n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut rng = sim::Rng::new(1234);
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 23));

fn bench_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("check");
    g.throughput(Throughput::Elements(1));
    // Single hot key.
    let w = warden(keyed_policy());
    let key = "sk-proj-0123456789abcdefghijkl".to_string();
    g.bench_function("ratewarden/single_key", |b| {
        b.iter(|| black_box(w.check(&Request::new(black_box(&key), "", IP)).is_allowed()))
    });
    let gov = RateLimiter::keyed(quota());
    g.bench_function("governor/single_key", |b| {
        b.iter(|| black_box(gov.check_key(black_box(&key)).is_ok()))
    });
    // 100,000 distinct string keys.
    let keys = api_keys(100_000);
    let ord = order(keys.len());
    let w = warden(keyed_policy());
    let gov = RateLimiter::keyed(quota());
    for k in &keys {
        let _ = w.check(&Request::new(k, "", IP));
        let _ = gov.check_key(k);
    }
    let mut i = 0usize;
    g.bench_function("ratewarden/100k_string_keys", |b| {
        b.iter(|| {
            i = (i + 1) % ord.len();
            black_box(
                w.check(&Request::new(&keys[ord[i] as usize], "", IP))
                    .is_allowed(),
            )
        })
    });
    let mut i = 0usize;
    g.bench_function("governor/100k_string_keys", |b| {
        b.iter(|| {
            i = (i + 1) % ord.len();
            black_box(gov.check_key(&keys[ord[i] as usize]).is_ok())
        })
    });
    // The same keys and order, the key text of successive requests laid out one after the
    // other in one buffer, as a gateway reads each key from the request it has just parsed:
    // the text is in cache, the table entry is not. Governor takes `&String`, so its side
    // copies the text into a reused `String` (a copy within cache, ~2 ns).
    let mut stream = String::with_capacity(keys.len() * 30);
    let mut spans = Vec::with_capacity(keys.len());
    for &j in &ord {
        let a = stream.len();
        stream.push_str(&keys[j as usize]);
        spans.push((a, stream.len()));
    }
    let mut i = 0usize;
    g.bench_function("ratewarden/100k_string_keys_hot", |b| {
        b.iter(|| {
            i = (i + 1) % spans.len();
            let (a, z) = spans[i];
            black_box(w.check(&Request::new(&stream[a..z], "", IP)).is_allowed())
        })
    });
    let mut i = 0usize;
    let mut key = String::with_capacity(64);
    g.bench_function("governor/100k_string_keys_hot", |b| {
        b.iter(|| {
            i = (i + 1) % spans.len();
            let (a, z) = spans[i];
            key.clear();
            key.push_str(&stream[a..z]);
            black_box(gov.check_key(&key).is_ok())
        })
    });
    g.finish();
}

fn bench_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for &n in &[1usize, 1_000, 100_000, 1_000_000] {
        let ord = order(n);
        // String API keys.
        let keys = api_keys(n);
        let w = warden(keyed_policy());
        let gov = RateLimiter::keyed(quota());
        for k in &keys {
            let _ = w.check(&Request::new(k, "", IP));
            let _ = gov.check_key(k);
        }
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("ratewarden/api_key", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % n;
                black_box(
                    w.check(&Request::new(&keys[ord[i] as usize], "", IP))
                        .is_allowed(),
                )
            })
        });
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("governor/api_key", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % n;
                black_box(gov.check_key(&keys[ord[i] as usize]).is_ok())
            })
        });
        drop((w, gov, keys));
        // IPv4 and IPv6 addresses.
        for (family, ips) in [("ipv4", v4s(n)), ("ipv6", v6s(n))] {
            let w = warden(ip_policy());
            let gov = RateLimiter::keyed(quota());
            for ip in &ips {
                let _ = w.check(&Request::anonymous(*ip));
                let _ = gov.check_key(ip);
            }
            let mut i = 0usize;
            g.bench_with_input(
                BenchmarkId::new(format!("ratewarden/{family}"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        i = (i + 1) % n;
                        black_box(
                            w.check(&Request::new("", "", ips[ord[i] as usize]))
                                .is_allowed(),
                        )
                    })
                },
            );
            let mut i = 0usize;
            g.bench_with_input(
                BenchmarkId::new(format!("governor/{family}"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        i = (i + 1) % n;
                        black_box(gov.check_key(&ips[ord[i] as usize]).is_ok())
                    })
                },
            );
        }
    }
    g.finish();
}

/// Request `i` of the `full` and `behavior` groups: token costs and prompt features. Each
/// key's SimHash is spread over all 64 bits (a multiplicative hash of `i`), so that keys do
/// not share SimHash bands: with `i ^ 0xABCD`, as before the ninth session, every key fell in
/// the same bands, a family spread over all 10,000 orgs, and `full` lifted about 210,000
/// subjects to `watch` about a second after its fill, when criterion is measuring
/// (`examples/profile.rs`'s `ev_*` modes count such level changes).
fn with_prompt(r: Request<'_>, i: usize) -> Request<'_> {
    r.input_tokens(400)
        .expected_output_tokens(800)
        .prompt_fp(i as u64 * 0x9E37_79B9)
        .prompt_simhash((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .template_fp(i as u64 % 97)
}

/// Makes requests `0..n` live in `w` (checked and settled once each).
fn fill<'a>(w: &Warden, n: usize, req: impl Fn(usize) -> Request<'a>) {
    for i in 0..n {
        if let Decision::Allow(p) = w.check(&req(i)) {
            p.settle(700);
        }
    }
}

fn bench_full(c: &mut Criterion) {
    let mut g = c.benchmark_group("full");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    let n = 100_000;
    let keys = api_keys(n);
    let orgs: Vec<String> = (0..n / 10).map(|i| format!("org-{i:08}")).collect();
    let ips = v4s(n);
    let ord = order(n);
    for behavior in [false, true] {
        let w = warden(load::full_policy(behavior));
        let req = |i: usize| with_prompt(Request::new(&keys[i], &orgs[i / 10], ips[i]), i);
        fill(&w, n, req);
        let name = if behavior {
            "behavior_on"
        } else {
            "behavior_off"
        };
        let mut i = 0usize;
        g.bench_function(format!("ratewarden/3_subjects_2_limits/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                match w.check(&req(ord[i] as usize)) {
                    Decision::Allow(p) => p.settle(black_box(700)),
                    Decision::Deny(d) => panic!("bench must not deny: {}", d.reason()),
                }
            })
        });
    }
    g.finish();
}

/// What `check` adds with the behavioural layer on: 100,000 live API keys, each from its own
/// IPv4 address, with limits (a token bucket and a token limit) on the key only, each request
/// carrying prompt features, behaviour off against on. The behavioural layer tracks every
/// subject kind, so "on" also keeps the state of each key's IP cluster (no org: the requests
/// carry none). The permit is dropped unsettled, so this is the check alone. Every check must
/// be allowed: a refusal would time the denial path instead.
fn bench_behavior(c: &mut Criterion) {
    let mut g = c.benchmark_group("behavior");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    let n = 100_000;
    let keys = api_keys(n);
    let ips = v4s(n);
    let ord = order(n);
    for behavior in [false, true] {
        let mut p = load::full_policy(behavior);
        p.org.clear();
        p.ip_cluster.clear();
        let w = warden(p);
        let req = |i: usize| with_prompt(Request::new(&keys[i], "", ips[i]), i);
        fill(&w, n, req);
        let name = if behavior { "on" } else { "off" };
        let mut i = 0usize;
        g.bench_function(format!("ratewarden/100k_keys/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                match w.check(&req(ord[i] as usize)) {
                    Decision::Allow(p) => drop(black_box(p)),
                    Decision::Deny(d) => panic!("bench must not deny: {}", d.reason()),
                }
            })
        });
    }
    g.finish();
}

/// Runs `iters` calls of `op(thread, j)` on each of `threads` threads released together;
/// returns the wall time from the release to the last thread's end.
fn timed_threads(threads: usize, iters: u64, op: &(impl Fn(usize, usize) + Sync)) -> Duration {
    let barrier = Barrier::new(threads);
    let start = std::sync::Mutex::new(None::<Instant>);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (barrier, start) = (&barrier, &start);
            s.spawn(move || {
                barrier.wait();
                start.lock().unwrap().get_or_insert_with(Instant::now);
                for j in 0..iters as usize {
                    op(t, j);
                }
            });
        }
    });
    start
        .into_inner()
        .unwrap()
        .map_or(Duration::ZERO, |s| s.elapsed())
}

fn bench_contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    let threads_list: Vec<usize> = std::env::var("RATEWARDEN_BENCH_THREADS")
        .ok()
        .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let keys = api_keys(100_000);
    for &threads in &threads_list {
        g.throughput(Throughput::Elements(threads as u64));
        for shared in [true, false] {
            let case = if shared {
                "shared_key"
            } else {
                "distinct_keys"
            };
            let w = warden(keyed_policy());
            let gov = RateLimiter::keyed(quota());
            for k in &keys {
                let _ = w.check(&Request::new(k, "", IP));
                let _ = gov.check_key(k);
            }
            // Each thread walks its own slice of keys (or the one shared key).
            let slice = keys.len() / threads;
            let key = |t: usize, j: usize| {
                if shared {
                    &keys[0]
                } else {
                    &keys[t * slice + j % slice]
                }
            };
            let ours = |t: usize, j: usize| {
                black_box(w.check(&Request::new(key(t, j), "", IP)).is_allowed());
            };
            let theirs = |t: usize, j: usize| {
                black_box(gov.check_key(key(t, j)).is_ok());
            };
            g.bench_with_input(
                BenchmarkId::new(format!("ratewarden/{case}"), threads),
                &threads,
                |b, &t| b.iter_custom(|iters| timed_threads(t, iters, &ours)),
            );
            g.bench_with_input(
                BenchmarkId::new(format!("governor/{case}"), threads),
                &threads,
                |b, &t| b.iter_custom(|iters| timed_threads(t, iters, &theirs)),
            );
        }
    }
    g.finish();
}

fn bench_replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    g.sample_size(10);
    let cfg = sim::SimConfig::public_mix(1, 20 * 60_000);
    let mut trace = Vec::new();
    sim::write_jsonl(&cfg, &mut trace, None).unwrap();
    let text = String::from_utf8(trace).unwrap();
    let lines = text.lines().count() as u64;
    g.throughput(Throughput::Elements(lines));
    g.bench_function("parse_only", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for l in text.lines() {
                if let Ok(r) = serde_json::from_str::<replay::Line<'_>>(l) {
                    n += r.input_tokens;
                }
            }
            black_box(n)
        })
    });
    // `serial`: parse, check and settle on one thread; `pipelined`: the replay CLI's path,
    // with a helper thread parsing batches while this one decides.
    for (name, limits_only, pipelined) in [
        ("limits_only/serial", true, false),
        ("limits_only/pipelined", true, true),
        ("with_behavior/serial", false, false),
        ("with_behavior/pipelined", false, true),
    ] {
        g.bench_function(format!("parse_and_check/{name}"), |b| {
            b.iter(|| {
                let mut p = Policy::llm_api();
                p.behavior.enabled = !limits_only;
                replay::replay_quiet(p, None, pipelined, text.as_bytes(), std::io::sink())
                    .unwrap()
                    .requests
            })
        });
    }
    g.finish();
}

fn bench_clock(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock");
    g.throughput(Throughput::Elements(1));
    let q = ratewarden::SystemClock::new();
    let i = ratewarden::InstantClock::new();
    g.bench_function("quanta", |b| b.iter(|| black_box(q.now_nanos())));
    g.bench_function("instant", |b| b.iter(|| black_box(i.now_nanos())));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench_check, bench_keys, bench_full, bench_behavior, bench_contention, bench_replay, bench_clock
}
criterion_main!(benches);
