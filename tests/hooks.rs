//! Escalation hooks and the event queue: contents, re-entrancy, panics, a full queue.

mod common;
use common::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ratewarden::{
    ControlError, Decision, EscalationEvent, Level, ManualClock, Override, Policy, Request,
    SubjectId, SubjectKind, Warden,
};

type HookFn = Box<dyn Fn(&EscalationEvent) + Send + Sync>;

fn build(clock: &ManualClock, hooks: Vec<HookFn>, capacity: usize) -> Warden {
    let mut b = Warden::builder()
        .policy(Policy::llm_api())
        .clock(clock.clone())
        .event_capacity(capacity);
    for h in hooks {
        b = b.hook(move |e: &EscalationEvent| h(e));
    }
    b.build().unwrap()
}

#[test]
fn manual_levels_emit_events_with_their_contents() {
    let clock = ManualClock::new();
    clock.set_millis(5_000);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let w = build(
        &clock,
        vec![Box::new(move |e| s2.lock().unwrap().push(e.clone()))],
        16,
    );
    let key = SubjectId::api_key("sk-1");
    w.set_level(&key, Level::Challenge, Some(Duration::from_secs(30)))
        .unwrap();
    let req = Request::new("sk-1", "org-1", ip("192.0.2.1"));
    let Decision::Deny(d) = w.check(&req) else {
        panic!()
    };
    assert_eq!(d.reason(), "behavior:challenge");
    assert_eq!(d.behavior(), Some(Level::Challenge));
    assert_eq!(d.retry_after(), None);
    assert!(w.clear_level(&key).unwrap());
    assert!(w.check(&req).is_allowed());

    let events = w.drain_events();
    assert_eq!(events, *seen.lock().unwrap());
    assert_eq!(events.len(), 2);
    let e = &events[0];
    assert_eq!(
        (e.subject_kind, e.subject.as_str()),
        (SubjectKind::ApiKey, "sk-1")
    );
    assert_eq!(
        (e.from, e.to, e.manual, e.shadow, e.at_ms),
        (Level::Normal, Level::Challenge, true, false, 5_000)
    );
    let json = serde_json::to_value(e).unwrap();
    assert_eq!(json["subject_kind"], "api_key");
    assert_eq!(json["to"], "challenge");
    let back: EscalationEvent = serde_json::from_value(json).unwrap();
    assert_eq!(&back, e);
    assert_eq!(
        (events[1].from, events[1].to),
        (Level::Challenge, Level::Normal)
    );
    assert!(w.drain_events().is_empty());
}

#[test]
fn manual_level_expires_after_its_ttl_and_block_is_a_denial() {
    let clock = ManualClock::new();
    let w = build(&clock, vec![], 16);
    let org = SubjectId::org("org-x");
    w.set_level(&org, Level::Block, Some(Duration::from_secs(10)))
        .unwrap();
    let req = Request::new("any-key", "org-x", ip("192.0.2.1"));
    let Decision::Deny(d) = w.check(&req) else {
        panic!()
    };
    assert_eq!(
        (d.reason(), d.subject_kind()),
        ("behavior:block", SubjectKind::Org)
    );
    assert_eq!(w.stats().denied_behavior, 1);
    clock.advance(Duration::from_secs(10));
    assert!(w.check(&req).is_allowed());
}

#[test]
fn throttle_scales_the_subjects_limits() {
    let clock = ManualClock::new();
    let w = build(&clock, vec![], 16);
    w.set_level(&SubjectId::api_key("slow"), Level::Throttle, None)
        .unwrap();
    let req = Request::new("slow", "o", ip("192.0.2.1"));
    // Burst 20 at factor 0.25 (each request costs 4): 5 fit.
    let n = (0..20).filter(|_| w.check(&req).is_allowed()).count();
    assert_eq!(n, 5);
    let normal = Request::new("fast", "o2", ip("192.0.3.1"));
    assert_eq!(
        (0..25).filter(|_| w.check(&normal).is_allowed()).count(),
        20
    );
}

#[test]
fn exempt_subjects_ignore_computed_levels_but_not_manual_ones() {
    let clock = ManualClock::new();
    let w = build(&clock, vec![], 16);
    let key = SubjectId::api_key("batch");
    w.set_exempt(&key, true).unwrap();
    assert!(w.inspect(&key).unwrap().exempt);
    w.set_level(&key, Level::Block, None).unwrap();
    assert!(!w
        .check(&Request::new("batch", "o", ip("192.0.2.1")))
        .is_allowed());
}

