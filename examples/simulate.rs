//! Generates a deterministic simulated trace (and its truth labels) for `replay`.
//!
//! ```text
//! cargo run --release --example simulate -- --seed 1 --duration-min 60 --mix public \
//!     --trace trace.jsonl --truth truth.jsonl
//! ```
//! Run with `--help` for every flag, `--list` for the scenarios and their defaults.

#[path = "support/decimal.rs"]
mod decimal;
#[path = "support/sim.rs"]
mod sim;

use sim::{Scenario, ScenarioParams, SimConfig};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "\
usage: simulate [options] [--trace OUT.jsonl] [--truth TRUTH.jsonl]

Writes a deterministic request trace (JSONL, TRACE_FORMAT.md) and, with --truth, one label
line per request: {\"i\":0,\"actor\":\"E2-0\",\"scenario\":\"E2\",\"role\":\"attack\"}.

options:
  --seed N               master seed (default 1)
  --duration-min M       simulated minutes, may be fractional (default 60)
  --mix public           all eleven scenarios with default parameters (the default)
  --scenarios LIST       only these scenarios, e.g. B1,B2,E2,E4
  --scale F              multiply every scenario's actor and group counts by F
  --actors S=N[,S=N..]   actors (API keys) of scenario S, e.g. --actors E4=300,B1=5000
  --groups S=N[,..]      orgs / sites / campaigns of scenario S
  --rate S=R[,..]        mean requests/min per actor of scenario S (see --list)
  --start-min S=M[,..]   start of scenario S, minutes from the trace start
  --active-min S=M[,..]  how long scenario S stays active, minutes
  --requests N           stop after N requests
  --trace PATH           trace output; '-' or absent: standard output
  --truth PATH           truth output (optional)
  --quiet                no summary on standard error
  --list                 print the scenarios and their defaults, then exit
  -h, --help             this text

Per-scenario flags apply to scenarios present in the mix; naming an absent scenario is an
error. Identical flags and seed give byte-identical files.";

struct Args {
    cfg: SimConfig,
    trace: Option<String>,
    truth: Option<String>,
    quiet: bool,
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.trim()
        .parse::<T>()
        .map_err(|_| format!("{flag}: '{v}' is not a valid number"))
}

fn parse_minutes(flag: &str, v: &str) -> Result<u64, String> {
    let m: f64 = parse_num(flag, v)?;
    if !(m.is_finite() && (0.0..=10_000_000.0).contains(&m)) {
        return Err(format!(
            "{flag}: minutes must be between 0 and 10000000, got '{v}'"
        ));
    }
    Ok((m * 60_000.0).round() as u64)
}

/// Parses `S=V,S=V` into (scenario, value) pairs.
fn parse_pairs(flag: &str, v: &str) -> Result<Vec<(Scenario, String)>, String> {
    let mut out = Vec::new();
    for part in v.split(',').filter(|p| !p.trim().is_empty()) {
        let (s, val) = part
            .split_once('=')
            .ok_or_else(|| format!("{flag}: expected SCENARIO=VALUE, got '{part}'"))?;
        let sc = Scenario::parse(s).ok_or_else(|| {
            format!(
                "{flag}: unknown scenario '{}' (use B1..B5, E1..E6)",
                s.trim()
            )
        })?;
        out.push((sc, val.trim().to_owned()));
    }
    if out.is_empty() {
        return Err(format!(
            "{flag}: expected SCENARIO=VALUE[,SCENARIO=VALUE...]"
        ));
    }
    Ok(out)
}

fn list() {
    println!("scenario role    actors groups  rate/min  rate meaning / description");
    for s in Scenario::ALL {
        let p = ScenarioParams::default_for(s);
        println!(
            "{:<8} {:<7} {:>6} {:>6} {:>9}  {}; {}",
            s.name(),
            s.role().as_str(),
            p.actors,
            p.groups,
            p.rate_per_min,
            s.rate_meaning(),
            s.description()
        );
    }
}

enum Parsed {
    Run(Box<Args>),
    Exit,
}

fn parse_args(argv: &[String]) -> Result<Parsed, String> {
    let mut seed = 1u64;
    let mut duration_ms = 60 * 60_000u64;
    let mut scenarios: Option<Vec<Scenario>> = None;
    let mut scale: Option<f64> = None;
    let mut per: Vec<(&'static str, Scenario, String)> = Vec::new();
    let mut max_requests = None;
    let mut trace = None;
    let mut truth = None;
    let mut quiet = false;

    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let flag = flag.as_str();
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value (see --help)"))
        };
        match flag {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(Parsed::Exit);
            }
            "--list" => {
                list();
                return Ok(Parsed::Exit);
            }
            "--quiet" => quiet = true,
            "--seed" => seed = parse_num(flag, &value()?)?,
            "--duration-min" => duration_ms = parse_minutes(flag, &value()?)?,
            "--mix" => {
                let v = value()?;
                if v != "public" {
                    return Err(format!("--mix: only 'public' is known, got '{v}'"));
                }
                if scenarios.is_some() {
                    return Err("--mix and --scenarios exclude each other".to_owned());
                }
                scenarios = Some(Scenario::ALL.to_vec());
            }
            "--scenarios" => {
                if scenarios.is_some() {
                    return Err(
                        "--mix and --scenarios exclude each other, or were given twice".to_owned(),
                    );
                }
                let v = value()?;
                let mut list = Vec::new();
                for s in v.split(',').filter(|s| !s.trim().is_empty()) {
                    let sc = Scenario::parse(s).ok_or_else(|| {
                        format!(
                            "--scenarios: unknown scenario '{}' (use B1..B5, E1..E6)",
                            s.trim()
                        )
                    })?;
                    if !list.contains(&sc) {
                        list.push(sc);
                    }
                }
                if list.is_empty() {
                    return Err("--scenarios: empty list".to_owned());
                }
                scenarios = Some(list);
            }
            "--scale" => {
                let f: f64 = parse_num(flag, &value()?)?;
                if !(f.is_finite() && f > 0.0 && f <= 10_000.0) {
                    return Err(format!("--scale must be in (0, 10000], got {f}"));
                }
                scale = Some(f);
            }
            "--actors" | "--groups" | "--rate" | "--start-min" | "--active-min" => {
                let name: &'static str = match flag {
                    "--actors" => "--actors",
                    "--groups" => "--groups",
                    "--rate" => "--rate",
                    "--start-min" => "--start-min",
                    _ => "--active-min",
                };
                for (s, v) in parse_pairs(flag, &value()?)? {
                    per.push((name, s, v));
                }
            }
            "--requests" => {
                let n: u64 = parse_num(flag, &value()?)?;
                max_requests = Some(n);
            }
            "--trace" => trace = Some(value()?),
            "--truth" => truth = Some(value()?),
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }

    let scenarios = scenarios.unwrap_or_else(|| Scenario::ALL.to_vec());
    let mut cfg = SimConfig::only(seed, duration_ms, &scenarios);
    cfg.max_requests = max_requests;
    if let Some(f) = scale {
        cfg.scale(f);
    }
    for (flag, s, v) in per {
        if !scenarios.contains(&s) {
            return Err(format!("{flag}: scenario {s} is not in the mix"));
        }
        for p in cfg.params_mut(s) {
            match flag {
                "--actors" => {
                    let n: u32 = parse_num(flag, &v)?;
                    if n > sim::MAX_ACTORS {
                        return Err(format!(
                            "--actors: at most {} per scenario",
                            sim::MAX_ACTORS
                        ));
                    }
                    p.actors = n;
                }
                "--groups" => {
                    let n: u32 = parse_num(flag, &v)?;
                    if n == 0 {
                        return Err("--groups: must be at least 1".to_owned());
                    }
                    p.groups = n;
                }
                "--rate" => {
                    let r: f64 = parse_num(flag, &v)?;
                    if !(r.is_finite() && r > 0.0 && r <= 100_000.0) {
                        return Err(format!(
                            "--rate: must be in (0, 100000] per minute, got {v}"
                        ));
                    }
                    p.rate_per_min = r;
                }
                "--start-min" => p.start_ms = Some(parse_minutes(flag, &v)?),
                _ => p.active_ms = Some(parse_minutes(flag, &v)?),
            }
        }
    }
    let total: u64 = cfg.scenarios.iter().map(|(_, p)| u64::from(p.actors)).sum();
    if total > 5_000_000 {
        return Err(format!(
            "{total} actors in total is too many (at most 5000000)"
        ));
    }
    Ok(Parsed::Run(Box::new(Args {
        cfg,
        trace,
        truth,
        quiet,
    })))
}

