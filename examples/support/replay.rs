//! Replays a JSONL request trace (`TRACE_FORMAT.md`) through a warden driven by a manual
//! clock, writing one decision line per input line. Shared by `examples/replay.rs`,
//! `examples/demo.rs` and the tests (`#[path = "support/replay.rs"] mod replay;`).
//!
//! Streaming: memory grows with the number of live subjects, never with the trace length.

#![allow(dead_code, unreachable_pub)]

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ratewarden::{Decision, Level, ManualClock, Request, Warden};
use serde::Deserialize;

/// A trace line as parsed for replay: borrowed strings, hex features as text.
#[derive(Debug, Deserialize)]
pub struct Line<'a> {
    pub ts_ms: u64,
    #[serde(borrow)]
    pub api_key: Cow<'a, str>,
    #[serde(borrow)]
    pub org: Cow<'a, str>,
    #[serde(borrow)]
    pub ip: Cow<'a, str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default, borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub prompt_fp: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub prompt_simhash: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub template_fp: Option<Cow<'a, str>>,
    #[serde(default)]
    pub logprobs: bool,
}

fn hex(field: &str, v: &Option<Cow<'_, str>>) -> Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(s) if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(s, 16)
                .map(Some)
                .map_err(|e| format!("{field}: {e}"))
        }
        Some(s) => Err(format!("{field}: expected 16 hex digits, got {s:?}")),
    }
}

/// One request as typed fields.
#[derive(Clone, Copy, Debug)]
pub struct Parts<'a> {
    pub ts_ms: u64,
    pub api_key: &'a str,
    pub org: &'a str,
    pub ip: IpAddr,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub model: Option<&'a str>,
    pub prompt_fp: Option<u64>,
    pub prompt_simhash: Option<u64>,
    pub template_fp: Option<u64>,
    pub logprobs: bool,
}

/// Replay options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Output tokens charged up front for each request, before settling to the actual.
    pub expected_output: u64,
    /// Report malformed and out-of-order lines on stderr (the counts are kept either way).
    pub verbose_errors: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            expected_output: 500,
            verbose_errors: true,
        }
    }
}

/// What a replay saw.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub requests: u64,
    pub allowed: u64,
    pub denied_by_reason: std::collections::BTreeMap<String, u64>,
    pub decisions_by_level: [u64; 5],
    pub malformed: u64,
    pub out_of_order: u64,
    pub elapsed: Duration,
}

impl Summary {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "requests:      {}", self.requests)?;
        writeln!(f, "allowed:       {}", self.allowed)?;
        writeln!(f, "denied:        {}", self.requests - self.allowed)?;
        for (r, n) in &self.denied_by_reason {
            writeln!(f, "  {r:<34} {n}")?;
        }
        let names = ["normal", "watch", "throttle", "challenge", "block"];
        write!(f, "decisions by level:")?;
        for (n, c) in names.iter().zip(self.decisions_by_level) {
            write!(f, " {n}={c}")?;
        }
        writeln!(f)?;
        writeln!(f, "malformed lines: {}", self.malformed)?;
        writeln!(
            f,
            "out-of-order lines (replayed at the last time seen): {}",
            self.out_of_order
        )?;
        write!(
            f,
            "throughput:    {:.0} requests/s ({:.2} s, parsing included)",
            self.per_second(),
            self.elapsed.as_secs_f64()
        )
    }
}

/// One decision, as written to the decisions file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    pub level: Level,
    pub reason: Option<String>,
    pub retry_after_ms: Option<u64>,
}

/// Drives a warden from trace lines.
#[derive(Debug)]
pub struct Replayer<'w> {
    pub warden: &'w Warden,
    pub clock: ManualClock,
    pub opts: Options,
    last_ms: u64,
    pub summary: Summary,
}

impl<'w> Replayer<'w> {
    pub fn new(warden: &'w Warden, clock: ManualClock, opts: Options) -> Self {
        Self {
            warden,
            clock,
            opts,
            last_ms: 0,
            summary: Summary::default(),
        }
    }

    /// Decides one parsed line at its timestamp (never earlier than the last one seen), and
    /// settles the actual output tokens when allowed.
    pub fn apply(&mut self, lineno: u64, line: &Line<'_>) -> Result<Outcome, String> {
        let ip: IpAddr = line
            .ip
            .parse()
            .map_err(|_| format!("ip: invalid address {:?}", line.ip))?;
        let parts = Parts {
            ts_ms: line.ts_ms,
            api_key: &line.api_key,
            org: &line.org,
            ip,
            input_tokens: line.input_tokens,
            output_tokens: line.output_tokens,
            model: line.model.as_deref(),
            prompt_fp: hex("prompt_fp", &line.prompt_fp)?,
            prompt_simhash: hex("prompt_simhash", &line.prompt_simhash)?,
            template_fp: hex("template_fp", &line.template_fp)?,
            logprobs: line.logprobs,
        };
        Ok(self.apply_parts(lineno, &parts))
    }

