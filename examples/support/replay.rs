//! Replays a JSONL request trace (`TRACE_FORMAT.md`) through a warden driven by a manual
//! clock, writing one decision line per input line. Shared by `examples/replay.rs`,
//! `examples/demo.rs` and the tests (`#[path = "support/replay.rs"] mod replay;`).
//!
//! Streaming: memory grows with the number of live subjects, never with the trace length.

#![allow(dead_code, unreachable_pub)]

use super::decimal::push_u64;

use std::borrow::Cow;
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ratewarden::{Decision, Level, ManualClock, Policy, Request, SubjectId, Warden};
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
    #[serde(default, borrow, deserialize_with = "opt_borrowed")]
    pub model: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "opt_borrowed")]
    pub prompt_fp: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "opt_borrowed")]
    pub prompt_simhash: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "opt_borrowed")]
    pub template_fp: Option<Cow<'a, str>>,
    #[serde(default)]
    pub logprobs: bool,
}

/// An optional string borrowed from the line when it has no escapes. Serde borrows a plain
/// `Cow<str>` field under `#[serde(borrow)]`, but not one inside an `Option`: without this,
/// each optional string was copied into a fresh `String`.
fn opt_borrowed<'de, D>(d: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

fn hex(field: &str, v: &Option<Cow<'_, str>>) -> Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(s) => hex16(s.as_bytes())
            .map(Some)
            .ok_or_else(|| format!("{field}: expected 16 hex digits, got {s:?}")),
    }
}

/// Exactly 16 hex digits (either case) as a `u64`, in one pass without data-dependent branches
/// (a digit-or-letter branch per character mispredicts on random fingerprints; the earlier
/// validation pass plus `u64::from_str_radix` cost about a tenth of the replay tool's time).
fn hex16(s: &[u8]) -> Option<u64> {
    let s: &[u8; 16] = s.try_into().ok()?;
    let mut v = 0_u64;
    let mut bad = 0_u8;
    for &b in s {
        let d = HEX[usize::from(b)];
        bad |= d;
        v = v << 4 | u64::from(d & 0x0f);
    }
    (bad & 0x80 == 0).then_some(v)
}

