//! Scores a replay of a simulated trace against its truth labels.
//!
//! ```text
//! cargo run --release --example evaluate -- --trace trace.jsonl --truth truth.jsonl \
//!     --decisions decisions.jsonl [--baseline decisions_limits_only.jsonl]
//! ```

#[path = "support/eval.rs"]
mod eval;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: evaluate --trace T.jsonl --truth TRUTH.jsonl --decisions D.jsonl [--baseline B.jsonl]

Prints, per scenario: actors, requests, % denied with the behavioural layer (D) and
limits-only (B), output tokens served with behaviour relative to limits-only, and how many
actors were escalated to throttle or higher with the median time from their first request;
then one summary line (attack yield reduction, benign denials, benign escalations).";

struct Args {
    trace: PathBuf,
    truth: PathBuf,
    decisions: PathBuf,
    baseline: Option<PathBuf>,
}

fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    let (mut trace, mut truth, mut decisions, mut baseline) = (None, None, None, None);
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{flag} needs a file name (see --help)"))
        };
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--trace" => trace = Some(value()?),
            "--truth" => truth = Some(value()?),
            "--decisions" => decisions = Some(value()?),
            "--baseline" => baseline = Some(value()?),
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    let need = |v: Option<PathBuf>, name: &str| {
        v.ok_or_else(|| format!("{name} is required (see --help)"))
    };
    Ok(Some(Args {
        trace: need(trace, "--trace")?,
        truth: need(truth, "--truth")?,
        decisions: need(decisions, "--decisions")?,
        baseline,
    }))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evaluate: {e}");
            return ExitCode::from(2);
        }
    };
    match eval::evaluate_files(
        &args.trace,
        &args.truth,
        &args.decisions,
        args.baseline.as_deref(),
    ) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("evaluate: {e}");
            ExitCode::FAILURE
        }
    }
}
