//! Threads released on a barrier against shared subjects, with the clock frozen: exact totals.

mod common;
use common::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;

use ratewarden::{Decision, LimitConfig, Request};

const THREADS: usize = 8;

#[test]
fn one_hot_key_admits_exactly_the_burst() {
    let mut p = bare();
    p.api_key.insert("rpm".into(), gcra(120, 60, 50));
    let (w, _clock) = warden(p);
    let barrier = Barrier::new(THREADS);
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..100 {
                    if w.check(&Request::new("hot", "o", ip("10.0.0.1")))
                        .is_allowed()
                    {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 50);
    assert_eq!(w.stats().allowed, 50);
    assert_eq!(w.stats().denied_rate, (THREADS * 100 - 50) as u64);
}

#[test]
fn all_or_nothing_holds_under_concurrency() {
    // Key: 1,000 at once. Org: 37. Every refusal comes from the org and must leave no charge
    // on the key.
    let mut p = bare();
    p.api_key.insert("rpm".into(), gcra(1, 3600, 1000));
    p.org.insert("rpm".into(), gcra(1, 3600, 37));
    let (w, _clock) = warden(p);
    let barrier = Barrier::new(THREADS);
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (w, barrier, admitted) = (&w, &barrier, &admitted);
            s.spawn(move || {
                barrier.wait();
                for i in 0..50 {
                    // Half the threads also use a second, unlimited-org path to the same key,
                    // so the key's cell is contended by requests that commit and roll back.
                    let org = if (t + i) % 2 == 0 { "small" } else { "" };
                    if w.check(&Request::new("k", org, ip("10.0.0.1")))
                        .is_allowed()
                    {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let a = admitted.load(Ordering::Relaxed);
    // 200 requests had no org (all admitted: the key has room) and at most 37 had the org.
    let no_org = (THREADS * 50 / 2) as u64;
    assert_eq!(a, no_org + 37);
    // What is left on the key is exactly 1,000 minus what was admitted.
    let left = (0..1000)
        .filter(|_| w.check(&Request::new("k", "", ip("10.0.0.1"))).is_allowed())
        .count() as u64;
    assert_eq!(left, 1000 - a);
    // And the org is exactly used up by its admitted share.
    let Decision::Deny(d) = w.check(&Request::new("other", "small", ip("10.0.9.1"))) else {
        panic!("org must be exhausted")
    };
    assert_eq!(d.reason(), "org:rpm");
}

#[test]
fn concurrency_limit_is_exact_and_slots_come_back() {
    let mut p = bare();
    p.org
        .insert("inflight".into(), LimitConfig::Concurrency { max: 5 });
    let (w, _clock) = warden(p);
    let barrier = Barrier::new(THREADS);
    let held = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (w, barrier, held) = (&w, &barrier, &held);
            s.spawn(move || {
                let key = format!("k{t}");
                barrier.wait();
                let mut permits = Vec::new();
                for _ in 0..10 {
                    if let Decision::Allow(p) =
                        w.check(&Request::new(&key, "shared", ip("10.0.0.1")))
                    {
                        permits.push(p);
                    }
                }
                held.fetch_add(permits.len() as u64, Ordering::Relaxed);
                barrier.wait();
                drop(permits);
            });
        }
    });
    assert_eq!(held.load(Ordering::Relaxed), 5);
    let after = (0..10)
        .map(|_| w.check(&Request::new("late", "shared", ip("10.0.0.1"))))
        .collect::<Vec<_>>();
    assert_eq!(after.iter().filter(|d| d.is_allowed()).count(), 5);
}

#[test]
fn token_settlements_from_many_threads_add_up() {
    let mut p = bare();
    p.api_key.insert("tpm".into(), tokens(1_000_000, 60));
    let (w, _clock) = warden(p);
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..100 {
                    let req = Request::new("k", "", ip("10.0.0.1"))
                        .input_tokens(10)
                        .expected_output_tokens(100);
                    if let Decision::Allow(p) = w.check(&req) {
                        p.settle(40); // 110 charged, 50 used: 60 back each
                    }
                }
            });
        }
    });
    let Decision::Allow(p) = w.check(&Request::new("k", "", ip("10.0.0.1"))) else {
        panic!()
    };
    assert_eq!(
        p.rate_limit().tokens.unwrap().remaining,
        1_000_000 - 800 * 50
    );
}

