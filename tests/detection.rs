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
