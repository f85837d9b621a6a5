//! The behavioural layer: signals → detectors → score → level.
//!
//! Classic limits stop one key that asks too much. Distillation (harvesting a model's outputs
//! to train another) stays under every per-key limit by spreading queries over many keys, orgs
//! and IP clusters. This layer keeps a small state per subject ([`SubjectBehavior`]), plus one
//! global index of prompt families ([`CrossIndex`]) that links subjects which look unrelated,
//! and turns them into a level per subject: `normal`, `watch`, `throttle`, `challenge`,
//! `block`.
//!
//! # How the warden drives it
//!
//! Per check, with the clock read once (the test-only `scenarios` module follows the same
//! order, without the decision):
//! 0. decide with each subject's cached `level(now)` as it stood before this request:
//!    `challenge`/`block` deny, `throttle` scales that subject's limits by
//!    `throttle_factor` (`BehaviorParams::throttle_factor`); then charge the classic limits
//!    (all or nothing). A level change that this request causes therefore acts from the
//!    subject's next request;
//! 1. build one [`Observation`] for the request and its outcome; copy it per subject with
//!    that subject's own `pressure`;
//! 2. key first, under its short mutex: `observe(&obs, params)`, then
//!    `evaluate(now, params, &cross)`; read its `family_of(&obs)` and `mean_output()` and,
//!    after releasing its lock, file the request once in the cross index:
//!    `cross.observe(family, &obs, mean_output)`;
//! 3. if the key's `reported_level` is `throttle` or higher,
//!    call `child_escalated` on its org and cluster (cheap; repeating it on every such check
//!    keeps the propagated level alive, calling it only on transitions lets it lapse after
//!    `propagation.window_s`);
//! 4. the same `observe` + `evaluate` for the org and the cluster;
//! 5. for each `Some(transition)`, turn it into an event (`Transition::into_event`), push it to
//!    the [`EventQueue`](crate::hooks::EventQueue) and run the hooks, after releasing every
//!    lock;
//! 6. on `Permit::settle`, call `settle(output_tokens)` on the three subjects (the cross index
//!    needs nothing: it counted the key's mean output at check time).
//!
//! # Cost
//!
//! `observe` is O(1), allocation-free and lock-free: a dozen float adds, a few bit sets, a
//! dozen word operations for the SimHash centroid vote, four compares for housekeeping (a
//! decay fold with one `exp2` at most once per second, and a window rotation at most once per
//! window). `evaluate` returns after a few compares unless `evaluate_every_ms` passed since the
//! subject's last evaluation and either `evaluate_min_requests` requests arrived since or
//! `evaluate_max_ms` passed; a full evaluation reads the sketches, looks up at most five
//! families in the cross index (the centroid's four bands and the dominant template), and
//! allocates only when the level changes (the reasons of the [`Transition`]). Each check
//! files its request under exactly one family (`CrossIndex::observe`, one shard lock).
//! Measured with the ignored test `observe_cost` (release, best of five, on a shared and busy
//! 2-core VM, so ranges over several runs): `observe` 24–40 ns, `observe` + the usual
//! early-return `evaluate` 28–47 ns, one full evaluation 180–250 ns, `CrossIndex::observe`
//! 22–30 ns.
//!
//! # Memory
//!
//! One [`SubjectBehavior`] is [`SubjectBehavior::SIZE`] bytes (368 on 64-bit targets) for
//! every kind (a compile-time assert keeps it at most 512); with its lock and its cached levels
//! word a subject's [`Slot`] is 384 bytes in one allocation. Two rarer parts are boxed on first use,
//! so that a key which never needs them pays a pointer each: the escalated-children sketches
//! of an org or cluster (40 bytes, once a child key escalates) and what the host set on a
//! subject (24 bytes, on its first manual level, exemption or cleared challenge). The [`CrossIndex`] is 88 bytes per family slot (with its tag),
//! allocated once (4096 slots, about 352 KiB, by default).
//!
//! # Shadow, manual levels and exemption
//!
//! The *reported* level includes detectors in shadow mode; the *enforced* level leaves them
//! out and stays `normal` in global shadow mode. A manual level (with an optional expiry)
//! overrides both; an exempt subject is enforced `normal` (its reported level still shows what
//! it does). After the host clears a challenge, the computed level drops to `watch` and is
//! capped at `throttle` for `levels.challenge_grace_s`.

mod cross;
mod detect;
mod escalate;
mod policy;
mod signals;

#[cfg(test)]
mod scenarios;

use crate::hooks::Reason;
use crate::policy::ConfigError;
use crate::subject::SubjectKind;

pub(crate) use cross::{CrossIndex, FamilyStats};
pub use escalate::Level;
pub(crate) use escalate::Transition;
pub use policy::{
    BehaviorPolicy, CrossPolicy, DetectorsPolicy, IpSpreadPolicy, KeyChurnPolicy, KeyFanoutPolicy,
    LevelRule, LevelsPolicy, LogprobHarvestPolicy, OutputVolumePolicy, PinnedPolicy,
    PromptDiversityPolicy, PropagationPolicy, PropagationRule, RegularTimingPolicy,
    TemplateSpreadPolicy, TemplateSweepPolicy,
};

use detect::{DetectorId, DETECTORS};
use escalate::{Escalation, StepInput};
use signals::Signals;
pub(crate) use signals::ORG_SHAPE_NONE;

/// What the behavioural layer sees of one request. Plain data, built by the warden once per
/// check and passed to the request's three subjects and to the [`CrossIndex`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Observation {
    /// The check's clock reading.
    pub(crate) now_ns: u64,
    /// Prompt tokens.
    pub(crate) input_tokens: u64,
    /// The host's estimate of output tokens (seeds the output mean until the first settle).
    pub(crate) expected_output_tokens: u64,
    /// Exact hash of the prompt.
    pub(crate) prompt_fp: Option<u64>,
    /// 64-bit SimHash of the prompt.
    pub(crate) prompt_simhash: Option<u64>,
    /// Hash of the prompt's template or system prompt.
    pub(crate) template_fp: Option<u64>,
    /// Whether log-probabilities were requested.
    pub(crate) logprobs: bool,
    /// Hash of the API key id.
    pub(crate) key_hash: u64,
    /// Hash of the org id.
    pub(crate) org_hash: u64,
    /// Hash of the IP cluster id.
    pub(crate) cluster_hash: u64,
    /// How close *this subject's* most constrained classic limit is to refusing, `0..=1`
    /// (1 = refusing): the warden copies the observation per subject and sets it. Values
    /// outside the range or NaN are harmless.
    pub(crate) pressure: f32,
    /// Whether a classic limit (of any of the request's subjects) refused this request: it
    /// counts as pinned.
    pub(crate) denied_by_limit: bool,
    /// Whether the request was refused, by a classic limit or by the behavioural layer.
    /// Refused requests still count for rates and timing, but not for distinct prompts, so
    /// that a client retrying a refused prompt does not look repetitive.
    pub(crate) refused: bool,
}

