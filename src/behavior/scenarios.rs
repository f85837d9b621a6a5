//! Synthetic traffic for the benign and attack archetypes of `SCENARIOS.md`, replayed through
//! a small stand-in warden (classic GCRA limits of the `llm_api` preset, throttle scaling,
//! propagation, hooks) that drives `observe`/`settle`/`evaluate` exactly as documented in the
//! module docs. Deterministic: every stream comes from a seeded SplitMix64.
//!
//! Besides the archetypes (with `STANDARD` and lower-rate `HARDER` attack parameters), the
//! benign stress actors go beyond `SCENARIOS.md`: an enterprise whose 40 chat-like keys share
//! one template (B3'), a 5-task logprob classifier on a serverless pool of /24s (B2'), 300
//! heavy users of one popular app's system prompt (B7), and 600 of them behind one carrier
//! NAT (B8).
//!
//! Each world runs twice, with the behavioural layer off (limits only: the baseline) and on,
//! and reports per actor group: requests, share denied by behaviour, output tokens the group
//! still got compared with the baseline, the highest level its requests saw, and the time from
//! its first request to its first request at throttle or higher. Run with
//! `cargo test scenarios -- --nocapture` to see the tables.

use std::collections::HashMap;

use super::{
    BehaviorParams, BehaviorPolicy, CrossIndex, Level, Observation, SubjectBehavior, ORG_SHAPE_NONE,
};
use crate::hooks::{EscalationEvent, EventQueue, HookRunner};
use crate::subject::SubjectKind;

const S: u64 = 1_000_000_000;
const MIN: u64 = 60 * S;

