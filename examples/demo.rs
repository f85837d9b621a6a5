//! The whole loop in memory: simulate the public traffic mix (benign B1–B5 and extraction
//! attacks E1–E6), check every request through a warden with the `llm_api` preset, once
//! limits-only and once with the behavioural layer, and print the evaluation.
//!
//! ```text
//! cargo run --release --example demo [-- --seed N --minutes M]
//! ```

#[path = "support/decimal.rs"]
mod decimal;
#[path = "support/eval.rs"]
mod eval;
#[path = "support/pipeline.rs"]
mod pipeline;
#[path = "support/replay.rs"]
mod replay;
#[path = "support/sim.rs"]
mod sim;

use std::process::ExitCode;

use ratewarden::Policy;

fn main() -> ExitCode {
    let mut seed = 1u64;
    let mut minutes = 60u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), v) {
            ("--seed", Some(v)) => seed = v,
            ("--minutes", Some(v)) if v > 0 => minutes = v,
            _ => {
                eprintln!("usage: demo [--seed N] [--minutes M]");
                return ExitCode::from(2);
            }
        }
    }
    let cfg = sim::SimConfig::public_mix(seed, minutes * 60_000);
    println!(
        "ratewarden demo: public mix, seed {seed}, {minutes} simulated minutes, llm_api preset"
    );
    match pipeline::run(&cfg, Policy::llm_api()) {
        Ok(run) => {
            println!(
                "{} requests simulated in {:.2} s; replayed at {:.0} req/s (limits only) and {:.0} req/s (with behaviour)\n",
                run.requests,
                run.simulate.as_secs_f64(),
                run.limits_only.per_second(),
                run.with_behavior.per_second()
            );
            println!("{}", run.report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
