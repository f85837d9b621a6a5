//! Replay and simulate: round trip, malformed and out-of-order lines, one decision per line,
//! determinism.

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

fn replay_text(input: &str, policy: Policy) -> (String, replay::Summary) {
    let mut out = Vec::new();
    let s = replay::replay_quiet(policy, None, true, input.as_bytes(), &mut out).unwrap();
    (String::from_utf8(out).unwrap(), s)
}

fn simulate(seed: u64, minutes: u64) -> (String, String) {
    let cfg = sim::SimConfig::public_mix(seed, minutes * 60_000).scale_owned(0.2);
    let mut trace = Vec::new();
    let mut truth = Vec::new();
    sim::write_jsonl(&cfg, &mut trace, Some(&mut truth)).unwrap();
    (
        String::from_utf8(trace).unwrap(),
        String::from_utf8(truth).unwrap(),
    )
}

trait ScaleOwned {
    fn scale_owned(self, f: f64) -> Self;
}
impl ScaleOwned for sim::SimConfig {
    fn scale_owned(mut self, f: f64) -> Self {
        self.scale(f);
        self
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, ta) = simulate(7, 5);
    let (b, tb) = simulate(7, 5);
    let (c, _) = simulate(8, 5);
    assert_eq!(a, b);
    assert_eq!(ta, tb);
    assert_ne!(a, c);
    assert!(a.lines().count() > 1000);
}

#[test]
fn round_trip_simulate_replay_evaluate() {
    let (trace, truth) = simulate(3, 10);
    let (limits_only, s0) = replay_text(&trace, Policy::llm_api_limits_only());
    let (full, s1) = replay_text(&trace, Policy::llm_api());
    let n = trace.lines().count();
    assert_eq!(limits_only.lines().count(), n);
    assert_eq!(full.lines().count(), n);
    assert_eq!((s0.requests as usize, s0.malformed), (n, 0));
    assert_eq!(s1.requests as usize, n);
    let parse = |text: &str| -> Vec<eval::EvalDecision> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let reqs: Vec<eval::EvalRequest> = trace
        .lines()
        .map(|l| {
            let r: sim::TraceRecord = serde_json::from_str(l).unwrap();
            eval::EvalRequest::new(r.ts_ms, r.output_tokens)
        })
        .collect();
    let truth: Vec<eval::EvalTruth> = truth
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let report = eval::evaluate(&reqs, &truth, &parse(&full), Some(&parse(&limits_only))).unwrap();
    assert_eq!(report.rows.len(), 11, "{report}");
    // Benign traffic stays inside the classic limits.
    let benign: u64 = report
        .rows
        .iter()
        .filter(|r| r.scenario.starts_with('B'))
        .map(|r| r.denied_baseline.unwrap_or(0))
        .sum();
    assert_eq!(benign, 0, "{report}");
}

#[test]
fn malformed_lines_are_reported_counted_and_keep_their_index() {
    let good = r#"{"ts_ms":10,"api_key":"k","org":"o","ip":"192.0.2.1","input_tokens":5,"output_tokens":7}"#;
    let input = [
        good,
        "not json",
        r#"{"ts_ms":11,"api_key":"k","org":"o","ip":"300.1.1.1","input_tokens":5,"output_tokens":7}"#,
        r#"{"ts_ms":12,"api_key":"k","org":"o","ip":"192.0.2.1","input_tokens":5,"output_tokens":7,"prompt_fp":"xyz"}"#,
        r#"{"ts_ms":-1,"api_key":"k","org":"o","ip":"192.0.2.1","input_tokens":5,"output_tokens":7}"#,
        "",
        r#"{"ts_ms":13,"api_key":"k","org":"o","ip":"192.0.2.1","input_tokens":5,"output_tokens":7,"extra":"ignored"}"#,
    ]
    .join("\n");
    let (out, s) = replay_text(&input, Policy::llm_api());
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(s.malformed, 5);
    assert_eq!(s.requests, 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["i"], i as u64);
    }
    assert_eq!(lines[0]["allowed"], true);
    assert_eq!(lines[1]["reason"], "malformed_line");
    assert_eq!(lines[6]["allowed"], true);
    assert_eq!(lines[6]["reason"], serde_json::Value::Null);
}