#[test]
fn cluster_ids_are_checked_and_disabled_behaviour_is_an_error() {
    let clock = ManualClock::new();
    let w = build(&clock, vec![], 16);
    let bad = SubjectId {
        kind: SubjectKind::IpCluster,
        id: "10.0.0.0/16".into(),
    };
    assert!(matches!(
        w.set_level(&bad, Level::Block, None),
        Err(ControlError::BadCluster(_))
    ));
    let good = SubjectId::ip_cluster(ratewarden::IpCluster::new(ip("10.0.0.9"), 24, 48));
    w.set_level(&good, Level::Block, None).unwrap();
    assert!(!w
        .check(&Request::new("k", "o", ip("10.0.0.200")))
        .is_allowed());
    assert!(w
        .check(&Request::new("k", "o", ip("10.0.1.1")))
        .is_allowed());

    let (lo, _) = warden(Policy::llm_api_limits_only());
    assert_eq!(
        lo.set_level(&SubjectId::api_key("k"), Level::Block, None),
        Err(ControlError::BehaviorDisabled)
    );
}

/// A level or an exemption for a subject that cannot be tracked (its table is full) is an
/// error, not a silent no-op: before, `set_level(.., Block, ..)` returned `Ok` and the key
/// was still served. A tracked subject of the same full table can still be blocked.
#[test]
fn controls_on_a_full_table_say_so() {
    let mut p = Policy::llm_api();
    p.table.max_subjects = 2;
    let (w, _clock) = warden(p);
    for k in ["a", "b"] {
        assert!(w.check(&Request::new(k, "o", ip("10.0.0.1"))).is_allowed());
    }
    let bad = SubjectId::api_key("sk-bad");
    assert_eq!(
        w.set_level(&bad, Level::Block, None),
        Err(ControlError::TableFull("sk-bad".into()))
    );
    assert_eq!(
        w.set_exempt(&bad, true),
        Err(ControlError::TableFull("sk-bad".into()))
    );
    // Nothing to do is not an error: an untracked subject is at normal, and not exempt.
    w.set_level(&bad, Level::Normal, None).unwrap();
    w.set_exempt(&bad, false).unwrap();
    w.set_level(&SubjectId::api_key("a"), Level::Block, None)
        .unwrap();
    assert!(!w
        .check(&Request::new("a", "o", ip("10.0.0.1")))
        .is_allowed());
}

/// A request refused because its org is blocked says nothing about its key's own limits:
/// the key gets no `pinned` evidence from it (it used to get pressure 1 on every such
/// request, and reached `watch` on `pinned` and `regular_timing` alone).
#[test]
fn a_behaviour_denial_is_no_pinned_evidence_for_the_other_subjects() {
    let (w, clock) = warden(Policy::llm_api());
    w.set_level(
        &SubjectId::org("o"),
        Level::Block,
        Some(Duration::from_secs(120)),
    )
    .unwrap();
    let req = Request::new("k", "o", ip("10.0.0.1"));
    for _ in 0..40 {
        assert!(!w.check(&req).is_allowed());
        clock.advance(Duration::from_secs(2));
    }
    let r = w.inspect(&SubjectId::api_key("k")).unwrap();
    assert!(
        r.reasons.iter().all(|x| x.detector != "pinned"),
        "{:?}",
        r.reasons
    );
}

#[test]
fn a_hook_that_reenters_the_warden_does_not_deadlock() {
    let clock = ManualClock::new();
    let cell: Arc<OnceLock<Arc<Warden>>> = Arc::new(OnceLock::new());
    let c2 = cell.clone();
    let inner_checks = Arc::new(AtomicUsize::new(0));
    let n2 = inner_checks.clone();
    let w = Arc::new(build(
        &clock,
        vec![Box::new(move |e: &EscalationEvent| {
            let w = c2.get().expect("set");
            // Re-enter: a check on the same subject, a stats read, an inspect, a manual change.
            let _ = w.check(&Request::new(&e.subject, "org-r", ip("192.0.2.1")));
            let _ = w.stats();
            let _ = w.inspect(&SubjectId::api_key(e.subject.clone()));
            if e.to == Level::Watch {
                let _ = w.set_level(&SubjectId::api_key(e.subject.clone()), Level::Normal, None);
            }
            n2.fetch_add(1, Ordering::SeqCst);
        })],
        64,
    ));
    let _ = cell.set(w.clone());
    w.set_level(&SubjectId::api_key("re"), Level::Watch, None)
        .unwrap();
    // The hook ran, re-entered, and its own set_level produced a second event.
    assert_eq!(inner_checks.load(Ordering::SeqCst), 2);
    assert_eq!(w.drain_events().len(), 2);
}

#[test]
fn a_panicking_hook_is_disabled_counted_and_the_warden_keeps_serving() {
    let clock = ManualClock::new();
    let good = Arc::new(AtomicUsize::new(0));
    let g2 = good.clone();
    let w = build(
        &clock,
        vec![
            Box::new(|_e: &EscalationEvent| panic!("hook bug")),
            Box::new(move |_e: &EscalationEvent| {
                g2.fetch_add(1, Ordering::SeqCst);
            }),
        ],
        16,
    );
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (i, l) in [Level::Watch, Level::Throttle, Level::Watch]
        .into_iter()
        .enumerate()
    {
        w.set_level(&SubjectId::api_key(format!("k{i}")), l, None)
            .unwrap();
    }
    std::panic::set_hook(prev);
    assert_eq!(w.stats().hooks_panicked, 1);
    assert_eq!(good.load(Ordering::SeqCst), 3);
    assert_eq!(w.drain_events().len(), 3);
    assert!(w
        .check(&Request::new("k9", "o", ip("192.0.2.1")))
        .is_allowed());
}