    /// Decides one request given as typed fields (the in-memory path of the demo).
    pub fn apply_parts(&mut self, lineno: u64, p: &Parts<'_>) -> Outcome {
        let mut ts = p.ts_ms;
        if ts < self.last_ms {
            self.summary.out_of_order += 1;
            if self.opts.verbose_errors {
                eprintln!(
                    "line {}: ts_ms {} goes back in time; replayed at {}",
                    lineno + 1,
                    ts,
                    self.last_ms
                );
            }
            ts = self.last_ms;
        }
        self.last_ms = ts;
        self.clock.set_millis(ts);
        let mut req = Request::new(p.api_key, p.org, p.ip)
            .input_tokens(p.input_tokens)
            .expected_output_tokens(self.opts.expected_output)
            .logprobs(p.logprobs);
        if let Some(v) = p.prompt_fp {
            req = req.prompt_fp(v);
        }
        if let Some(v) = p.prompt_simhash {
            req = req.prompt_simhash(v);
        }
        if let Some(v) = p.template_fp {
            req = req.template_fp(v);
        }
        if let Some(m) = p.model {
            req = req.model(m);
        }
        self.summary.requests += 1;
        let out = match self.warden.check(&req) {
            Decision::Allow(permit) => {
                let level = permit.level();
                permit.settle(p.output_tokens);
                self.summary.allowed += 1;
                Outcome {
                    allowed: true,
                    level,
                    reason: None,
                    retry_after_ms: None,
                }
            }
            Decision::Deny(d) => {
                *self
                    .summary
                    .denied_by_reason
                    .entry(d.reason().to_string())
                    .or_default() += 1;
                Outcome {
                    allowed: false,
                    level: d.level(),
                    reason: Some(d.reason().to_string()),
                    retry_after_ms: d
                        .retry_after()
                        .map(|r| r.as_millis().min(u128::from(u64::MAX)) as u64),
                }
            }
        };
        self.summary.decisions_by_level[out.level as usize] += 1;
        out
    }

    /// Parses and decides one raw line. Malformed lines are counted, reported with their
    /// line number, and get a `malformed_line` decision so the output stays one line per
    /// input line.
    pub fn apply_text(&mut self, lineno: u64, text: &str) -> Outcome {
        let parsed = serde_json::from_str::<Line<'_>>(text)
            .map_err(|e| e.to_string())
            .and_then(|l| self.apply(lineno, &l));
        match parsed {
            Ok(o) => o,
            Err(e) => {
                self.summary.malformed += 1;
                if self.opts.verbose_errors {
                    eprintln!("line {}: malformed, skipped: {e}", lineno + 1);
                }
                Outcome {
                    allowed: false,
                    level: Level::Normal,
                    reason: Some("malformed_line".into()),
                    retry_after_ms: None,
                }
            }
        }
    }

    /// Streams `input` to `output`. Returns the summary (also kept in `self.summary`).
    pub fn run(&mut self, input: impl BufRead, mut output: impl Write) -> std::io::Result<Summary> {
        let start = Instant::now();
        let mut buf = String::with_capacity(512);
        let mut out = String::with_capacity(1 << 16);
        let mut input = input;
        let mut i = 0u64;
        loop {
            buf.clear();
            let n = match input.read_line(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    // Not UTF-8: skip to the next newline and count it as malformed.
                    let mut raw = Vec::new();
                    input.read_until(b'\n', &mut raw)?;
                    let o = self.apply_text(i, "\u{fffd}");
                    write_decision(&mut out, i, &o);
                    i += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            let text = buf.trim_end_matches(['\n', '\r']);
            let o = self.apply_text(i, text);
            write_decision(&mut out, i, &o);
            i += 1;
            if out.len() > (1 << 16) - 256 {
                output.write_all(out.as_bytes())?;
                out.clear();
            }
        }
        output.write_all(out.as_bytes())?;
        output.flush()?;
        self.summary.elapsed = start.elapsed();
        Ok(self.summary.clone())
    }
}

/// Appends one decision line in the `TRACE_FORMAT.md` decision format.
pub fn write_decision(out: &mut String, i: u64, o: &Outcome) {
    let _ = write!(
        out,
        "{{\"i\":{i},\"allowed\":{},\"level\":\"{}\",\"reason\":",
        o.allowed,
        o.level.as_str()
    );
    match &o.reason {
        Some(r) => {
            let _ = write!(out, "{}", serde_json::Value::String(r.clone()));
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"retry_after_ms\":");
    match o.retry_after_ms {
        Some(ms) => {
            let _ = write!(out, "{ms}");
        }
        None => out.push_str("null"),
    }
    out.push_str("}\n");
}
