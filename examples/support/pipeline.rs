//! Simulate → check every request through a warden → evaluate, all in memory. Shared by
//! `examples/demo.rs` and the detection-quality tests. Include it next to its siblings:
//!
//! ```ignore
//! #[path = "support/sim.rs"] mod sim;
//! #[path = "support/eval.rs"] mod eval;
//! #[path = "support/replay.rs"] mod replay;
//! #[path = "support/pipeline.rs"] mod pipeline;
//! ```

#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use ratewarden::Policy;

use super::eval;
use super::replay::{self, Options, Parts, Replayer, Summary};
use super::sim::{self, Role, SimConfig, TraceRecord};

/// Runs `records` through a fresh warden with `policy` and hashing seed `seed` (so that a
/// run is repeatable); returns the decisions and summary.
pub fn run_policy(
    records: &[(TraceRecord, sim::TruthRecord)],
    policy: Policy,
    seed: u64,
) -> (Vec<eval::EvalDecision>, Summary) {
    let (warden, clock) = replay::replay_warden(policy, Some(seed));
    let mut r = Replayer::new(&warden, clock, Options::quiet());
    let start = Instant::now();
    let mut out = Vec::with_capacity(records.len());
    for (i, (rec, _)) in records.iter().enumerate() {
        let ip = rec.ip_addr().expect("simulated addresses parse");
        let parts = Parts {
            ts_ms: rec.ts_ms,
            api_key: &rec.api_key,
            org: &rec.org,
            ip,
            input_tokens: rec.input_tokens,
            output_tokens: rec.output_tokens,
            model: rec.model.as_deref(),
            prompt_fp: rec.prompt_fp,
            prompt_simhash: rec.prompt_simhash,
            template_fp: rec.template_fp,
            logprobs: rec.logprobs,
        };
        let o = r.apply_parts(i as u64, &parts);
        let level = eval::Level::parse(o.level.as_str()).unwrap_or(eval::Level::Normal);
        let mut d = eval::EvalDecision::new(i as u64, o.allowed, level);
        d.reason = o.reason;
        d.retry_after_ms = o.retry_after_ms;
        out.push(d);
    }
    r.summary.elapsed = start.elapsed();
    (out, r.summary.clone())
}

/// The outcome of one end-to-end run.
#[derive(Debug)]
pub struct Run {
    pub report: eval::Report,
    pub requests: usize,
    pub simulate: Duration,
    pub with_behavior: Summary,
    pub limits_only: Summary,
}

/// Simulates `cfg`, replays it with `policy` and with the same policy limits-only, and
/// evaluates. The wardens' hashing seed is the simulation's seed, so the same `cfg` gives
/// the same report.
pub fn run(cfg: &SimConfig, policy: Policy) -> Result<Run, String> {
    let t = Instant::now();
    let records = sim::generate(cfg);
    run_records(&records, cfg.seed, policy, t.elapsed())
}

/// [`run`] on records already simulated (and perhaps reshaped), with wardens seeded by `seed`;
/// `simulate` is how long the simulation took, for the report.
pub fn run_records(
    records: &[(TraceRecord, sim::TruthRecord)],
    seed: u64,
    policy: Policy,
    simulate: Duration,
) -> Result<Run, String> {
    let mut limits = policy.clone();
    limits.behavior.enabled = false;
    let (base, limits_only) = run_policy(records, limits, seed);
    let (dec, with_behavior) = run_policy(records, policy, seed);
    let trace: Vec<_> = records
        .iter()
        .map(|(r, _)| eval::EvalRequest::new(r.ts_ms, r.output_tokens))
        .collect();
    let truth: Vec<_> = records
        .iter()
        .map(|(_, t)| {
            eval::EvalTruth::new(
                t.i,
                t.actor.clone(),
                t.scenario.name(),
                eval::EvalRole::from_attack(t.role == Role::Attack),
            )
        })
        .collect();
    let report = eval::evaluate(&trace, &truth, &dec, Some(&base)).map_err(|e| e.to_string())?;
    Ok(Run {
        report,
        requests: records.len(),
        simulate,
        with_behavior,
        limits_only,
    })
}
