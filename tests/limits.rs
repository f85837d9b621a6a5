//! Public-API tests of the classic limits, with a manual clock and exact assertions.

mod common;
use common::*;

use std::time::Duration;

use ratewarden::{
    ConfigError, Decision, LimitConfig, Override, Period, Policy, Request, SubjectKind,
};

fn count_allowed(w: &ratewarden::Warden, req: &Request<'_>, n: usize) -> usize {
    (0..n).filter(|_| w.check(req).is_allowed()).count()
}

#[test]
fn key_burst_then_steady_rate() {
    let (w, clock) = warden(Policy::llm_api_limits_only());
    let req = Request::new("sk-1", "org-1", ip("198.51.100.1"));
    assert_eq!(count_allowed(&w, &req, 30), 20);
    // 120/min = one every 500 ms.
    clock.advance(Duration::from_millis(499));
    assert_eq!(count_allowed(&w, &req, 1), 0);
    clock.advance(Duration::from_millis(1));
    assert_eq!(count_allowed(&w, &req, 5), 1);
    clock.advance(Duration::from_secs(60));
    assert_eq!(count_allowed(&w, &req, 30), 20);
}

#[test]
fn denial_names_subject_limit_and_retry_after() {
    let (w, _clock) = warden(Policy::llm_api_limits_only());
    let req = Request::new("sk-1", "org-1", ip("198.51.100.1"));
    count_allowed(&w, &req, 20);
    let Decision::Deny(d) = w.check(&req) else {
        panic!("expected a denial")
    };
    assert_eq!(d.subject_kind(), SubjectKind::ApiKey);
    assert_eq!(d.reason(), "api_key:requests_per_minute");
    assert_eq!(d.limit(), "requests_per_minute");
    assert_eq!(d.retry_after(), Some(Duration::from_millis(500)));
    let h = d.headers();
    let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
    assert_eq!(get("retry-after").as_deref(), Some("1"));
    assert_eq!(get("x-ratelimit-limit-requests").as_deref(), Some("20"));
    assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("0"));
}

#[test]
fn all_or_nothing_across_subjects() {
    let mut p = bare();
    p.api_key.insert("rpm".into(), gcra(100, 60, 10));
    p.org.insert("rpm".into(), gcra(3, 60, 3));
    let (w, _clock) = warden(p);
    // The org allows 3; the key allows 10. Requests 4.. are refused by the org and must not
    // charge the key.
    let a = Request::new("k-a", "o-small", ip("10.0.0.1"));
    assert_eq!(count_allowed(&w, &a, 8), 3);
    let Decision::Deny(d) = w.check(&a) else {
        panic!()
    };
    assert_eq!(d.reason(), "org:rpm");
    // Same key, no org: exactly 10 − 3 = 7 left on the key.
    let b = Request::new("k-a", "", ip("10.0.0.1"));
    assert_eq!(count_allowed(&w, &b, 20), 7);
}

#[test]
fn token_cost_is_settled_with_refund_and_debt() {
    let mut p = bare();
    p.api_key.insert("tpm".into(), tokens(1_000, 60));
    let (w, clock) = warden(p);
    let req = Request::new("k", "o", ip("10.0.0.1"))
        .input_tokens(100)
        .expected_output_tokens(400);
    // 500 charged; settle to 100 + 50 = 150: 350 refunded.
    let Decision::Allow(permit) = w.check(&req) else {
        panic!()
    };
    permit.settle(50);
    let rem = |w: &ratewarden::Warden| {
        let probe = Request::new("k", "o", ip("10.0.0.1"));
        match w.check(&probe) {
            Decision::Allow(p) => p.rate_limit().tokens.unwrap().remaining,
            Decision::Deny(d) => d.rate_limit().tokens.map_or(0, |t| t.remaining),
        }
    };
    assert_eq!(rem(&w), 850);
    // Debt: charged 500, actual 100 + 2,000 → 1,600 more, past the limit. It is kept.
    let Decision::Allow(permit) = w.check(&req) else {
        panic!()
    };
    permit.settle(2_000);
    assert_eq!(rem(&w), 0);
    let Decision::Deny(d) = w.check(&req) else {
        panic!("debt must block")
    };
    assert_eq!(d.reason(), "api_key:tpm");
    // Debt 850 − 2,100 = −1,250 tokens; at 1,000/min, 500 tokens need 75 s + 30 s to clear.
    let wait = d.retry_after().unwrap();
    assert_eq!(wait, Duration::from_secs(105));
    clock.advance(wait - Duration::from_millis(1));
    assert!(!w.check(&req).is_allowed());
    clock.advance(Duration::from_millis(1));
    assert!(w.check(&req).is_allowed());
}