/// Tag (in the top 16 bits) that keeps SimHash-band family ids apart from template
/// fingerprints.
const BAND_TAG: u64 = 0x5AD0_0000_0000_0000;

/// SimHash bands per family: four of 16 bits.
pub(crate) const BANDS: usize = 4;

/// Prompt-family ids, as the [`CrossIndex`] knows them. A *family* is either a band of a
/// SimHash centroid (LSH: two 64-bit SimHashes a few bits apart agree on most of their four
/// 16-bit bands) or an exact template fingerprint.
///
/// A request is filed under **one** family id ([`Observation::family_id`]), chosen by its key:
/// its template fingerprint when the key is more concentrated on its dominant template than on
/// its SimHash centroid (one system prompt over diverse content), else one band of the key's
/// centroid (template variants and fillings alike), picked by a hash of the request so that
/// each of the four bands sees about a quarter of the family's traffic (the index scales band
/// statistics back up). A subject looks up the four bands of its own centroid and its dominant
/// template ([`Families::probe`]). Filing one id instead of five keeps the per-check cost at one
/// index update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Families {
    ids: [u64; BANDS + 1],
    len: u8,
}

impl Families {
    #[cfg(test)]
    /// The family of an exact template fingerprint.
    #[inline]
    pub(crate) fn template(template_fp: u64) -> Self {
        Self::probe(None, Some(template_fp))
    }

    #[cfg(test)]
    /// The four band families of a SimHash.
    #[inline]
    pub(crate) fn bands(simhash: u64) -> Self {
        Self::probe(Some(simhash), None)
    }

    /// The bands of a centroid (if any), then a template (if any).
    #[inline]
    pub(crate) fn probe(centroid: Option<u64>, template_fp: Option<u64>) -> Self {
        let mut f = Self::default();
        if let Some(c) = centroid {
            for i in 0..BANDS as u32 {
                f.ids[usize::from(f.len)] = band(c, i);
                f.len += 1;
            }
        }
        if let Some(t) = template_fp {
            f.ids[usize::from(f.len)] = t;
            f.len += 1;
        }
        f
    }

    /// The ids.
    #[inline]
    pub(crate) fn ids(&self) -> &[u64] {
        &self.ids[..usize::from(self.len)]
    }
}

/// Band `i` (`0..4`) of a SimHash as a family id.
#[inline]
pub(crate) fn band(simhash: u64, i: u32) -> u64 {
    let i = u64::from(i % BANDS as u32);
    BAND_TAG ^ (i << 16) ^ ((simhash >> (16 * i)) & 0xFFFF)
}

/// Whether a family id is a SimHash band (sampled one in four, see [`Families`]).
#[inline]
pub(crate) fn is_band(id: u64) -> bool {
    id & 0xFFFF_0000_0000_0000 == BAND_TAG
}

impl Observation {
    /// The one family this request is filed under in the [`CrossIndex`]: its template
    /// fingerprint when `by_template` (its key is concentrated on its dominant template rather
    /// than on its SimHash centroid) and it has one; else a band of `centroid` (the key's
    /// SimHash centroid, else the prompt's own SimHash), picked by a hash of the request; else
    /// its template; else none.
    #[inline]
    pub(crate) fn family_id(&self, centroid: Option<u64>, by_template: bool) -> Option<u64> {
        if by_template {
            if let Some(t) = self.template_fp {
                return Some(t);
            }
        }
        match (centroid.or(self.prompt_simhash), self.template_fp) {
            (Some(c), _) => {
                let h = (self.now_ns ^ self.prompt_fp.unwrap_or(0) ^ self.key_hash)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                Some(band(c, (h >> 62) as u32))
            }
            (None, Some(t)) => Some(t),
            (None, None) => None,
        }
    }
}

/// Runtime settings of one detector.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct DetectorParams {
    pub(crate) enabled: bool,
    pub(crate) shadow: bool,
    pub(crate) weight: f32,
}

/// The validated runtime form of a [`BehaviorPolicy`]: durations in nanoseconds, inverses
/// precomputed so the request path never divides, and a secret per-process seed for sketch
/// hashing. Built once by the warden.
#[derive(Clone, Debug)]
pub(crate) struct BehaviorParams {
    policy: BehaviorPolicy,
    pub(crate) seed: u64,
    pub(crate) inv_half_life_ns: f64,
    /// Multiplier from a decayed sum to a per-minute rate: `60 · ln 2 / half_life_s`.
    pub(crate) per_min: f32,
    pub(crate) window_ns: u64,
    pub(crate) kids_window_ns: u64,
    pub(crate) eval_ns: u64,
    pub(crate) eval_min_requests: u32,
    pub(crate) eval_max_ns: u64,
    pub(crate) near_bits: u32,
    pub(crate) min_requests: u32,
    pub(crate) pinned_pressure: f32,
    pub(crate) fire_strength: f32,
    pub(crate) min_classes: u32,
    /// `min_classes` for a subject whose coverage cannot be observed (no prompt features).
    pub(crate) featureless_min_classes: u32,
    pub(crate) up: [f32; 5],
    pub(crate) down: [f32; 5],
    pub(crate) cooldown_ns: [u64; 5],
    pub(crate) grace_ns: u64,
    pub(crate) promote_ns: u64,
    pub(crate) throttle_factor: f32,
    pub(crate) detectors: [DetectorParams; DETECTORS],
}

const NS_PER_S: u64 = 1_000_000_000;

