//! Evaluator for simulated traffic: joins a trace, its truth file and the decisions of a
//! replay (and optionally of a `--limits-only` baseline replay) into a per-scenario report.
//!
//! Independent of the simulator module: it reads truth and decision records through its own
//! small serde structs, so it can be included alone with
//! `#[path = "support/eval.rs"] mod eval;`. It also works on in-memory slices, for demos that
//! never touch files: build [`EvalRequest`], [`EvalTruth`] and [`EvalDecision`] values and call
//! [`evaluate`]. With the simulator's in-memory output that is:
//!
//! ```ignore
//! let recs = sim::generate(&cfg); // Vec<(TraceRecord, TruthRecord)>
//! let trace: Vec<_> = recs.iter().map(|(r, _)| eval::EvalRequest::new(r.ts_ms, r.output_tokens)).collect();
//! let truth: Vec<_> = recs
//!     .iter()
//!     .map(|(_, t)| {
//!         let attack = t.role == sim::Role::Attack;
//!         eval::EvalTruth::new(t.i, t.actor.clone(), t.scenario.name(), eval::EvalRole::from_attack(attack))
//!     })
//!     .collect();
//! // decisions[k] = eval::EvalDecision::new(k as u64, allowed, level) for each request k
//! let report = eval::evaluate(&trace, &truth, &decisions, Some(&limits_only))?;
//! println!("{report}");
//! let e4 = report.scenario("E4");
//! ```
//!
//! Metrics, per scenario: actors, requests, the share denied with the behavioural layer and
//! limits-only, the output tokens served with behaviour relative to limits-only, and how many
//! actors were escalated to `throttle` or higher with the median time from an actor's first
//! request to its first such escalation. The summary gives the attack yield reduction, the
//! benign requests denied and the benign actors escalated.

#![allow(dead_code, unreachable_pub)]

use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Escalation level of a decision, ordered from `Normal` to `Block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Nothing noticed.
    Normal,
    /// Reported only.
    Watch,
    /// Limits scaled down.
    Throttle,
    /// Denied until re-verification.
    Challenge,
    /// Denied.
    Block,
}

impl Level {
    /// Parses `normal`, `watch`, `throttle`, `challenge` or `block`.
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "normal" => Some(Level::Normal),
            "watch" => Some(Level::Watch),
            "throttle" => Some(Level::Throttle),
            "challenge" => Some(Level::Challenge),
            "block" => Some(Level::Block),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Watch => "watch",
            Level::Throttle => "throttle",
            Level::Challenge => "challenge",
            Level::Block => "block",
        }
    }

    /// True for `throttle` or higher: the level that counts as an escalation in the report.
    pub fn is_escalated(self) -> bool {
        self >= Level::Throttle
    }
}

/// Benign or attack, as labelled in the truth file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalRole {
    /// Legitimate traffic.
    Benign,
    /// Extraction traffic.
    Attack,
}

impl EvalRole {
    /// `Attack` when `attack` is true, else `Benign`.
    pub fn from_attack(attack: bool) -> Self {
        if attack {
            EvalRole::Attack
        } else {
            EvalRole::Benign
        }
    }

    /// `"benign"` or `"attack"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalRole::Benign => "benign",
            EvalRole::Attack => "attack",
        }
    }
}

/// The two trace fields the evaluator needs (other fields of a trace line are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct EvalRequest {
    /// Milliseconds since the start of the trace.
    pub ts_ms: u64,
    /// Output tokens the response had (served only if the request was allowed).
    pub output_tokens: u64,
}

impl EvalRequest {
    /// Creates a request view.
    pub fn new(ts_ms: u64, output_tokens: u64) -> Self {
        EvalRequest {
            ts_ms,
            output_tokens,
        }
    }
}

/// One truth record: `{"i":0,"actor":"E2-0","scenario":"E2","role":"attack"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EvalTruth {
    /// Index of the request in the trace.
    pub i: u64,
    /// Actor id.
    pub actor: String,
    /// Scenario name (any string; rows are grouped by it).
    pub scenario: String,
    /// Benign or attack.
    pub role: EvalRole,
}

