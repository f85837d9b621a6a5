//! Deterministic traffic simulator for ratewarden's replay and demo tooling.
//!
//! It builds the actors of `SCENARIOS.md` (benign B1–B5, extraction attacks E1–E6) and merges
//! their request streams into one trace in the JSONL format of `TRACE_FORMAT.md`, plus a truth
//! file that labels every request with its actor, scenario and role.
//!
//! * **Deterministic.** Everything derives from [`SimConfig::seed`] through a small built-in
//!   PRNG ([`Rng`], xoshiro256** seeded by SplitMix64). The same seed and parameters give
//!   byte-identical output on the same platform.
//! * **Streaming.** [`Simulator`] is an iterator of compact [`SimEvent`]s (one heap entry per
//!   live actor), and [`write_jsonl`] writes millions of requests with bounded memory.
//!   [`generate`] is the in-memory variant for tests and demos.
//! * **Benign traffic stays within the `llm_api` preset's classic limits** by construction:
//!   rates are clamped, minimum gaps enforced, and every subject (key, org, /24 or /48 cluster)
//!   of a benign actor is disjoint from every attack actor's subjects. Any denial a benign
//!   actor receives is therefore collateral damage from the behavioural layer.
//!
//! Include it as a nested module: `#[path = "support/sim.rs"] mod sim;`. It depends only on
//! `std`, `serde` and `serde_json`.

#![allow(dead_code, unreachable_pub)]

use super::decimal::push_u64;

use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------------------------

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Advances a SplitMix64 state and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes two words into one well-distributed word (used to derive independent seeds).
pub fn mix64(a: u64, b: u64) -> u64 {
    let mut s = a ^ b.rotate_left(29).wrapping_mul(GOLDEN);
    splitmix64(&mut s)
}

/// A small deterministic PRNG: xoshiro256** seeded through SplitMix64.
///
/// Not cryptographic. Its helpers draw the distributions the simulator needs.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Creates a generator from a 64-bit seed.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for w in &mut s {
            *w = splitmix64(&mut sm);
        }
        if s == [0; 4] {
            s[0] = GOLDEN;
        }
        Rng { s }
    }

    /// Creates a generator from a seed and a path of labels, so that independent streams
    /// (one per scenario, one per actor) do not influence each other.
    pub fn derive(seed: u64, parts: &[u64]) -> Self {
        let mut h = seed;
        for &p in parts {
            h = mix64(h, p);
        }
        Rng::new(h)
    }

    /// Next raw 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform integer in `[0, n)`; returns 0 when `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform integer in `[lo, hi]` (inclusive); returns `lo` when `hi <= lo`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below((hi - lo).saturating_add(1))
        }
    }

    /// Uniform real in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Exponential variate with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }

    /// Standard normal variate (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.f64(); // (0, 1]
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Lognormal variate given its median and the sigma of the underlying normal.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// A uniformly chosen element, or `None` for an empty slice.
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        let n = items.len() as u64;
        items.get(self.below(n) as usize)
    }

    /// `x` with exactly `k` distinct random bits flipped (`k` is capped at 64).
    pub fn flip_bits(&mut self, x: u64, k: u32) -> u64 {
        let k = k.min(64);
        let mut mask = 0u64;
        while mask.count_ones() < k {
            mask |= 1u64 << self.below(64);
        }
        x ^ mask
    }

    /// Appends `n` random base62 characters to `out`.
    pub fn base62(&mut self, n: usize, out: &mut String) {
        const ALPHABET: &[u8; 62] =
            b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        for _ in 0..n {
            out.push(char::from(ALPHABET[self.below(62) as usize]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios and configuration
// ---------------------------------------------------------------------------------------------

/// Whether an actor is legitimate or an extraction attacker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Legitimate traffic; must never be denied by the behavioural layer.
    Benign,
    /// Model-output harvesting.
    Attack,
}

impl Role {
    /// `"benign"` or `"attack"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Benign => "benign",
            Role::Attack => "attack",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scenarios of `SCENARIOS.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scenario {
    /// Interactive people: sessions with think time, near-edit prompts.
    B1,
    /// Legitimate batch classifier near 80% of its key limits (the hard negative).
    B2,
    /// Large enterprise: dozens of modest service keys in one org.
    B3,
    /// Campus or carrier NAT: hundreds of accounts behind one or two addresses of one /24.
    B4,
    /// CI bots: exact periodic timing, identical prompt, tiny outputs.
    B5,
    /// Single key pinned at its request limit, long outputs.
    E1,
    /// Tens of keys in one org, each under its limit, starting in sync.
    E2,
    /// Sybil organisations behind one or two datacenter /24s.
    E3,
    /// Low and slow: 100+ keys/orgs, a different residential /24 per request.
    E4,
    /// Template sweep over a topic list.
    E5,
    /// Logprob harvesting: one-token outputs, many templates.
    E6,
}

impl Scenario {
    /// All scenarios, benign first.
    pub const ALL: [Scenario; 11] = [
        Scenario::B1,
        Scenario::B2,
        Scenario::B3,
        Scenario::B4,
        Scenario::B5,
        Scenario::E1,
        Scenario::E2,
        Scenario::E3,
        Scenario::E4,
        Scenario::E5,
        Scenario::E6,
    ];

    /// Parses a scenario name such as `"E3"` (case-insensitive, surrounding blanks ignored).
    pub fn parse(s: &str) -> Option<Scenario> {
        let s = s.trim();
        Scenario::ALL
            .iter()
            .copied()
            .find(|sc| sc.name().eq_ignore_ascii_case(s))
    }

    /// The short name, e.g. `"E3"`.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::B1 => "B1",
            Scenario::B2 => "B2",
            Scenario::B3 => "B3",
            Scenario::B4 => "B4",
            Scenario::B5 => "B5",
            Scenario::E1 => "E1",
            Scenario::E2 => "E2",
            Scenario::E3 => "E3",
            Scenario::E4 => "E4",
            Scenario::E5 => "E5",
            Scenario::E6 => "E6",
        }
    }

    /// Benign (B*) or attack (E*).
    pub fn role(self) -> Role {
        match self {
            Scenario::B1 | Scenario::B2 | Scenario::B3 | Scenario::B4 | Scenario::B5 => {
                Role::Benign
            }
            _ => Role::Attack,
        }
    }

    /// A one-line description.
    pub fn description(self) -> &'static str {
        match self {
            Scenario::B1 => "interactive people: sessions, think time, prompt edits",
            Scenario::B2 => "legitimate batch classifier at ~80% of key limits (hard negative)",
            Scenario::B3 => "large enterprise: dozens of service keys in one org",
            Scenario::B4 => "campus / carrier NAT: hundreds of accounts behind one /24",
            Scenario::B5 => "CI bots: exact periodic timing, identical prompt",
            Scenario::E1 => "single key pinned at its request limit, long outputs",
            Scenario::E2 => "tens of keys in one org, each under its limit, in sync",
            Scenario::E3 => "sybil single-key orgs behind one or two datacenter /24s",
            Scenario::E4 => "low and slow: 100+ orgs, a different residential /24 per request",
            Scenario::E5 => "template sweep over a topic list",
            Scenario::E6 => "logprob harvesting: one-token outputs, many templates",
        }
    }

    /// What [`ScenarioParams::rate_per_min`] means for this scenario.
    pub fn rate_meaning(self) -> &'static str {
        match self {
            Scenario::B1 | Scenario::B4 => "requests/min within a session (max 8)",
            Scenario::B2 => "requests/min per key (max 100)",
            Scenario::B3 => "mean requests/min per key (max 60; org total max 1200)",
            Scenario::B5 => "requests/min per bot (max 30)",
            _ => "mean requests/min per key",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parameters of one scenario entry.
///
/// | scenario | `actors` | `groups` |
/// |---|---|---|
/// | B1 | users (each its own key and org) | unused |
/// | B2 | keys in total | customers (orgs); at most 12 keys each |
/// | B3 | service keys in total | enterprises (orgs) |
/// | B4 | accounts in total | NAT sites (one /24 each); at most 800 accounts per site |
/// | B5 | bots | orgs; at most 20 bots each |
/// | E1 | keys (each its own org) | unused |
/// | E2 | keys in total | campaigns (one org and one cloud /24 each) |
/// | E3 | single-key orgs in total | campaigns |
/// | E4 | single-key orgs in total | campaigns (one residential pool each) |
/// | E5, E6 | keys in total | campaigns (one org each) |
///
/// Out-of-range values are clamped when the simulator is built (see
/// [`Scenario::rate_meaning`]); a non-finite or non-positive rate falls back to the default.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioParams {
    /// Number of actors (one API key each).
    pub actors: u32,
    /// Number of groups the actors are split into (orgs, sites or campaigns).
    pub groups: u32,
    /// Mean request rate per actor, per minute; see [`Scenario::rate_meaning`].
    pub rate_per_min: f64,
    /// When the scenario starts, ms from the trace start; `None` = scenario default (benign
    /// traffic from the start, attack campaigns at a seeded offset early in the trace).
    pub start_ms: Option<u64>,
    /// How long the scenario stays active after its start; `None` = until the trace ends.
    pub active_ms: Option<u64>,
}

impl ScenarioParams {
    /// The defaults used by [`SimConfig::public_mix`].
    pub fn default_for(s: Scenario) -> Self {
        let (actors, groups, rate) = match s {
            Scenario::B1 => (2000, 1, 2.0),
            Scenario::B2 => (6, 2, 96.0),
            Scenario::B3 => (40, 1, 25.0),
            Scenario::B4 => (600, 2, 2.0),
            Scenario::B5 => (6, 2, 1.0),
            Scenario::E1 => (2, 2, 120.0),
            Scenario::E2 => (30, 1, 40.0),
            Scenario::E3 => (30, 1, 30.0),
            Scenario::E4 => (150, 1, 3.0),
            Scenario::E5 => (3, 1, 75.0),
            Scenario::E6 => (3, 1, 90.0),
        };
        ScenarioParams {
            actors,
            groups,
            rate_per_min: rate,
            start_ms: None,
            active_ms: None,
        }
    }

    /// Copy with actor and group counts multiplied by `factor` (each at least 1).
    pub fn scaled(&self, factor: f64) -> Self {
        let f = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
        let scale =
            |n: u32| ((f64::from(n) * f).round().max(1.0)).min(f64::from(MAX_ACTORS)) as u32;
        ScenarioParams {
            actors: scale(self.actors),
            groups: scale(self.groups),
            ..self.clone()
        }
    }

    /// The parameters actually used: counts and rates clamped so that benign scenarios stay
    /// within the `llm_api` preset's classic limits.
    pub fn sanitized(&self, s: Scenario) -> Self {
        let default = ScenarioParams::default_for(s);
        let mut p = self.clone();
        p.actors = p.actors.min(MAX_ACTORS);
        p.groups = p.groups.clamp(1, p.actors.max(1));
        if !(p.rate_per_min.is_finite() && p.rate_per_min > 0.0) {
            p.rate_per_min = default.rate_per_min;
        }
        p.rate_per_min = p.rate_per_min.clamp(0.01, 100_000.0);
        match s {
            Scenario::B1 | Scenario::B4 => p.rate_per_min = p.rate_per_min.min(8.0),
            Scenario::B2 => p.rate_per_min = p.rate_per_min.min(100.0),
            Scenario::B3 => p.rate_per_min = p.rate_per_min.min(60.0),
            Scenario::B5 => p.rate_per_min = p.rate_per_min.min(30.0),
            _ => {}
        }
        // Keep per-group sizes within the org / cluster limits.
        let per_group_cap = match s {
            Scenario::B2 => 12,
            Scenario::B4 => 800,
            Scenario::B5 => 20,
            _ => u32::MAX,
        };
        let need = p.actors.div_ceil(per_group_cap);
        p.groups = p.groups.max(need).clamp(1, p.actors.max(1));
        p
    }
}

/// Upper bound on actors per scenario entry (protects memory).
pub const MAX_ACTORS: u32 = 2_000_000;

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Master seed; everything derives from it.
    pub seed: u64,
    /// Length of the trace in simulated milliseconds; no request has `ts_ms >= duration_ms`.
    pub duration_ms: u64,
    /// Scenario entries. A scenario may appear more than once (actor ids keep counting).
    pub scenarios: Vec<(Scenario, ScenarioParams)>,
    /// Stop after this many requests (the trace is truncated, not rescaled).
    pub max_requests: Option<u64>,
}

impl SimConfig {
    /// An empty configuration (no scenarios yet).
    pub fn new(seed: u64, duration_ms: u64) -> Self {
        SimConfig {
            seed,
            duration_ms,
            scenarios: Vec::new(),
            max_requests: None,
        }
    }

    /// The default full mix of all eleven scenarios with their default parameters.
    pub fn public_mix(seed: u64, duration_ms: u64) -> Self {
        Self::only(seed, duration_ms, &Scenario::ALL)
    }

    /// The given scenarios with their default parameters.
    pub fn only(seed: u64, duration_ms: u64, scenarios: &[Scenario]) -> Self {
        let mut cfg = SimConfig::new(seed, duration_ms);
        for &s in scenarios {
            cfg.scenarios.push((s, ScenarioParams::default_for(s)));
        }
        cfg
    }

    /// Adds a scenario entry with explicit parameters.
    pub fn with(mut self, s: Scenario, params: ScenarioParams) -> Self {
        self.scenarios.push((s, params));
        self
    }

    /// Multiplies every entry's actor and group counts by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for (_, p) in &mut self.scenarios {
            *p = p.scaled(factor);
        }
    }

    /// Mutable parameters of every entry of scenario `s`.
    pub fn params_mut(&mut self, s: Scenario) -> impl Iterator<Item = &mut ScenarioParams> {
        self.scenarios
            .iter_mut()
            .filter(move |(sc, _)| *sc == s)
            .map(|(_, p)| p)
    }
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_str(&format!("{x:016x}")),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
        match v {
            None => Ok(None),
            Some(s) => super::parse_hex64(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("expected 1 to 16 hex digits")),
        }
    }
}

/// Parses 1 to 16 hex digits (either case) into a `u64`.
pub fn parse_hex64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// One request line of the trace, exactly as in `TRACE_FORMAT.md`.
///
/// The hash features are `u64` in Rust and 16 lowercase hex digits in JSON. Optional fields
/// are omitted when `None`; `logprobs` is always written and defaults to `false` when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Milliseconds since the start of the trace.
    pub ts_ms: u64,
    /// The API key.
    pub api_key: String,
    /// The organisation the key belongs to.
    pub org: String,
    /// Client address, IPv4 or IPv6 text.
    pub ip: String,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Tokens the response had.
    pub output_tokens: u64,
    /// Model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Exact 64-bit hash of the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_opt")]
    pub prompt_fp: Option<u64>,
    /// 64-bit SimHash of the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_opt")]
    pub prompt_simhash: Option<u64>,
    /// 64-bit hash of the prompt's template or system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_opt")]
    pub template_fp: Option<u64>,
    /// Whether token log-probabilities were requested.
    #[serde(default)]
    pub logprobs: bool,
}

impl TraceRecord {
    /// Appends this record as one JSON line (with a trailing `\n`) to `buf`.
    ///
    /// The output is byte-identical to `serde_json::to_string(self)` plus `\n`, only faster.
    pub fn to_json_line(&self, buf: &mut String) {
        write_trace_json(
            buf,
            &TraceView {
                ts_ms: self.ts_ms,
                api_key: &self.api_key,
                org: &self.org,
                ip: &self.ip,
                input_tokens: self.input_tokens,
                output_tokens: self.output_tokens,
                model: self.model.as_deref(),
                prompt_fp: self.prompt_fp,
                prompt_simhash: self.prompt_simhash,
                template_fp: self.template_fp,
                logprobs: self.logprobs,
            },
        );
    }

    /// The client address parsed, or `None` if `ip` is not a valid address.
    pub fn ip_addr(&self) -> Option<IpAddr> {
        self.ip.parse().ok()
    }
}

/// One line of the truth file: who sent request `i`.
///
/// JSON: `{"i":0,"actor":"E2-0","scenario":"E2","role":"attack"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruthRecord {
    /// 0-based index of the request in the trace.
    pub i: u64,
    /// Actor id, `<scenario>-<n>`; one actor is one API key.
    pub actor: String,
    /// The scenario that generated it.
    pub scenario: Scenario,
    /// Benign or attack.
    pub role: Role,
}

impl TruthRecord {
    /// Appends this record as one JSON line (with a trailing `\n`) to `buf`.
    pub fn to_json_line(&self, buf: &mut String) {
        write_truth_json(buf, self.i, &self.actor, self.scenario);
    }
}

struct TraceView<'a> {
    ts_ms: u64,
    api_key: &'a str,
    org: &'a str,
    ip: &'a str,
    input_tokens: u64,
    output_tokens: u64,
    model: Option<&'a str>,
    prompt_fp: Option<u64>,
    prompt_simhash: Option<u64>,
    template_fp: Option<u64>,
    logprobs: bool,
}

fn push_hex16(buf: &mut String, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        buf.push(char::from(HEX[((v >> (shift * 4)) & 0xf) as usize]));
    }
}

/// Appends `s` as a JSON string literal, escaped the way serde_json escapes.
fn push_json_str(buf: &mut String, s: &str) {
    buf.push('"');
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => buf.push_str("\\\""),
                '\\' => buf.push_str("\\\\"),
                '\n' => buf.push_str("\\n"),
                '\r' => buf.push_str("\\r"),
                '\t' => buf.push_str("\\t"),
                '\u{08}' => buf.push_str("\\b"),
                '\u{0c}' => buf.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    buf.push_str("\\u00");
                    buf.push(char::from(HEX[(c as usize) >> 4]));
                    buf.push(char::from(HEX[(c as usize) & 0xf]));
                }
                c => buf.push(c),
            }
        }
    }
    buf.push('"');
}