impl BehaviorParams {
    /// Validates `policy` and precomputes the runtime form; `path` prefixes error paths.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first bad field (see `BehaviorPolicy::validate`).
    pub(crate) fn new(policy: &BehaviorPolicy, path: &str) -> Result<Self, ConfigError> {
        policy.validate(path)?;
        let l = &policy.levels;
        let rules = [l.watch, l.watch, l.throttle, l.challenge, l.block];
        let d = &policy.detectors;
        let det = |enabled: bool, shadow: bool, weight: f64| DetectorParams {
            enabled,
            shadow,
            weight: weight as f32,
        };
        let mut detectors = [DetectorParams::default(); DETECTORS];
        for id in DetectorId::ALL {
            detectors[id.idx()] = match id {
                DetectorId::OutputVolume => det(
                    d.output_volume.enabled,
                    d.output_volume.shadow,
                    d.output_volume.weight,
                ),
                DetectorId::LogprobHarvest => det(
                    d.logprob_harvest.enabled,
                    d.logprob_harvest.shadow,
                    d.logprob_harvest.weight,
                ),
                DetectorId::TemplateSweep => det(
                    d.template_sweep.enabled,
                    d.template_sweep.shadow,
                    d.template_sweep.weight,
                ),
                DetectorId::PromptDiversity => det(
                    d.prompt_diversity.enabled,
                    d.prompt_diversity.shadow,
                    d.prompt_diversity.weight,
                ),
                DetectorId::IpSpread => {
                    det(d.ip_spread.enabled, d.ip_spread.shadow, d.ip_spread.weight)
                }
                DetectorId::TemplateSpread => det(
                    d.template_spread.enabled && policy.cross.enabled,
                    d.template_spread.shadow,
                    d.template_spread.weight,
                ),
                DetectorId::KeyFanout => det(
                    d.key_fanout.enabled,
                    d.key_fanout.shadow,
                    d.key_fanout.weight,
                ),
                DetectorId::KeyChurn => {
                    det(d.key_churn.enabled, d.key_churn.shadow, d.key_churn.weight)
                }
                DetectorId::RegularTiming => det(
                    d.regular_timing.enabled,
                    d.regular_timing.shadow,
                    d.regular_timing.weight,
                ),
                DetectorId::Pinned => det(d.pinned.enabled, d.pinned.shadow, d.pinned.weight),
                DetectorId::Propagation => det(
                    policy.propagation.enabled,
                    policy.propagation.shadow,
                    policy.propagation.weight,
                ),
            };
        }
        Ok(Self {
            seed: ahash::RandomState::new().hash_one(0x5EED_u64),
            inv_half_life_ns: 1.0 / (policy.rate_half_life_s as f64 * NS_PER_S as f64),
            per_min: (60.0 * std::f64::consts::LN_2 / policy.rate_half_life_s as f64) as f32,
            window_ns: policy.window_s.saturating_mul(NS_PER_S),
            kids_window_ns: policy.propagation.window_s.saturating_mul(NS_PER_S),
            eval_ns: policy.evaluate_every_ms.saturating_mul(1_000_000),
            eval_min_requests: policy.evaluate_min_requests,
            eval_max_ns: policy
                .evaluate_max_ms
                .max(policy.evaluate_every_ms)
                .saturating_mul(1_000_000),
            near_bits: policy.near_bits,
            min_requests: policy.min_requests,
            pinned_pressure: d.pinned.pressure as f32,
            fire_strength: l.fire_strength as f32,
            min_classes: l.min_evidence_classes,
            featureless_min_classes: l
                .featureless_min_evidence_classes
                .unwrap_or(l.min_evidence_classes.saturating_sub(1).max(1)),
            up: rules.map(|r| r.up as f32),
            down: rules.map(|r| r.down as f32),
            cooldown_ns: rules.map(|r| r.cooldown_s.saturating_mul(NS_PER_S)),
            grace_ns: l.challenge_grace_s.saturating_mul(NS_PER_S),
            promote_ns: l.promote_after_s.saturating_mul(NS_PER_S),
            throttle_factor: policy.throttle_factor as f32,
            detectors,
            policy: policy.clone(),
        })
    }

    /// Fixes the sketch-hashing seed (tests and reproducible replays). The default seed is
    /// random per process, so that clients cannot aim fingerprints at sketch collisions. When
    /// the warden rebuilds its params for a new policy at run time, it should carry the old
    /// seed over (`new.with_seed(old.seed)`): existing sketches and the cross index were
    /// filled with it.
    pub(crate) fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The policy this was built from.
    pub(crate) fn policy(&self) -> &BehaviorPolicy {
        &self.policy
    }
}

impl TryFrom<&BehaviorPolicy> for BehaviorParams {
    type Error = ConfigError;

    /// Same as `BehaviorParams::new(policy, "behavior")`.
    fn try_from(policy: &BehaviorPolicy) -> Result<Self, ConfigError> {
        Self::new(policy, "behavior")
    }
}

/// Behavioural state of one subject (an API key, an org or an IP cluster).
///
/// Stored by the warden in the subject's table entry behind a short `parking_lot::Mutex`;
/// every method is `&mut self` or `&self` and takes no lock of its own. No method panics.
/// Only `evaluate` (on a level change) and `explain` allocate, and the first escalated child
/// or host control boxes its small side state once.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SubjectBehavior {
    /// The signals, and the subject's kind and evaluation cadence counters (which share the
    /// signals' small fields).
    signals: Signals,
    escalation: Escalation,
    last_eval_ns: u64,
}

// A key's whole behavioural state must stay within 512 bytes (one per tracked subject).
const _: () = assert!(SubjectBehavior::SIZE <= 512);

impl SubjectBehavior {
    /// Bytes of one subject's behavioural state, for every kind (368 on 64-bit targets), without
    /// the two side boxes (see the module docs).
    pub(crate) const SIZE: usize = std::mem::size_of::<SubjectBehavior>();

    /// Fresh state, first seen at `now_ns`.
    pub(crate) const fn new(kind: SubjectKind, now_ns: u64) -> Self {
        Self {
            signals: Signals::new(kind, now_ns),
            escalation: Escalation::new(now_ns),
            last_eval_ns: now_ns,
        }
    }

    /// The kind given at construction.
    #[inline]
    pub(crate) const fn kind(&self) -> SubjectKind {
        self.signals.kind()
    }

    /// Records one check of a request involving this subject, allowed or refused. O(1), no
    /// allocation, no lock. While the subject is itself enforced at `throttle` or higher, its
    /// requests do not count as pinned: pressure against limits that the layer itself cut (or
    /// a denial it issued) is no evidence about the subject, and counting it would let a
    /// throttle escalate itself.
    #[inline]
    pub(crate) fn observe(&mut self, obs: &Observation, p: &BehaviorParams) {
        let restrained = self.escalation.level(obs.now_ns) >= Level::Throttle;
        self.signals.observe(obs, !restrained, p);
    }

    /// Records the actual output tokens of a finished response.
    #[inline]
    pub(crate) fn settle(&mut self, output_tokens: u64) {
        self.signals.settle(output_tokens);
    }