#[test]
fn stats_are_exact_with_more_threads_than_owned_stripes() {
    // The first 16 counting threads of the process own a stripe; the rest share atomically
    // bumped ones. Forty threads (three rounds, so thread ids keep growing) must still add up.
    let mut p = bare();
    p.api_key.insert("rpm".into(), gcra(60, 60, 100));
    let (w, _clock) = warden(p);
    let mut admitted = 0u64;
    for _round in 0..3 {
        let barrier = Barrier::new(40);
        let ok = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..40 {
                let (barrier, ok, w) = (&barrier, &ok, &w);
                s.spawn(move || {
                    barrier.wait();
                    for j in 0..50 {
                        // Half the threads share one key (it runs out); the rest have their own.
                        let key = if t % 2 == 0 {
                            "shared".to_string()
                        } else {
                            format!("k{t}-{j}")
                        };
                        if w.check(&Request::new(&key, "o", ip("10.0.0.1")))
                            .is_allowed()
                        {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        admitted += ok.load(Ordering::Relaxed);
    }
    let st = w.stats();
    assert_eq!(st.allowed, admitted);
    assert_eq!(st.allowed + st.denied_rate, 3 * 40 * 50);
    // The shared key admitted exactly its burst over the three rounds (clock frozen).
    assert_eq!(st.denied_rate, 3 * 20 * 50 - 100);
}

#[test]
fn behaviour_layer_under_threads_and_host_controls_counts_every_check() {
    // Threads with their own keys share two orgs and two /24s, so checks contend on the org
    // and cluster states, while another thread sets and clears levels, exempts subjects,
    // inspects, runs maintenance and moves the clock on (so that manual levels with a TTL
    // expire mid-run). Nothing may deadlock, and every check is counted exactly once.
    let mut p = ratewarden::Policy::llm_api();
    p.behavior.enabled = true;
    let (w, clock) = warden(p);
    const CHECKS: usize = 300;
    let barrier = Barrier::new(THREADS + 1);
    let served = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let org: ratewarden::SubjectId = "org:o1".parse().unwrap();
    let cluster: ratewarden::SubjectId = "ip_cluster:10.0.1.0/24".parse().unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (barrier, served, refused, w) = (&barrier, &served, &refused, &w);
            s.spawn(move || {
                barrier.wait();
                for j in 0..CHECKS {
                    let key = format!("sk-{t}-{}", j % 7);
                    let org = if j % 2 == 0 { "o1" } else { "o2" };
                    let addr = ip(if t % 2 == 0 { "10.0.1.9" } else { "10.0.2.9" });
                    let req = Request::new(&key, org, addr)
                        .input_tokens(100)
                        .expected_output_tokens(200)
                        .prompt_fp(j as u64)
                        .prompt_simhash((j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                        .template_fp(t as u64);
                    match w.check(&req) {
                        Decision::Allow(permit) => {
                            served.fetch_add(1, Ordering::Relaxed);
                            permit.settle(150);
                        }
                        Decision::Deny(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        let (barrier, w, org, cluster, clock) = (&barrier, &w, &org, &cluster, &clock);
        s.spawn(move || {
            barrier.wait();
            for i in 0..200 {
                let level = if i % 2 == 0 {
                    ratewarden::Level::Block
                } else {
                    ratewarden::Level::Watch
                };
                // A TTL of 1 ms, and the clock moves 0.3 ms a round: some levels expire by
                // themselves, the rest are cleared.
                let ttl = std::time::Duration::from_millis(1);
                w.set_level(org, level, Some(ttl)).unwrap();
                w.set_exempt(cluster, i % 3 == 0).unwrap();
                assert!(w.inspect(org).is_some());
                if i % 10 == 0 {
                    w.maintain();
                }
                clock.advance(std::time::Duration::from_micros(300));
                if i % 4 == 0 {
                    w.clear_level(org).unwrap();
                }
            }
        });
    });
    let st = w.stats();
    assert_eq!(st.allowed, served.load(Ordering::Relaxed));
    assert_eq!(
        st.denied_rate + st.denied_tokens + st.denied_concurrency + st.denied_behavior,
        refused.load(Ordering::Relaxed)
    );
}

#[test]
fn lookups_stay_exact_through_new_subjects_a_full_table_evictions_and_policy_swaps() {
    // Checks find known subjects by read-locking all their shards first, and fall back to a
    // path that inserts, migrates or overflows. Here the two paths interleave on every thread:
    // 400 keys against a cap of 64 (so some keys share the overflow entry and idle ones are
    // evicted), new IP clusters, maintenance, and a thread that swaps between two policies
    // that differ only in the key limit (so every entry is migrated, while the org's state
    // carries over). One org's bucket must admit exactly its burst over the whole run, and
    // every check must be counted once.
    let policy = |key_rate: u64| {
        let mut p = bare();
        p.table.max_subjects = 64;
        p.table.idle_timeout = ratewarden::Period(std::time::Duration::from_millis(1));
        p.api_key.insert("rpm".into(), gcra(key_rate, 1, 1_000_000));
        p.org.insert("rpm".into(), gcra(1, 3600, 300));
        p.ip_cluster
            .insert("rpm".into(), gcra(1_000_000, 1, 1_000_000));
        p
    };
    let (w, clock) = warden(policy(1_000_000));
    const CHECKS: usize = 400;
    let barrier = Barrier::new(THREADS + 1);
    let admitted = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (barrier, admitted, refused, w) = (&barrier, &admitted, &refused, &w);
            s.spawn(move || {
                barrier.wait();
                for j in 0..CHECKS {
                    let key = format!("sk-{}", (t * 131 + j * 7) % 400);
                    let addr = ip(&format!("10.{}.{}.1", t, j % 50));
                    match w.check(&Request::new(&key, "shared", addr)) {
                        Decision::Allow(_) => admitted.fetch_add(1, Ordering::Relaxed),
                        Decision::Deny(d) => {
                            assert_eq!(d.reason(), "org:rpm");
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        let (barrier, w, clock) = (&barrier, &w, &clock);
        s.spawn(move || {
            barrier.wait();
            for i in 0..100u64 {
                w.set_policy(policy(1_000_000 + i % 2)).unwrap();
                clock.advance(std::time::Duration::from_micros(100));
                if i % 10 == 0 {
                    w.maintain();
                }
            }
        });
    });
    let total = (THREADS * CHECKS) as u64;
    assert_eq!(admitted.load(Ordering::Relaxed), 300);
    assert_eq!(refused.load(Ordering::Relaxed), total - 300);
    let st = w.stats();
    assert_eq!(st.allowed, 300);
    assert_eq!(st.denied_rate, total - 300);
    assert!(st.tracked.iter().all(|&n| n <= 64), "{st:?}");
    // 400 keys and 400 clusters against a cap of 64: the overflow path ran.
    assert!(st.overflow_hits > 0, "{st:?}");
}