impl EvalTruth {
    /// Creates a truth record.
    pub fn new(
        i: u64,
        actor: impl Into<String>,
        scenario: impl Into<String>,
        role: EvalRole,
    ) -> Self {
        EvalTruth {
            i,
            actor: actor.into(),
            scenario: scenario.into(),
            role,
        }
    }
}

/// One decision record of `replay` (see `TRACE_FORMAT.md`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EvalDecision {
    /// Index of the request in the trace.
    pub i: u64,
    /// Whether the request was served.
    pub allowed: bool,
    /// Highest escalation level among the request's subjects at decision time.
    pub level: Level,
    /// Why it was denied.
    #[serde(default)]
    pub reason: Option<String>,
    /// When a denied request may be retried.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

impl EvalDecision {
    /// Creates a decision without reason or retry time.
    pub fn new(i: u64, allowed: bool, level: Level) -> Self {
        EvalDecision {
            i,
            allowed,
            level,
            reason: None,
            retry_after_ms: None,
        }
    }

    /// True when denied for a behavioural reason (`reason` starts with `behavior`).
    pub fn denied_for_behavior(&self) -> bool {
        !self.allowed
            && self
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with("behavior") || r.starts_with("behaviour"))
    }
}

/// What went wrong while reading or joining the inputs.
#[derive(Debug)]
#[non_exhaustive]
pub enum EvalError {
    /// A file could not be opened or read.
    Io {
        /// Which input (file name).
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line is not valid JSON of the expected shape.
    Malformed {
        /// Which input (file name).
        what: String,
        /// 1-based line number.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// The inputs do not line up (counts, indices).
    Mismatch(String),
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalError::Io { what, source } => write!(f, "cannot read {what}: {source}"),
            EvalError::Malformed {
                what,
                line,
                message,
            } => write!(f, "{what}:{line}: malformed line: {message}"),
            EvalError::Mismatch(m) => write!(f, "inputs do not line up: {m}"),
        }
    }
}

impl std::error::Error for EvalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EvalError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Reads JSON Lines into `T`s. Blank lines at the end are ignored; any other blank or
/// malformed line is an error naming `what` and the 1-based line number.
///
/// # Errors
/// [`EvalError::Io`] on read errors, [`EvalError::Malformed`] on a bad line.
pub fn read_jsonl<T: DeserializeOwned>(
    reader: impl BufRead,
    what: &str,
) -> Result<Vec<T>, EvalError> {
    let mut out = Vec::new();
    let mut first_blank: Option<usize> = None;
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| EvalError::Io {
            what: what.to_owned(),
            source,
        })?;
        if line.trim().is_empty() {
            first_blank.get_or_insert(n + 1);
            continue;
        }
        if let Some(blank) = first_blank {
            return Err(EvalError::Malformed {
                what: what.to_owned(),
                line: blank,
                message: "empty line".to_owned(),
            });
        }
        let v = serde_json::from_str(&line).map_err(|e| EvalError::Malformed {
            what: what.to_owned(),
            line: n + 1,
            message: e.to_string(),
        })?;
        out.push(v);
    }
    Ok(out)
}

/// Opens `path` and reads it with [`read_jsonl`].
///
/// # Errors
/// As [`read_jsonl`], plus [`EvalError::Io`] if the file cannot be opened.
pub fn load_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, EvalError> {
    let what = path.display().to_string();
    let file = File::open(path).map_err(|source| EvalError::Io {
        what: what.clone(),
        source,
    })?;
    read_jsonl(BufReader::with_capacity(1 << 20, file), &what)
}

/// One row of the report: one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioRow {
    /// Scenario name.
    pub scenario: String,
    /// Role of the scenario's actors.
    pub role: EvalRole,
    /// Distinct actors.
    pub actors: usize,
    /// Requests.
    pub requests: u64,
    /// Requests denied with the behavioural layer.
    pub denied: u64,
    /// Of those, denied for a behavioural reason.
    pub denied_for_behavior: u64,
    /// Requests denied limits-only (when a baseline was given).
    pub denied_baseline: Option<u64>,
    /// Output tokens of all requests.
    pub output_tokens: u64,
    /// Output tokens of allowed requests, with behaviour.
    pub served_output_tokens: u64,
    /// Output tokens of allowed requests, limits-only.
    pub served_output_tokens_baseline: Option<u64>,
    /// Actors with at least one request at `throttle` or higher.
    pub escalated_actors: usize,
    /// Median time from an escalated actor's first request to its first escalation.
    pub median_escalation_ms: Option<u64>,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