    /// Re-evaluates detectors, score and level, at most once per `evaluate_every_ms` of the
    /// subject's clock and then only once `evaluate_min_requests` requests arrived since the
    /// last evaluation or `evaluate_max_ms` passed (at once after `child_escalated` reports a
    /// new key, or when the clock went backwards); otherwise returns `None` after a few
    /// compares. Returns `Some`
    /// only when a level changed: the enforced level's change (`shadow: false`) if it changed,
    /// else the reported level's change (`shadow: true`).
    #[inline]
    pub(crate) fn evaluate(
        &mut self,
        now_ns: u64,
        p: &BehaviorParams,
        cross: &CrossIndex,
    ) -> Option<Transition> {
        if !self.evaluation_due(now_ns, p) {
            return None;
        }
        self.evaluate_now(now_ns, p, cross)
    }

    /// Whether [`evaluate`](Self::evaluate) at `now_ns` would evaluate (the cadence).
    #[inline]
    fn evaluation_due(&self, now_ns: u64, p: &BehaviorParams) -> bool {
        // A clock behind the last evaluation counts as due, so nothing stalls after a jump.
        if self.signals.is_evaluated() && now_ns >= self.last_eval_ns {
            let since = now_ns - self.last_eval_ns;
            if since < p.eval_ns
                || (u32::from(self.signals.since_eval()) < p.eval_min_requests
                    && since < p.eval_max_ns)
            {
                return false;
            }
        }
        true
    }

    /// [`evaluate`](Self::evaluate) for a key: when an evaluation is due, it first records
    /// the shape its org publishes (`org()`: [`org_shape`](Self::org_shape) of the org's
    /// state, or `ORG_SHAPE_NONE` for no org), so the org is read only then.
    #[inline]
    pub(crate) fn evaluate_key(
        &mut self,
        now_ns: u64,
        p: &BehaviorParams,
        cross: &CrossIndex,
        org: impl FnOnce() -> u8,
    ) -> Option<Transition> {
        if !self.evaluation_due(now_ns, p) {
            return None;
        }
        self.signals.set_org_shape(org());
        self.evaluate_now(now_ns, p, cross)
    }

    /// Org: how much it looked like harvesting as a whole at its last evaluation
    /// (`detect::org_shape`, stored by `signals::quantize_shape`; `ORG_SHAPE_NONE` before
    /// that, or while it has fewer than two active keys). Key: the one it last recorded.
    #[inline]
    pub(crate) fn org_shape(&self) -> u8 {
        self.signals.org_shape()
    }

    #[inline(never)]
    fn evaluate_now(
        &mut self,
        now_ns: u64,
        p: &BehaviorParams,
        cross: &CrossIndex,
    ) -> Option<Transition> {
        self.signals.evaluated(true);
        self.last_eval_ns = now_ns;
        let policy = p.policy();
        if !policy.enabled {
            self.escalation.enforced.force(Level::Normal, now_ns);
            self.escalation.reported.force(Level::Normal, now_ns);
            return None;
        }
        let a = self.assess(now_ns, p, cross, true);
        let cap = self.escalation.cap(now_ns);
        let rep = a.tally(p, true);
        let enf = a.tally(p, false);
        let rep_from = self.escalation.reported.step(
            StepInput {
                score: rep.score,
                gate: rep.gate(p),
                floor: a.floor_reported,
                cap,
            },
            now_ns,
            p,
        );
        let enf_from = if policy.shadow {
            self.escalation.enforced.force(Level::Normal, now_ns);
            None
        } else {
            self.escalation.enforced.step(
                StepInput {
                    score: enf.score,
                    gate: enf.gate(p),
                    floor: a.floor_enforced,
                    cap,
                },
                now_ns,
                p,
            )
        };
        if let Some(from) = enf_from {
            return Some(Transition {
                from,
                to: self.escalation.enforced.level(),
                score: enf.score,
                reasons: a.reasons(p, false),
                shadow: false,
            });
        }
        rep_from.map(|from| Transition {
            from,
            to: self.escalation.reported.level(),
            score: rep.score,
            reasons: a.reasons(p, true),
            shadow: true,
        })
    }

    /// Runs the detectors on the signals as of `now_ns`; `publish`: an org also publishes its
    /// shape for its keys (evaluations only, not diagnostics).
    fn assess(
        &mut self,
        now_ns: u64,
        p: &BehaviorParams,
        cross: &CrossIndex,
        publish: bool,
    ) -> detect::Assessment {
        let view = self.signals.view(now_ns, p);
        if publish && self.kind() == SubjectKind::Org {
            // Published for the org's keys (see `TemplateSweepPolicy::org_weight`).
            let shape = detect::org_shape(&view, p);
            self.signals.set_org_shape(signals::quantize_shape(shape));
        }
        let mut stats = [FamilyStats::default(); BANDS + 1];
        let mut found = 0;
        let t = &p.policy().detectors.template_spread;
        if p.detectors[DetectorId::TemplateSpread.idx()].enabled
            && view.window_requests >= t.min_subject_requests
        {
            // Only the families the subject is mostly in can count: skip the others' look-ups.
            let min_share = t.min_subject_share as f32;
            // Pick them and ask for every bucket first, so that the misses overlap instead of
            // each waiting behind the previous look-up's shard lock.
            let mut wanted = [0_u64; BANDS + 1];
            let mut n = 0;
            for &id in view.probe.ids() {
                let share = if is_band(id) {
                    view.family_share
                } else {
                    view.template_family_share
                };
                if share >= min_share {
                    cross.prefetch(id);
                    wanted[n] = id;
                    n += 1;
                }
            }
            for &id in &wanted[..n] {
                if let Some(s) = cross.stats(id, now_ns) {
                    stats[found] = s;
                    found += 1;
                }
            }
        }
        detect::assess(self.kind(), &view, &stats[..found], p)
    }

    /// The reasons the subject would be scored on now, reported view (shadow detectors
    /// included), strongest first. Allocates; for diagnostics, not the request path.
    ///
    /// Works on a copy: reading the signals folds a sample into the smoothed prompt breadth,
    /// and an inspection must not count as an evaluation.
    pub(crate) fn explain(
        &self,
        now_ns: u64,
        p: &BehaviorParams,
        cross: &CrossIndex,
    ) -> Vec<Reason> {
        self.clone()
            .assess(now_ns, p, cross, false)
            .reasons(p, true)
    }

    /// The enforced level: a live manual level, else `normal` if exempt, else the computed
    /// level without shadow detectors (always `normal` in global shadow mode), as of the
    /// last `evaluate`. The warden decides a request with the level cached before its
    /// `observe` and `evaluate`.
    #[inline]
    pub(crate) fn level(&self, now_ns: u64) -> Level {
        self.escalation.level(now_ns)
    }