#[test]
fn lines_going_back_in_time_replay_at_the_last_time_seen() {
    // Burst 20 at t=60 s; a line stamped earlier must not see a refilled bucket.
    let burst = r#"{"ts_ms":60000,"api_key":"k","org":"o","ip":"192.0.2.1","input_tokens":1,"output_tokens":1}"#;
    let mut lines = vec![burst; 20];
    lines.push(r#"{"ts_ms":0,"api_key":"k","org":"o","ip":"192.0.2.1","input_tokens":1,"output_tokens":1}"#);
    lines.push(r#"{"ts_ms":60500,"api_key":"k","org":"o","ip":"192.0.2.1","input_tokens":1,"output_tokens":1}"#);
    let (out, s) = replay_text(&lines.join("\n"), Policy::llm_api_limits_only());
    let v: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(s.out_of_order, 1);
    assert_eq!(v[20]["allowed"], false);
    assert_eq!(v[20]["reason"], "api_key:requests_per_minute");
    assert_eq!(v[20]["retry_after_ms"], 500);
    assert_eq!(v[21]["allowed"], true);
}

#[test]
fn pipelined_and_serial_replays_write_the_same_bytes() {
    // A mixed trace longer than one batch, with malformed, non-UTF-8, CRLF, blank and
    // out-of-order lines in it, and no newline at the very end.
    let (trace, _) = simulate(3, 4);
    let mut input: Vec<u8> = Vec::new();
    // Output lines of the four requests of one key, spelt with and without JSON escapes.
    let mut escaped_key = Vec::new();
    let mut out_line = 0usize;
    for (n, line) in trace.lines().enumerate() {
        match n % 997 {
            5 => input.extend_from_slice(b"{\"ts_ms\": oops}\n"),
            6 => input.extend_from_slice(b"\xff\xfe not utf-8\n"),
            7 => input.extend_from_slice(b"\n"),
            8 => input.extend_from_slice(b"{\"ts_ms\":0,\"api_key\":\"k\",\"org\":\"o\",\"ip\":\"1.2.3.4\",\"input_tokens\":1,\"output_tokens\":1}\r\n"),
            9 if n < 997 => {
                for spelling in [r"sk-\u0065sc", "sk-esc", r"sk-e\u0073c", "sk-esc"] {
                    input.extend_from_slice(
                        format!("{{\"ts_ms\":0,\"api_key\":\"{spelling}\",\"org\":\"o\\u0072g\",\"ip\":\"1.2.3.4\",\"input_tokens\":1,\"output_tokens\":1,\"model\":\"m\\u0031\"}}\n").as_bytes(),
                    );
                    escaped_key.push(out_line);
                    out_line += 1;
                }
            }
            11 => input.extend_from_slice(b"{\"ts_ms\":0,\"api_key\":\"k\",\"org\":\"o\",\"ip\":\"1.2.3\",\"input_tokens\":1,\"output_tokens\":1}\n"),
            12 => input.extend_from_slice(b"{\"ts_ms\":0,\"api_key\":\"k\",\"org\":\"o\",\"ip\":\"1.2.3.4\",\"input_tokens\":1,\"output_tokens\":1,\"prompt_fp\":\"xyz\"}\n"),
            // A line longer than the pipelined reader's block.
            10 if n < 997 => {
                let model = "y".repeat(replay::BLOCK + 1000);
                input.extend_from_slice(
                    format!("{{\"ts_ms\":0,\"api_key\":\"k\",\"org\":\"o\",\"ip\":\"1.2.3.4\",\"input_tokens\":1,\"output_tokens\":1,\"model\":\"{model}\"}}\n").as_bytes(),
                );
                out_line += 1;
            }
            _ => {}
        }
        if matches!(n % 997, 5..=8 | 11 | 12) {
            out_line += 1;
        }
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
        out_line += 1;
    }
    input.pop();
    assert!(input.len() > 4 * replay::BLOCK, "spans several blocks");
    // A tight per-key limit, so denials (with retry-after) are compared too; behaviour on,
    // with a fixed seed so that two wardens decide alike.
    let mut p = Policy::llm_api();
    p.api_key.insert(
        "requests_per_minute".into(),
        ratewarden::LimitConfig::Gcra {
            rate: 6,
            period: ratewarden::Period(std::time::Duration::from_secs(60)),
            burst: 3,
        },
    );
    let run = |pipelined: bool| {
        let mut out = Vec::new();
        let s = replay::replay_quiet(p.clone(), Some(99), pipelined, &input[..], &mut out).unwrap();
        (out, s)
    };
    let (a, sa) = run(true);
    let (b, sb) = run(false);
    assert_eq!(sa.requests, sb.requests);
    assert_eq!(sa.malformed, sb.malformed);
    assert!(sa.malformed >= 5 && sa.out_of_order > 0, "{sa:?}");
    assert_eq!(sa.out_of_order, sb.out_of_order);
    assert_eq!(sa.denied_by_reason, sb.denied_by_reason);
    assert!(
        !sa.denied_by_reason.is_empty(),
        "some limit refuses: {sa:?}"
    );
    let (a, b) = (String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap());
    assert_eq!(a.lines().count() as u64, sa.requests + sa.malformed);
    assert!(a == b, "pipelined and serial outputs differ");
    // The escaped and plain spellings are one key: its burst of 3 is spent by the fourth.
    let lines: Vec<&str> = a.lines().collect();
    let allowed: Vec<bool> = escaped_key
        .iter()
        .map(|&k| {
            let v: serde_json::Value = serde_json::from_str(lines[k]).unwrap();
            assert_eq!(v["i"], k as u64);
            v["allowed"].as_bool().unwrap()
        })
        .collect();
    assert_eq!(allowed, [true, true, true, false]);
}

#[test]
fn a_fixed_seed_makes_replays_with_behaviour_repeatable() {
    let (trace, _) = simulate(5, 20);
    let run = || {
        let mut out = Vec::new();
        let s = replay::replay_quiet(Policy::llm_api(), Some(7), true, trace.as_bytes(), &mut out)
            .unwrap();
        (String::from_utf8(out).unwrap(), s)
    };
    let (a, sa) = run();
    let (b, _) = run();
    assert!(
        sa.decisions_by_level[1..].iter().sum::<u64>() > 0,
        "behaviour acted: {sa:?}"
    );
    assert!(a == b, "same seed, different decisions");
}

#[test]
fn explain_reports_subjects_at_the_end_of_a_replay() {
    let (trace, truth) = simulate(7, 10);
    // The first attack key and its org, an unknown key, and a bad cluster id written validly.
    let (mut key, mut org) = (String::new(), String::new());
    for (line, label) in trace.lines().zip(truth.lines()) {
        if label.contains("\"role\":\"attack\"") {
            let l: replay::Line<'_> = serde_json::from_str(line).unwrap();
            (key, org) = (l.api_key.to_string(), l.org.to_string());
            break;
        }
    }
    let subjects: Vec<ratewarden::SubjectId> = [
        format!("api_key:{key}"),
        format!("org:{org}"),
        "api_key:never-seen".to_string(),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    for behaviour in [true, false] {
        let mut p = Policy::llm_api();
        p.behavior.enabled = behaviour;
        let (w, clock) = replay::replay_warden(p, Some(7));
        let mut r = replay::Replayer::new(&w, clock, replay::Options::quiet());
        r.run(trace.as_bytes(), std::io::sink()).unwrap();
        let lines = replay::explain(&w, &subjects);
        assert_eq!(lines.len(), 3);
        let v: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for (got, want) in v.iter().zip(&subjects) {
            assert_eq!(got["subject"]["id"], want.id.as_str(), "{got}");
        }
        if behaviour {
            assert!(
                v[0]["level"].is_string() && v[0]["reasons"].is_array(),
                "{}",
                v[0]
            );
            assert!(
                !v[0]["reasons"].as_array().unwrap().is_empty(),
                "an attack key has evidence: {}",
                v[0]
            );
            assert!(v[1]["score"].is_number(), "{}", v[1]);
            assert_eq!(v[2]["tracked"], false);
            assert_eq!(v[2]["why"], "not seen, or evicted");
        } else {
            for x in &v {
                assert_eq!(x["why"], "the behavioural layer is off", "{x}");
            }
        }
    }
}