impl ScenarioRow {
    /// Percentage of requests denied with behaviour.
    pub fn denied_pct(&self) -> f64 {
        pct(self.denied, self.requests)
    }

    /// Percentage of requests denied limits-only.
    pub fn denied_baseline_pct(&self) -> Option<f64> {
        self.denied_baseline.map(|d| pct(d, self.requests))
    }

    /// Served output tokens with behaviour divided by served limits-only; `None` without a
    /// baseline or when the baseline served nothing.
    pub fn served_ratio(&self) -> Option<f64> {
        match self.served_output_tokens_baseline {
            Some(b) if b > 0 => Some(self.served_output_tokens as f64 / b as f64),
            _ => None,
        }
    }
}

/// Totals over all rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Attack actors.
    pub attack_actors: usize,
    /// Attack actors escalated to throttle or higher.
    pub attack_escalated: usize,
    /// Output tokens served to attackers with behaviour.
    pub attack_served: u64,
    /// Output tokens served to attackers limits-only.
    pub attack_served_baseline: Option<u64>,
    /// `1 - attack_served / attack_served_baseline`.
    pub attack_yield_reduction: Option<f64>,
    /// Benign requests.
    pub benign_requests: u64,
    /// Benign requests denied with behaviour.
    pub benign_denied: u64,
    /// Of those, denied for a behavioural reason.
    pub benign_denied_for_behavior: u64,
    /// Benign requests denied limits-only.
    pub benign_denied_baseline: Option<u64>,
    /// Benign actors.
    pub benign_actors: usize,
    /// Benign actors escalated to throttle or higher, earliest escalation first.
    pub benign_escalated: Vec<String>,
}

impl Summary {
    /// Percentage of benign requests denied with behaviour.
    pub fn benign_denied_pct(&self) -> f64 {
        pct(self.benign_denied, self.benign_requests)
    }
}

/// The evaluation result. `Display` prints the table and the summary line.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// One row per scenario present, benign first, then by name.
    pub rows: Vec<ScenarioRow>,
    /// Totals.
    pub summary: Summary,
    /// Whether a limits-only baseline was given.
    pub has_baseline: bool,
}

impl Report {
    /// The row of scenario `name`, if present.
    pub fn scenario(&self, name: &str) -> Option<&ScenarioRow> {
        self.rows.iter().find(|r| r.scenario == name)
    }
}

/// Formats a duration as `850ms`, `4.2s`, `3m41s` or `2h05m`.
pub fn format_duration(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// Median of `v` (mean of the middle two, rounded down, for an even count).
fn median(v: &mut [u64]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        let (a, b) = (v[n / 2 - 1], v[n / 2]);
        a / 2 + b / 2 + (a % 2 + b % 2) / 2
    })
}

fn index_decisions<'a>(
    decisions: &'a [EvalDecision],
    n: usize,
    what: &str,
) -> Result<Vec<&'a EvalDecision>, EvalError> {
    let mut idx: Vec<Option<&EvalDecision>> = vec![None; n];
    for d in decisions {
        let slot = usize::try_from(d.i)
            .ok()
            .and_then(|i| idx.get_mut(i))
            .ok_or_else(|| {
                EvalError::Mismatch(format!(
                    "{what}: decision for request {} but the trace has {n} requests",
                    d.i
                ))
            })?;
        if slot.is_some() {
            return Err(EvalError::Mismatch(format!(
                "{what}: two decisions for request {}",
                d.i
            )));
        }
        *slot = Some(d);
    }
    let missing = idx.iter().filter(|d| d.is_none()).count();
    if let Some(first) = idx.iter().position(Option::is_none) {
        return Err(EvalError::Mismatch(format!(
            "{what}: no decision for request {first} ({missing} requests lack one)"
        )));
    }
    Ok(idx.into_iter().flatten().collect())
}