// ---------------------------------------------------------------------------------------------
// Randomness

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1_u64 << 53) as f64
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
    /// Exponential inter-arrival for a Poisson process of `per_min` events per minute.
    fn poisson_gap(&mut self, per_min: f64) -> u64 {
        let mean_ns = 60e9 / per_min;
        (-(1.0 - self.unit()).ln() * mean_ns) as u64
    }
    /// `x` with `k` distinct random bits flipped.
    fn flip(&mut self, x: u64, k: u32) -> u64 {
        let mut mask = 0_u64;
        while mask.count_ones() < k {
            mask |= 1 << (self.next() % 64);
        }
        x ^ mask
    }
    fn tokens(&mut self, median: f64, sigma: f64, cap: u64) -> u64 {
        (self.lognormal(median, sigma) as u64).clamp(1, cap)
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic

#[derive(Clone, Copy, Debug)]
struct Req {
    t: u64,
    group: usize,
    key: u64,
    org: u64,
    cluster: u64,
    input: u64,
    output: u64,
    prompt_fp: Option<u64>,
    simhash: Option<u64>,
    template: Option<u64>,
    logprobs: bool,
}

struct Group {
    name: &'static str,
    attack: bool,
}

/// Builds the requests of a world; ids are drawn from one counter so groups never collide.
struct Traffic {
    rng: Rng,
    reqs: Vec<Req>,
    groups: Vec<Group>,
    next_id: u64,
    end: u64,
}

/// A template family: its fingerprint and the SimHash its fills sit close to.
#[derive(Clone, Copy)]
struct Family {
    template: u64,
    simhash: u64,
}

impl Traffic {
    fn new(seed: u64, minutes: u64) -> Self {
        Self {
            rng: Rng(seed),
            reqs: Vec::new(),
            groups: Vec::new(),
            next_id: 1,
            end: minutes * MIN,
        }
    }
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
    fn group(&mut self, name: &'static str, attack: bool) -> usize {
        self.groups.push(Group { name, attack });
        self.groups.len() - 1
    }
    fn family(&mut self) -> Family {
        Family {
            template: self.rng.next(),
            simhash: self.rng.next(),
        }
    }
    /// A distinct fill of a family: new exact fingerprint, SimHash a few bits off.
    fn fill(&mut self, f: Family) -> (Option<u64>, Option<u64>, Option<u64>) {
        let k = self.rng.range(1, 6) as u32;
        (
            Some(self.rng.next()),
            Some(self.rng.flip(f.simhash, k)),
            Some(f.template),
        )
    }

    /// B1 / B4: people in sessions of 3–20 requests with lognormal think time, then idle.
    /// Prompts are mostly edits of the previous one. `homework` (B4) is a shared template used
    /// in some sessions; `clusters` is the pool of home clusters (B4: one NAT cluster).
    fn people(
        &mut self,
        group: usize,
        users: usize,
        clusters: &[u64],
        homework: Option<Family>,
        idle_median_min: f64,
    ) {
        for _ in 0..users {
            let key = self.id();
            let org = self.id();
            let home = [
                clusters[self.rng.next() as usize % clusters.len()],
                clusters[self.rng.next() as usize % clusters.len()],
            ];
            let app = self.rng.chance(0.3).then(|| self.rng.next());
            let mut t = self.rng.range(0, 30 * MIN);
            let mut sim = self.rng.next();
            while t < self.end {
                let n = self.rng.range(3, 20);
                let hw = homework.filter(|_| self.rng.chance(0.3));
                let cluster = home[self.rng.range(0, 1) as usize];
                for _ in 0..n {
                    if t >= self.end {
                        break;
                    }
                    let (fp, s, template) = if let Some(h) = hw {
                        self.fill(h)
                    } else {
                        sim = if self.rng.chance(0.6) {
                            let k = self.rng.range(1, 4) as u32;
                            self.rng.flip(sim, k)
                        } else {
                            self.rng.next()
                        };
                        (Some(self.rng.next()), Some(sim), app)
                    };
                    let input = self.rng.tokens(200.0, 0.8, 4000);
                    let output = self.rng.tokens(350.0, 0.7, 4000);
                    self.reqs.push(Req {
                        t,
                        group,
                        key,
                        org,
                        cluster,
                        input,
                        output,
                        prompt_fp: fp,
                        simhash: s,
                        template,
                        logprobs: false,
                    });
                    t += (self.rng.lognormal(40.0, 0.9) * 1e9) as u64;
                }
                t += (self.rng.lognormal(idle_median_min, 0.8) * 60e9) as u64;
            }
        }
    }

    /// A key sending `rpm` requests a minute from `start` on. `gap` picks the arrival process:
    /// Poisson when `jitter` is `None`, else periodic with ± `jitter` share of the period.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &mut self,
        group: usize,
        key: u64,
        org: u64,
        clusters: &[u64],
        rpm: f64,
        jitter: Option<f64>,
        start: u64,
        mut make: impl FnMut(&mut Rng) -> (u64, u64, Option<u64>, Option<u64>, Option<u64>, bool),
    ) {
        let mut t = start;
        let period = 60e9 / rpm;
        while t < self.end {
            let (input, output, fp, sim, template, logprobs) = make(&mut self.rng);
            let cluster = clusters[self.rng.next() as usize % clusters.len()];
            self.reqs.push(Req {
                t,
                group,
                key,
                org,
                cluster,
                input,
                output,
                prompt_fp: fp,
                simhash: sim,
                template,
                logprobs,
            });
            t += match jitter {
                None => self.rng.poisson_gap(rpm),
                Some(j) => (period * (1.0 + j * (2.0 * self.rng.unit() - 1.0))) as u64,
            };
        }
    }

    /// A key sweeping family `f` with long outputs.
    #[allow(clippy::too_many_arguments)]
    fn sweeper(
        &mut self,
        group: usize,
        key: u64,
        org: u64,
        clusters: &[u64],
        rpm: f64,
        jitter: Option<f64>,
        start: u64,
        f: Family,
    ) {
        self.stream(group, key, org, clusters, rpm, jitter, start, |r| {
            let k = r.range(1, 6) as u32;
            (
                r.range(60, 180),
                r.tokens(900.0, 0.4, 3000),
                Some(r.next()),
                Some(r.flip(f.simhash, k)),
                Some(f.template),
                false,
            )
        });
    }

    fn finish(mut self) -> (Vec<Req>, Vec<Group>) {
        self.reqs.sort_by_key(|r| r.t);
        (self.reqs, self.groups)
    }
}

/// Knobs of the archetypes, so that variants can be run.
#[derive(Clone, Copy)]
struct Mix {
    e1_rpm: f64,
    e2_keys: usize,
    e2_rpm: f64,
    e3_orgs: usize,
    e3_rpm: f64,
    e4_keys: usize,
    e4_rpm: f64,
    e5_rpm: f64,
    e6_rpm: f64,
    attacks: bool,
    /// Add harder benign actors beyond SCENARIOS.md (see `world`).
    stress: bool,
}

