//! Detection quality on the simulator's public mix: every benign scenario (B1–B5) and every
//! extraction attack (E1–E6) at their default parameters, checked end to end through a warden
//! with the `llm_api` preset, once limits-only (the baseline) and once with the behavioural
//! layer, then evaluated. The bars are the issue's:
//!
//! - attack output-token yield at least 90% lower than limits-only;
//! - at most 0.1% of benign requests denied;
//! - no benign actor escalated to `throttle` or higher;
//! - every attack scenario escalated (with a median time to detect).
//!
//! One simulated hour per seed (about 275,000 requests, replayed twice), as in the issue and the
//! `demo` example; a few seconds in the test profile. Run
//! `cargo test --test detection -- --nocapture` to see the tables.

#[path = "../examples/support/decimal.rs"]
mod decimal;
#[path = "../examples/support/eval.rs"]
mod eval;
#[path = "../examples/support/pipeline.rs"]
mod pipeline;
#[path = "../examples/support/replay.rs"]
mod replay;
#[path = "../examples/support/sim.rs"]
mod sim;

use ratewarden::Policy;

const MINUTES: u64 = 60;

fn check_bars(seed: u64) {
    let cfg = sim::SimConfig::public_mix(seed, MINUTES * 60_000);
    let run = pipeline::run(&cfg, Policy::llm_api()).expect("pipeline runs");
    let report = &run.report;
    println!("seed {seed}, {MINUTES} simulated minutes:\n{report}");
    let s = &report.summary;

    let reduction = s.attack_yield_reduction.expect("a limits-only baseline");
    assert!(
        reduction >= 0.90,
        "seed {seed}: attack yield reduced by only {:.1}%",
        100.0 * reduction
    );
    assert!(
        s.benign_denied_pct() <= 0.1,
        "seed {seed}: {:.3}% of benign requests denied",
        s.benign_denied_pct()
    );
    assert!(
        s.benign_escalated.is_empty(),
        "seed {seed}: benign actors escalated to throttle or higher: {:?}",
        s.benign_escalated
    );
    let attacks: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.role == eval::EvalRole::Attack)
        .collect();
    assert_eq!(attacks.len(), 6, "every attack scenario is in the mix");
    for row in attacks {
        assert!(
            row.escalated_actors > 0 && row.median_escalation_ms.is_some(),
            "seed {seed}: attack scenario {} never escalated",
            row.scenario
        );
    }
}

#[test]
fn public_mix_meets_the_bars() {
    check_bars(1);
}

#[test]
fn public_mix_meets_the_bars_other_seed() {
    check_bars(2);
}

/// A host that sends no prompt features (no fingerprint, SimHash or template): the coverage
/// class cannot be observed, so subjects need one evidence class fewer
/// (`levels.featureless_min_evidence_classes`). On the public mix with every feature removed,
/// no benign request is denied and no benign actor escalated, and E1 (one key pinned at its
/// limit with long answers) is still throttled on its volume. The coordinated campaigns are
/// mostly missed without features (see the README's probes), so there is no yield bar here.
#[test]
fn without_prompt_features_benign_stays_clean_and_a_pinned_key_is_caught() {
    let cfg = sim::SimConfig::public_mix(1, MINUTES * 60_000);
    let mut records = sim::generate(&cfg);
    for (r, _) in &mut records {
        r.prompt_fp = None;
        r.prompt_simhash = None;
        r.template_fp = None;
    }
    let run = pipeline::run_records(&records, cfg.seed, Policy::llm_api(), Default::default())
        .expect("pipeline runs");
    let report = &run.report;
    println!("seed 1 without prompt features:\n{report}");
    let reduction = benign_clean_and_caught(report, &["E1"]);
    assert!(reduction > 0.1, "attack yield reduced by {reduction}");
}