    /// The level for reports and replay output: a live manual level, else the computed level
    /// including shadow detectors (exemption does not hide it).
    #[inline]
    pub(crate) fn reported_level(&self, now_ns: u64) -> Level {
        self.escalation.reported_level(now_ns)
    }

    /// Last scores computed: `(enforced, reported)`.
    pub(crate) fn scores(&self) -> (f32, f32) {
        (
            self.escalation.enforced.score(),
            self.escalation.reported.score(),
        )
    }

    /// Sets a manual level until `until_ns` (`None`: until cleared). It overrides computed
    /// levels and exemption.
    pub(crate) fn set_manual(&mut self, level: Level, until_ns: Option<u64>) {
        self.escalation.set_manual(level, until_ns);
    }

    /// When the live manual level expires, if it has an expiry.
    pub(crate) fn manual_until(&self, now_ns: u64) -> Option<u64> {
        self.escalation.manual_until(now_ns)
    }

    /// Removes the manual level.
    pub(crate) fn clear_manual(&mut self) {
        self.escalation.clear_manual();
    }

    /// The manual level, if set and not expired.
    pub(crate) fn manual(&self, now_ns: u64) -> Option<Level> {
        self.escalation.manual(now_ns)
    }

    /// Exempts the subject from behavioural enforcement (signals are still kept and reported).
    pub(crate) fn set_exempt(&mut self, exempt: bool) {
        self.escalation.set_exempt(exempt);
    }

    /// Whether the subject is exempt.
    pub(crate) fn is_exempt(&self) -> bool {
        self.escalation.is_exempt()
    }

    /// The host re-verified the subject: a manual challenge/block is removed, computed
    /// challenge/block drop to `watch` with a fresh cool-down, and the computed level stays at
    /// most `throttle` for `levels.challenge_grace_s`. Returns whether anything changed.
    pub(crate) fn clear_challenge(&mut self, now_ns: u64, p: &BehaviorParams) -> bool {
        self.escalation.clear_challenge(now_ns, p.grace_ns)
    }

    /// Propagation: one of this org's or cluster's keys is at `reported` (and enforced at
    /// `enforced`). Levels below `throttle` are ignored. Enough distinct escalated keys within
    /// `propagation.window_s` raise this subject (see `PropagationPolicy`). When the key is
    /// new in the current window, the next `evaluate` runs without waiting for
    /// `evaluate_every_ms`. O(1); the first escalated child boxes the 40-byte children's
    /// sketches.
    pub(crate) fn child_escalated(
        &mut self,
        child_hash: u64,
        reported: Level,
        enforced: Level,
        now_ns: u64,
        p: &BehaviorParams,
    ) {
        if self.kind() == SubjectKind::ApiKey || reported.max(enforced) < Level::Throttle {
            return;
        }
        if self
            .signals
            .child(child_hash, enforced >= Level::Throttle, now_ns, p)
        {
            self.signals.evaluated(false);
        }
    }

    /// The family this (key) subject files `obs` under in the cross index: see
    /// [`Observation::family_id`]. The family it is filed under is the one after `observe`;
    /// called before, it gives the family as the state stood (the engine's prefetch hint).
    #[inline]
    pub(crate) fn family_of(&self, obs: &Observation) -> Option<u64> {
        obs.family_id(self.signals.centroid(), self.signals.by_template())
    }

    /// Mean output tokens per request (settled; the host's estimate before the first settle).
    #[inline]
    pub(crate) fn mean_output(&self) -> f32 {
        self.signals.mean_output()
    }

    #[cfg(test)]
    /// Time of the last observed request (for idle eviction).
    pub(crate) const fn last_seen_ns(&self) -> u64 {
        self.signals.last_ns()
    }