const STANDARD: Mix = Mix {
    e1_rpm: 150.0,
    e2_keys: 30,
    e2_rpm: 40.0,
    e3_orgs: 30,
    e3_rpm: 15.0,
    e4_keys: 150,
    e4_rpm: 3.0,
    e5_rpm: 60.0,
    e6_rpm: 60.0,
    attacks: true,
    stress: false,
};

/// Lower-rate, smaller attackers (closer to the benign traffic).
const HARDER: Mix = Mix {
    e1_rpm: 120.0,
    e2_keys: 12,
    e2_rpm: 25.0,
    e3_orgs: 12,
    e3_rpm: 8.0,
    e4_keys: 100,
    e4_rpm: 2.0,
    e5_rpm: 30.0,
    e6_rpm: 30.0,
    attacks: true,
    stress: false,
};

fn world(seed: u64, minutes: u64, mix: Mix) -> (Vec<Req>, Vec<Group>) {
    let mut w = Traffic::new(seed, minutes);
    let residential: Vec<u64> = (0..50_000).map(|i| 1_000_000 + i).collect();

    // B1: interactive people, each their own org, one or two home clusters.
    let g = w.group("B1 interactive", false);
    w.people(g, 80, &residential, None, 30.0);

    // B2: batch classifier at ~80% of its key limit for the whole run.
    let g = w.group("B2 batch classifier", false);
    let org = w.id();
    let cloud = [w.id()];
    let f = w.family();
    for _ in 0..3 {
        let key = w.id();
        let start = w.rng.range(0, 10 * S);
        w.stream(g, key, org, &cloud, 96.0, Some(0.5), start, |r| {
            let k = r.range(1, 6) as u32;
            (
                r.tokens(900.0, 0.5, 6000),
                r.range(1, 5),
                Some(r.next()),
                Some(r.flip(f.simhash, k)),
                Some(f.template),
                r.chance(0.7),
            )
        });
    }

    // B3: enterprise org, 40 service keys (5 services sharing templates) on 4 clusters, all
    // starting at once.
    let g = w.group("B3 enterprise", false);
    let org = w.id();
    let offices: Vec<u64> = (0..4).map(|_| w.id()).collect();
    let services: Vec<Family> = (0..5).map(|_| w.family()).collect();
    for i in 0..40 {
        let key = w.id();
        let f = services[i % services.len()];
        let rpm = 8.0 + w.rng.unit() * 22.0;
        let mine = [offices[i % 4], offices[(i + 1) % 4]];
        let start = w.rng.range(0, 5 * S);
        w.stream(g, key, org, &mine, rpm, None, start, |r| {
            let k = r.range(3, 10) as u32;
            (
                r.tokens(600.0, 0.6, 8000),
                r.tokens(250.0, 0.7, 3000),
                Some(r.next()),
                Some(r.flip(f.simhash, k)),
                Some(f.template),
                false,
            )
        });
    }

    // B4: 300 accounts behind one campus NAT, people-like, sometimes a shared homework template.
    let g = w.group("B4 campus NAT", false);
    let nat = [w.id()];
    let homework = w.family();
    w.people(g, 300, &nat, Some(homework), 20.0);

    // B5: CI bots: exact period, identical prompt, tiny output.
    let g = w.group("B5 CI bots", false);
    let org = w.id();
    let ci = [w.id()];
    for i in 0..3_u64 {
        let key = w.id();
        let (fp, sim, tpl) = (w.rng.next(), w.rng.next(), w.rng.next());
        w.stream(g, key, org, &ci, 2.0, Some(0.0), i * 7 * S, move |_| {
            (50, 5, Some(fp), Some(sim), Some(tpl), false)
        });
    }

    if mix.stress {
        // B3': an enterprise whose 40 keys all share one corporate template, chat-like
        // (outputs longer than inputs), all starting together, org output ~300k tokens/min.
        let g = w.group("B3' shared template", false);
        let org = w.id();
        let offices: Vec<u64> = (0..4).map(|_| w.id()).collect();
        let f = w.family();
        for i in 0..40 {
            let key = w.id();
            let rpm = 8.0 + w.rng.unit() * 22.0;
            let mine = [offices[i % 4]];
            w.stream(g, key, org, &mine, rpm, None, 0, |r| {
                let k = r.range(3, 10) as u32;
                (
                    r.tokens(300.0, 0.6, 8000),
                    r.tokens(400.0, 0.6, 3000),
                    Some(r.next()),
                    Some(r.flip(f.simhash, k)),
                    Some(f.template),
                    false,
                )
            });
        }
        // B2': a multi-task classifier: 5 templates, logprobs always, 110 rpm (92% of the
        // limit) on 2 keys, from a serverless pool of 30 cloud /24s.
        let g = w.group("B2' multi-task classify", false);
        let org = w.id();
        let pool: Vec<u64> = (0..30).map(|_| w.id()).collect();
        let tasks: Vec<Family> = (0..5).map(|_| w.family()).collect();
        for _ in 0..2 {
            let key = w.id();
            let tasks = tasks.clone();
            w.stream(g, key, org, &pool, 110.0, Some(0.3), 0, move |r| {
                let f = tasks[r.next() as usize % tasks.len()];
                let k = r.range(1, 6) as u32;
                (
                    r.tokens(700.0, 0.5, 6000),
                    r.range(1, 3),
                    Some(r.next()),
                    Some(r.flip(f.simhash, k)),
                    Some(f.template),
                    true,
                )
            });
        }
        // B7: 300 heavy users of one popular app (one system prompt for all, each their own
        // org), residential, short idle gaps.
        let g = w.group("B7 popular app prompt", false);
        let app = w.family();
        w.people(g, 300, &residential[..5000], None, 5.0);
        for r in w.reqs.iter_mut().filter(|r| r.group == g) {
            r.template = Some(app.template);
            r.output *= 2;
        }
        // B8: a carrier NAT: 600 heavy users of that same app behind one /24.
        let g = w.group("B8 carrier NAT app", false);
        let nat = [w.id()];
        w.people(g, 600, &nat, None, 5.0);
        for r in w.reqs.iter_mut().filter(|r| r.group == g) {
            r.template = Some(app.template);
            r.output *= 2;
        }
    }

    if !mix.attacks {
        return w.finish();
    }

    // E1: one key pinned at (above) its request limit, template sweep, long outputs.
    let g = w.group("E1 single key max", true);
    let (key, org, dc) = (w.id(), w.id(), [w.id()]);
    let f = w.family();
    w.sweeper(g, key, org, &dc, mix.e1_rpm, Some(0.1), 0, f);

    // E2: many keys in one org, one cluster, shared family, synchronised start.
    let g = w.group("E2 many keys one org", true);
    let (org, dc) = (w.id(), [w.id()]);
    let f = w.family();
    for _ in 0..mix.e2_keys {
        let key = w.id();
        let start = w.rng.range(0, 20 * S);
        w.sweeper(g, key, org, &dc, mix.e2_rpm, None, start, f);
    }

    // E3: fresh single-key orgs behind two datacenter /24s, one family.
    let g = w.group("E3 sybil orgs", true);
    let dcs = [w.id(), w.id()];
    let f = w.family();
    for i in 0..mix.e3_orgs {
        let (key, org) = (w.id(), w.id());
        let start = w.rng.range(0, 120 * S);
        w.sweeper(
            g,
            key,
            org,
            &dcs[i % 2..i % 2 + 1],
            mix.e3_rpm,
            None,
            start,
            f,
        );
    }

    // E4: low and slow: a key per org, a few requests a minute, every request from another
    // residential /24.
    let g = w.group("E4 low and slow", true);
    let f = w.family();
    for _ in 0..mix.e4_keys {
        let (key, org) = (w.id(), w.id());
        let start = w.rng.range(0, 300 * S);
        w.sweeper(g, key, org, &residential, mix.e4_rpm, Some(0.6), start, f);
    }

    // E5: a few keys sweeping one template from a topic list.
    let g = w.group("E5 template sweep", true);
    let (org, dc) = (w.id(), [w.id()]);
    let f = w.family();
    for _ in 0..3 {
        let key = w.id();
        w.sweeper(g, key, org, &dc, mix.e5_rpm, None, 0, f);
    }

    // E6: logprob harvesting: logprobs on nearly every request, one-token outputs, many
    // templates.
    let g = w.group("E6 logprob harvest", true);
    let (org, dc) = (w.id(), [w.id()]);
    let templates: Vec<Family> = (0..200).map(|_| w.family()).collect();
    for _ in 0..3 {
        let key = w.id();
        let templates = templates.clone();
        w.stream(g, key, org, &dc, mix.e6_rpm, None, 0, move |r| {
            let f = templates[r.next() as usize % templates.len()];
            let k = r.range(1, 6) as u32;
            (
                r.range(80, 300),
                1,
                Some(r.next()),
                Some(r.flip(f.simhash, k)),
                Some(f.template),
                r.chance(0.98),
            )
        });
    }
    w.finish()
}