#[derive(Default)]
struct RowAcc {
    role: Option<EvalRole>,
    actors: Vec<usize>,
    requests: u64,
    denied: u64,
    denied_behavior: u64,
    denied_baseline: u64,
    output: u64,
    served: u64,
    served_baseline: u64,
}

struct ActorAcc {
    first_ts: u64,
    escalated_at: Option<u64>,
    role: EvalRole,
}

/// Joins trace, truth and decisions (and an optional limits-only baseline) into a [`Report`].
///
/// `trace[k]` and `truth[k]` describe request `k` (truth's `i` must equal `k`); decisions are
/// matched by their `i` and must cover every request exactly once.
///
/// # Errors
/// [`EvalError::Mismatch`] when the inputs do not line up.
pub fn evaluate(
    trace: &[EvalRequest],
    truth: &[EvalTruth],
    decisions: &[EvalDecision],
    baseline: Option<&[EvalDecision]>,
) -> Result<Report, EvalError> {
    let n = trace.len();
    if truth.len() != n {
        return Err(EvalError::Mismatch(format!(
            "the trace has {n} requests but the truth file has {} records",
            truth.len()
        )));
    }
    if let Some((k, t)) = truth.iter().enumerate().find(|(k, t)| t.i != *k as u64) {
        return Err(EvalError::Mismatch(format!(
            "truth record {k} (0-based) has i={}, expected {k}",
            t.i
        )));
    }
    let dec = index_decisions(decisions, n, "decisions")?;
    let base = match baseline {
        Some(b) => Some(index_decisions(b, n, "baseline")?),
        None => None,
    };

    let mut rows: Vec<(String, RowAcc)> = Vec::new();
    let mut row_of: HashMap<&str, usize> = HashMap::new();
    let mut actors: Vec<(&str, ActorAcc)> = Vec::new();
    let mut actor_of: HashMap<&str, usize> = HashMap::new();

    for k in 0..n {
        let (req, tr, d) = (&trace[k], &truth[k], dec[k]);
        let r = *row_of.entry(tr.scenario.as_str()).or_insert_with(|| {
            rows.push((tr.scenario.clone(), RowAcc::default()));
            rows.len() - 1
        });
        let a = match actor_of.get(tr.actor.as_str()) {
            Some(&a) => a,
            None => {
                actors.push((
                    tr.actor.as_str(),
                    ActorAcc {
                        first_ts: req.ts_ms,
                        escalated_at: None,
                        role: tr.role,
                    },
                ));
                actor_of.insert(tr.actor.as_str(), actors.len() - 1);
                rows[r].1.actors.push(actors.len() - 1);
                actors.len() - 1
            }
        };
        let acc = &mut actors[a].1;
        acc.first_ts = acc.first_ts.min(req.ts_ms);
        if d.level.is_escalated() && acc.escalated_at.is_none() {
            acc.escalated_at = Some(req.ts_ms);
        }
        let row = &mut rows[r].1;
        row.role.get_or_insert(tr.role);
        row.requests += 1;
        row.output += req.output_tokens;
        if d.allowed {
            row.served += req.output_tokens;
        } else {
            row.denied += 1;
            if d.denied_for_behavior() {
                row.denied_behavior += 1;
            }
        }
        if let Some(b) = &base {
            if b[k].allowed {
                row.served_baseline += req.output_tokens;
            } else {
                row.denied_baseline += 1;
            }
        }
    }

    let has_baseline = base.is_some();
    let mut out_rows = Vec::with_capacity(rows.len());
    for (name, acc) in rows {
        let mut times: Vec<u64> = acc
            .actors
            .iter()
            .filter_map(|&a| {
                let x = &actors[a].1;
                x.escalated_at.map(|t| t.saturating_sub(x.first_ts))
            })
            .collect();
        out_rows.push(ScenarioRow {
            scenario: name,
            role: acc.role.unwrap_or(EvalRole::Benign),
            actors: acc.actors.len(),
            requests: acc.requests,
            denied: acc.denied,
            denied_for_behavior: acc.denied_behavior,
            denied_baseline: has_baseline.then_some(acc.denied_baseline),
            output_tokens: acc.output,
            served_output_tokens: acc.served,
            served_output_tokens_baseline: has_baseline.then_some(acc.served_baseline),
            escalated_actors: times.len(),
            median_escalation_ms: median(&mut times),
        });
    }
    out_rows.sort_by(|a, b| (a.role, &a.scenario).cmp(&(b.role, &b.scenario)));

    let sum = |role: EvalRole, f: &dyn Fn(&ScenarioRow) -> u64| -> u64 {
        out_rows.iter().filter(|r| r.role == role).map(f).sum()
    };
    let attack_served = sum(EvalRole::Attack, &|r| r.served_output_tokens);
    let attack_served_baseline = has_baseline.then(|| {
        sum(EvalRole::Attack, &|r| {
            r.served_output_tokens_baseline.unwrap_or(0)
        })
    });
    let attack_yield_reduction = match attack_served_baseline {
        Some(b) if b > 0 => Some(1.0 - attack_served as f64 / b as f64),
        _ => None,
    };
    let mut benign_escalated: Vec<(u64, &str)> = actors
        .iter()
        .filter(|(_, a)| a.role == EvalRole::Benign)
        .filter_map(|(id, a)| a.escalated_at.map(|t| (t, *id)))
        .collect();
    benign_escalated.sort_unstable();
    let summary = Summary {
        attack_actors: actors
            .iter()
            .filter(|(_, a)| a.role == EvalRole::Attack)
            .count(),
        attack_escalated: actors
            .iter()
            .filter(|(_, a)| a.role == EvalRole::Attack && a.escalated_at.is_some())
            .count(),
        attack_served,
        attack_served_baseline,
        attack_yield_reduction,
        benign_requests: sum(EvalRole::Benign, &|r| r.requests),
        benign_denied: sum(EvalRole::Benign, &|r| r.denied),
        benign_denied_for_behavior: sum(EvalRole::Benign, &|r| r.denied_for_behavior),
        benign_denied_baseline: has_baseline
            .then(|| sum(EvalRole::Benign, &|r| r.denied_baseline.unwrap_or(0))),
        benign_actors: actors
            .iter()
            .filter(|(_, a)| a.role == EvalRole::Benign)
            .count(),
        benign_escalated: benign_escalated
            .into_iter()
            .map(|(_, id)| id.to_owned())
            .collect(),
    };
    Ok(Report {
        rows: out_rows,
        summary,
        has_baseline,
    })
}