/// Nibble value of each byte; 0xff for a byte that is not a hex digit.
const HEX: [u8; 256] = {
    let mut t = [0xff_u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

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

impl Options {
    /// No error reports on stderr (tests, benches, the demo).
    pub fn quiet() -> Self {
        Self {
            verbose_errors: false,
            ..Self::default()
        }
    }
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
            Err(e) => self.malformed(lineno, &e),
        }
    }

    /// Streams `input` to `output` on two threads: this one reads the input, decides and
    /// writes; a helper thread parses batches of lines meanwhile (JSON parsing is about as
    /// costly as the check). Decisions, counts and error reports are exactly those of
    /// [`run_serial`](Self::run_serial), in the same order. Returns the summary (also kept in
    /// `self.summary`).
    ///
    /// This thread reads blocks of about [`BLOCK`] bytes, cut after their last newline, and
    /// leaves finding lines to the parser. The parser turns a block into a `String` in one
    /// UTF-8 pass and records each field as a range into it, so field text is never copied.
    /// Buffers come back to this thread and are reused.
    pub fn run(
        &mut self,
        mut input: impl BufRead,
        mut output: impl Write,
    ) -> std::io::Result<Summary> {
        use std::sync::mpsc::sync_channel;
        // Bounded: at most `AHEAD` batches between reading and deciding, so memory stays
        // bounded and neither thread can wait on the other forever (see the comment below).
        const AHEAD: usize = 3;
        let start = Instant::now();
        let mut out = String::with_capacity(1 << 16);
        let mut i = 0u64;
        let mut spare: Vec<Chunk> = Vec::with_capacity(AHEAD + 1);
        let mut carry = Vec::new();
        std::thread::scope(|scope| -> std::io::Result<()> {
            let (raw_tx, raw_rx) = sync_channel::<Chunk>(2);
            let (parsed_tx, parsed_rx) = sync_channel::<Batch>(2);
            scope.spawn(move || {
                for chunk in raw_rx {
                    if parsed_tx.send(Batch::parse(chunk)).is_err() {
                        break;
                    }
                }
            });
            // Up to AHEAD batches are in flight: 2 in `raw_tx`, 1 in the parser's hands, 2 in
            // `parsed_tx` hold 5 >= AHEAD, so a send never waits on a receive that only this
            // thread would make.
            let mut in_flight = 0usize;
            let mut eof = false;
            while !eof || in_flight > 0 {
                if !eof {
                    let mut chunk = spare.pop().unwrap_or_else(|| Chunk {
                        raw: Vec::with_capacity(2 * BLOCK),
                        ends: Vec::with_capacity(BLOCK / 200),
                    });
                    chunk.raw.clear();
                    chunk.raw.append(&mut carry);
                    eof = read_block(&mut input, &mut chunk.raw, &mut carry)?;
                    if chunk.raw.is_empty() {
                        spare.push(chunk);
                    } else {
                        raw_tx.send(chunk).expect("parser thread alive");
                        in_flight += 1;
                    }
                    if in_flight < AHEAD && !eof {
                        continue;
                    }
                }
                if in_flight == 0 {
                    break;
                }
                let batch = parsed_rx.recv().expect("parser thread alive");
                in_flight -= 1;
                for item in &batch.items {
                    let o = match item {
                        Ok(l) => match self.apply(i, &batch.line_at(l)) {
                            Ok(o) => o,
                            Err(e) => self.malformed(i, &e),
                        },
                        Err(e) => self.malformed(i, e),
                    };
                    write_decision(&mut out, i, &o);
                    i += 1;
                    if out.len() > (1 << 16) - 256 {
                        output.write_all(out.as_bytes())?;
                        out.clear();
                    }
                }
                let mut chunk = batch.into_chunk();
                // A line longer than a block grew this buffer: give the excess back.
                chunk.raw.shrink_to(2 * BLOCK);
                spare.push(chunk);
            }
            drop(raw_tx);
            Ok(())
        })?;
        output.write_all(out.as_bytes())?;
        output.flush()?;
        self.summary.elapsed = start.elapsed();
        Ok(self.summary.clone())
    }

    /// Counts and reports a malformed line; its decision.
    fn malformed(&mut self, lineno: u64, e: &str) -> Outcome {
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

    /// [`run`](Self::run) on this thread alone: parse, decide and write line by line.
    pub fn run_serial(
        &mut self,
        input: impl BufRead,
        mut output: impl Write,
    ) -> std::io::Result<Summary> {
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
                    // Not UTF-8: `read_line` consumed the line (through its newline) and left
                    // `buf` empty; count it as malformed.
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

/// Bytes read per batch of the pipelined replay (about 230 trace lines). At most four
/// batches are alive at once; the worst case is a block of blank lines, 65,536 items of
/// 176 bytes plus an error message each, about 17 MB per batch.
pub const BLOCK: usize = 64 * 1024;

/// Appends about [`BLOCK`] bytes of `input` to `raw`, cut after the last newline; the rest
/// goes to `carry`, the start of the next block. A line longer than a block is read whole.
/// At the end of the input, a last line without a newline gets one. Returns whether the
/// input is done.
fn read_block(
    input: &mut impl BufRead,
    raw: &mut Vec<u8>,
    carry: &mut Vec<u8>,
) -> std::io::Result<bool> {
    use std::io::Read;
    loop {
        let from = raw.len();
        // `read_to_end` fills spare capacity without zeroing it first.
        if input.by_ref().take(BLOCK as u64).read_to_end(raw)? == 0 {
            if raw.last().is_some_and(|&b| b != b'\n') {
                raw.push(b'\n');
            }
            return Ok(true);
        }
        if let Some(p) = raw[from..].iter().rposition(|&b| b == b'\n') {
            carry.extend_from_slice(&raw[from + p + 1..]);
            raw.truncate(from + p + 1);
            return Ok(false);
        }
    }
}

/// Raw lines on their way to the parser, each ending with `\n`; `ends` is the parser's
/// (line `k` ends just before `ends[k]`), sent back with the buffer for reuse.
#[derive(Debug)]
struct Chunk {
    raw: Vec<u8>,
    ends: Vec<usize>,
}

/// A field's text: a byte range into the batch's text, or into its `extra` arena when at or
/// past `text.len()` (a string that had JSON escapes, so it is not a slice of the line).
type Span = (usize, usize);

/// A trace line parsed off the reading thread, its strings as spans. The deciding thread
/// reads the address and the hex features (as [`Replayer::apply`] does for `run_serial`),
/// which balances the two threads' work.
#[derive(Debug)]
struct OwnedLine {
    ts_ms: u64,
    api_key: Span,
    org: Span,
    ip: Span,
    input_tokens: u64,
    output_tokens: u64,
    model: Option<Span>,
    prompt_fp: Option<Span>,
    prompt_simhash: Option<Span>,
    template_fp: Option<Span>,
    logprobs: bool,
}

/// A batch of parsed lines, in input order; a malformed line is its error message.
#[derive(Debug)]
struct Batch {
    /// The chunk's lines as text (a line that was not UTF-8 reads as U+FFFD).
    text: String,
    /// Decoded strings that are not slices of `text`.
    extra: String,
    ends: Vec<usize>,
    items: Vec<Result<OwnedLine, String>>,
}

impl Batch {
    /// Parses the chunk's lines (`\r\n` accepted) exactly as `apply_text` would.
    fn parse(chunk: Chunk) -> Batch {
        let Chunk { raw, mut ends } = chunk;
        ends.clear();
        let text = match String::from_utf8(raw) {
            Ok(t) => {
                ends.extend(t.match_indices('\n').map(|(at, _)| at + 1));
                t
            }
            Err(e) => lossy_lines(&e.into_bytes(), &mut ends),
        };
        let mut b = Batch {
            text,
            extra: String::new(),
            items: Vec::with_capacity(ends.len()),
            ends,
        };
        let mut from = 0;
        for &end in &b.ends {
            let line = &b.text[from..end - 1];
            // As `run_serial`, which trims every trailing `\r` and `\n`.
            let line = line.trim_end_matches('\r');
            from = end;
            let item = Batch::line(line, &b.text, &mut b.extra);
            b.items.push(item);
        }
        b
    }

    fn line(line: &str, text: &str, extra: &mut String) -> Result<OwnedLine, String> {
        let l = serde_json::from_str::<Line<'_>>(line).map_err(|e| e.to_string())?;
        let base = text.as_ptr() as usize;
        let mut span = |s: &Cow<'_, str>| -> Span {
            // Borrowed strings are slices of `line`, itself a slice of `text`; anything else
            // (an escaped string, or a borrow from elsewhere) is copied to `extra`.
            let inside = |b: &str| {
                let at = (b.as_ptr() as usize).wrapping_sub(base);
                (at <= text.len() && b.len() <= text.len() - at).then_some(at)
            };
            let a = match s {
                Cow::Borrowed(b) => inside(b),
                Cow::Owned(_) => None,
            }
            .unwrap_or_else(|| {
                let a = text.len() + extra.len();
                extra.push_str(s);
                a
            });
            (a, a + s.len())
        };
        Ok(OwnedLine {
            ts_ms: l.ts_ms,
            api_key: span(&l.api_key),
            org: span(&l.org),
            ip: span(&l.ip),
            input_tokens: l.input_tokens,
            output_tokens: l.output_tokens,
            model: l.model.as_ref().map(&mut span),
            prompt_fp: l.prompt_fp.as_ref().map(&mut span),
            prompt_simhash: l.prompt_simhash.as_ref().map(&mut span),
            template_fp: l.template_fp.as_ref().map(&mut span),
            logprobs: l.logprobs,
        })
    }

    fn str(&self, (a, b): Span) -> &str {
        let n = self.text.len();
        if a < n {
            &self.text[a..b]
        } else {
            &self.extra[a - n..b - n]
        }
    }

    fn line_at(&self, l: &OwnedLine) -> Line<'_> {
        let cow = |span| Cow::Borrowed(self.str(span));
        Line {
            ts_ms: l.ts_ms,
            api_key: cow(l.api_key),
            org: cow(l.org),
            ip: cow(l.ip),
            input_tokens: l.input_tokens,
            output_tokens: l.output_tokens,
            model: l.model.map(cow),
            prompt_fp: l.prompt_fp.map(cow),
            prompt_simhash: l.prompt_simhash.map(cow),
            template_fp: l.template_fp.map(cow),
            logprobs: l.logprobs,
        }
    }

    /// The buffers back, for the next chunk.
    fn into_chunk(self) -> Chunk {
        Chunk {
            raw: self.text.into_bytes(),
            ends: self.ends,
        }
    }
}

/// The lines of `raw` as text, each line that is not UTF-8 replaced by U+FFFD as
/// `run_serial` sees it, with their ends in `ends`.
fn lossy_lines(raw: &[u8], ends: &mut Vec<usize>) -> String {
    let mut text = String::with_capacity(raw.len());
    for line in raw.split_inclusive(|&b| b == b'\n') {
        text.push_str(std::str::from_utf8(line).unwrap_or("\u{fffd}\n"));
        ends.push(text.len());
    }
    text
}

/// Replays `input` into `output` through a fresh warden with `policy` on a manual clock,
/// without error reports on stderr: pipelined (`Replayer::run`) or on one thread
/// (`Replayer::run_serial`). `seed` fixes the warden's hashing seed.
pub fn replay_quiet(
    policy: Policy,
    seed: Option<u64>,
    pipelined: bool,
    input: impl BufRead,
    output: impl Write,
) -> std::io::Result<Summary> {
    let (w, clock) = replay_warden(policy, seed);
    let mut r = Replayer::new(&w, clock, Options::quiet());
    if pipelined {
        r.run(input, output)
    } else {
        r.run_serial(input, output)
    }
}

/// A warden for replaying `policy` on a manual clock (returned with it), its hashing seed
/// fixed to `seed` when given.
pub fn replay_warden(policy: Policy, seed: Option<u64>) -> (Warden, ManualClock) {
    let clock = ManualClock::new();
    let mut builder = Warden::builder().policy(policy).clock(clock.clone());
    if let Some(s) = seed {
        builder = builder.seed(s);
    }
    (builder.build().expect("valid policy"), clock)
}

/// One JSON line per subject for `replay --explain`: the subject's behavioural report at
/// the end of the replay (`Warden::inspect`: level, score and the evidence it is scored on),
/// or why there is none.
pub fn explain(w: &Warden, subjects: &[SubjectId]) -> Vec<String> {
    subjects
        .iter()
        .map(|s| match w.inspect(s) {
            Some(report) => serde_json::to_string(&report).expect("a report serialises"),
            None => serde_json::json!({
                "subject": s,
                "tracked": false,
                "why": if !w.policy().behavior.enabled {
                    "the behavioural layer is off"
                } else if s.kind == ratewarden::SubjectKind::IpCluster {
                    "not seen, evicted, or not a network at the policy's prefix length"
                } else {
                    "not seen, or evicted"
                },
            })
            .to_string(),
        })
        .collect()
}

/// Appends one decision line in the `TRACE_FORMAT.md` decision format.
pub fn write_decision(out: &mut String, i: u64, o: &Outcome) {
    out.push_str("{\"i\":");
    push_u64(out, i);
    out.push_str(if o.allowed {
        ",\"allowed\":true,\"level\":\""
    } else {
        ",\"allowed\":false,\"level\":\""
    });
    out.push_str(o.level.as_str());
    out.push_str("\",\"reason\":");
    match &o.reason {
        // Reasons are limit names and fixed words; escape whatever JSON needs escaped.
        Some(r) if r.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') => {
            out.push('"');
            out.push_str(r);
            out.push('"');
        }
        Some(r) => out.push_str(&serde_json::Value::String(r.clone()).to_string()),
        None => out.push_str("null"),
    }
    out.push_str(",\"retry_after_ms\":");
    match o.retry_after_ms {
        Some(ms) => push_u64(out, ms),
        None => out.push_str("null"),
    }
    out.push_str("}\n");
}