// ---------------------------------------------------------------------------------------------
// A stand-in warden

/// GCRA limit: `period_ns` per unit, `tolerance_ns` of burst.
#[derive(Clone, Copy)]
struct Gcra {
    tat: u64,
}

struct LimitSpec {
    per_min: f64,
    burst: f64,
}

const KEY_REQ: LimitSpec = LimitSpec {
    per_min: 120.0,
    burst: 20.0,
};
const KEY_TOK: LimitSpec = LimitSpec {
    per_min: 400_000.0,
    burst: 400_000.0,
};
const ORG_REQ: LimitSpec = LimitSpec {
    per_min: 1500.0,
    burst: 150.0,
};
const ORG_TOK: LimitSpec = LimitSpec {
    per_min: 4_000_000.0,
    burst: 4_000_000.0,
};
const CLUSTER_REQ: LimitSpec = LimitSpec {
    per_min: 3000.0,
    burst: 300.0,
};

impl Gcra {
    /// `(conforms, pressure, new tat)` for `cost` units at `factor` of the limit.
    fn peek(&self, spec: &LimitSpec, cost: f64, factor: f64, now: u64) -> (bool, f32, u64) {
        let period = 60e9 / (spec.per_min * factor);
        let tolerance = period * (spec.burst * factor).max(1.0);
        let tat = self.tat.max(now);
        let new_tat = tat as f64 + period * cost;
        let used = new_tat - now as f64;
        let pressure = (used / tolerance).clamp(0.0, 1.0) as f32;
        (used <= tolerance, pressure, new_tat as u64)
    }
}