fn write_trace_json(buf: &mut String, r: &TraceView<'_>) {
    buf.push_str("{\"ts_ms\":");
    push_u64(buf, r.ts_ms);
    buf.push_str(",\"api_key\":");
    push_json_str(buf, r.api_key);
    buf.push_str(",\"org\":");
    push_json_str(buf, r.org);
    buf.push_str(",\"ip\":");
    push_json_str(buf, r.ip);
    buf.push_str(",\"input_tokens\":");
    push_u64(buf, r.input_tokens);
    buf.push_str(",\"output_tokens\":");
    push_u64(buf, r.output_tokens);
    if let Some(m) = r.model {
        buf.push_str(",\"model\":");
        push_json_str(buf, m);
    }
    for (name, v) in [
        (",\"prompt_fp\":\"", r.prompt_fp),
        (",\"prompt_simhash\":\"", r.prompt_simhash),
        (",\"template_fp\":\"", r.template_fp),
    ] {
        if let Some(v) = v {
            buf.push_str(name);
            push_hex16(buf, v);
            buf.push('"');
        }
    }
    buf.push_str(if r.logprobs {
        ",\"logprobs\":true}\n"
    } else {
        ",\"logprobs\":false}\n"
    });
}

fn write_truth_json(buf: &mut String, i: u64, actor: &str, s: Scenario) {
    buf.push_str("{\"i\":");
    push_u64(buf, i);
    buf.push_str(",\"actor\":");
    push_json_str(buf, actor);
    buf.push_str(",\"scenario\":\"");
    buf.push_str(s.name());
    buf.push_str("\",\"role\":\"");
    buf.push_str(s.role().as_str());
    buf.push_str("\"}\n");
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    Residential,
    Mobile,
    Cloud,
    Datacenter,
    Campus,
    Office,
}

const RESIDENTIAL_V4: &[u8] = &[
    2, 5, 24, 31, 37, 46, 47, 50, 62, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 108, 109, 115, 118,
    121, 151, 173, 174, 176, 177, 178, 179, 184, 187, 188, 189, 190, 201, 212, 213, 217,
];
const MOBILE_V4: &[u8] = &[107, 166, 172, 174, 39, 49, 100, 117];
const CLOUD_V4: &[u8] = &[3, 4, 13, 18, 20, 34, 35, 40, 44, 51, 52, 54, 104, 137, 138];
const DATACENTER_V4: &[u8] = &[
    5, 23, 45, 46, 64, 66, 91, 95, 103, 107, 139, 141, 146, 149, 151, 158, 159, 162, 167, 176, 185,
    193, 194, 195, 198, 207, 209, 213,
];
const CAMPUS_V4: &[u8] = &[
    128, 129, 130, 131, 132, 134, 136, 137, 138, 140, 141, 152, 155,
];
const OFFICE_V4: &[u8] = &[
    12, 38, 62, 63, 64, 65, 66, 80, 193, 194, 195, 199, 206, 208, 212, 216, 217,
];
/// (first hextet, second hextet base, mask of the second hextet's free bits).
const RESIDENTIAL_V6: &[(u16, u16, u16)] = &[
    (0x2601, 0x0000, 0x0fff),
    (0x2600, 0x1700, 0x00ff),
    (0x2a02, 0x8000, 0x0fff),
    (0x2003, 0x00c0, 0x003f),
    (0x2a01, 0x0c00, 0x00ff),
    (0x2804, 0x0000, 0x3fff),
    (0x240d, 0x0000, 0x0fff),
];
const MOBILE_V6: &[(u16, u16, u16)] = &[
    (0x2607, 0xfb90, 0x0000),
    (0x2600, 0x0380, 0x000f),
    (0x2a01, 0x0598, 0x0007),
    (0x2a00, 0x0020, 0x000f),
];