    /// Whether the table must keep this subject: its computed or manual level is `throttle`
    /// or higher, or it is exempt or has a manual level.
    pub(crate) fn must_keep(&self, now_ns: u64) -> bool {
        self.is_exempt()
            || self.manual(now_ns).is_some()
            || self
                .escalation
                .reported
                .level()
                .max(self.escalation.enforced.level())
                >= Level::Throttle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn params(policy: &BehaviorPolicy) -> BehaviorParams {
        BehaviorParams::new(policy, "behavior")
            .unwrap()
            .with_seed(11)
    }

    /// A key sweeping one template with long outputs at `rpm`.
    fn sweep(
        sb: &mut SubjectBehavior,
        cross: &CrossIndex,
        p: &BehaviorParams,
        rpm: u64,
        secs: u64,
    ) -> Vec<Transition> {
        sweep_from(sb, cross, p, rpm, 0, secs)
    }

    fn sweep_from(
        sb: &mut SubjectBehavior,
        cross: &CrossIndex,
        p: &BehaviorParams,
        rpm: u64,
        from_s: u64,
        to_s: u64,
    ) -> Vec<Transition> {
        let gap = 60 * S / rpm;
        let mut out = Vec::new();
        let mut t = from_s * S;
        let mut i = t / gap;
        while t < to_s * S {
            let obs = Observation {
                now_ns: t,
                input_tokens: 120,
                expected_output_tokens: 1000,
                prompt_fp: Some(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                prompt_simhash: Some(0xDEAD_BEEF_0000_0000 ^ (1 << (i % 7))),
                template_fp: Some(99),
                key_hash: 1,
                org_hash: 2,
                cluster_hash: 3,
                ..Observation::default()
            };
            sb.observe(&obs, p);
            cross.observe(sb.family_of(&obs).unwrap(), &obs, sb.mean_output());
            sb.settle(1000);
            out.extend(sb.evaluate(t, p, cross));
            t += gap;
            i += 1;
        }
        out
    }

    /// Explaining a subject leaves its state as it was, so that inspecting it repeatedly
    /// reports the same reasons and does not move the next evaluation (the smoothed prompt
    /// breadth used to take a sample on each call).
    #[test]
    fn explain_does_not_change_the_state() {
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        // Prompts far apart, so that the recent ones make eight SimHash clusters and the
        // smoothed breadth is still climbing towards 8 when it is read.
        for i in 0..20_u64 {
            let now = i * S;
            let obs = Observation {
                now_ns: now,
                input_tokens: 100,
                expected_output_tokens: 500,
                prompt_fp: Some(i),
                prompt_simhash: Some(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ..Observation::default()
            };
            sb.observe(&obs, &p);
            sb.evaluate(now, &p, &cross);
        }
        let before = sb.clone();
        let first = sb.explain(20 * S, &p, &cross);
        for _ in 0..5 {
            assert_eq!(sb.explain(20 * S, &p, &cross), first);
        }
        assert_eq!(sb, before);
        // The breadth is what a mutating read would move: the check above can fail.
        let mut touched = sb.clone();
        touched.assess(20 * S, &p, &cross, false);
        assert_ne!(touched, before);
    }

    #[test]
    fn size_per_subject() {
        println!("SubjectBehavior: {} bytes", SubjectBehavior::SIZE);
        // Two boxed side states (a pointer each); the docs state the 64-bit sizes.
        #[cfg(target_pointer_width = "64")]
        {
            assert_eq!(
                SubjectBehavior::SIZE,
                368,
                "update the docs when this changes"
            );
            assert_eq!(std::mem::size_of::<Slot>(), 384);
        }
        // Same type for every kind, so the same size.
        assert_eq!(
            std::mem::size_of_val(&SubjectBehavior::new(SubjectKind::Org, 0)),
            SubjectBehavior::SIZE
        );
    }

    #[test]
    fn families_are_centroid_bands_else_template() {
        let sim = 0xABCD_0000_1234_0001_u64;
        let bands = Families::bands(sim);
        assert_eq!(bands.ids().len(), 4);
        assert_eq!(bands.ids()[0], BAND_TAG ^ 0x0001);
        assert_eq!(bands.ids()[3], BAND_TAG ^ (3 << 16) ^ 0xABCD);
        assert!(bands.ids().iter().all(|&id| is_band(id)));
        assert_eq!(Families::template(5).ids(), [5]);
        assert!(!is_band(5));
        // Two SimHashes 3 bits apart share at least one band.
        let near = Families::bands(sim ^ 0x0001_0001_0001_0000);
        assert!(near.ids().iter().any(|id| bands.ids().contains(id)));
        // A request is filed under one band of the centroid it is given (else of its own
        // SimHash), whatever its template; without SimHash under its template.
        let o = Observation {
            template_fp: Some(5),
            prompt_simhash: Some(u64::MAX),
            ..Observation::default()
        };
        assert!(bands
            .ids()
            .contains(&o.family_id(Some(sim), false).unwrap()));
        assert!(Families::bands(u64::MAX)
            .ids()
            .contains(&o.family_id(None, false).unwrap()));
        let o = Observation {
            template_fp: Some(5),
            ..Observation::default()
        };
        assert_eq!(o.family_id(None, false), Some(5));
        assert!(Observation::default().family_id(None, false).is_none());
        // A key concentrated on its template files under the template when there is one.
        let o = Observation {
            template_fp: Some(5),
            prompt_simhash: Some(u64::MAX),
            ..Observation::default()
        };
        assert_eq!(o.family_id(Some(sim), true), Some(5));
        let o = Observation {
            prompt_simhash: Some(u64::MAX),
            ..Observation::default()
        };
        assert!(is_band(o.family_id(Some(sim), true).unwrap()));
        assert_eq!(
            Families::probe(Some(sim), Some(5)).ids(),
            [bands.ids(), &[5]].concat()
        );
        // The band picked varies with the request, so each band sees a share of the family.
        let picked: std::collections::HashSet<u64> = (0..64_u64)
            .map(|i| {
                Observation {
                    now_ns: i * 1_000_003,
                    prompt_fp: Some(i),
                    ..Observation::default()
                }
                .family_id(Some(sim), false)
                .unwrap()
            })
            .collect();
        assert_eq!(picked.len(), 4);
    }

    #[test]
    fn escalates_sweeper_and_reports_reasons_then_decays() {
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        let ts = sweep(&mut sb, &cross, &p, 90, 600);
        assert!(!ts.is_empty());
        let last = ts.last().unwrap();
        assert!(!last.shadow);
        assert!(sb.level(600 * S) >= Level::Challenge, "{ts:?}");
        assert!(last.reasons.iter().any(|r| r.detector == "output_volume"));
        assert!(last.reasons.iter().any(|r| r.detector == "template_sweep"));
        assert!(sb.must_keep(600 * S));
        // Levels only went up.
        for w in ts.windows(2) {
            assert!(w[1].to > w[0].to);
        }
        // Quiet for three hours: back to normal on the next evaluation.
        let later = 600 * S + 3 * 3600 * S;
        let t = sb.evaluate(later, &p, &cross).unwrap();
        assert_eq!(t.to, Level::Normal);
        assert_eq!(sb.level(later), Level::Normal);
        assert!(t.reasons.is_empty());
    }

    #[test]
    fn evaluation_is_rate_limited() {
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        sweep(&mut sb, &cross, &p, 90, 600);
        let before = sb.clone();
        assert!(sb.evaluate(sb.last_eval_ns + 1, &p, &cross).is_none());
        assert_eq!(sb, before);
    }

    #[test]
    fn slow_subjects_are_evaluated_every_few_requests_or_after_the_ceiling() {
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        let obs = |t: u64| Observation {
            now_ns: t,
            ..Observation::default()
        };
        sb.observe(&obs(0), &p);
        sb.evaluate_now(0, &p, &cross);
        // One request every 2 s: past `evaluate_every_ms`, but only every 4th request is scored.
        let mut evaluated = Vec::new();
        for i in 1..=8u64 {
            let t = i * 2 * S;
            sb.observe(&obs(t), &p);
            sb.evaluate(t, &p, &cross);
            if sb.last_eval_ns == t {
                evaluated.push(i);
            }
        }
        assert_eq!(evaluated, vec![4, 8]);
        // After 30 s of silence the next request is scored whatever the count.
        let t = 16 * S + 31 * S;
        sb.observe(&obs(t), &p);
        sb.evaluate(t, &p, &cross);
        assert_eq!(sb.last_eval_ns, t);
    }

    #[test]
    fn global_shadow_reports_but_never_enforces() {
        let policy = BehaviorPolicy {
            shadow: true,
            ..BehaviorPolicy::default()
        };
        let p = params(&policy);
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        let ts = sweep(&mut sb, &cross, &p, 90, 600);
        assert!(ts.iter().all(|t| t.shadow));
        assert!(sb.reported_level(600 * S) >= Level::Challenge);
        assert_eq!(sb.level(600 * S), Level::Normal);
        sb.set_manual(Level::Block, Some(700 * S));
        assert_eq!(sb.level(600 * S), Level::Block);
        assert_eq!(sb.level(700 * S), Level::Normal);
    }

    #[test]
    fn detector_shadow_splits_enforced_and_reported() {
        let mut policy = BehaviorPolicy::default();
        policy.detectors.template_sweep.shadow = true;
        let p = params(&policy);
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        let ts = sweep(&mut sb, &cross, &p, 90, 600);
        // Without the sweep only one class remains: enforced at most watch.
        assert!(sb.level(600 * S) <= Level::Watch);
        assert!(sb.reported_level(600 * S) >= Level::Challenge);
        assert!(ts.iter().any(|t| t.shadow && t.to >= Level::Challenge));
        let (enf, rep) = sb.scores();
        assert!(rep > enf);
    }

    #[test]
    fn disabled_policy_stays_normal() {
        let policy = BehaviorPolicy {
            enabled: false,
            ..BehaviorPolicy::default()
        };
        let p = params(&policy);
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        assert!(sweep(&mut sb, &cross, &p, 90, 300).is_empty());
        assert_eq!(sb.reported_level(300 * S), Level::Normal);
    }

    #[test]
    fn exempt_and_clear_challenge() {
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        sweep(&mut sb, &cross, &p, 90, 600);
        sb.set_exempt(true);
        assert!(sb.is_exempt());
        assert_eq!(sb.level(600 * S), Level::Normal);
        assert!(sb.reported_level(600 * S) >= Level::Challenge);
        sb.set_exempt(false);
        assert!(sb.clear_challenge(600 * S, &p));
        assert_eq!(sb.level(600 * S), Level::Watch);
        // Behaviour continues: capped at throttle during the grace period (900 s)...
        let ts = sweep_from(&mut sb, &cross, &p, 90, 600, 1499);
        assert!(ts.iter().all(|t| t.to <= Level::Throttle), "{ts:?}");
        let t = 1499 * S;
        assert_eq!(sb.level(t), Level::Throttle);
        // ...and challenged again after it.
        sweep_from(&mut sb, &cross, &p, 90, 1499, 1510);
        let t = 1510 * S;
        assert!(sb.level(t) >= Level::Challenge);
        sb.set_manual(Level::Watch, None);
        assert_eq!(sb.manual(t), Some(Level::Watch));
        sb.clear_manual();
        assert_eq!(sb.manual(t), None);
    }

    #[test]
    fn propagation_raises_group() {
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let mut org = SubjectBehavior::new(SubjectKind::Org, 0);
        // Ten keys sweep one template through the org: evidence of its own (watch).
        for i in 0..40_u64 {
            let obs = Observation {
                now_ns: i * S / 4,
                key_hash: i % 10,
                prompt_fp: Some(i),
                template_fp: Some(9),
                ..Observation::default()
            };
            org.observe(&obs, &p);
        }
        org.evaluate(10 * S, &p, &cross);
        assert_eq!(org.level(10 * S), Level::Watch);
        for k in 0..3_u64 {
            org.child_escalated(k, Level::Throttle, Level::Throttle, 10 * S, &p);
        }
        // Watch-level children are ignored.
        org.child_escalated(7, Level::Watch, Level::Watch, 10 * S, &p);
        // Evaluates at once although less than evaluate_every_ms passed.
        let t = org.evaluate(10 * S + 1, &p, &cross).unwrap();
        assert!(t.to >= Level::Throttle, "{t:?}");
        assert!(t.reasons.iter().any(|r| r.detector == "propagation"));
        for k in 3..6_u64 {
            org.child_escalated(k, Level::Challenge, Level::Challenge, 11 * S, &p);
        }
        org.evaluate(11 * S, &p, &cross);
        assert_eq!(org.level(11 * S), Level::Challenge);
        // Keys ignore child escalations.
        let mut key = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        key.child_escalated(1, Level::Block, Level::Block, 0, &p);
        key.evaluate(S, &p, &cross);
        assert_eq!(key.level(S), Level::Normal);
        // The propagated level lapses after two windows without new calls, then cools down.
        let late = 11 * S + 1200 * S + 900 * S + 600 * S + 300 * S;
        org.evaluate(late, &p, &cross);
        assert_eq!(org.level(late), Level::Normal);
    }

    #[test]
    fn explain_lists_current_evidence() {
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let mut sb = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        assert!(sb.explain(0, &p, &cross).is_empty());
        sweep(&mut sb, &cross, &p, 90, 300);
        let reasons = sb.explain(300 * S, &p, &cross);
        let names: Vec<_> = reasons.iter().map(|r| r.detector.as_ref()).collect();
        assert_eq!(names[..2], ["output_volume", "template_sweep"]);
        assert!(reasons
            .windows(2)
            .all(|w| w[0].contribution >= w[1].contribution));
        assert_eq!(sb.kind(), SubjectKind::ApiKey);
        assert!(sb.last_seen_ns() < 300 * S && sb.last_seen_ns() > 299 * S);
    }

    /// Deterministic random call sequences: no panic, finite scores, levels consistent,
    /// whatever the inputs (clock jumps both ways, extreme token counts, NaN pressure).
    #[test]
    fn random_calls_never_panic() {
        let mut policy = BehaviorPolicy::default();
        policy.cross.capacity = 64;
        let p = params(&policy);
        let cross = CrossIndex::new(&p);
        let mut state = 0x1234_5678_9ABC_DEF0_u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let kinds = [
            SubjectKind::ApiKey,
            SubjectKind::Org,
            SubjectKind::IpCluster,
        ];
        let mut subjects: Vec<_> = kinds.iter().map(|k| SubjectBehavior::new(*k, 0)).collect();
        let mut now = 0_u64;
        let levels = Level::ALL;
        for _ in 0..200_000 {
            now = match rnd() % 100 {
                0 => rnd(),                                  // anywhere, even u64::MAX-ish
                1 => now.saturating_sub(rnd() % (3600 * S)), // backwards
                2..=5 => now.saturating_add(rnd() % (3600 * S)),
                _ => now.saturating_add(rnd() % (2 * S)),
            };
            let big = |x: u64| if x % 50 == 0 { u64::MAX } else { x % 5000 };
            let obs = Observation {
                now_ns: now,
                input_tokens: big(rnd()),
                expected_output_tokens: big(rnd()),
                prompt_fp: (rnd() % 3 != 0).then(|| rnd() % 64),
                prompt_simhash: (rnd() % 3 != 0).then(&mut rnd),
                template_fp: (rnd() % 2 == 0).then(|| rnd() % 8),
                logprobs: rnd() % 2 == 0,
                key_hash: rnd() % 32,
                org_hash: rnd() % 8,
                cluster_hash: rnd() % 16,
                pressure: match rnd() % 10 {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => -1.0,
                    _ => (rnd() % 100) as f32 / 100.0,
                },
                denied_by_limit: rnd() % 7 == 0,
                refused: rnd() % 5 == 0,
            };
            if let Some(f) = obs.family_id(None, false) {
                cross.observe(f, &obs, 500.0);
            }
            let s = &mut subjects[(rnd() % 3) as usize];
            match rnd() % 20 {
                0 => s.settle(big(rnd())),
                1 => s.set_manual(
                    levels[(rnd() % 5) as usize],
                    (rnd() % 2 == 0).then(|| now.saturating_add(rnd() % S)),
                ),
                2 => s.clear_manual(),
                3 => s.set_exempt(rnd() % 2 == 0),
                4 => {
                    s.clear_challenge(now, &p);
                }
                5 => s.child_escalated(
                    rnd() % 16,
                    levels[(rnd() % 5) as usize],
                    levels[(rnd() % 5) as usize],
                    now,
                    &p,
                ),
                6 => {
                    if let Some(f) = s.family_of(&obs) {
                        cross.observe(f, &obs, s.mean_output());
                    }
                }
                7 => {
                    cross.maintain(now);
                }
                _ => s.observe(&obs, &p),
            }
            if let Some(t) = s.evaluate(now, &p, &cross) {
                assert_ne!(t.from, t.to);
                assert!(t.score.is_finite());
                assert!(t
                    .reasons
                    .iter()
                    .all(|r| r.contribution.is_finite() && r.value.is_finite()
                        || r.value.is_infinite()));
            }
            let (e, r) = s.scores();
            assert!(e.is_finite() && r.is_finite() && e >= 0.0 && r >= 0.0);
            if s.manual(now).is_none() && !s.is_exempt() {
                assert!(s.level(now) <= Level::Block);
            }
            if let Some(c) = obs.prompt_simhash {
                for &id in Families::bands(c).ids() {
                    let _ = cross.stats(id, now);
                }
            }
        }
        assert!(cross.len() <= cross.capacity());
    }

    /// Cost of the per-request calls; run with
    /// `cargo test --release observe_cost -- --ignored --nocapture`. A measurement that
    /// prints the best of five runs (the build machine is shared), not a pass/fail test.
    #[test]
    #[ignore = "measurement; run in release"]
    fn observe_cost() {
        fn best_of_5(mut f: impl FnMut() -> u64) -> f64 {
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    let n = f();
                    start.elapsed().as_nanos() as f64 / n as f64
                })
                .fold(f64::INFINITY, f64::min)
        }
        let p = params(&BehaviorPolicy::default());
        let cross = CrossIndex::new(&p);
        let base = Observation {
            input_tokens: 300,
            expected_output_tokens: 500,
            prompt_fp: Some(1),
            prompt_simhash: Some(2),
            template_fp: Some(3),
            logprobs: true,
            key_hash: 4,
            org_hash: 5,
            cluster_hash: 6,
            pressure: 0.5,
            ..Observation::default()
        };
        let n = 2_000_000_u64;
        for count in [1_u64, 4096] {
            let mut subjects: Vec<_> = (0..count)
                .map(|_| SubjectBehavior::new(SubjectKind::ApiKey, 0))
                .collect();
            // Every subject sees a request every 10 ms.
            let step = 10_000_000 / count;
            let mut clock = 0_u64;
            let observe = best_of_5(|| {
                let mut obs = base;
                for i in 0..n {
                    clock += step;
                    obs.now_ns = clock;
                    obs.prompt_fp = Some(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    obs.prompt_simhash = Some(i.rotate_left(17));
                    let s = &mut subjects[(i % count) as usize];
                    s.observe(std::hint::black_box(&obs), &p);
                }
                n
            });
            // As the warden calls it, after every observe: one full evaluation per subject per
            // second, early returns otherwise.
            let both = best_of_5(|| {
                let mut obs = base;
                for i in 0..n {
                    clock += step;
                    obs.now_ns = clock;
                    obs.prompt_fp = Some(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let s = &mut subjects[(i % count) as usize];
                    s.observe(std::hint::black_box(&obs), &p);
                    std::hint::black_box(s.evaluate(clock, &p, &cross));
                }
                n
            });
            println!("{count} subjects: observe {observe:.1} ns; observe + evaluate {both:.1} ns");
        }
        let mut s = SubjectBehavior::new(SubjectKind::ApiKey, 0);
        let mut clock = 0;
        let full = best_of_5(|| {
            for _ in 0..100_000 {
                clock += 2 * S;
                std::hint::black_box(s.evaluate(clock, &p, &cross));
            }
            100_000
        });
        println!("one full evaluation {full:.0} ns");
        let mut clock = 0;
        let cross_cost = best_of_5(|| {
            let mut obs = base;
            for i in 0..n {
                clock += 1000;
                obs.now_ns = clock;
                let f = obs
                    .family_id(Some((i % 256).wrapping_mul(0x9E37_79B9_7F4A_7C15)), false)
                    .unwrap_or(0);
                cross.observe(f, std::hint::black_box(&obs), 500.0);
            }
            n
        });
        println!("cross.observe (256 hot families) {cross_cost:.1} ns");

        // Cold: 100,000 keys (50 MB of state) whose prompts sit in 1,000 families, the index
        // full; a full evaluation of each in turn, as when every subject is due.
        let cross = CrossIndex::new(&p);
        let n = 100_000_u64;
        let mut subjects: Vec<_> = (0..n)
            .map(|_| SubjectBehavior::new(SubjectKind::ApiKey, 0))
            .collect();
        let mut clock = 0;
        for round in 0..8_u64 {
            for (k, s) in subjects.iter_mut().enumerate() {
                clock += 10;
                let k = k as u64;
                let fam = (k % 1000).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let obs = Observation {
                    now_ns: clock,
                    prompt_fp: Some(round * n + k),
                    prompt_simhash: Some(fam ^ (1 << (round % 64))),
                    template_fp: Some(k % 97),
                    key_hash: k,
                    org_hash: k / 10,
                    ..base
                };
                s.observe(&obs, &p);
                if let Some(f) = s.family_of(&obs) {
                    cross.observe(f, &obs, 500.0);
                }
            }
        }
        let cold = best_of_5(|| {
            clock += 2 * S;
            for s in subjects.iter_mut() {
                std::hint::black_box(s.evaluate(clock, &p, &cross));
            }
            n
        });
        println!("full evaluation, 100k subjects round-robin, index full: {cold:.0} ns");
        let mut no_spread = BehaviorPolicy::default();
        no_spread.detectors.template_spread.enabled = false;
        let q = params(&no_spread);
        let cold = best_of_5(|| {
            clock += 2 * S;
            for s in subjects.iter_mut() {
                std::hint::black_box(s.evaluate(clock, &q, &cross));
            }
            n
        });
        println!("the same without template_spread (no index look-ups): {cold:.0} ns");
    }
}

mod engine;
pub(crate) use engine::{BehaviorRt, Engine, Pending, Slot, Verdict};