/// Asserts that no benign request was denied and no benign actor escalated, and that every
/// actor of each named scenario was escalated; returns the attack yield reduction.
fn benign_clean_and_caught(report: &eval::Report, scenarios: &[&str]) -> f64 {
    let s = &report.summary;
    assert_eq!(s.benign_denied_pct(), 0.0, "benign requests denied");
    assert!(
        s.benign_escalated.is_empty(),
        "benign actors escalated: {:?}",
        s.benign_escalated
    );
    for name in scenarios {
        let row = report
            .rows
            .iter()
            .find(|r| r.scenario == *name)
            .expect("scenario in the mix");
        assert!(
            row.escalated_actors == row.actors && row.actors > 0,
            "{name}: {} of {} actors escalated",
            row.escalated_actors,
            row.actors
        );
    }
    s.attack_yield_reduction.expect("a limits-only baseline")
}

/// Key rotation (`reshape.py --rotate-keys 20`): every attack key is replaced by a fresh key
/// of the same org every 20 of its requests, too soon for any key to build evidence of its
/// own. Per distinct key, E1's and E5's orgs then look like a customer's many modest keys;
/// per key sending at once (one), they draw a single key's extraction volume. This fails if
/// a group's output is shared by its distinct keys (before the eleventh session E1 and E5
/// were never escalated and the yield reduction was 67.2%).
#[test]
fn keys_rotated_every_20_requests_are_caught_through_their_org() {
    use std::collections::HashMap;
    let cfg = sim::SimConfig::public_mix(1, MINUTES * 60_000);
    let mut records = sim::generate(&cfg);
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (r, t) in &mut records {
        if t.role == sim::Role::Attack {
            let n = seen.entry(r.api_key.clone()).or_default();
            r.api_key = format!("{}~{}", r.api_key, *n / 20);
            *n += 1;
        }
    }
    let run = pipeline::run_records(&records, cfg.seed, Policy::llm_api(), Default::default())
        .expect("pipeline runs");
    let report = &run.report;
    println!("seed 1, attack keys rotated every 20 requests:\n{report}");
    let reduction = benign_clean_and_caught(report, &["E1", "E5"]);
    assert!(reduction > 0.8, "attack yield reduced by {reduction}");
}