#[test]
fn a_full_event_queue_drops_and_counts_without_blocking() {
    let clock = ManualClock::new();
    let w = build(&clock, vec![], 4);
    for i in 0..10 {
        w.set_level(&SubjectId::api_key(format!("k{i}")), Level::Watch, None)
            .unwrap();
    }
    assert_eq!(w.stats().events_dropped, 6);
    let events = w.drain_events();
    assert_eq!(events.len(), 4);
    assert_eq!(events[0].subject, "k0");
    w.set_level(&SubjectId::api_key("later"), Level::Watch, None)
        .unwrap();
    assert_eq!(w.drain_events().len(), 1);
}

#[test]
fn the_anonymous_key_of_a_cluster_is_controlled_by_its_event_name() {
    let clock = ManualClock::new();
    let w = build(&clock, Vec::new(), 16);
    let anon = Request::anonymous("203.0.113.9".parse().unwrap());
    assert!(w.check(&anon).is_allowed());
    w.set_level(
        &SubjectId::api_key("anon:203.0.113.0/24"),
        Level::Block,
        None,
    )
    .unwrap();
    let Decision::Deny(d) = w.check(&anon) else {
        panic!("the anonymous bucket is blocked")
    };
    assert_eq!(d.reason(), "behavior:block");
    // A real key with that name is another subject.
    let spoof = Request::new("anon:203.0.113.0/24", "", "198.51.100.1".parse().unwrap());
    assert!(w.check(&spoof).is_allowed());
}

/// Whether `key` is tracked with behavioural state, and exempt, after one more request.
fn touch_and_inspect(w: &Warden, key: &str) -> Option<bool> {
    let _ = w.check(&Request::new(key, "org-1", ip("198.51.100.7")));
    w.inspect(&SubjectId::api_key(key)).map(|r| r.exempt)
}

fn exempt_override(key: &str) -> Override {
    Override {
        kind: SubjectKind::ApiKey,
        id: key.into(),
        limits: Default::default(),
        exempt_behavior: true,
    }
}

#[test]
fn policy_exemptions_reach_subjects_already_tracked() {
    let (w, _clock) = warden(Policy::llm_api());
    assert_eq!(touch_and_inspect(&w, "sk-batch"), Some(false));
    assert_eq!(touch_and_inspect(&w, "sk-host"), Some(false));
    w.set_exempt(&SubjectId::api_key("sk-host"), true).unwrap();
    // The policy exempts sk-batch: it applies on the subject's next request.
    let mut p = Policy::llm_api();
    p.overrides.push(exempt_override("sk-batch"));
    w.set_policy(p.clone()).unwrap();
    assert_eq!(touch_and_inspect(&w, "sk-batch"), Some(true));
    // A swap that leaves a subject's policy exemption alone keeps the host's exemption.
    assert_eq!(touch_and_inspect(&w, "sk-host"), Some(true));
    p.org.clear();
    w.set_policy(p).unwrap();
    assert_eq!(touch_and_inspect(&w, "sk-batch"), Some(true));
    assert_eq!(touch_and_inspect(&w, "sk-host"), Some(true));
    // The policy drops the exemption.
    w.set_policy(Policy::llm_api()).unwrap();
    assert_eq!(touch_and_inspect(&w, "sk-batch"), Some(false));
    assert_eq!(touch_and_inspect(&w, "sk-host"), Some(true));
}

#[test]
fn switching_behaviour_on_at_runtime_tracks_subjects_already_seen() {
    let mut off = Policy::llm_api();
    off.behavior.enabled = false;
    let (w, _clock) = warden(off.clone());
    let _ = w.check(&Request::new("sk-early", "org-1", ip("198.51.100.7")));
    w.set_policy(Policy::llm_api()).unwrap();
    assert_eq!(touch_and_inspect(&w, "sk-early"), Some(false));
    assert_eq!(touch_and_inspect(&w, "sk-late"), Some(false));
    // Off again: checks go on and the state is freed (the host's exemption with it), so the
    // layer switched back on starts afresh.
    w.set_exempt(&SubjectId::api_key("sk-early"), true).unwrap();
    assert_eq!(touch_and_inspect(&w, "sk-early"), Some(true));
    w.set_policy(off).unwrap();
    assert!(w
        .check(&Request::new("sk-early", "org-1", ip("198.51.100.7")))
        .is_allowed());
    assert!(w.inspect(&SubjectId::api_key("sk-early")).is_none());
    w.set_policy(Policy::llm_api()).unwrap();
    assert_eq!(touch_and_inspect(&w, "sk-early"), Some(false));
}