#[derive(Clone, Default)]
struct GroupStats {
    requests: u64,
    allowed: u64,
    denied_behavior: u64,
    denied_limit: u64,
    output: u64,
    max_enforced: Level,
    max_reported: Level,
    first_t: Option<u64>,
    first_throttle: Option<u64>,
}

struct Warden {
    p: BehaviorParams,
    cross: CrossIndex,
    subjects: HashMap<(SubjectKind, u64), SubjectBehavior>,
    limits: HashMap<(SubjectKind, u64, bool), Gcra>,
    queue: EventQueue,
    hooks: HookRunner,
    transitions: u64,
    next_maintenance: u64,
    /// Per group and subject kind: the highest level an event of one of its requests reached,
    /// and its reasons.
    evidence: Vec<[(Level, String); 3]>,
}

fn hash(id: u64) -> u64 {
    let mut r = Rng(id ^ 0xA5A5_A5A5);
    r.next()
}

impl Warden {
    fn new(policy: &BehaviorPolicy, groups: usize) -> Self {
        let p = BehaviorParams::new(policy, "behavior")
            .unwrap()
            .with_seed(0xC0FFEE);
        Self {
            cross: CrossIndex::new(&p),
            p,
            subjects: HashMap::new(),
            limits: HashMap::new(),
            queue: EventQueue::new(1 << 16),
            hooks: HookRunner::new(vec![Box::new(|e: &EscalationEvent| {
                assert!(e.from != e.to);
            })]),
            transitions: 0,
            next_maintenance: 0,
            evidence: vec![Default::default(); groups],
        }
    }

    fn factor(&self, id: (SubjectKind, u64), now: u64) -> f64 {
        match self.subjects.get(&id).map(|s| s.level(now)) {
            Some(Level::Throttle) => f64::from(self.p.throttle_factor),
            _ => 1.0,
        }
    }

