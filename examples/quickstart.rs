//! Builds a warden from the `llm_api` preset and sends a small mix of requests, printing each
//! decision with the headers a gateway would send.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::time::Duration;

use ratewarden::{Decision, ManualClock, Policy, Request, Warden};

fn main() -> Result<(), ratewarden::ConfigError> {
    let clock = ManualClock::new();
    let warden = Warden::builder()
        .policy(Policy::llm_api())
        .clock(clock.clone())
        .build()?;

    let office = "198.51.100.23".parse().expect("valid address");
    let home = "2001:db8:aa:1::7".parse().expect("valid address");
    println!(
        "{:<4} {:<8} {:<26} {:<8} {:<34} headers",
        "#", "t", "api key", "result", "reason"
    );
    let mut n = 0;
    let mut show = |t: &ManualClock, label: &str, req: &Request<'_>, actual_output: u64| {
        n += 1;
        let decision = warden.check(req);
        let headers = decision
            .headers()
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("x-ratelimit-remaining") || *k == "retry-after" || *k == "ratelimit"
            })
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let (result, reason) = match &decision {
            Decision::Allow(_) => ("allow", String::new()),
            Decision::Deny(d) => ("DENY", d.reason().to_string()),
        };
        println!(
            "{n:<4} {:<8} {label:<26} {result:<8} {reason:<34} {headers}",
            format!("{:.1}s", t.now_secs())
        );
        if let Decision::Allow(permit) = decision {
            permit.settle(actual_output);
        }
    };

    // A chat user: a few requests, settled to the real output size.
    for _ in 0..3 {
        let req = Request::new("sk-proj-alice", "org-alice", home)
            .input_tokens(300)
            .expected_output_tokens(1_000);
        show(&clock, "sk-proj-alice", &req, 420);
        clock.advance(Duration::from_secs(2));
    }
    // A script that bursts past its key's burst of 20 requests.
    for i in 0..23 {
        let req = Request::new("sk-proj-script", "org-acme", office).input_tokens(50);
        if !(3..20).contains(&i) {
            show(&clock, "sk-proj-script", &req, 10);
        } else {
            drop(warden.check(&req));
        }
    }
    // After half a second one more fits (120/min = one per 500 ms).
    clock.advance(Duration::from_millis(500));
    let req = Request::new("sk-proj-script", "org-acme", office).input_tokens(50);
    show(&clock, "sk-proj-script (+0.5s)", &req, 10);
    // A huge token estimate is refused by the 400k tokens/min limit without charging anything.
    let req = Request::new("sk-proj-bob", "org-acme", office).input_tokens(500_000);
    show(&clock, "sk-proj-bob (500k tokens)", &req, 0);
    // A request without an API key is charged to its cluster's anonymous bucket.
    show(&clock, "(anonymous)", &Request::anonymous(office), 0);

    let s = warden.stats();
    println!(
        "\nallowed {}, denied {} (rate {}, tokens {}), tracked keys/orgs/clusters {:?}",
        s.allowed,
        s.denied_rate + s.denied_tokens + s.denied_concurrency + s.denied_behavior,
        s.denied_rate,
        s.denied_tokens,
        s.tracked
    );
    Ok(())
}

trait Secs {
    fn now_secs(&self) -> f64;
}

impl Secs for ManualClock {
    fn now_secs(&self) -> f64 {
        use ratewarden::Clock;
        self.now_nanos() as f64 / 1e9
    }
}
