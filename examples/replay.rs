//! Replays a JSONL trace through a warden and writes one decision per line.
//!
//! ```text
//! cargo run --release --example replay -- [--policy FILE] [--limits-only] [--shadow] \
//!     [--expected-output N] [--serial] [--seed N] [--quiet] [--explain SUBJECT].. < trace.jsonl > decisions.jsonl
//!
//! `--explain SUBJECT` (repeatable; `api_key:<key>`, `org:<org>` or
//! `ip_cluster:<network>/<prefix>`) prints, after the summary, one JSON line per subject on
//! stderr: its level, score and the evidence it is scored on at the end of the trace.
//!
//! `--seed N` fixes the warden's hashing seed, so that runs with the behavioural layer on
//! give the same decisions (by default the seed is random, and runs may differ by a decision
//! or two).
//!
//! By default a helper thread parses batches of lines while the main thread decides
//! (`--serial`: one thread; the output is byte for byte the same).
//! ```
//!
//! The summary (requests, allowed, denied by reason, decisions by level, malformed lines,
//! throughput) goes to stderr.

#[path = "support/decimal.rs"]
mod decimal;
#[path = "support/replay.rs"]
mod replay;

use std::io::{BufReader, BufWriter};
use std::process::ExitCode;

use ratewarden::{ManualClock, Policy, Warden};

const USAGE: &str = "usage: replay [--policy FILE.toml|FILE.json] [--limits-only] [--shadow] [--expected-output N] [--serial] [--seed N] [--quiet] [--explain api_key:KEY|org:ORG|ip_cluster:NET/LEN].. < trace.jsonl > decisions.jsonl";

fn run() -> Result<(), String> {
    let mut policy = None;
    let mut limits_only = false;
    let mut shadow = false;
    let mut serial = false;
    let mut seed = None;
    let mut explain: Vec<ratewarden::SubjectId> = Vec::new();
    let mut opts = replay::Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--policy" => policy = Some(args.next().ok_or("--policy needs a file")?),
            "--limits-only" => limits_only = true,
            "--shadow" => shadow = true,
            "--serial" => serial = true,
            "--seed" => {
                seed = Some(
                    args.next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or("--seed needs a non-negative integer")?,
                );
            }
            "--quiet" => opts.verbose_errors = false,
            "--explain" => {
                let text = args.next().ok_or("--explain needs a subject")?;
                explain.push(text.parse().map_err(|e| format!("--explain: {e}"))?);
            }
            "--expected-output" => {
                opts.expected_output = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--expected-output needs a non-negative integer")?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    let mut policy = match policy {
        None => Policy::llm_api(),
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            let parsed = if path.ends_with(".json") {
                Policy::from_json_str(&text)
            } else {
                Policy::from_toml_str(&text)
            };
            parsed.map_err(|e| format!("{path}: {e}"))?
        }
    };
    if limits_only {
        policy.behavior.enabled = false;
    }
    if shadow {
        policy.behavior.shadow = true;
    }
    let clock = ManualClock::new();
    let mut builder = Warden::builder().policy(policy).clock(clock.clone());
    if let Some(s) = seed {
        builder = builder.seed(s);
    }
    let warden = builder.build().map_err(|e| format!("policy: {e}"))?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut r = replay::Replayer::new(&warden, clock, opts);
    let output = BufWriter::new(stdout.lock());
    let summary = if serial {
        r.run_serial(BufReader::with_capacity(1 << 20, stdin.lock()), output)
    } else {
        // The pipelined reader asks for whole blocks, which bypass stdin's small buffer; a
        // large `BufReader` here would only add a copy.
        r.run(stdin.lock(), output)
    }
    .map_err(|e| format!("i/o: {e}"))?;
    eprintln!("{summary}");
    for line in replay::explain(&warden, &explain) {
        eprintln!("{line}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replay: {e}");
            ExitCode::from(2)
        }
    }
}