    /// One check. Returns `(allowed, denied_by_behavior, max enforced, max reported)`.
    fn check(&mut self, r: &Req) -> (bool, bool, Level, Level) {
        let now = r.t;
        let subjects = [
            (SubjectKind::ApiKey, r.key),
            (SubjectKind::Org, r.org),
            (SubjectKind::IpCluster, r.cluster),
        ];
        for id in subjects {
            self.subjects
                .entry(id)
                .or_insert_with(|| SubjectBehavior::new(id.0, now));
        }

        // Classic limits: peek everything (throttled subjects at their reduced factor).
        let cost = (r.input + r.output) as f64;
        let checks: [(SubjectKind, u64, bool, &LimitSpec, f64); 5] = [
            (SubjectKind::ApiKey, r.key, false, &KEY_REQ, 1.0),
            (SubjectKind::ApiKey, r.key, true, &KEY_TOK, cost),
            (SubjectKind::Org, r.org, false, &ORG_REQ, 1.0),
            (SubjectKind::Org, r.org, true, &ORG_TOK, cost),
            (SubjectKind::IpCluster, r.cluster, false, &CLUSTER_REQ, 1.0),
        ];
        let mut conform = true;
        let mut pressure = [0.0_f32; 3];
        let mut commits = [0_u64; 5];
        for (i, (kind, id, tokens, spec, c)) in checks.iter().enumerate() {
            let factor = self.factor((*kind, *id), now);
            let cell = self
                .limits
                .entry((*kind, *id, *tokens))
                .or_insert(Gcra { tat: 0 });
            let (ok, pr, tat) = cell.peek(spec, *c, factor, now);
            conform &= ok;
            let slot = match kind {
                SubjectKind::ApiKey => 0,
                SubjectKind::Org => 1,
                SubjectKind::IpCluster => 2,
            };
            pressure[slot] = pressure[slot].max(pr);
            commits[i] = tat;
        }

        // Behaviour: observe the three subjects and the cross index, then evaluate.
        let obs = Observation {
            now_ns: now,
            input_tokens: r.input,
            expected_output_tokens: 500,
            prompt_fp: r.prompt_fp,
            prompt_simhash: r.simhash,
            template_fp: r.template,
            logprobs: r.logprobs,
            key_hash: hash(r.key),
            org_hash: hash(r.org),
            cluster_hash: hash(r.cluster),
            pressure: 0.0,
            denied_by_limit: !conform,
            refused: !conform,
        };
        // Key first (it files the request in the cross index); if it is escalated, tell its org and cluster; then the org and cluster.
        let mut events = Vec::new();
        for (i, id) in subjects.iter().enumerate() {
            if i == 1 {
                let key = &self.subjects[&subjects[0]];
                let (rep, enf) = (key.reported_level(now), key.level(now));
                if rep >= Level::Throttle {
                    for group in &subjects[1..] {
                        let g = self.subjects.get_mut(group).unwrap();
                        g.child_escalated(obs.key_hash, rep, enf, now, &self.p);
                    }
                }
            }
            // The key's evaluation weighs what its org published (as `Engine::observe` does).
            let org_shape = if i == 0 {
                self.subjects[&subjects[1]].org_shape()
            } else {
                ORG_SHAPE_NONE
            };
            let s = self.subjects.get_mut(id).unwrap();
            s.observe(
                &Observation {
                    pressure: pressure[i],
                    ..obs
                },
                &self.p,
            );
            if i == 0 {
                if let Some(family) = s.family_of(&obs) {
                    self.cross.observe(family, &obs, s.mean_output());
                }
            }
            let t = if i == 0 {
                s.evaluate_key(now, &self.p, &self.cross, || org_shape)
            } else {
                s.evaluate(now, &self.p, &self.cross)
            };
            if let Some(t) = t {
                events.push(t.into_event(s.kind(), format!("{}", id.1), now / 1_000_000));
            }
        }
        self.transitions += events.len() as u64;
        for e in &events {
            let kind = match e.subject_kind {
                SubjectKind::ApiKey => 0,
                SubjectKind::Org => 1,
                SubjectKind::IpCluster => 2,
            };
            let best = &mut self.evidence[r.group][kind];
            if e.to > best.0 {
                let names = e
                    .reasons
                    .iter()
                    .map(|x| format!("{}:{:.2}", x.detector, x.contribution));
                *best = (
                    e.to,
                    format!(
                        "{:?} {}",
                        e.subject_kind,
                        names.collect::<Vec<_>>().join(" ")
                    ),
                );
            }
        }
        for e in events {
            self.hooks.run(&e);
            self.queue.push(e);
        }

        let levels: Vec<(Level, Level)> = subjects
            .iter()
            .map(|id| {
                let s = &self.subjects[id];
                (s.level(now), s.reported_level(now))
            })
            .collect();
        let enforced = levels.iter().map(|l| l.0).max().unwrap_or_default();
        let reported = levels.iter().map(|l| l.1).max().unwrap_or_default();

        let allowed = conform && !enforced.denies();
        if allowed {
            for (i, (kind, id, tokens, _, _)) in checks.iter().enumerate() {
                self.limits
                    .insert((*kind, *id, *tokens), Gcra { tat: commits[i] });
            }
            for id in &subjects {
                self.subjects.get_mut(id).unwrap().settle(r.output);
            }
        }
        self.maintain(now);
        (allowed, enforced.denies(), enforced, reported)
    }