/// The org context of `template_sweep`, end to end through a warden: the same service key
/// (one template, every prompt new, ~780-token answers to ~330-token prompts, 34 requests a
/// minute: output volume at about half strength) is throttled when the rest of its org does
/// the same, and only watched when it is one service among many of an org whose traffic as a
/// whole reads more than it writes and whose other keys are modest. This fails if the org's
/// published shape does not reach its key (through the org slot's cached word), or if the
/// key's sweep ignores it.
#[test]
fn a_service_key_of_a_diversified_org_is_watched_not_throttled() {
    use ratewarden::{Decision, Level, Request, SubjectId};
    use std::net::{IpAddr, Ipv4Addr};

    let (clock, w) = preset_warden();
    // (key, org, period ms, template, input, output, simhash base)
    type Actor = (String, &'static str, u64, u64, u64, u64, u64);
    let mut actors: Vec<Actor> = Vec::new();
    let sweeper = |key: &str, org| (key.to_string(), org, 1_765, 0xA11CE, 330, 780, 0xF0F0_1234);
    // Enterprise: the service key, and ten keys that read long documents for short answers.
    actors.push(sweeper("svc-enterprise", "enterprise"));
    for i in 0..10_u64 {
        actors.push((
            format!("quiet-{i}"),
            "enterprise",
            6_000 + 37 * i,
            0xB0B0 + i,
            1_200,
            200,
            // Each service its own family: SimHashes far apart.
            (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
    }
    // Campaign: the same service key, and three more keys sweeping the same template.
    actors.push(sweeper("svc-campaign", "campaign"));
    for i in 0..3 {
        actors.push((
            format!("sweep-{i}"),
            "campaign",
            1_765 + 13 * i,
            0xA11CE,
            330,
            780,
            0xF0F0_1234,
        ));
    }

    let mut n = 0_u64;
    let mut next: Vec<u64> = (0..actors.len() as u64).map(|a| 101 * a).collect();
    for t in 0..15 * 60_000_u64 {
        for (a, (key, org, period, template, input, output, sim)) in actors.iter().enumerate() {
            if next[a] != t {
                continue;
            }
            // Jittered gaps (half to one and a half periods), as services are not
            // machine-regular; `regular_timing` still adds a little (about 0.2) on both
            // service keys, which the margin check below allows for.
            let jitter = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % period;
            next[a] += period / 2 + jitter;
            clock.set_millis(t);
            n += 1;
            let ip = IpAddr::V4(Ipv4Addr::new(203, 0, (a / 4) as u8, 10 + a as u8));
            let req = Request::new(key, org, ip)
                .input_tokens(*input)
                .expected_output_tokens(*output)
                .prompt_fp(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .prompt_simhash(sim ^ (1 << (n % 5)))
                .template_fp(*template);
            if let Decision::Allow(p) = w.check(&req) {
                p.settle(*output);
            }
        }
    }
    let report = |key: &str| w.inspect(&SubjectId::api_key(key)).unwrap();
    let sweep = |key: &str| {
        report(key)
            .reasons
            .iter()
            .find(|r| r.detector == "template_sweep")
            .map(|r| r.contribution)
    };
    let (campaign, enterprise) = (report("svc-campaign"), report("svc-enterprise"));
    assert!(campaign.level >= Level::Throttle, "{campaign:?}");
    assert_eq!(enterprise.level, Level::Watch, "{enterprise:?}");
    // The rule itself: the sweep counts in full in the campaign, at half in the enterprise,
    // and the enterprise key stays clear of the throttle mark (1.5) by more than noise.
    assert_eq!(sweep("svc-campaign"), Some(1.0));
    assert_eq!(sweep("svc-enterprise"), Some(0.5));
    assert!(enterprise.score < 1.4, "{enterprise:?}");
}

/// The benign side of key rotation, end to end: an org with one busy, stable service key
/// (diverse prompts, long answers: output volume, but no coverage) and a stream of occasional
/// keys that each send one request and never return (a sign-up funnel, a CI fleet minting
/// keys). Most of its keys are new in every window, as in a rotating campaign, but most of
/// its requests come from the stable key, so the org is judged as a group: its output per
/// distinct key is small and it is not throttled, and no occasional key is refused. This
/// fails if transience is judged by the keys alone (the org's output is then judged as one
/// key's, and with `key_fanout` the org is throttled).
#[test]
fn one_busy_stable_key_with_occasional_new_keys_is_not_rotation() {
    use ratewarden::{Decision, Level, Request, SubjectId};
    use std::net::{IpAddr, Ipv4Addr};

    let (clock, w) = preset_warden();
    let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let (mut n, mut refused) = (0_u64, 0_u32);
    // 20 minutes: the busy key every 1.2 s (50 requests/min, 1,600-token answers to
    // 300-token prompts: 80k output tokens/min), a new key every 10 s (one request in nine).
    for t in (0..20 * 60_000_u64).step_by(100) {
        clock.set_millis(t);
        let key = if t % 1_200 == 0 {
            "svc-busy".to_string()
        } else if t % 10_000 == 600 {
            format!("new-{t}")
        } else {
            continue;
        };
        n += 1;
        let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let req = Request::new(&key, "platform", ip)
            .input_tokens(300)
            .expected_output_tokens(1_600)
            .prompt_fp(h)
            .prompt_simhash(h.rotate_left(17));
        match w.check(&req) {
            Decision::Allow(p) => p.settle(1_600),
            Decision::Deny(_) if key != "svc-busy" => refused += 1,
            Decision::Deny(_) => {}
        }
    }
    let org = w.inspect(&SubjectId::org("platform")).unwrap();
    assert!(org.level < Level::Throttle, "{org:?}");
    assert_eq!(refused, 0, "occasional keys refused; org: {org:?}");
}

/// A warden with the `llm_api` preset on a manual clock, with a fixed hashing seed.
fn preset_warden() -> (ratewarden::ManualClock, ratewarden::Warden) {
    let clock = ratewarden::ManualClock::new();
    let w = ratewarden::Warden::builder()
        .policy(Policy::llm_api())
        .clock(clock.clone())
        .seed(7)
        .build()
        .unwrap();
    (clock, w)
}