#[test]
fn dropping_a_permit_without_settling_keeps_the_estimate() {
    let mut p = bare();
    p.api_key.insert("tpm".into(), tokens(1_000, 60));
    let (w, _clock) = warden(p);
    let req = Request::new("k", "o", ip("10.0.0.1")).expected_output_tokens(400);
    drop(w.check(&req));
    drop(w.check(&req));
    let Decision::Deny(d) = w.check(&req) else {
        panic!()
    };
    assert_eq!(d.rate_limit().tokens.unwrap().remaining, 200);
}

#[test]
fn concurrency_slot_released_on_drop() {
    let mut p = bare();
    p.api_key
        .insert("inflight".into(), LimitConfig::Concurrency { max: 2 });
    let (w, _clock) = warden(p);
    let req = Request::new("k", "o", ip("10.0.0.1"));
    let a = w.check(&req);
    let b = w.check(&req);
    assert!(a.is_allowed() && b.is_allowed());
    let Decision::Deny(d) = w.check(&req) else {
        panic!()
    };
    assert_eq!(d.reason(), "api_key:inflight");
    drop(a);
    let c = w.check(&req);
    assert!(c.is_allowed());
    if let Decision::Allow(p) = b {
        p.settle(0);
    }
    assert!(w.check(&req).is_allowed());
    drop(c);
}

#[test]
fn sliding_window_limit() {
    let mut p = bare();
    p.ip_cluster.insert(
        "per_10s".into(),
        LimitConfig::SlidingWindow {
            limit: 4,
            window: Period(Duration::from_secs(10)),
        },
    );
    let (w, clock) = warden(p);
    // Two addresses of one /24 share the cluster.
    assert_eq!(
        count_allowed(&w, &Request::new("a", "", ip("192.0.2.1")), 3),
        3
    );
    assert_eq!(
        count_allowed(&w, &Request::new("b", "", ip("192.0.2.200")), 3),
        1
    );
    let Decision::Deny(d) = w.check(&Request::new("c", "", ip("::ffff:192.0.2.9"))) else {
        panic!()
    };
    assert_eq!(d.reason(), "ip_cluster:per_10s");
    clock.advance(Duration::from_secs(15));
    // Half of the previous window's 4 still counts.
    assert_eq!(
        count_allowed(&w, &Request::new("a", "", ip("192.0.2.1")), 4),
        2
    );
}

#[test]
fn clock_going_backwards_never_refunds_or_panics() {
    let (w, clock) = warden(Policy::llm_api_limits_only());
    clock.set_millis(3_600_000);
    let req = Request::new("k", "o", ip("10.0.0.1"));
    assert_eq!(count_allowed(&w, &req, 20), 20);
    clock.set_millis(0);
    assert_eq!(count_allowed(&w, &req, 5), 0);
    clock.set_millis(3_600_000);
    assert_eq!(count_allowed(&w, &req, 5), 0);
}