fn is_public_v4(a: u8, b: u8, c: u8) -> bool {
    !matches!(
        (a, b, c),
        (0, _, _)
            | (10, _, _)
            | (127, _, _)
            | (224..=255, _, _)
            | (100, 64..=127, _)
            | (169, 254, _)
            | (172, 16..=31, _)
            | (192, 168, _)
            | (192, 0, 0)
            | (192, 0, 2)
            | (198, 18..=19, _)
            | (198, 51, 100)
            | (203, 0, 113)
    )
}

/// Allocates address prefixes that no other actor group uses, and interns address strings.
#[derive(Debug, Default)]
struct AddrBook {
    used24: HashSet<u32>,
    used48: HashSet<u64>,
    table: Vec<String>,
}

impl AddrBook {
    fn v4_prefix(&mut self, rng: &mut Rng, net: Net) -> u32 {
        let firsts = match net {
            Net::Residential => RESIDENTIAL_V4,
            Net::Mobile => MOBILE_V4,
            Net::Cloud => CLOUD_V4,
            Net::Datacenter => DATACENTER_V4,
            Net::Campus => CAMPUS_V4,
            Net::Office => OFFICE_V4,
        };
        let mut last = 0;
        for _ in 0..1000 {
            let a = firsts
                .get(rng.below(firsts.len() as u64) as usize)
                .copied()
                .unwrap_or(73);
            let b = rng.below(256) as u8;
            let c = rng.below(256) as u8;
            if !is_public_v4(a, b, c) {
                continue;
            }
            last = u32::from_be_bytes([0, a, b, c]);
            if self.used24.insert(last) {
                return last;
            }
        }
        last // address space exhausted: accept a shared /24 rather than loop forever
    }

    fn v6_prefix(&mut self, rng: &mut Rng, net: Net) -> u64 {
        let table = if net == Net::Mobile {
            MOBILE_V6
        } else {
            RESIDENTIAL_V6
        };
        let mut last = 0;
        for _ in 0..1000 {
            let (h0, base, mask) = table
                .get(rng.below(table.len() as u64) as usize)
                .copied()
                .unwrap_or((0x2601, 0, 0x0fff));
            let h1 = base | (rng.next_u64() as u16 & mask);
            let h2 = rng.next_u64() as u16;
            last = (u64::from(h0) << 32) | (u64::from(h1) << 16) | u64::from(h2);
            if self.used48.insert(last) {
                return last;
            }
        }
        last
    }