#[cfg(test)]
mod tests {
    #[test]
    fn write_decision_matches_serde_json() {
        use super::{write_decision, Level, Outcome};
        let outcomes = [
            (0, true, Level::Normal, None, None),
            (7, false, Level::Block, Some("behavior:block"), None),
            (u64::MAX, false, Level::Watch, Some("api_key:rpm"), Some(1)),
            (
                42,
                false,
                Level::Challenge,
                Some("odd \"name\\\u{1}é"),
                Some(u64::MAX),
            ),
            (1_000_000, true, Level::Throttle, None, Some(0)),
        ];
        for (i, allowed, level, reason, retry) in outcomes {
            let o = Outcome {
                allowed,
                level,
                reason: reason.map(str::to_string),
                retry_after_ms: retry,
            };
            let mut got = String::new();
            write_decision(&mut got, i, &o);
            let want = serde_json::json!({
                "i": i,
                "allowed": allowed,
                "level": level.as_str(),
                "reason": reason,
                "retry_after_ms": retry,
            });
            assert!(got.ends_with('\n'));
            let parsed: serde_json::Value = serde_json::from_str(&got).unwrap();
            assert_eq!(parsed, want, "{got}");
            // Field order as TRACE_FORMAT.md gives it.
            assert!(
                got.starts_with(&format!("{{\"i\":{i},\"allowed\":{allowed},")),
                "{got}"
            );
        }
    }