#[test]
fn overflowing_costs_are_denied() {
    let (w, _clock) = warden(Policy::llm_api_limits_only());
    let big = Request::new("k", "o", ip("10.0.0.1"))
        .input_tokens(u64::MAX)
        .expected_output_tokens(5);
    let Decision::Deny(d) = w.check(&big) else {
        panic!()
    };
    assert_eq!(d.reason(), "api_key:tokens_per_minute");
    assert_eq!(d.retry_after(), None);
    assert!(d.headers().iter().all(|(k, _)| *k != "retry-after"));
    let many = Request::new("k", "o", ip("10.0.0.1")).requests(u64::MAX);
    assert!(!w.check(&many).is_allowed());
    // Nothing was charged.
    assert_eq!(
        count_allowed(&w, &Request::new("k", "o", ip("10.0.0.1")), 25),
        20
    );
}

#[test]
fn allow_headers_use_the_most_constrained_limits() {
    let (w, _clock) = warden(Policy::llm_api_limits_only());
    let req = Request::new("k", "o", ip("10.0.0.1"))
        .input_tokens(1000)
        .expected_output_tokens(1000);
    let Decision::Allow(p) = w.check(&req) else {
        panic!()
    };
    let info = p.rate_limit();
    let r = info.requests.unwrap();
    assert_eq!(
        (r.name(), r.limit, r.remaining),
        ("requests_per_minute", 20, 19)
    );
    let t = info.tokens.unwrap();
    assert_eq!((t.limit, t.remaining), (400_000, 398_000));
    let h = p.headers();
    let get = |n: &str| {
        h.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(
        get("ratelimit-policy"),
        "\"requests_per_minute\";q=20;qu=\"request\";w=10, \"tokens_per_minute\";q=400000;qu=\"tokens\";w=60"
    );
    assert_eq!(
        get("ratelimit"),
        "\"requests_per_minute\";r=19;t=1, \"tokens_per_minute\";r=398000;t=1"
    );
    assert_eq!(get("x-ratelimit-remaining-tokens"), "398000");
    assert_eq!(get("x-ratelimit-reset-requests"), "500ms");
    assert_eq!(get("x-ratelimit-reset-tokens"), "300ms");
}

#[test]
fn overrides_give_named_subjects_their_own_limits() {
    let mut p = Policy::llm_api_limits_only();
    p.overrides.push(Override {
        kind: SubjectKind::ApiKey,
        id: "sk-vip".into(),
        limits: [("requests_per_minute".to_string(), gcra(600, 60, 100))]
            .into_iter()
            .collect(),
        exempt_behavior: false,
    });
    let (w, _clock) = warden(p);
    assert_eq!(
        count_allowed(&w, &Request::new("sk-vip", "o1", ip("10.0.0.1")), 150),
        100
    );
    assert_eq!(
        count_allowed(&w, &Request::new("sk-std", "o2", ip("10.0.1.1")), 150),
        20
    );
}

#[test]
fn anonymous_requests_share_a_bucket_per_cluster() {
    let mut p = Policy::llm_api_limits_only();
    p.anonymous = Some([("rpm".to_string(), gcra(10, 60, 5))].into_iter().collect());
    let (w, _clock) = warden(p);
    assert_eq!(
        count_allowed(&w, &Request::anonymous(ip("203.0.113.1")), 3),
        3
    );
    assert_eq!(
        count_allowed(&w, &Request::anonymous(ip("203.0.113.77")), 5),
        2
    );
    let Decision::Deny(d) = w.check(&Request::anonymous(ip("203.0.113.2"))) else {
        panic!()
    };
    assert_eq!(d.reason(), "api_key:rpm");
    // Another cluster has its own anonymous bucket.
    assert_eq!(
        count_allowed(&w, &Request::anonymous(ip("203.0.114.1")), 9),
        5
    );
}

#[test]
fn an_api_key_named_like_an_anonymous_bucket_is_not_that_bucket() {
    let mut p = Policy::llm_api_limits_only();
    p.anonymous = Some([("rpm".to_string(), gcra(10, 60, 2))].into_iter().collect());
    let (w, _clock) = warden(p);
    // A client sends the anonymous bucket's name as its key: it gets key limits (burst 20) on
    // its own subject, and the anonymous bucket of its cluster is untouched.
    let spoof = Request::new("anon:203.0.113.0/24", "", ip("203.0.113.1"));
    assert_eq!(count_allowed(&w, &spoof, 25), 20);
    assert_eq!(
        count_allowed(&w, &Request::anonymous(ip("203.0.113.9")), 5),
        2
    );
}

#[test]
fn set_policy_keeps_unchanged_limits_and_resets_changed_ones() {
    let mut p = bare();
    p.api_key.insert("a".into(), gcra(60, 60, 5));
    p.api_key.insert("b".into(), gcra(60, 60, 8));
    let (w, _clock) = warden(p.clone());
    let req = Request::new("k", "o", ip("10.0.0.1"));
    assert_eq!(count_allowed(&w, &req, 10), 5);
    // Raise `a` to 10: it starts fresh. `b` is unchanged and keeps its 5 used.
    p.api_key.insert("a".into(), gcra(60, 60, 10));
    w.set_policy(p.clone()).unwrap();
    assert_eq!(count_allowed(&w, &req, 10), 3);
    let Decision::Deny(d) = w.check(&req) else {
        panic!()
    };
    assert_eq!(d.reason(), "api_key:b");
    assert_eq!(w.policy(), p);
}

/// A concurrency limit whose maximum changes keeps its count of requests in flight: the
/// permits from before the swap still hold their slots and release into the new count, so
/// the new maximum is never exceeded. (Before the fix the count restarted at 0, and the old
/// permits' releases then freed slots the new ones held: 5 in flight under a maximum of 3.)
#[test]
fn a_changed_concurrency_maximum_keeps_the_requests_in_flight() {
    let mut p = bare();
    p.api_key
        .insert("inflight".into(), LimitConfig::Concurrency { max: 2 });
    let (w, _clock) = warden(p.clone());
    let req = Request::new("k", "o", ip("10.0.0.1"));
    let old: Vec<_> = (0..2).map(|_| w.check(&req)).collect();
    assert!(old.iter().all(Decision::is_allowed));
    p.api_key
        .insert("inflight".into(), LimitConfig::Concurrency { max: 3 });
    w.set_policy(p).unwrap();
    let mut held: Vec<_> = (0..5).map(|_| w.check(&req)).collect();
    held.retain(Decision::is_allowed);
    assert_eq!(held.len(), 1, "two of three slots are still held");
    drop(old);
    held.extend((0..5).map(|_| w.check(&req)));
    held.retain(Decision::is_allowed);
    assert_eq!(held.len(), 3, "in flight after the old permits released");
}

/// A concurrency limit that a swap adds counts the requests already in flight: every
/// permit releases all the concurrency limits of its subject when it ends, including one
/// added after it was issued, so the new limit starts from the old one's count. (Starting
/// at 0, the old permits' releases freed the new limit's slot and a second request got in.)
#[test]
fn a_concurrency_limit_added_by_a_swap_counts_the_requests_in_flight() {
    let mut p = bare();
    p.api_key
        .insert("a".into(), LimitConfig::Concurrency { max: 10 });
    let (w, _clock) = warden(p.clone());
    let req = Request::new("k", "o", ip("10.0.0.1"));
    let old: Vec<_> = (0..3).map(|_| w.check(&req)).collect();
    assert!(old.iter().all(Decision::is_allowed));
    p.api_key
        .insert("b".into(), LimitConfig::Concurrency { max: 1 });
    w.set_policy(p).unwrap();
    let Decision::Deny(d) = w.check(&req) else {
        panic!("three requests are in flight, b allows one")
    };
    assert_eq!(d.reason(), "api_key:b");
    drop(old);
    let held = w.check(&req);
    assert!(held.is_allowed());
    assert!(!w.check(&req).is_allowed(), "b's one slot is held");
    drop(held);
    assert!(w.check(&req).is_allowed());
}

/// A policy swap keeps the state of each table's shared overflow entry: a slot held in it
/// stays held, and its shared allowance is not reset. (Before the fix every swap replaced
/// the entry with a fresh one: 2 in flight under a maximum of 1.)
#[test]
fn a_policy_swap_keeps_the_overflow_entrys_state() {
    let mut p = bare();
    p.api_key
        .insert("inflight".into(), LimitConfig::Concurrency { max: 1 });
    p.api_key.insert("rpm".into(), gcra(60, 60, 3));
    p.table.max_subjects = 1;
    let (w, _clock) = warden(p.clone());
    assert!(w
        .check(&Request::new("a", "o", ip("10.0.0.1")))
        .is_allowed());
    // The table is full: "b" gets the overflow entry and holds its one slot.
    let held = w.check(&Request::new("b", "o", ip("10.0.0.1")));
    assert!(held.is_allowed());
    w.set_policy(p).unwrap();
    let again = (0..5)
        .filter(|i| {
            w.check(&Request::new(&format!("z{i}"), "o", ip("10.0.0.1")))
                .is_allowed()
        })
        .count();
    assert_eq!(again, 0, "the overflow slot is still held");
    drop(held);
    // Released into the migrated entry, whose allowance (3 a minute, 1 used by "b")
    // carried over: two more, each permit dropped at once.
    let after = (0..5)
        .filter(|i| {
            w.check(&Request::new(&format!("y{i}"), "o", ip("10.0.0.1")))
                .is_allowed()
        })
        .count();
    assert_eq!(after, 2);
}

/// A refund gives back only the part of the estimate that the bucket has not refilled since
/// the check. (Before the fix, three 1,000-token reservations held for a minute each and
/// then settled at 0 let a client draw 4,000 tokens at one instant from a 1,000-token
/// bucket.)
#[test]
fn settling_old_reservations_never_draws_more_than_a_burst() {
    let mut p = bare();
    p.api_key.insert("tpm".into(), tokens(1_000, 60));
    let (w, clock) = warden(p);
    let big = Request::new("k", "o", ip("10.0.0.1")).expected_output_tokens(1_000);
    let mut reservations = Vec::new();
    for _ in 0..3 {
        let Decision::Allow(permit) = w.check(&big) else {
            panic!("the bucket has refilled")
        };
        reservations.push(permit);
        clock.advance(Duration::from_secs(60));
    }
    let mut drawn = 0;
    loop {
        if w.check(&big).is_allowed() {
            drawn += 1_000;
        } else if let Some(permit) = reservations.pop() {
            permit.settle(0);
        } else {
            break;
        }
    }
    assert_eq!(drawn, 1_000);

    let remaining = |w: &ratewarden::Warden| {
        let probe = Request::new("k", "o", ip("10.0.0.1"));
        match w.check(&probe) {
            Decision::Allow(p) => p.rate_limit().tokens.unwrap().remaining,
            Decision::Deny(d) => d.rate_limit().tokens.map_or(0, |t| t.remaining),
        }
    };
    // Settled promptly, a refund is whole.
    clock.advance(Duration::from_secs(60));
    let Decision::Allow(permit) =
        w.check(&Request::new("k", "o", ip("10.0.0.1")).expected_output_tokens(600))
    else {
        panic!()
    };
    permit.settle(0);
    assert_eq!(remaining(&w), 1_000);
    // A reservation of 1,000 held 30 s, during which another request took 500: settled at
    // 0, it gives back the 500 the bucket has not refilled, which leaves exactly the other
    // request's 500 charged. (Refunding all 1,000 would leave a full bucket.)
    clock.advance(Duration::from_secs(60));
    let Decision::Allow(held) = w.check(&big) else {
        panic!()
    };
    clock.advance(Duration::from_secs(30));
    let Decision::Allow(other) =
        w.check(&Request::new("k", "o", ip("10.0.0.1")).expected_output_tokens(500))
    else {
        panic!()
    };
    drop(other);
    held.settle(0);
    assert_eq!(remaining(&w), 500);
    // The price of never refunding capacity twice: two reservations of 500 held together
    // for 30 s and settled at 0 get nothing back, since the bucket's 500 refilled units
    // cannot be told apart from either one's (an exact account would leave it full).
    clock.advance(Duration::from_secs(60));
    let half = Request::new("k", "o", ip("10.0.0.1")).expected_output_tokens(500);
    let (Decision::Allow(a), Decision::Allow(b)) = (w.check(&half), w.check(&half)) else {
        panic!()
    };
    clock.advance(Duration::from_secs(30));
    a.settle(0);
    b.settle(0);
    assert_eq!(remaining(&w), 500);
}

#[test]
fn permits_settle_into_migrated_state_after_a_policy_swap() {
    let mut p = bare();
    p.api_key.insert("tpm".into(), tokens(1_000, 60));
    let (w, _clock) = warden(p.clone());
    let req = Request::new("k", "o", ip("10.0.0.1")).expected_output_tokens(900);
    let Decision::Allow(permit) = w.check(&req) else {
        panic!()
    };
    p.org.insert("rpm".into(), gcra(60, 60, 10));
    w.set_policy(p).unwrap();
    // Touch the key so it migrates, then settle the old permit: the refund must land.
    assert!(!w.check(&req).is_allowed());
    permit.settle(0);
    assert!(w.check(&req).is_allowed());
}

#[test]
fn every_config_error_variant_names_its_path() {
    let err = Policy::from_toml_str(
        "[api_key.rpm]\nkind = \"gcra\"\nrate = 1\nperiod = \"1m\"\nburst = 1\nburts = 2\n",
    )
    .unwrap_err();
    match &err {
        ConfigError::Parse { path, message } => {
            assert_eq!(path, "api_key.rpm");
            assert!(message.contains("unknown field `burts`"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let err = Policy::from_json_str(r#"{"table":{"max_subjects":"many"}}"#).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { path, .. } if path == "table.max_subjects"),
        "{err}"
    );
    let err = Policy::from_toml_str("[cluster]\nv4_prefix = 24\nv6_prefx = 48\n").unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { path, .. } if path == "cluster.v6_prefx"),
        "{err}"
    );

    let zero = |f: &dyn Fn(&mut Policy), want: &str| {
        let mut p = Policy::llm_api();
        f(&mut p);
        let e = p.validate().unwrap_err();
        assert_eq!(e, ConfigError::Zero { path: want.into() }, "{e}");
        assert_eq!(e.to_string(), format!("{want}: must be greater than zero"));
    };
    zero(
        &|p| {
            p.api_key
                .insert("requests_per_minute".into(), gcra(0, 60, 1));
        },
        "api_key.requests_per_minute.rate",
    );
    zero(
        &|p| {
            p.org.insert("requests_per_minute".into(), gcra(1, 60, 0));
        },
        "org.requests_per_minute.burst",
    );
    zero(
        &|p| {
            p.ip_cluster.insert("x".into(), gcra(1, 0, 1));
        },
        "ip_cluster.x.period",
    );
    zero(
        &|p| {
            p.ip_cluster.insert(
                "w".into(),
                LimitConfig::SlidingWindow {
                    limit: 5,
                    window: Period(Duration::ZERO),
                },
            );
        },
        "ip_cluster.w.window",
    );
    zero(
        &|p| {
            p.api_key
                .insert("c".into(), LimitConfig::Concurrency { max: 0 });
        },
        "api_key.c.max",
    );
    zero(&|p| p.table.max_subjects = 0, "table.max_subjects");

    let invalid = |f: &dyn Fn(&mut Policy), want: &str| {
        let mut p = Policy::llm_api();
        f(&mut p);
        match p.validate().unwrap_err() {
            ConfigError::Invalid { path, reason } => {
                assert_eq!(path, want);
                assert!(!reason.is_empty());
            }
            other => panic!("{other:?}"),
        }
    };
    invalid(&|p| p.cluster.v4_prefix = 33, "cluster.v4_prefix");
    invalid(&|p| p.cluster.v6_prefix = 0, "cluster.v6_prefix");
    invalid(
        &|p| {
            p.api_key.insert(
                "w".into(),
                LimitConfig::SlidingWindow {
                    limit: 2_000_000,
                    window: Period(Duration::from_secs(1)),
                },
            );
        },
        "api_key.w.limit",
    );
    invalid(
        &|p| {
            p.api_key.insert("bad name".into(), gcra(1, 1, 1));
        },
        "api_key.bad name",
    );
    invalid(
        &|p| {
            p.api_key.insert("fast".into(), gcra(2_000_000_000, 1, 1));
        },
        "api_key.fast.rate",
    );
    let over = |kind, id: &str| Override {
        kind,
        id: id.into(),
        limits: Default::default(),
        exempt_behavior: false,
    };
    invalid(
        &|p| {
            p.overrides
                .push(over(SubjectKind::IpCluster, "10.0.0.0/16"))
        },
        "overrides[0].id",
    );
    invalid(
        &|p| {
            p.overrides
                .push(over(SubjectKind::IpCluster, "10.0.0.7/24"))
        },
        "overrides[0].id",
    );
    invalid(
        &|p| {
            p.overrides.push(over(SubjectKind::Org, "o"));
            p.overrides.push(over(SubjectKind::Org, "o"));
        },
        "overrides[1].id",
    );
    // A valid cluster override parses.
    let mut ok = Policy::llm_api();
    ok.overrides
        .push(over(SubjectKind::IpCluster, "10.0.0.0/24"));
    ok.validate().unwrap();
    // The builder reports the same errors.
    let mut p = Policy::llm_api();
    p.cluster.v4_prefix = 0;
    assert!(ratewarden::Warden::builder().policy(p).build().is_err());
}

#[test]
fn policies_round_trip_through_toml_and_json() {
    let p = Policy::llm_api();
    let toml_text = toml::to_string(&p).unwrap();
    assert_eq!(Policy::from_toml_str(&toml_text).unwrap(), p);
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(Policy::from_json_str(&json).unwrap(), p);
}

#[test]
fn idle_subjects_are_evicted_but_limited_ones_are_kept() {
    let mut p = Policy::llm_api_limits_only();
    p.table.idle_timeout = Period(Duration::from_secs(60));
    let (w, clock) = warden(p);
    let busy = Request::new("busy", "o1", ip("10.0.0.1"));
    count_allowed(&w, &busy, 20);
    // A key with a debt far in the future (tokens) stays, even when idle.
    let heavy = Request::new("heavy", "o2", ip("10.0.1.1")).expected_output_tokens(300_000);
    let Decision::Allow(pm) = w.check(&heavy) else {
        panic!()
    };
    pm.settle(30_000_000);
    assert!(w
        .check(&Request::new("light", "o3", ip("10.0.2.1")))
        .is_allowed());
    assert_eq!(w.stats().tracked, [3, 3, 3]);
    clock.advance(Duration::from_secs(61));
    let evicted = w.maintain();
    // busy, light, their orgs and all three clusters are back to fresh; heavy and its org
    // still carry the token debt.
    assert_eq!(evicted, 7);
    assert_eq!(w.stats().tracked, [1, 1, 0]);
    assert!(
        !w.check(&heavy).is_allowed(),
        "a limited subject must not come back fresh"
    );
}

#[test]
fn unique_key_flood_stays_within_the_cap() {
    let mut p = bare();
    p.api_key.insert("rpm".into(), gcra(120, 60, 20));
    p.table.max_subjects = 100_000;
    let (w, clock) = warden(p);
    let mut key = String::with_capacity(32);
    let mut allowed_overflow = 0u64;
    for i in 0..2_000_000u64 {
        use std::fmt::Write;
        key.clear();
        let _ = write!(key, "sk-proj-{i:022}");
        if i % 1000 == 0 {
            clock.advance(Duration::from_millis(1));
        }
        let allowed = w
            .check(&Request::new(&key, "", ip("10.9.0.1")))
            .is_allowed();
        if i < 100_000 {
            assert!(allowed, "tracked keys have their own bucket");
        } else if allowed {
            allowed_overflow += 1;
        }
        if i % 50_000 == 0 {
            assert!(w.stats().tracked[0] <= 100_000);
        }
    }
    let s = w.stats();
    assert_eq!(s.tracked[0], 100_000);
    assert_eq!(s.overflow_hits, 1_900_000);
    // Unseen keys share one strict bucket: its burst plus 2/s over the ~2 s of the flood.
    assert!(allowed_overflow <= 20 + 4, "{allowed_overflow}");
    assert!(allowed_overflow >= 20);
}

#[test]
fn a_settle_that_comes_first_after_a_policy_swap_keeps_the_key_override() {
    let mut p = bare();
    p.api_key.insert("rpm".into(), gcra(60, 60, 5));
    p.api_key.insert("tpm".into(), tokens(1_000_000, 60));
    p.overrides.push(Override {
        kind: SubjectKind::ApiKey,
        id: "sk-ent".into(),
        limits: [
            ("rpm".to_string(), gcra(600, 60, 50)),
            ("tpm".to_string(), tokens(1_000_000, 60)),
        ]
        .into_iter()
        .collect(),
        exempt_behavior: false,
    });
    let (w, _clock) = warden(p.clone());
    let req = Request::new("sk-ent", "", ip("10.0.0.1"))
        .input_tokens(10)
        .expected_output_tokens(10);
    let Decision::Allow(permit) = w.check(&req) else {
        panic!("first request")
    };
    // Another limit changes: a new generation, the key's entry is laid out afresh on its
    // next touch, which here is the settle.
    p.org.insert("rpm".into(), gcra(60, 60, 5));
    w.set_policy(p).unwrap();
    permit.settle(500);
    // Still the override's burst of 50 (one used), not the default's 5.
    assert_eq!(
        count_allowed(&w, &Request::new("sk-ent", "", ip("10.0.0.1")), 60),
        49
    );
}

#[test]
fn an_evicted_anonymous_bucket_comes_back_with_the_anonymous_limits_on_settle() {
    let mut p = bare();
    p.api_key.insert("rpm".into(), gcra(60, 60, 20));
    p.anonymous = Some(
        [
            ("anon_rpm".to_string(), gcra(60, 60, 20)),
            ("anon_tpm".to_string(), tokens(1_000, 60)),
        ]
        .into_iter()
        .collect(),
    );
    p.table.idle_timeout = Period(Duration::from_secs(120));
    let (w, clock) = warden(p);
    let req = Request::anonymous(ip("203.0.113.5"))
        .input_tokens(10)
        .expected_output_tokens(10);
    let Decision::Allow(permit) = w.check(&req) else {
        panic!("first request")
    };
    // A long stream: the bucket refills and is evicted while the response is running.
    clock.advance(Duration::from_secs(600));
    assert_eq!(w.maintain(), 1);
    // The settle re-creates it with a debt of 990 tokens against the anonymous 1,000.
    permit.settle(1_000);
    let Decision::Deny(d) = w.check(&req) else {
        panic!("the debt is charged to the anonymous bucket")
    };
    assert_eq!(d.reason(), "api_key:anon_tpm");
}