    fn host_v4(&mut self, rng: &mut Rng, prefix: u32) -> u32 {
        let [_, a, b, c] = prefix.to_be_bytes();
        let d = rng.range(2, 254) as u8;
        self.intern(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn host_v6(&mut self, rng: &mut Rng, prefix48: u64) -> u32 {
        let subnet = rng.below(256) as u16;
        let iid = rng.next_u64() | 1;
        let hi = (u128::from(prefix48) << 80) | (u128::from(subnet) << 64);
        self.intern(IpAddr::V6(Ipv6Addr::from(hi | u128::from(iid))))
    }

    /// A fresh /24 (or /48 with probability `p_v6`) and one host in it.
    fn fresh_host(&mut self, rng: &mut Rng, net: Net, p_v6: f64) -> u32 {
        if rng.chance(p_v6) {
            let p = self.v6_prefix(rng, net);
            self.host_v6(rng, p)
        } else {
            let p = self.v4_prefix(rng, net);
            self.host_v4(rng, p)
        }
    }

    fn intern(&mut self, ip: IpAddr) -> u32 {
        self.table.push(ip.to_string());
        (self.table.len() - 1) as u32
    }
}

// ---------------------------------------------------------------------------------------------
// Actor models
// ---------------------------------------------------------------------------------------------

const MODEL_LARGE: &str = "lumen-4o";
const MODEL_MINI: &str = "lumen-4o-mini";
const MODEL_REASON: &str = "lumen-o3";
const MAX_OUTPUT: u32 = 4096;

#[derive(Debug, Clone, Copy)]
struct Template {
    fp: u64,
    centroid: u64,
}

/// Between `count.0` and `count.1` templates whose centroids lie within `bits` flipped bits of one family centroid.
fn template_family(rng: &mut Rng, count: (u64, u64), bits: (u64, u64)) -> Vec<Template> {
    let n = rng.range(count.0, count.1).max(1);
    let base = rng.next_u64();
    (0..n)
        .map(|_| {
            let k = rng.range(bits.0, bits.1) as u32;
            Template {
                fp: rng.next_u64(),
                centroid: rng.flip_bits(base, k),
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Timing {
    /// Near-constant rate: gap * (1 ± jitter), with rare pauses.
    Steady {
        gap: f64,
        jitter: f64,
        pause_p: f64,
        pause_mean: f64,
    },
    /// Poisson arrivals with a minimum gap.
    Poisson { mean_gap: f64, min_gap: f64 },
    /// Exactly periodic (whole milliseconds).
    Periodic { period: f64 },
    /// Sessions of a few requests with lognormal think time, then long idle gaps.
    Sessions {
        think_median: f64,
        think_sigma: f64,
        min_gap: f64,
        len_median: f64,
        idle_median: f64,
        idle_sigma: f64,
        remaining: u32,
    },
}

impl Timing {
    fn session_len(rng: &mut Rng, len_median: f64) -> u32 {
        rng.lognormal(len_median, 0.55).round().clamp(2.0, 20.0) as u32
    }

    fn init(&mut self, rng: &mut Rng) {
        if let Timing::Sessions {
            len_median,
            remaining,
            ..
        } = self
        {
            *remaining = Self::session_len(rng, *len_median) - 1;
        }
    }

    /// The gap to the next request, and whether that request starts a new session.
    fn next_gap(&mut self, rng: &mut Rng) -> (f64, bool) {
        match self {
            Timing::Steady {
                gap,
                jitter,
                pause_p,
                pause_mean,
            } => {
                let mut g = *gap * (1.0 + *jitter * (2.0 * rng.f64() - 1.0));
                if *pause_p > 0.0 && rng.chance(*pause_p) {
                    g += rng.exp(*pause_mean);
                }
                (g.max(1.0), false)
            }
            Timing::Poisson { mean_gap, min_gap } => (rng.exp(*mean_gap).max(*min_gap), false),
            Timing::Periodic { period } => (*period, false),
            Timing::Sessions {
                think_median,
                think_sigma,
                min_gap,
                len_median,
                idle_median,
                idle_sigma,
                remaining,
            } => {
                if *remaining > 0 {
                    *remaining -= 1;
                    (
                        rng.lognormal(*think_median, *think_sigma).max(*min_gap),
                        false,
                    )
                } else {
                    *remaining = Self::session_len(rng, *len_median) - 1;
                    let idle = rng.lognormal(*idle_median, *idle_sigma).max(5.0 * 60_000.0);
                    (idle, true)
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum IpSource {
    Fixed(u32),
    PerRequest(Vec<u32>),
    PerSession {
        ips: Vec<u32>,
        p_primary: f64,
        cur: u32,
    },
    /// A different address of a shared pool on every request.
    Pool {
        ips: Arc<Vec<u32>>,
        last: u32,
    },
}

impl IpSource {
    fn pick(&mut self, rng: &mut Rng, new_session: bool) -> u32 {
        match self {
            IpSource::Fixed(ip) => *ip,
            IpSource::PerRequest(ips) => rng.choice(ips).copied().unwrap_or(0),
            IpSource::PerSession {
                ips,
                p_primary,
                cur,
            } => {
                if new_session {
                    let first = ips.first().copied().unwrap_or(0);
                    *cur = if ips.len() < 2 || rng.chance(*p_primary) {
                        first
                    } else {
                        ips.get(1 + rng.below(ips.len() as u64 - 1) as usize)
                            .copied()
                            .unwrap_or(first)
                    };
                }
                *cur
            }
            IpSource::Pool { ips, last } => {
                let n = ips.len() as u64;
                let mut idx = rng.below(n) as usize;
                if n > 1 && ips.get(idx) == Some(last) {
                    idx = (idx + 1) % ips.len();
                }
                *last = ips.get(idx).copied().unwrap_or(0);
                *last
            }
        }
    }
}

#[derive(Debug, Clone)]
enum PromptGen {
    /// People chatting: near edits of the previous prompt, optional system prompt or
    /// shared homework template.
    Chat {
        system: Option<u64>,
        system_p: f64,
        edit_p: f64,
        resend_p: f64,
        homework: Option<Arc<Vec<Template>>>,
        homework_p: f64,
        cur_homework: Option<Template>,
        use_system: bool,
        last_fp: u64,
        last_sim: u64,
    },
    /// Distinct prompts filled into templates of a family; SimHash near the template centroid.
    Family {
        templates: Arc<Vec<Template>>,
        spread: (u64, u64),
    },
    /// A sweep of one (or two) templates over a topic list; the topic decides the SimHash.
    Sweep {
        main: Template,
        alt: Option<Template>,
        topics: u64,
        counter: u64,
        step: u64,
        topic_seed: u64,
    },
    /// The same prompt every time.
    Fixed {
        fp: u64,
        sim: u64,
        template: Option<u64>,
    },
}

type Features = (Option<u64>, Option<u64>, Option<u64>);

impl PromptGen {
    fn next(&mut self, rng: &mut Rng, new_session: bool) -> Features {
        match self {
            PromptGen::Chat {
                system,
                system_p,
                edit_p,
                resend_p,
                homework,
                homework_p,
                cur_homework,
                use_system,
                last_fp,
                last_sim,
            } => {
                if new_session {
                    *cur_homework = None;
                    if let Some(hw) = homework {
                        if rng.chance(*homework_p) {
                            *cur_homework = rng.choice(hw).copied();
                        }
                    }
                    *use_system = system.is_some() && rng.chance(*system_p);
                }
                let fresh = |rng: &mut Rng, hw: &Option<Template>| match hw {
                    Some(t) => {
                        let k = rng.range(2, 7) as u32;
                        rng.flip_bits(t.centroid, k)
                    }
                    None => rng.next_u64(),
                };
                let r = rng.f64();
                if new_session {
                    *last_sim = fresh(rng, cur_homework);
                    *last_fp = rng.next_u64();
                } else if r < *resend_p {
                    // regenerate: the exact same prompt again
                } else if r < *resend_p + *edit_p {
                    let k = rng.range(1, 4) as u32;
                    *last_sim = rng.flip_bits(*last_sim, k);
                    *last_fp = rng.next_u64();
                } else {
                    *last_sim = fresh(rng, cur_homework);
                    *last_fp = rng.next_u64();
                }
                let tfp = match (cur_homework, *use_system) {
                    (Some(t), _) => Some(t.fp),
                    (None, true) => *system,
                    (None, false) => None,
                };
                (Some(*last_fp), Some(*last_sim), tfp)
            }
            PromptGen::Family { templates, spread } => {
                let t = rng
                    .choice(templates)
                    .copied()
                    .unwrap_or(Template { fp: 0, centroid: 0 });
                let k = rng.range(spread.0, spread.1) as u32;
                let sim = rng.flip_bits(t.centroid, k);
                (Some(rng.next_u64()), Some(sim), Some(t.fp))
            }
            PromptGen::Sweep {
                main,
                alt,
                topics,
                counter,
                step,
                topic_seed,
            } => {
                let topic = *counter % (*topics).max(1);
                let round = *counter / (*topics).max(1);
                *counter += *step;
                let t = match alt {
                    Some(a) if rng.chance(0.3) => *a,
                    _ => *main,
                };
                let mut trng = Rng::derive(*topic_seed, &[topic]);
                let k = trng.range(1, 5) as u32;
                let sim = trng.flip_bits(t.centroid, k);
                let fp = mix64(mix64(*topic_seed ^ t.fp, topic), round);
                (Some(fp), Some(sim), Some(t.fp))
            }
            PromptGen::Fixed { fp, sim, template } => (Some(*fp), Some(*sim), *template),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum TokenDist {
    LogNormal {
        median: f64,
        sigma: f64,
        min: u32,
        max: u32,
    },
    /// Mostly exactly one token, sometimes a few.
    OneToken { p_one: f64, max: u32 },
}

impl TokenDist {
    fn lognormal(median: f64, sigma: f64, min: u32, max: u32) -> Self {
        TokenDist::LogNormal {
            median,
            sigma,
            min,
            max,
        }
    }

    fn draw(&self, rng: &mut Rng) -> u32 {
        match *self {
            TokenDist::LogNormal {
                median,
                sigma,
                min,
                max,
            } => rng
                .lognormal(median, sigma)
                .round()
                .clamp(f64::from(min), f64::from(max)) as u32,
            TokenDist::OneToken { p_one, max } => {
                if rng.chance(p_one) {
                    1
                } else {
                    rng.range(2, u64::from(max.max(2))) as u32
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ModelPick {
    None,
    Fixed(&'static str),
    /// First with probability `1 - p`, second with probability `p`.
    Mix(&'static str, &'static str, f64),
}

/// Everything that defines an actor's behaviour.
#[derive(Debug)]
struct ActorSpec {
    timing: Timing,
    ip: IpSource,
    prompt: PromptGen,
    input: TokenDist,
    output: TokenDist,
    /// Conversation history carried into the input, capped at this many tokens.
    context_cap: Option<u32>,
    logprob_p: f64,
    model: ModelPick,
}

#[derive(Debug)]
struct Actor {
    rng: Rng,
    next_t: f64,
    next_new_session: bool,
    end: f64,
    spec: ActorSpec,
    context: u32,
}

impl Actor {
    fn emit(&mut self, actor: u32) -> SimEvent {
        let rng = &mut self.rng;
        let s = &mut self.spec;
        let ts_ms = self.next_t as u64;
        let new_session = self.next_new_session;
        let ip = s.ip.pick(rng, new_session);
        let (prompt_fp, prompt_simhash, template_fp) = s.prompt.next(rng, new_session);
        let own_input = s.input.draw(rng);
        let output = s.output.draw(rng);
        let input = match s.context_cap {
            Some(cap) => {
                if new_session {
                    self.context = 0;
                }
                let input = own_input.saturating_add(self.context.min(cap));
                self.context = self
                    .context
                    .saturating_add(own_input)
                    .saturating_add(output);
                input
            }
            None => own_input,
        };
        let logprobs = s.logprob_p > 0.0 && rng.chance(s.logprob_p);
        let model = match s.model {
            ModelPick::None => None,
            ModelPick::Fixed(m) => Some(m),
            ModelPick::Mix(a, b, p) => Some(if rng.chance(p) { b } else { a }),
        };
        let (gap, ns) = s.timing.next_gap(rng);
        self.next_t += gap;
        self.next_new_session = ns;
        SimEvent {
            ts_ms,
            actor,
            ip,
            input_tokens: input,
            output_tokens: output,
            model,
            prompt_fp,
            prompt_simhash,
            template_fp,
            logprobs,
        }
    }
}

/// Who an actor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    /// Actor id as written in the truth file, e.g. `"E2-0"`.
    pub id: String,
    /// Its scenario.
    pub scenario: Scenario,
    /// Its API key.
    pub api_key: String,
    /// Its org.
    pub org: String,
    /// Group number within the scenario (org, NAT site or campaign), counted across entries.
    pub group: u32,
}

impl ActorInfo {
    /// Benign or attack.
    pub fn role(&self) -> Role {
        self.scenario.role()
    }
}

/// One generated request in compact form (no allocation); turn it into a [`TraceRecord`]
/// with [`Simulator::record`] or write it with [`Simulator::write_trace_line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimEvent {
    /// Milliseconds since the start of the trace.
    pub ts_ms: u64,
    /// Index of the actor in [`Simulator::actors`].
    pub actor: u32,
    /// Index of the client address in the simulator's address table ([`Simulator::ip`]).
    pub ip: u32,
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Response tokens.
    pub output_tokens: u32,
    /// Model name.
    pub model: Option<&'static str>,
    /// Exact prompt hash.
    pub prompt_fp: Option<u64>,
    /// Prompt SimHash.
    pub prompt_simhash: Option<u64>,
    /// Template hash.
    pub template_fp: Option<u64>,
    /// Logprobs requested.
    pub logprobs: bool,
}

// ---------------------------------------------------------------------------------------------
// Building the actors
// ---------------------------------------------------------------------------------------------

const SETUP_DOMAIN: u64 = 0x5E7_0001;
const ACTOR_DOMAIN: u64 = 0xAC7_0002;

fn api_key(rng: &mut Rng) -> String {
    let mut s = String::with_capacity(30);
    s.push_str("sk-proj-");
    rng.base62(22, &mut s);
    s
}

fn org_id(rng: &mut Rng) -> String {
    let mut s = String::with_capacity(16);
    s.push_str("org-");
    rng.base62(12, &mut s);
    s
}

/// Splits `n` into `groups` near-equal parts.
fn split(n: u32, groups: u32) -> impl Iterator<Item = (u32, u32)> {
    let groups = groups.max(1);
    (0..groups).map(move |g| (g, n / groups + u32::from(g < n % groups)))
}

struct Builder {
    seed: u64,
    duration: f64,
    addr: AddrBook,
    actors: Vec<Actor>,
    infos: Vec<ActorInfo>,
    next_id: [u32; 11],
    next_group: [u32; 11],
}

impl Builder {
    fn setup_rng(&self, s: Scenario, ordinal: u64) -> Rng {
        Rng::derive(self.seed, &[SETUP_DOMAIN, s.index() as u64, ordinal])
    }

    /// Start of an attack campaign: explicit, or seeded early in the trace.
    fn campaign_start(&self, rng: &mut Rng, p: &ScenarioParams, frac: f64, cap_ms: f64) -> f64 {
        match p.start_ms {
            Some(t) => t as f64,
            None => rng.uniform(0.0, (self.duration * frac).min(cap_ms)),
        }
    }

    fn end(&self, start: f64, p: &ScenarioParams) -> f64 {
        match p.active_ms {
            Some(a) => (start + a as f64).min(self.duration),
            None => self.duration,
        }
    }

    fn group_id(&mut self, s: Scenario) -> u32 {
        let g = self.next_group[s.index()];
        self.next_group[s.index()] += 1;
        g
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        s: Scenario,
        group: u32,
        api_key: String,
        org: String,
        spec: ActorSpec,
        start: f64,
        end: f64,
    ) {
        let n = self.next_id[s.index()];
        self.next_id[s.index()] += 1;
        let mut rng = Rng::derive(self.seed, &[ACTOR_DOMAIN, s.index() as u64, u64::from(n)]);
        let mut spec = spec;
        spec.timing.init(&mut rng);
        self.actors.push(Actor {
            rng,
            next_t: start.max(0.0),
            next_new_session: true,
            end,
            spec,
            context: 0,
        });
        self.infos.push(ActorInfo {
            id: format!("{}-{}", s.name(), n),
            scenario: s,
            api_key,
            org,
            group,
        });
    }

    fn build(&mut self, s: Scenario, p: &ScenarioParams, ordinal: u64) {
        if p.actors == 0 {
            return;
        }
        let mut rng = self.setup_rng(s, ordinal);
        match s {
            Scenario::B1 => self.b1(&mut rng, p),
            Scenario::B2 => self.b2(&mut rng, p),
            Scenario::B3 => self.b3(&mut rng, p),
            Scenario::B4 => self.b4(&mut rng, p),
            Scenario::B5 => self.b5(&mut rng, p),
            Scenario::E1 => self.e1(&mut rng, p),
            Scenario::E2 => self.e2(&mut rng, p),
            Scenario::E3 => self.e3(&mut rng, p),
            Scenario::E4 => self.e4(&mut rng, p),
            Scenario::E5 => self.e5(&mut rng, p),
            Scenario::E6 => self.e6(&mut rng, p),
        }
    }

    /// A person's behaviour (B1, B4). Returns the spec and its idle median.
    fn chat_spec(
        rng: &mut Rng,
        rate: f64,
        ips: Vec<u32>,
        p_primary: f64,
        homework: Option<Arc<Vec<Template>>>,
        homework_p: f64,
    ) -> (ActorSpec, f64) {
        let think_median = 60_000.0 / rate * rng.uniform(0.6, 1.6);
        let idle_median = rng.uniform(20.0, 90.0) * 60_000.0;
        let has_system = rng.chance(0.3);
        let system = if has_system {
            Some(rng.next_u64())
        } else {
            None
        };
        let carries_context = rng.chance(0.6);
        let model = if rng.chance(0.6) {
            ModelPick::Mix(MODEL_LARGE, MODEL_MINI, rng.uniform(0.05, 0.3))
        } else {
            ModelPick::Mix(MODEL_MINI, MODEL_REASON, rng.uniform(0.0, 0.15))
        };
        let spec = ActorSpec {
            timing: Timing::Sessions {
                think_median,
                think_sigma: 0.9,
                min_gap: 4_000.0,
                len_median: rng.uniform(4.0, 9.0),
                idle_median,
                idle_sigma: 0.8,
                remaining: 0,
            },
            ip: IpSource::PerSession {
                ips,
                p_primary,
                cur: 0,
            },
            prompt: PromptGen::Chat {
                system,
                system_p: 0.7,
                edit_p: rng.uniform(0.4, 0.75),
                resend_p: 0.03,
                homework,
                homework_p,
                cur_homework: None,
                use_system: false,
                last_fp: 0,
                last_sim: 0,
            },
            input: TokenDist::lognormal(rng.uniform(60.0, 250.0), 0.9, 3, 4000),
            output: TokenDist::lognormal(rng.uniform(150.0, 500.0), 0.8, 1, MAX_OUTPUT),
            context_cap: if carries_context { Some(6000) } else { None },
            logprob_p: 0.01,
            model,
        };
        (spec, idle_median)
    }

    fn b1(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        let t0 = p.start_ms.unwrap_or(0) as f64;
        let end = self.end(t0, p);
        let g = self.group_id(Scenario::B1);
        for _ in 0..p.actors {
            let key = api_key(rng);
            let org = org_id(rng);
            let mut ips = vec![self.addr.fresh_host(rng, Net::Residential, 0.3)];
            if rng.chance(0.5) {
                ips.push(self.addr.fresh_host(rng, Net::Mobile, 0.6));
            }
            let (spec, idle) = Self::chat_spec(rng, p.rate_per_min, ips, 0.8, None, 0.0);
            let start = t0 + rng.uniform(0.0, idle);
            self.push(Scenario::B1, g, key, org, spec, start, end);
        }
    }

    fn b2(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for (_, keys) in split(p.actors, p.groups) {
            let g = self.group_id(Scenario::B2);
            let org = org_id(rng);
            let prefix = self.addr.v4_prefix(rng, Net::Cloud);
            let hosts: Vec<u32> = (0..rng.range(1, 3))
                .map(|_| self.addr.host_v4(rng, prefix))
                .collect();
            let template = Arc::new(template_family(rng, (1, 1), (0, 0)));
            let logprob_p = rng.uniform(0.5, 0.95);
            let doc_median = rng.uniform(300.0, 900.0);
            let label_median = rng.uniform(1.5, 4.0);
            let t0 = match p.start_ms {
                Some(t) => t as f64,
                None => rng.uniform(0.0, (self.duration * 0.02).min(60_000.0)),
            };
            let end = self.end(t0, p);
            for k in 0..keys {
                let rate = (p.rate_per_min * rng.uniform(0.95, 1.03)).min(100.0);
                let gap = 60_000.0 / rate;
                let spec = ActorSpec {
                    timing: Timing::Steady {
                        gap,
                        jitter: 0.12,
                        pause_p: 0.0005,
                        pause_mean: 60_000.0,
                    },
                    ip: IpSource::Fixed(hosts[k as usize % hosts.len()]),
                    prompt: PromptGen::Family {
                        templates: template.clone(),
                        spread: (1, 6),
                    },
                    input: TokenDist::lognormal(doc_median, 0.5, 20, 3000),
                    output: TokenDist::lognormal(label_median, 0.4, 1, 8),
                    context_cap: None,
                    logprob_p,
                    model: ModelPick::Fixed(MODEL_MINI),
                };
                let start = t0 + rng.uniform(0.0, 5_000.0);
                let key = api_key(rng);
                self.push(Scenario::B2, g, key, org.clone(), spec, start, end);
            }
        }
    }

    fn b3(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for (_, keys) in split(p.actors, p.groups) {
            if keys == 0 {
                continue;
            }
            let g = self.group_id(Scenario::B3);
            let org = org_id(rng);
            let mut clusters: Vec<Vec<u32>> = Vec::new();
            for net in [Net::Office, Net::Office, Net::Cloud, Net::Cloud] {
                let prefix = self.addr.v4_prefix(rng, net);
                let hosts = (0..rng.range(1, 4))
                    .map(|_| self.addr.host_v4(rng, prefix))
                    .collect();
                clusters.push(hosts);
            }
            // Org total stays at most 1200/min; per key at most 60/min.
            let total = (p.rate_per_min * f64::from(keys)).min(1200.0);
            let weights: Vec<f64> = (0..keys).map(|_| rng.lognormal(1.0, 0.8)).collect();
            let wsum: f64 = weights.iter().sum::<f64>().max(1e-9);
            let t0 = p.start_ms.unwrap_or(0) as f64;
            let end = self.end(t0, p);
            for w in weights {
                let rate = (total * w / wsum).clamp(0.05, 60.0);
                let gap = 60_000.0 / rate;
                let timing = if rng.chance(0.5) {
                    Timing::Poisson {
                        mean_gap: gap,
                        min_gap: 150.0,
                    }
                } else {
                    Timing::Steady {
                        gap,
                        jitter: 0.5,
                        pause_p: 0.002,
                        pause_mean: 120_000.0,
                    }
                };
                let c1 = rng.below(clusters.len() as u64) as usize;
                let mut ips = clusters[c1].clone();
                if rng.chance(0.3) {
                    let c2 = rng.below(clusters.len() as u64) as usize;
                    ips.extend(clusters[c2].iter().copied());
                }
                let n_templates = rng.range(1, 4) as usize;
                let templates: Vec<Template> = (0..n_templates)
                    .map(|_| Template {
                        fp: rng.next_u64(),
                        centroid: rng.next_u64(),
                    })
                    .collect();
                let spec = ActorSpec {
                    timing,
                    ip: IpSource::PerRequest(ips),
                    prompt: PromptGen::Family {
                        templates: Arc::new(templates),
                        spread: (3, 14),
                    },
                    input: TokenDist::lognormal(rng.uniform(150.0, 1500.0), 0.7, 10, 8000),
                    output: TokenDist::lognormal(rng.uniform(40.0, 600.0), 0.9, 1, MAX_OUTPUT),
                    context_cap: None,
                    logprob_p: if rng.chance(0.1) { 0.5 } else { 0.0 },
                    model: ModelPick::Fixed(if rng.chance(0.5) {
                        MODEL_MINI
                    } else {
                        MODEL_LARGE
                    }),
                };
                let start = t0 + rng.uniform(0.0, gap.min(600_000.0));
                let key = api_key(rng);
                self.push(Scenario::B3, g, key, org.clone(), spec, start, end);
            }
        }
    }

    fn b4(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        let t0 = p.start_ms.unwrap_or(0) as f64;
        let end = self.end(t0, p);
        for (site, accounts) in split(p.actors, p.groups) {
            let g = self.group_id(Scenario::B4);
            // Even sites are campuses (homework templates), odd ones carrier NATs.
            let campus = site % 2 == 0;
            let prefix = self
                .addr
                .v4_prefix(rng, if campus { Net::Campus } else { Net::Mobile });
            let hosts: Vec<u32> = (0..rng.range(1, 2))
                .map(|_| self.addr.host_v4(rng, prefix))
                .collect();
            let homework = Arc::new(
                (0..rng.range(3, 8))
                    .map(|_| Template {
                        fp: rng.next_u64(),
                        centroid: rng.next_u64(),
                    })
                    .collect::<Vec<_>>(),
            );
            for _ in 0..accounts {
                let key = api_key(rng);
                let org = org_id(rng);
                let homework_p = if campus { rng.uniform(0.1, 0.5) } else { 0.05 };
                let (spec, idle) = Self::chat_spec(
                    rng,
                    p.rate_per_min,
                    hosts.clone(),
                    0.5,
                    Some(homework.clone()),
                    homework_p,
                );
                let start = t0 + rng.uniform(0.0, idle);
                self.push(Scenario::B4, g, key, org, spec, start, end);
            }
        }
    }

    fn b5(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        let t0 = p.start_ms.unwrap_or(0) as f64;
        let end = self.end(t0, p);
        for (_, bots) in split(p.actors, p.groups) {
            let g = self.group_id(Scenario::B5);
            let org = org_id(rng);
            for _ in 0..bots {
                let mult = *rng.choice(&[0.5, 1.0, 1.0, 2.0, 5.0]).unwrap_or(&1.0);
                let period = (60_000.0 / p.rate_per_min * mult).round().max(2_000.0);
                let prefix = self.addr.v4_prefix(rng, Net::Cloud);
                let ip = self.addr.host_v4(rng, prefix);
                let model = if rng.chance(0.3) {
                    ModelPick::None
                } else {
                    ModelPick::Fixed(MODEL_MINI)
                };
                let spec = ActorSpec {
                    timing: Timing::Periodic { period },
                    ip: IpSource::Fixed(ip),
                    prompt: PromptGen::Fixed {
                        fp: rng.next_u64(),
                        sim: rng.next_u64(),
                        template: if rng.chance(0.5) {
                            Some(rng.next_u64())
                        } else {
                            None
                        },
                    },
                    input: TokenDist::lognormal(rng.range(20, 400) as f64, 0.0, 1, 400),
                    output: TokenDist::lognormal(rng.range(1, 12) as f64, 0.15, 1, 16),
                    context_cap: None,
                    logprob_p: 0.0,
                    model,
                };
                let start = (t0 + rng.uniform(0.0, period)).round();
                let key = api_key(rng);
                self.push(Scenario::B5, g, key, org.clone(), spec, start, end);
            }
        }
    }

    fn e1(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for _ in 0..p.actors {
            let g = self.group_id(Scenario::E1);
            let ip = if rng.chance(0.5) {
                self.addr.fresh_host(rng, Net::Cloud, 0.0)
            } else {
                self.addr.fresh_host(rng, Net::Residential, 0.2)
            };
            let family = template_family(rng, (2, 4), (1, 5));
            let rate = p.rate_per_min * rng.uniform(0.97, 1.06);
            let spec = ActorSpec {
                timing: Timing::Steady {
                    gap: 60_000.0 / rate,
                    jitter: 0.35,
                    pause_p: 0.0,
                    pause_mean: 0.0,
                },
                ip: IpSource::Fixed(ip),
                prompt: PromptGen::Family {
                    templates: Arc::new(family),
                    spread: (1, 4),
                },
                input: TokenDist::lognormal(rng.uniform(150.0, 600.0), 0.4, 10, 8000),
                output: TokenDist::lognormal(rng.uniform(800.0, 1500.0), 0.35, 50, MAX_OUTPUT),
                context_cap: None,
                logprob_p: rng.uniform(0.0, 0.1),
                model: ModelPick::Mix(MODEL_LARGE, MODEL_REASON, rng.uniform(0.0, 0.2)),
            };
            let start = self.campaign_start(rng, p, 0.1, 600_000.0);
            let end = self.end(start, p);
            let (key, org) = (api_key(rng), org_id(rng));
            self.push(Scenario::E1, g, key, org, spec, start, end);
        }
    }

    fn e2(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for (_, keys) in split(p.actors, p.groups) {
            if keys == 0 {
                continue;
            }
            let g = self.group_id(Scenario::E2);
            let org = org_id(rng);
            let prefix = self.addr.v4_prefix(rng, Net::Cloud);
            let hosts: Vec<u32> = (0..rng.range(2, 8))
                .map(|_| self.addr.host_v4(rng, prefix))
                .collect();
            let family = Arc::new(template_family(rng, (3, 6), (1, 5)));
            // Each key under its limit, the org total under 1,500/min.
            let base = p
                .rate_per_min
                .min(110.0 / 1.15)
                .min(1400.0 / 1.15 / f64::from(keys));
            let t0 = self.campaign_start(rng, p, 0.15, 900_000.0);
            let end = self.end(t0, p);
            let jitter = rng.uniform(0.2, 0.5);
            for k in 0..keys {
                let rate = base * rng.uniform(0.8, 1.15);
                let spec = ActorSpec {
                    timing: Timing::Steady {
                        gap: 60_000.0 / rate,
                        jitter,
                        pause_p: 0.001,
                        pause_mean: 20_000.0,
                    },
                    ip: IpSource::Fixed(hosts[k as usize % hosts.len()]),
                    prompt: PromptGen::Family {
                        templates: family.clone(),
                        spread: (1, 4),
                    },
                    input: TokenDist::lognormal(rng.uniform(150.0, 500.0), 0.4, 10, 8000),
                    output: TokenDist::lognormal(rng.uniform(700.0, 1600.0), 0.4, 50, MAX_OUTPUT),
                    context_cap: None,
                    logprob_p: 0.05,
                    model: ModelPick::Fixed(MODEL_LARGE),
                };
                let start = t0 + rng.uniform(0.0, 3_000.0);
                let key = api_key(rng);
                self.push(Scenario::E2, g, key, org.clone(), spec, start, end);
            }
        }
    }

    fn e3(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for (_, orgs) in split(p.actors, p.groups) {
            if orgs == 0 {
                continue;
            }
            let g = self.group_id(Scenario::E3);
            let mut hosts: Vec<u32> = Vec::new();
            for _ in 0..rng.range(1, 2) {
                let prefix = self.addr.v4_prefix(rng, Net::Datacenter);
                for _ in 0..rng.range(1, 6) {
                    hosts.push(self.addr.host_v4(rng, prefix));
                }
            }
            let family = Arc::new(template_family(rng, (3, 6), (1, 5)));
            let t0 = self.campaign_start(rng, p, 0.1, 600_000.0);
            let stagger = (self.duration * 0.2).min(1_200_000.0);
            for _ in 0..orgs {
                let rate = (p.rate_per_min * rng.uniform(0.6, 1.4)).min(115.0);
                let gap = 60_000.0 / rate;
                let timing = if rng.chance(0.6) {
                    Timing::Steady {
                        gap,
                        jitter: rng.uniform(0.2, 0.6),
                        pause_p: 0.002,
                        pause_mean: 30_000.0,
                    }
                } else {
                    Timing::Poisson {
                        mean_gap: gap,
                        min_gap: 300.0,
                    }
                };
                let spec = ActorSpec {
                    timing,
                    ip: IpSource::Fixed(*rng.choice(&hosts).unwrap_or(&0)),
                    prompt: PromptGen::Family {
                        templates: family.clone(),
                        spread: (1, 4),
                    },
                    input: TokenDist::lognormal(rng.uniform(150.0, 500.0), 0.4, 10, 8000),
                    output: TokenDist::lognormal(rng.uniform(600.0, 1400.0), 0.4, 50, MAX_OUTPUT),
                    context_cap: None,
                    logprob_p: 0.03,
                    model: ModelPick::Fixed(MODEL_LARGE),
                };
                let start = t0 + rng.uniform(0.0, stagger);
                let end = self.end(t0, p);
                let (key, org) = (api_key(rng), org_id(rng));
                self.push(Scenario::E3, g, key, org, spec, start, end);
            }
        }
    }

    fn e4(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for (_, orgs) in split(p.actors, p.groups) {
            if orgs == 0 {
                continue;
            }
            let g = self.group_id(Scenario::E4);
            let pool_size = (orgs as usize * 30).clamp(2000, 200_000);
            let pool: Vec<u32> = (0..pool_size)
                .map(|_| self.addr.fresh_host(rng, Net::Residential, 0.15))
                .collect();
            let pool = Arc::new(pool);
            let family = Arc::new(template_family(rng, (3, 6), (1, 5)));
            let t0 = self.campaign_start(rng, p, 0.05, 300_000.0);
            let stagger = (self.duration * 0.3).min(1_800_000.0);
            let end = self.end(t0, p);
            for _ in 0..orgs {
                let rate = p.rate_per_min * rng.uniform(0.5, 1.5);
                let gap = 60_000.0 / rate;
                let timing = if rng.chance(0.7) {
                    Timing::Poisson {
                        mean_gap: gap,
                        min_gap: 1_000.0,
                    }
                } else {
                    Timing::Steady {
                        gap,
                        jitter: 0.6,
                        pause_p: 0.01,
                        pause_mean: 120_000.0,
                    }
                };
                let spec = ActorSpec {
                    timing,
                    ip: IpSource::Pool {
                        ips: pool.clone(),
                        last: u32::MAX,
                    },
                    prompt: PromptGen::Family {
                        templates: family.clone(),
                        spread: (1, 4),
                    },
                    input: TokenDist::lognormal(rng.uniform(200.0, 500.0), 0.4, 10, 8000),
                    output: TokenDist::lognormal(rng.uniform(900.0, 1800.0), 0.35, 50, MAX_OUTPUT),
                    context_cap: None,
                    logprob_p: 0.02,
                    model: ModelPick::Mix(MODEL_LARGE, MODEL_REASON, 0.1),
                };
                let start = t0 + rng.uniform(0.0, stagger);
                let (key, org) = (api_key(rng), org_id(rng));
                self.push(Scenario::E4, g, key, org, spec, start, end);
            }
        }
    }

    fn e5(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for (_, keys) in split(p.actors, p.groups) {
            if keys == 0 {
                continue;
            }
            let g = self.group_id(Scenario::E5);
            let org = org_id(rng);
            let family = template_family(rng, (2, 2), (2, 5));
            let main = family[0];
            let alt = if rng.chance(0.3) {
                family.get(1).copied()
            } else {
                None
            };
            let topics = rng.range(300, 3000);
            let topic_seed = rng.next_u64();
            let t0 = self.campaign_start(rng, p, 0.1, 600_000.0);
            let end = self.end(t0, p);
            for k in 0..keys {
                let ip = if rng.chance(0.6) {
                    self.addr.fresh_host(rng, Net::Cloud, 0.0)
                } else {
                    self.addr.fresh_host(rng, Net::Residential, 0.3)
                };
                let rate = (p.rate_per_min * rng.uniform(0.8, 1.2)).min(118.0);
                let spec = ActorSpec {
                    timing: Timing::Steady {
                        gap: 60_000.0 / rate,
                        jitter: 0.4,
                        pause_p: 0.001,
                        pause_mean: 30_000.0,
                    },
                    ip: IpSource::Fixed(ip),
                    prompt: PromptGen::Sweep {
                        main,
                        alt,
                        topics,
                        counter: u64::from(k),
                        step: u64::from(keys),
                        topic_seed,
                    },
                    input: TokenDist::lognormal(rng.uniform(120.0, 400.0), 0.3, 10, 8000),
                    output: TokenDist::lognormal(rng.uniform(900.0, 1700.0), 0.35, 50, MAX_OUTPUT),
                    context_cap: None,
                    logprob_p: 0.02,
                    model: ModelPick::Fixed(MODEL_LARGE),
                };
                let start = t0 + rng.uniform(0.0, 60_000.0);
                let key = api_key(rng);
                self.push(Scenario::E5, g, key, org.clone(), spec, start, end);
            }
        }
    }

    fn e6(&mut self, rng: &mut Rng, p: &ScenarioParams) {
        for (_, keys) in split(p.actors, p.groups) {
            if keys == 0 {
                continue;
            }
            let g = self.group_id(Scenario::E6);
            let org = org_id(rng);
            let mut templates = Vec::new();
            for _ in 0..rng.range(2, 4) {
                templates.extend(template_family(rng, (10, 20), (6, 20)));
            }
            let templates = Arc::new(templates);
            let t0 = self.campaign_start(rng, p, 0.1, 600_000.0);
            let end = self.end(t0, p);
            for _ in 0..keys {
                let ip = self.addr.fresh_host(rng, Net::Cloud, 0.0);
                let rate = (p.rate_per_min * rng.uniform(0.8, 1.2)).min(118.0);
                let gap = 60_000.0 / rate;
                let timing = if rng.chance(0.5) {
                    Timing::Steady {
                        gap,
                        jitter: 0.3,
                        pause_p: 0.001,
                        pause_mean: 30_000.0,
                    }
                } else {
                    Timing::Poisson {
                        mean_gap: gap,
                        min_gap: 250.0,
                    }
                };
                let spec = ActorSpec {
                    timing,
                    ip: IpSource::Fixed(ip),
                    prompt: PromptGen::Family {
                        templates: templates.clone(),
                        spread: (0, 4),
                    },
                    input: TokenDist::lognormal(rng.uniform(40.0, 250.0), 0.5, 5, 4000),
                    output: TokenDist::OneToken {
                        p_one: rng.uniform(0.88, 0.97),
                        max: 5,
                    },
                    context_cap: None,
                    logprob_p: rng.uniform(0.93, 0.995),
                    model: ModelPick::Fixed(MODEL_LARGE),
                };
                let start = t0 + rng.uniform(0.0, 30_000.0);
                let key = api_key(rng);
                self.push(Scenario::E6, g, key, org.clone(), spec, start, end);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulator
// ---------------------------------------------------------------------------------------------

/// Streams the merged requests of all actors in non-decreasing `ts_ms` order.
///
/// Ties are broken by actor index, so the order is fully deterministic. Memory is one heap
/// entry per live actor plus the actors themselves, independent of the trace length.
#[derive(Debug)]
pub struct Simulator {
    actors: Vec<Actor>,
    infos: Vec<ActorInfo>,
    ips: Vec<String>,
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    emitted: u64,
    max_requests: u64,
    duration_ms: u64,
}

impl Simulator {
    /// Builds every actor of `cfg`. Parameters are [`ScenarioParams::sanitized`] first.
    pub fn new(cfg: &SimConfig) -> Self {
        let mut b = Builder {
            seed: cfg.seed,
            duration: cfg.duration_ms as f64,
            addr: AddrBook::default(),
            actors: Vec::new(),
            infos: Vec::new(),
            next_id: [0; 11],
            next_group: [0; 11],
        };
        for (ordinal, (s, p)) in cfg.scenarios.iter().enumerate() {
            b.build(*s, &p.sanitized(*s), ordinal as u64);
        }
        let mut heap = BinaryHeap::with_capacity(b.actors.len());
        for (idx, a) in b.actors.iter().enumerate() {
            if a.next_t < a.end {
                heap.push(Reverse((a.next_t as u64, idx as u32)));
            }
        }
        Simulator {
            actors: b.actors,
            infos: b.infos,
            ips: b.addr.table,
            heap,
            emitted: 0,
            max_requests: cfg.max_requests.unwrap_or(u64::MAX),
            duration_ms: cfg.duration_ms,
        }
    }

    /// All actors, indexed by [`SimEvent::actor`].
    pub fn actors(&self) -> &[ActorInfo] {
        &self.infos
    }

    /// The actor that sent `ev`.
    ///
    /// # Panics
    /// If `ev` came from another simulator with fewer actors.
    pub fn actor(&self, ev: &SimEvent) -> &ActorInfo {
        &self.infos[ev.actor as usize]
    }

    /// The client address of `ev` as text.
    pub fn ip(&self, ev: &SimEvent) -> &str {
        self.ips
            .get(ev.ip as usize)
            .map_or("0.0.0.0", String::as_str)
    }

    /// Number of requests emitted so far.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// The next request, or `None` when the trace is over.
    pub fn next_event(&mut self) -> Option<SimEvent> {
        if self.emitted >= self.max_requests {
            return None;
        }
        let Reverse((_, idx)) = self.heap.pop()?;
        let actor = self.actors.get_mut(idx as usize)?;
        let ev = actor.emit(idx);
        if actor.next_t < actor.end && (actor.next_t as u64) < self.duration_ms {
            self.heap.push(Reverse((actor.next_t as u64, idx)));
        }
        self.emitted += 1;
        Some(ev)
    }

    /// `ev` as an owned [`TraceRecord`].
    pub fn record(&self, ev: &SimEvent) -> TraceRecord {
        let info = self.actor(ev);
        TraceRecord {
            ts_ms: ev.ts_ms,
            api_key: info.api_key.clone(),
            org: info.org.clone(),
            ip: self.ip(ev).to_owned(),
            input_tokens: u64::from(ev.input_tokens),
            output_tokens: u64::from(ev.output_tokens),
            model: ev.model.map(str::to_owned),
            prompt_fp: ev.prompt_fp,
            prompt_simhash: ev.prompt_simhash,
            template_fp: ev.template_fp,
            logprobs: ev.logprobs,
        }
    }

    /// The truth record of `ev`, which is request number `i` of the trace.
    pub fn truth(&self, i: u64, ev: &SimEvent) -> TruthRecord {
        let info = self.actor(ev);
        TruthRecord {
            i,
            actor: info.id.clone(),
            scenario: info.scenario,
            role: info.role(),
        }
    }

    /// Appends `ev` as one trace line (with `\n`) to `buf` without allocating.
    pub fn write_trace_line(&self, ev: &SimEvent, buf: &mut String) {
        let info = self.actor(ev);
        write_trace_json(
            buf,
            &TraceView {
                ts_ms: ev.ts_ms,
                api_key: &info.api_key,
                org: &info.org,
                ip: self.ip(ev),
                input_tokens: u64::from(ev.input_tokens),
                output_tokens: u64::from(ev.output_tokens),
                model: ev.model,
                prompt_fp: ev.prompt_fp,
                prompt_simhash: ev.prompt_simhash,
                template_fp: ev.template_fp,
                logprobs: ev.logprobs,
            },
        );
    }

    /// Appends the truth line of request `i` (with `\n`) to `buf`.
    pub fn write_truth_line(&self, i: u64, ev: &SimEvent, buf: &mut String) {
        let info = self.actor(ev);
        write_truth_json(buf, i, &info.id, info.scenario);
    }
}

impl Iterator for Simulator {
    type Item = SimEvent;

    fn next(&mut self) -> Option<SimEvent> {
        self.next_event()
    }
}

/// Counts from one [`write_jsonl`] run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Requests written.
    pub requests: u64,
    /// Of which sent by attack actors.
    pub attack_requests: u64,
    /// Actors built.
    pub actors: usize,
    /// Requests per scenario, in [`Scenario::ALL`] order, scenarios with none left out.
    pub per_scenario: Vec<(Scenario, u64)>,
}

/// Generates the whole trace in memory (for tests and demos).
pub fn generate(cfg: &SimConfig) -> Vec<(TraceRecord, TruthRecord)> {
    let mut sim = Simulator::new(cfg);
    let mut out = Vec::new();
    let mut i = 0u64;
    while let Some(ev) = sim.next_event() {
        out.push((sim.record(&ev), sim.truth(i, &ev)));
        i += 1;
    }
    out
}

/// Streams the trace to `trace` and, if given, the truth file to `truth`.
///
/// Memory stays bounded whatever the trace length. Wrap files in a `BufWriter` or not: writes
/// go out in chunks of about 256 KiB either way.
///
/// # Errors
/// Any I/O error from the writers.
pub fn write_jsonl(
    cfg: &SimConfig,
    trace: &mut dyn Write,
    mut truth: Option<&mut dyn Write>,
) -> io::Result<SimStats> {
    const CHUNK: usize = 256 * 1024;
    let mut sim = Simulator::new(cfg);
    let mut tbuf = String::with_capacity(CHUNK + 1024);
    let mut ubuf = String::with_capacity(CHUNK / 4 + 256);
    let mut counts = [0u64; 11];
    let mut stats = SimStats {
        actors: sim.actors().len(),
        ..SimStats::default()
    };
    let mut i = 0u64;
    while let Some(ev) = sim.next_event() {
        sim.write_trace_line(&ev, &mut tbuf);
        if truth.is_some() {
            sim.write_truth_line(i, &ev, &mut ubuf);
        }
        let sc = sim.actor(&ev).scenario;
        counts[sc.index()] += 1;
        if sc.role() == Role::Attack {
            stats.attack_requests += 1;
        }
        i += 1;
        if tbuf.len() >= CHUNK {
            trace.write_all(tbuf.as_bytes())?;
            tbuf.clear();
            if let Some(w) = truth.as_mut() {
                w.write_all(ubuf.as_bytes())?;
            }
            ubuf.clear();
        }
    }
    trace.write_all(tbuf.as_bytes())?;
    trace.flush()?;
    if let Some(w) = truth.as_mut() {
        w.write_all(ubuf.as_bytes())?;
        w.flush()?;
    }
    stats.requests = i;
    stats.per_scenario = Scenario::ALL
        .iter()
        .filter(|s| counts[s.index()] > 0)
        .map(|s| (*s, counts[s.index()]))
        .collect();
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn bytes(cfg: &SimConfig) -> (Vec<u8>, Vec<u8>) {
        let mut t = Vec::new();
        let mut u = Vec::new();
        write_jsonl(cfg, &mut t, Some(&mut u)).expect("in-memory write");
        (t, u)
    }

    #[test]
    fn same_seed_same_bytes_different_seed_different_bytes() {
        let cfg = SimConfig::public_mix(7, 5 * 60_000);
        let a = bytes(&cfg);
        let b = bytes(&cfg);
        assert!(!a.0.is_empty());
        assert_eq!(a, b);
        let c = bytes(&SimConfig::public_mix(8, 5 * 60_000));
        assert_ne!(a.0, c.0);
        // The streaming writer and the in-memory generator agree line for line.
        let mut lines = String::new();
        let mut truth = String::new();
        for (r, t) in generate(&cfg) {
            r.to_json_line(&mut lines);
            t.to_json_line(&mut truth);
        }
        assert_eq!(lines.as_bytes(), &a.0[..]);
        assert_eq!(truth.as_bytes(), &a.1[..]);
        // A request cap truncates the same stream.
        let mut capped = cfg.clone();
        capped.max_requests = Some(1000);
        let d = bytes(&capped);
        assert_eq!(d.0.iter().filter(|b| **b == b'\n').count(), 1000);
        assert!(a.0.starts_with(&d.0));
    }

    #[test]
    fn scenarios_do_not_perturb_each_other() {
        // E1's actors draw from their own streams: adding another scenario keeps them.
        let only = generate(&SimConfig::only(3, 120_000, &[Scenario::E1]));
        let mixed = generate(&SimConfig::only(3, 120_000, &[Scenario::E1, Scenario::E6]));
        let strip = |v: &[(TraceRecord, TruthRecord)]| -> Vec<(u64, u64, Option<u64>)> {
            v.iter()
                .filter(|(_, t)| t.scenario == Scenario::E1)
                .map(|(r, _)| (r.ts_ms, r.output_tokens, r.prompt_fp))
                .collect()
        };
        assert!(!strip(&only).is_empty());
        assert_eq!(strip(&only), strip(&mixed));
    }

    #[test]
    fn json_round_trip_and_fast_writer_matches_serde() {
        let recs = generate(&SimConfig::public_mix(11, 3 * 60_000));
        assert!(recs.len() > 1000);
        let mut line = String::new();
        for (r, t) in recs.iter().step_by(37) {
            line.clear();
            r.to_json_line(&mut line);
            let serde_line = serde_json::to_string(r).expect("serialize");
            assert_eq!(line.trim_end(), serde_line);
            let back: TraceRecord = serde_json::from_str(&line).expect("parse");
            assert_eq!(&back, r);
            line.clear();
            t.to_json_line(&mut line);
            assert_eq!(
                line.trim_end(),
                serde_json::to_string(t).expect("serialize")
            );
            let back: TruthRecord = serde_json::from_str(&line).expect("parse");
            assert_eq!(&back, t);
        }
        // Escaping, absent optional fields, defaults, unknown fields.
        let odd = TraceRecord {
            ts_ms: 0,
            api_key: "k\"\\\n\u{1}é".into(),
            org: "o".into(),
            ip: "::1".into(),
            input_tokens: 1,
            output_tokens: 0,
            model: None,
            prompt_fp: Some(0),
            prompt_simhash: None,
            template_fp: Some(u64::MAX),
            logprobs: true,
        };
        line.clear();
        odd.to_json_line(&mut line);
        assert_eq!(
            line.trim_end(),
            serde_json::to_string(&odd).expect("serialize")
        );
        assert!(line.contains("\"prompt_fp\":\"0000000000000000\""));
        assert_eq!(
            serde_json::from_str::<TraceRecord>(&line).expect("parse"),
            odd
        );
        let minimal: TraceRecord = serde_json::from_str(
            r#"{"ts_ms":5,"api_key":"a","org":"b","ip":"1.2.3.4","input_tokens":1,"output_tokens":2,"extra":[1]}"#,
        )
        .expect("parse");
        assert!(!minimal.logprobs && minimal.prompt_fp.is_none());
        assert!(serde_json::from_str::<TraceRecord>(
            r#"{"ts_ms":5,"api_key":"a","org":"b","ip":"x","input_tokens":1,"output_tokens":2,"prompt_fp":"xyz"}"#
        )
        .is_err());
    }

    #[test]
    fn trace_is_sorted_and_well_formed() {
        let recs = generate(&SimConfig::public_mix(5, 10 * 60_000));
        let mut last = 0;
        let mut seen = [false; 11];
        for (i, (r, t)) in recs.iter().enumerate() {
            assert!(r.ts_ms >= last && r.ts_ms < 10 * 60_000);
            last = r.ts_ms;
            assert_eq!(t.i, i as u64);
            assert!(r.ip_addr().is_some(), "bad ip {}", r.ip);
            assert!(r.api_key.starts_with("sk-proj-") && r.api_key.len() == 30);
            assert!(r.org.starts_with("org-") && r.org.len() == 16);
            seen[t.scenario.index()] = true;
        }
        assert!(seen.iter().all(|s| *s), "every scenario shows up: {seen:?}");
    }

    /// Reference GCRA: `burst` back-to-back requests, then one per `60_000 / per_min` ms.
    struct Gcra {
        t: f64,
        tau: f64,
        tat: f64,
    }

    impl Gcra {
        fn new(per_min: f64, burst: f64) -> Self {
            let t = 60_000.0 / per_min;
            Gcra {
                t,
                tau: t * (burst - 1.0),
                tat: f64::MIN,
            }
        }
        fn conforms(&mut self, now: f64) -> bool {
            let tat = self.tat.max(now);
            if tat - now > self.tau {
                return false;
            }
            self.tat = tat + self.t;
            true
        }
    }

    fn cluster(ip: &str) -> String {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => {
                let o = v4.octets();
                format!("{}.{}.{}/24", o[0], o[1], o[2])
            }
            Ok(IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
            }
            Err(_) => panic!("bad ip {ip}"),
        }
    }

    /// Checks one subject's request stream against a GCRA and (optionally) a sliding-minute
    /// token budget; returns the peak tokens in any minute.
    fn check_subject(
        name: &str,
        events: &[(u64, u64)],
        per_min: f64,
        burst: f64,
        tokens: Option<u64>,
    ) -> u64 {
        let mut g = Gcra::new(per_min, burst);
        let mut window: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut sum = 0u64;
        let mut peak = 0u64;
        for &(ts, tok) in events {
            assert!(
                g.conforms(ts as f64),
                "{name} exceeds {per_min}/min burst {burst} at {ts}"
            );
            window.push_back((ts, tok));
            sum += tok;
            while let Some(&(t0, k)) = window.front() {
                if t0 + 60_000 <= ts {
                    sum -= k;
                    window.pop_front();
                } else {
                    break;
                }
            }
            peak = peak.max(sum);
            if let Some(limit) = tokens {
                assert!(
                    sum <= limit,
                    "{name} uses {sum} tokens/min > {limit} at {ts}"
                );
            }
        }
        peak
    }

    fn check_benign_limits(cfg: &SimConfig) {
        let mut sim = Simulator::new(cfg);
        let mut keys: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        let mut orgs: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        let mut clusters: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        let mut attack = (HashSet::new(), HashSet::new(), HashSet::new());
        while let Some(ev) = sim.next_event() {
            let info = sim.actor(&ev);
            let c = cluster(sim.ip(&ev));
            if info.role() == Role::Attack {
                attack.0.insert(info.api_key.clone());
                attack.1.insert(info.org.clone());
                attack.2.insert(c);
                continue;
            }
            let tok = u64::from(ev.input_tokens) + u64::from(ev.output_tokens);
            keys.entry(info.api_key.clone())
                .or_default()
                .push((ev.ts_ms, tok));
            orgs.entry(info.org.clone())
                .or_default()
                .push((ev.ts_ms, tok));
            clusters.entry(c).or_default().push((ev.ts_ms, tok));
        }
        assert!(!keys.is_empty());
        let mut peak_key = 0;
        let mut peak_org = 0;
        for (k, ev) in &keys {
            assert!(!attack.0.contains(k), "benign key shared with an attacker");
            peak_key = peak_key.max(check_subject(k, ev, 120.0, 20.0, Some(400_000)));
        }
        for (o, ev) in &orgs {
            assert!(!attack.1.contains(o), "benign org shared with an attacker");
            peak_org = peak_org.max(check_subject(o, ev, 1500.0, 150.0, Some(4_000_000)));
        }
        for (c, ev) in &clusters {
            assert!(
                !attack.2.contains(c),
                "benign cluster {c} shared with an attacker"
            );
            check_subject(c, ev, 3000.0, 300.0, None);
        }
        // Leave headroom for up-front output estimates.
        assert!(peak_key <= 250_000, "peak key tokens/min {peak_key}");
        assert!(peak_org <= 2_500_000, "peak org tokens/min {peak_org}");
    }

    #[test]
    fn benign_actors_stay_within_llm_api_limits() {
        check_benign_limits(&SimConfig::public_mix(42, 30 * 60_000));
    }

    #[test]
    fn benign_limits_hold_at_clamped_extremes() {
        let mut cfg = SimConfig::new(9, 20 * 60_000);
        for s in [
            Scenario::B1,
            Scenario::B2,
            Scenario::B3,
            Scenario::B4,
            Scenario::B5,
        ] {
            let mut p = ScenarioParams::default_for(s);
            p.rate_per_min = 1e6; // clamped to the safe maximum
            p.actors *= 3;
            p.groups = 1; // re-split where one group would be too big
            cfg.scenarios.push((s, p));
        }
        check_benign_limits(&cfg);
    }

    #[test]
    fn attack_shapes() {
        let recs = generate(&SimConfig::only(
            13,
            40 * 60_000,
            &[
                Scenario::E1,
                Scenario::E2,
                Scenario::E4,
                Scenario::E5,
                Scenario::E6,
            ],
        ));
        let of = |s: Scenario| recs.iter().filter(move |(_, t)| t.scenario == s);
        // E2: one org, tens of keys, org total under 1,500/min once running.
        let e2: Vec<_> = of(Scenario::E2).collect();
        let orgs: HashSet<_> = e2.iter().map(|(r, _)| r.org.clone()).collect();
        let keys: HashSet<_> = e2.iter().map(|(r, _)| r.api_key.clone()).collect();
        assert_eq!(orgs.len(), 1);
        assert_eq!(keys.len(), 30);
        let first = e2.first().map_or(0, |(r, _)| r.ts_ms);
        let per_min = e2.iter().filter(|(r, _)| r.ts_ms < first + 60_000).count();
        assert!((900..1500).contains(&per_min), "E2 org rate {per_min}/min");
        // E4: consecutive requests of a key never share a /24.
        let mut last: HashMap<String, String> = HashMap::new();
        for (r, _) in of(Scenario::E4) {
            let c = cluster(&r.ip);
            if let Some(prev) = last.insert(r.api_key.clone(), c.clone()) {
                assert_ne!(prev, c);
            }
        }
        // E5: every prompt distinct, SimHashes near each other.
        let e5: Vec<_> = of(Scenario::E5).collect();
        let fps: HashSet<_> = e5.iter().map(|(r, _)| r.prompt_fp).collect();
        assert_eq!(fps.len(), e5.len());
        // E6: logprobs nearly always, one-token outputs mostly.
        let e6: Vec<_> = of(Scenario::E6).collect();
        let lp = e6.iter().filter(|(r, _)| r.logprobs).count();
        let one = e6.iter().filter(|(r, _)| r.output_tokens == 1).count();
        assert!(lp * 100 > e6.len() * 90 && one * 100 > e6.len() * 80);
        // E1: close to 120/min.
        let e1: Vec<_> = of(Scenario::E1)
            .filter(|(_, t)| t.actor == "E1-0")
            .collect();
        let span = e1.last().map_or(0, |(r, _)| r.ts_ms) - e1.first().map_or(0, |(r, _)| r.ts_ms);
        let rate = e1.len() as f64 / (span as f64 / 60_000.0);
        assert!((112.0..132.0).contains(&rate), "E1 rate {rate}");
    }

    #[test]
    fn rng_helpers() {
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            assert!(r.below(7) < 7);
            assert_eq!(r.flip_bits(0, 5).count_ones(), 5);
            let x = r.range(3, 5);
            assert!((3..=5).contains(&x));
        }
        assert_eq!(r.below(0), 0);
        assert!(r.choice::<u8>(&[]).is_none());
        let mean: f64 = (0..20_000).map(|_| r.exp(10.0)).sum::<f64>() / 20_000.0;
        assert!((9.5..10.5).contains(&mean));
        assert_eq!(Scenario::parse(" e3 "), Some(Scenario::E3));
        assert_eq!(Scenario::parse("E7"), None);
    }
}