    #[test]
    fn optional_strings_borrow_unless_escaped() {
        use std::borrow::Cow;
        let plain = r#"{"ts_ms":1,"api_key":"k","org":"o","ip":"10.0.0.1","input_tokens":1,"output_tokens":2,"model":"m-1","prompt_fp":"00000000000000ff"}"#;
        let l: super::Line<'_> = serde_json::from_str(plain).unwrap();
        assert!(matches!(l.model, Some(Cow::Borrowed("m-1"))));
        assert!(matches!(
            l.prompt_fp,
            Some(Cow::Borrowed("00000000000000ff"))
        ));
        assert!(l.prompt_simhash.is_none() && l.template_fp.is_none());
        let escaped = r#"{"ts_ms":1,"api_key":"k","org":"o","ip":"10.0.0.1","input_tokens":1,"output_tokens":2,"model":"m\u002d1","template_fp":null}"#;
        let l: super::Line<'_> = serde_json::from_str(escaped).unwrap();
        assert!(matches!(&l.model, Some(Cow::Owned(m)) if m == "m-1"));
        assert!(l.template_fp.is_none());
        let wrong = r#"{"ts_ms":1,"api_key":"k","org":"o","ip":"10.0.0.1","input_tokens":1,"output_tokens":2,"model":7}"#;
        assert!(serde_json::from_str::<super::Line<'_>>(wrong).is_err());
    }

    #[test]
    fn blocks_end_at_newlines_and_lose_nothing() {
        use super::{read_block, BLOCK};
        /// Hands out at most 4099 bytes per read, to cut blocks at awkward places.
        struct Dribble<'a>(&'a [u8]);
        impl std::io::Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(4099);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let long = "x".repeat(BLOCK * 2 + 17);
        let mut input = String::new();
        for i in 0..5000 {
            input.push_str(&format!("line {i} é\r\n"));
            if i == 1234 {
                input.push_str(&long);
                input.push('\n');
            }
        }
        input.push_str("no newline at the end");
        for cap in [1, 64, 8192] {
            let mut r = std::io::BufReader::with_capacity(cap, Dribble(input.as_bytes()));
            let (mut all, mut carry, mut blocks) = (Vec::new(), Vec::new(), 0);
            loop {
                let mut raw = std::mem::take(&mut carry);
                let eof = read_block(&mut r, &mut raw, &mut carry).unwrap();
                if !raw.is_empty() {
                    assert_eq!(raw.last(), Some(&b'\n'));
                    blocks += 1;
                }
                all.extend_from_slice(&raw);
                if eof {
                    break;
                }
            }
            assert!(carry.is_empty());
            assert_eq!(all, format!("{input}\n").into_bytes(), "capacity {cap}");
            assert!(blocks >= 3, "{blocks} blocks");
        }
    }