fn open(path: &str) -> Result<BufWriter<File>, String> {
    File::create(path)
        .map(|f| BufWriter::with_capacity(1 << 20, f))
        .map_err(|e| format!("cannot create {path}: {e}"))
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let stdout = io::stdout();
    let mut trace_out: Box<dyn Write> = match args.trace.as_deref() {
        None | Some("-") => Box::new(BufWriter::with_capacity(1 << 20, stdout.lock())),
        Some(p) => Box::new(open(p)?),
    };
    let mut truth_file = match args.truth.as_deref() {
        Some(p) => Some(open(p)?),
        None => None,
    };
    let stats = match sim::write_jsonl(
        &args.cfg,
        &mut trace_out,
        truth_file.as_mut().map(|w| w as &mut dyn Write),
    ) {
        Ok(s) => s,
        // A closed pipe (`simulate | head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(format!("write failed: {e}")),
    };
    drop(trace_out);
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        let per: Vec<String> = stats
            .per_scenario
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        eprintln!(
            "simulate: {} requests ({} attack) from {} actors over {:.1} simulated min in {:.2}s ({:.0} req/s)\n  {}",
            stats.requests,
            stats.attack_requests,
            stats.actors,
            args.cfg.duration_ms as f64 / 60_000.0,
            secs,
            stats.requests as f64 / secs.max(1e-9),
            per.join(" ")
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&argv) {
        Ok(Parsed::Exit) => ExitCode::SUCCESS,
        Ok(Parsed::Run(args)) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("simulate: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::from(2)
        }
    }
}