    /// Idle eviction as the table would do it: never evicts subjects that must be kept.
    fn maintain(&mut self, now: u64) {
        if now < self.next_maintenance {
            return;
        }
        self.next_maintenance = now + 5 * MIN;
        self.subjects
            .retain(|_, s| s.must_keep(now) || now.saturating_sub(s.last_seen_ns()) < 30 * MIN);
        self.cross.maintain(now);
    }
}

struct Report {
    groups: Vec<(&'static str, bool, GroupStats)>,
    evidence: Vec<[(Level, String); 3]>,
    transitions: u64,
    events_dropped: u64,
}

fn replay(reqs: &[Req], groups: &[Group], policy: &BehaviorPolicy) -> Report {
    let mut warden = Warden::new(policy, groups.len());
    let mut stats = vec![GroupStats::default(); groups.len()];
    for r in reqs {
        let (allowed, by_behavior, enforced, reported) = warden.check(r);
        let s = &mut stats[r.group];
        s.requests += 1;
        s.first_t.get_or_insert(r.t);
        if allowed {
            s.allowed += 1;
            s.output += r.output;
        } else if by_behavior {
            s.denied_behavior += 1;
        } else {
            s.denied_limit += 1;
        }
        s.max_enforced = s.max_enforced.max(enforced);
        s.max_reported = s.max_reported.max(reported);
        if enforced >= Level::Throttle && s.first_throttle.is_none() {
            s.first_throttle = Some(r.t);
        }
    }
    assert_eq!(warden.hooks.panicked_hooks(), 0);
    let drained = warden.queue.drain().len() as u64;
    assert_eq!(drained + warden.queue.dropped(), warden.transitions);
    Report {
        groups: groups
            .iter()
            .zip(stats)
            .map(|(g, s)| (g.name, g.attack, s))
            .collect(),
        transitions: warden.transitions,
        events_dropped: warden.queue.dropped(),
        evidence: warden.evidence,
    }
}

/// Replays a world with and without the behavioural layer; prints the table; returns
/// `(name, attack, with, baseline)` per group.
fn compare(
    title: &str,
    reqs: &[Req],
    groups: &[Group],
    policy: &BehaviorPolicy,
) -> Vec<(&'static str, bool, GroupStats, GroupStats)> {
    let off = BehaviorPolicy {
        enabled: false,
        ..policy.clone()
    };
    let base = replay(reqs, groups, &off);
    let with = replay(reqs, groups, policy);
    println!(
        "\n{title}: {} requests, {} level changes",
        reqs.len(),
        with.transitions
    );
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>12}",
        "group",
        "requests",
        "denied%",
        "base_den%",
        "yield%",
        "max_level",
        "max_rep",
        "to_throttle"
    );
    let mut out = Vec::new();
    for ((name, attack, w), (_, _, b)) in with.groups.into_iter().zip(base.groups) {
        let pct = |n: u64, d: u64| {
            if d == 0 {
                0.0
            } else {
                100.0 * n as f64 / d as f64
            }
        };
        let ttt = match (w.first_throttle, w.first_t) {
            (Some(a), Some(b)) => format!("{:.0}s", (a - b) as f64 / 1e9),
            _ => "-".into(),
        };
        println!(
            "{:<22} {:>8} {:>9.3} {:>9.3} {:>8.1} {:>10} {:>10} {:>12}",
            name,
            w.requests,
            pct(w.denied_behavior + w.denied_limit, w.requests),
            pct(b.denied_limit, b.requests),
            pct(w.output, b.output),
            w.max_enforced.as_str(),
            w.max_reported.as_str(),
            ttt
        );
        out.push((name, attack, w, b));
    }
    assert_eq!(with.events_dropped, 0);
    for ((name, ..), evidence) in out.iter().zip(&with.evidence) {
        for (level, why) in evidence {
            if *level > Level::Normal {
                println!("  {name}: {level} by {why}");
            }
        }
    }
    out
}