/// Loads the three or four files and evaluates them.
///
/// # Errors
/// Any [`EvalError`] from reading or joining.
pub fn evaluate_files(
    trace: &Path,
    truth: &Path,
    decisions: &Path,
    baseline: Option<&Path>,
) -> Result<Report, EvalError> {
    let trace: Vec<EvalRequest> = load_jsonl(trace)?;
    let truth: Vec<EvalTruth> = load_jsonl(truth)?;
    let decisions: Vec<EvalDecision> = load_jsonl(decisions)?;
    let baseline: Option<Vec<EvalDecision>> = match baseline {
        Some(p) => Some(load_jsonl(p)?),
        None => None,
    };
    evaluate(&trace, &truth, &decisions, baseline.as_deref())
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |p| format!("{p:.2}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<9} {:<7} {:>7} {:>10} {:>8} {:>12} {:>12}  escalated >= throttle",
            "scenario", "role", "actors", "requests", "denied%", "denied% lim", "served/lim"
        )?;
        for r in &self.rows {
            let esc = match r.median_escalation_ms {
                Some(m) => format!(
                    "{}/{}, median {}",
                    r.escalated_actors,
                    r.actors,
                    format_duration(m)
                ),
                None => "-".to_owned(),
            };
            writeln!(
                f,
                "{:<9} {:<7} {:>7} {:>10} {:>8.2} {:>12} {:>12}  {}",
                r.scenario,
                r.role.as_str(),
                r.actors,
                r.requests,
                r.denied_pct(),
                opt_pct(r.denied_baseline_pct()),
                r.served_ratio()
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.3}")),
                esc
            )?;
        }
        let s = &self.summary;
        let yield_red = s.attack_yield_reduction.map_or_else(
            || "- (no baseline)".to_owned(),
            |y| format!("{:.1}%", 100.0 * y),
        );
        let listed: Vec<&str> = s
            .benign_escalated
            .iter()
            .take(5)
            .map(String::as_str)
            .collect();
        let more = s.benign_escalated.len().saturating_sub(listed.len());
        let list = if listed.is_empty() {
            String::new()
        } else if more > 0 {
            format!(" ({}, +{more} more)", listed.join(", "))
        } else {
            format!(" ({})", listed.join(", "))
        };
        write!(
            f,
            "summary: attack yield reduction {yield_red}; benign requests denied {:.3}% ({}/{}, {} for behaviour); benign actors escalated to throttle or higher: {}/{}{}",
            s.benign_denied_pct(),
            s.benign_denied,
            s.benign_requests,
            s.benign_denied_for_behavior,
            s.benign_escalated.len(),
            s.benign_actors,
            list
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (
        Vec<EvalRequest>,
        Vec<EvalTruth>,
        Vec<EvalDecision>,
        Vec<EvalDecision>,
    ) {
        use EvalRole::{Attack, Benign};
        use Level::{Block, Normal, Throttle, Watch};
        // (ts, out, actor, scenario, role, allowed, level, baseline allowed)
        let rows = [
            (0, 100, "E1-0", "E1", Attack, true, Normal, true),
            (1_000, 100, "E1-1", "E1", Attack, true, Normal, true),
            (2_000, 100, "B1-0", "B1", Benign, true, Normal, true),
            (60_000, 200, "E1-0", "E1", Attack, true, Throttle, true),
            (61_000, 300, "E1-0", "E1", Attack, false, Block, false),
            (90_000, 400, "E1-1", "E1", Attack, false, Block, true),
            (120_000, 50, "B1-0", "B1", Benign, true, Watch, true),
            (130_000, 50, "B1-1", "B1", Benign, false, Normal, false),
            (200_000, 500, "E1-1", "E1", Attack, false, Block, true),
        ];
        let mut trace = Vec::new();
        let mut truth = Vec::new();
        let mut dec = Vec::new();
        let mut base = Vec::new();
        for (i, &(ts, out, actor, sc, role, ok, level, bok)) in rows.iter().enumerate() {
            let i = i as u64;
            trace.push(EvalRequest::new(ts, out));
            truth.push(EvalTruth::new(i, actor, sc, role));
            let mut d = EvalDecision::new(i, ok, level);
            if !ok {
                d.reason = Some(if level == Block {
                    "behavior:block".to_owned()
                } else {
                    "api_key:requests_per_minute".to_owned()
                });
            }
            dec.push(d);
            base.push(EvalDecision::new(i, bok, Normal));
        }
        // Decisions may come in any order.
        dec.reverse();
        (trace, truth, dec, base)
    }

    #[test]
    fn evaluator_math_on_a_tiny_example() {
        let (trace, truth, dec, base) = tiny();
        let rep = evaluate(&trace, &truth, &dec, Some(&base)).expect("evaluate");
        let e1 = rep.scenario("E1").expect("E1 row");
        assert_eq!(e1.role, EvalRole::Attack);
        assert_eq!((e1.actors, e1.requests, e1.denied), (2, 6, 3));
        assert_eq!(e1.denied_baseline, Some(1));
        assert_eq!(e1.output_tokens, 1600);
        assert_eq!(e1.served_output_tokens, 400);
        assert_eq!(e1.served_output_tokens_baseline, Some(1300));
        assert!((e1.served_ratio().unwrap_or(0.0) - 400.0 / 1300.0).abs() < 1e-12);
        assert!((e1.denied_pct() - 50.0).abs() < 1e-12);
        // E1-0: first at 0, throttle at 60s; E1-1: first at 1s, block at 90s => 89s.
        assert_eq!(e1.escalated_actors, 2);
        assert_eq!(e1.median_escalation_ms, Some((60_000 + 89_000) / 2));
        let b1 = rep.scenario("B1").expect("B1 row");
        assert_eq!(
            (b1.actors, b1.requests, b1.denied, b1.denied_for_behavior),
            (2, 3, 1, 0)
        );
        assert_eq!(b1.escalated_actors, 0);
        assert_eq!(b1.median_escalation_ms, None);
        assert_eq!(b1.served_ratio(), Some(1.0));
        assert_eq!(rep.rows[0].scenario, "B1");
        let s = &rep.summary;
        assert_eq!(s.attack_served, 400);
        assert_eq!(s.attack_served_baseline, Some(1300));
        assert!((s.attack_yield_reduction.unwrap_or(0.0) - 0.9 / 1.3).abs() < 1e-12);
        assert_eq!((s.benign_requests, s.benign_denied), (3, 1));
        assert_eq!(s.benign_denied_baseline, Some(1));
        assert!(s.benign_escalated.is_empty());
        assert_eq!(
            (s.attack_actors, s.attack_escalated, s.benign_actors),
            (2, 2, 2)
        );
        let text = rep.to_string();
        assert!(text.contains("2/2, median 1m14s"), "{text}");
        assert!(text.contains("attack yield reduction 69.2%"), "{text}");
        assert!(text.contains("0/2"), "{text}");
    }

    #[test]
    fn benign_escalations_are_listed_and_no_baseline_is_fine() {
        let (trace, truth, mut dec, _) = tiny();
        for d in &mut dec {
            if d.i == 7 {
                d.level = Level::Challenge;
            }
        }
        let rep = evaluate(&trace, &truth, &dec, None).expect("evaluate");
        assert!(!rep.has_baseline);
        assert_eq!(rep.summary.benign_escalated, vec!["B1-1".to_owned()]);
        let b1 = rep.scenario("B1").expect("B1");
        assert_eq!(b1.median_escalation_ms, Some(0));
        assert_eq!(b1.served_ratio(), None);
        assert_eq!(rep.summary.attack_yield_reduction, None);
        let text = rep.to_string();
        assert!(
            text.contains("(B1-1)") && text.contains("- (no baseline)"),
            "{text}"
        );
    }

    #[test]
    fn mismatches_and_malformed_lines_are_errors() {
        let (trace, truth, dec, _) = tiny();
        assert!(matches!(
            evaluate(&trace, &truth, &dec[1..], None),
            Err(EvalError::Mismatch(_))
        ));
        assert!(evaluate(&trace[1..], &truth, &dec, None).is_err());
        let mut dup = dec.clone();
        dup[0].i = dup[1].i;
        assert!(evaluate(&trace, &truth, &dup, None).is_err());
        let mut far = dec.clone();
        far[0].i = 1 << 40;
        assert!(evaluate(&trace, &truth, &far, None).is_err());

        let text = "{\"i\":0,\"allowed\":true,\"level\":\"normal\",\"reason\":null,\"retry_after_ms\":null}\n{\"i\":1,\"allowed\":true,\"level\":\"loud\"}\n";
        match read_jsonl::<EvalDecision>(text.as_bytes(), "d.jsonl") {
            Err(EvalError::Malformed { line, what, .. }) => {
                assert_eq!((line, what.as_str()), (2, "d.jsonl"));
            }
            other => panic!("expected a malformed-line error, got {other:?}"),
        }
        let gap = "{\"ts_ms\":1,\"output_tokens\":2}\n\n{\"ts_ms\":1,\"output_tokens\":2}\n";
        let err = read_jsonl::<EvalRequest>(gap.as_bytes(), "t").expect_err("blank line");
        assert!(err.to_string().contains("t:2"), "{err}");
        let trailing = "{\"ts_ms\":1,\"output_tokens\":2,\"api_key\":\"k\"}\n\n";
        assert_eq!(
            read_jsonl::<EvalRequest>(trailing.as_bytes(), "t")
                .map(|v| v.len())
                .ok(),
            Some(1)
        );
    }

    #[test]
    fn durations_and_medians() {
        assert_eq!(format_duration(850), "850ms");
        assert_eq!(format_duration(4_200), "4.2s");
        assert_eq!(format_duration(221_000), "3m41s");
        assert_eq!(format_duration(7_500_000), "2h05m");
        assert_eq!(median(&mut [5, 1, 3]), Some(3));
        assert_eq!(median(&mut [4, 1]), Some(2));
        assert_eq!(median(&mut [u64::MAX, u64::MAX]), Some(u64::MAX));
        assert_eq!(median(&mut []), None);
    }
}