    #[test]
    fn hex16_agrees_with_from_str_radix() {
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lower = format!("{x:016x}");
            let upper = format!("{x:016X}");
            assert_eq!(super::hex16(lower.as_bytes()), Some(x));
            assert_eq!(super::hex16(upper.as_bytes()), Some(x));
            assert_eq!(u64::from_str_radix(&lower, 16).ok(), Some(x));
        }
        assert_eq!(super::hex16(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(super::hex16(b"0000000000000000"), Some(0));
    }

    #[test]
    fn hex16_rejects_bad_input() {
        for bad in [
            &b""[..],
            b"0123456789abcde",
            b"0123456789abcdef0",
            b"+123456789abcdef",
            b"0123456789abcdeg",
            b"01234567 9abcdef",
            b"0x23456789abcdef",
            "0123456789abcdé".as_bytes(),
        ] {
            assert_eq!(super::hex16(bad), None, "{bad:?}");
        }
        // Every position, every non-hex byte.
        for pos in 0..16 {
            for b in 0..=255_u8 {
                if b.is_ascii_hexdigit() {
                    continue;
                }
                let mut s = *b"0123456789abcdef";
                s[pos] = b;
                assert_eq!(super::hex16(&s), None, "byte {b} at {pos}");
            }
        }
    }
}