/// The bar: every attack group reaches throttle or higher, benign groups never do, and the
/// behavioural layer denies at most 0.1% of benign requests. Returns the attackers' overall
/// output yield (with / limits only).
fn check_bar(rows: &[(&'static str, bool, GroupStats, GroupStats)]) -> f64 {
    let (mut got, mut base) = (0_u64, 0_u64);
    let (mut benign_denied, mut benign) = (0_u64, 0_u64);
    for (name, attack, w, b) in rows {
        if *attack {
            assert!(w.max_enforced >= Level::Throttle, "{name} never throttled");
            got += w.output;
            base += b.output;
        } else {
            assert!(
                w.max_enforced < Level::Throttle,
                "{name} reached {}",
                w.max_enforced
            );
            assert!(
                w.max_reported < Level::Throttle,
                "{name} reported {}",
                w.max_reported
            );
            benign_denied += w.denied_behavior;
            benign += w.requests;
        }
    }
    assert!(
        benign_denied * 1000 <= benign,
        "benign denied {benign_denied} of {benign}"
    );
    let yield_share = got as f64 / base.max(1) as f64;
    println!(
        "attack output yield vs limits only: {:.1}%",
        100.0 * yield_share
    );
    yield_share
}

#[test]
fn standard_archetypes_mixed() {
    let (reqs, groups) = world(1, 90, STANDARD);
    let rows = compare(
        "standard mix, 90 min",
        &reqs,
        &groups,
        &BehaviorPolicy::default(),
    );
    let y = check_bar(&rows);
    assert!(y <= 0.10, "attack yield {y}");
}

#[test]
fn harder_archetypes_mixed() {
    let (reqs, groups) = world(2, 90, HARDER);
    let rows = compare(
        "harder mix, 90 min",
        &reqs,
        &groups,
        &BehaviorPolicy::default(),
    );
    let y = check_bar(&rows);
    assert!(y <= 0.15, "attack yield {y}");
}

#[test]
fn benign_with_stress_for_three_hours() {
    let mix = Mix {
        attacks: false,
        stress: true,
        ..STANDARD
    };
    let (reqs, groups) = world(3, 180, mix);
    let rows = compare(
        "benign with stress actors, 180 min",
        &reqs,
        &groups,
        &BehaviorPolicy::default(),
    );
    check_bar(&rows);
}

#[test]
fn shadow_mode_denies_nothing_but_reports() {
    let (reqs, groups) = world(4, 30, STANDARD);
    let policy = BehaviorPolicy {
        shadow: true,
        ..BehaviorPolicy::default()
    };
    let rows = compare("shadow, 30 min", &reqs, &groups, &policy);
    for (name, attack, w, _) in &rows {
        assert_eq!(w.denied_behavior, 0, "{name}");
        assert_eq!(w.max_enforced, Level::Normal, "{name}");
        if *attack {
            assert!(w.max_reported >= Level::Throttle, "{name}");
        }
    }
}

/// The bar holds for other random draws of the same archetypes, and for the benign stress
/// actors alone.
#[test]
fn bar_holds_across_seeds() {
    for seed in 10..13 {
        let (reqs, groups) = world(seed, 60, STANDARD);
        let rows = compare(
            &format!("standard mix, seed {seed}"),
            &reqs,
            &groups,
            &BehaviorPolicy::default(),
        );
        assert!(check_bar(&rows) <= 0.10);
        let mix = Mix {
            attacks: false,
            stress: true,
            ..STANDARD
        };
        let (reqs, groups) = world(seed, 90, mix);
        let rows = compare(
            &format!("benign with stress, seed {seed}"),
            &reqs,
            &groups,
            &BehaviorPolicy::default(),
        );
        check_bar(&rows);
    }
}

/// Traces may leave out template fingerprints: families then come only from the SimHash
/// centroids (their bands in the cross index, the share of prompts near them for
/// concentration). Benign traffic stays below throttle; every attack, low-and-slow included,
/// is still escalated.
#[test]
fn without_template_fingerprints() {
    let strip = |(mut reqs, groups): (Vec<Req>, Vec<Group>)| {
        for r in &mut reqs {
            r.template = None;
        }
        (reqs, groups)
    };
    let (reqs, groups) = strip(world(
        5,
        60,
        Mix {
            stress: true,
            ..STANDARD
        },
    ));
    let rows = compare(
        "no template_fp, 60 min",
        &reqs,
        &groups,
        &BehaviorPolicy::default(),
    );
    for (name, attack, w, _) in &rows {
        if !attack {
            assert!(w.max_reported < Level::Throttle, "{name}");
            assert_eq!(w.denied_behavior, 0, "{name}");
        } else {
            assert!(w.max_enforced >= Level::Throttle, "{name}");
        }
    }
}
