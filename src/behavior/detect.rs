//! Detectors: each turns signals into a named finding with a strength in `[0, 2]`.
//!
//! Extraction is *information obtained* × *coverage of the model* × *coordination*. The
//! detectors are grouped by which of these they measure, and a level above `watch` needs
//! firing detectors (strength ≥ `fire_strength`) from at least `min_evidence_classes`
//! different classes, one of which measures *volume* (`require_volume`: `output_volume`,
//! `logprob_harvest`, `template_spread`, `propagation`), so that no single behaviour, however
//! extreme, is enough to throttle, and nothing throttles where nothing is being extracted:
//!
//! | class | detectors | what it measures |
//! |---|---|---|
//! | extraction | `output_volume`, `logprob_harvest` | new information the subject obtains |
//! | coverage | `template_sweep`, `prompt_diversity` | prompts that systematically cover a space |
//! | population | `template_spread`, `key_fanout`, `key_churn`, `propagation` | many accounts acting as one |
//! | network | `ip_spread` | one key from many places |
//! | corroborating | `regular_timing`, `pinned` | adds to the score, is not a class |
//!
//! Which subject kinds each detector applies to: `prompt_diversity`, `ip_spread` and
//! `regular_timing` to keys only (aggregates of many people are naturally diverse and
//! irregular); `key_fanout`, `key_churn` and `propagation` to orgs and IP clusters only; the
//! rest to all kinds, with `output_volume` counting only family-concentrated output for orgs
//! and clusters, except that a group most of whose keys are transient (key rotation) is also
//! judged as one key, by its output per key sending at once ([`group_share`]).
//!
//! A *prompt family* is what one template, or a few variants of one, filled with ever new
//! content, looks like: the subject's dominant template fingerprint, or the prompts within
//! `near_bits` of its SimHash centroid (see `signals.rs`), whichever holds more of its
//! requests. Concentration on a family feeds `template_sweep` and the group `output_volume`;
//! the cross index links the subjects of one family (`template_spread`).
//!
//! A key's `template_sweep` is read against its org: the org (two or more active keys)
//! publishes its *shape* at each evaluation, the strongest of its own concentration on one
//! family, its output/input ratio and its output per active key, each ramped to `[0, 1]`
//! ([`org_shape`]), in its slot's cached word (see `engine.rs`); the key's sweep counts at
//! `org_weight` at shape 0 and in full at 1, since one long-answer service among many of a
//! customer's modest keys is not the org harvesting.
//!
//! Pinned-at-limit evidence is not counted while the subject's own enforced level is
//! `throttle` or higher (the pressure is then of the layer's own making), and a subject that
//! keeps its throttle-strength score for `levels.promote_after_s` is challenged
//! (`escalate.rs`).

use std::borrow::Cow;

use super::cross::FamilyStats;
use super::signals::SignalView;
#[cfg(test)]
use super::Families;
use super::{BehaviorParams, Level};
use crate::hooks::Reason;
use crate::subject::SubjectKind;

/// Number of detectors.
pub(crate) const DETECTORS: usize = 11;

/// The detectors, in report order. The names are stable: they appear in events and configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum DetectorId {
    OutputVolume,
    LogprobHarvest,
    TemplateSweep,
    PromptDiversity,
    IpSpread,
    TemplateSpread,
    KeyFanout,
    KeyChurn,
    RegularTiming,
    Pinned,
    Propagation,
}

/// Evidence classes; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Extraction,
    Coverage,
    Population,
    Network,
    Corroborating,
}

impl Class {
    const fn bit(self) -> u8 {
        match self {
            Class::Extraction => 1,
            Class::Coverage => 2,
            Class::Population => 4,
            Class::Network => 8,
            Class::Corroborating => 0,
        }
    }
}

impl DetectorId {
    pub(crate) const ALL: [DetectorId; DETECTORS] = [
        DetectorId::OutputVolume,
        DetectorId::LogprobHarvest,
        DetectorId::TemplateSweep,
        DetectorId::PromptDiversity,
        DetectorId::IpSpread,
        DetectorId::TemplateSpread,
        DetectorId::KeyFanout,
        DetectorId::KeyChurn,
        DetectorId::RegularTiming,
        DetectorId::Pinned,
        DetectorId::Propagation,
    ];

    /// Stable snake_case name, as in the policy and in events.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            DetectorId::OutputVolume => "output_volume",
            DetectorId::LogprobHarvest => "logprob_harvest",
            DetectorId::TemplateSweep => "template_sweep",
            DetectorId::PromptDiversity => "prompt_diversity",
            DetectorId::IpSpread => "ip_spread",
            DetectorId::TemplateSpread => "template_spread",
            DetectorId::KeyFanout => "key_fanout",
            DetectorId::KeyChurn => "key_churn",
            DetectorId::RegularTiming => "regular_timing",
            DetectorId::Pinned => "pinned",
            DetectorId::Propagation => "propagation",
        }
    }

    pub(crate) const fn class(self) -> Class {
        match self {
            DetectorId::OutputVolume | DetectorId::LogprobHarvest => Class::Extraction,
            DetectorId::TemplateSweep | DetectorId::PromptDiversity => Class::Coverage,
            DetectorId::TemplateSpread
            | DetectorId::KeyFanout
            | DetectorId::KeyChurn
            | DetectorId::Propagation => Class::Population,
            DetectorId::IpSpread => Class::Network,
            DetectorId::RegularTiming | DetectorId::Pinned => Class::Corroborating,
        }
    }

    pub(crate) const fn idx(self) -> usize {
        self as usize
    }

    /// Whether the detector measures the volume of extracted information.
    pub(crate) const fn measures_volume(self) -> bool {
        matches!(
            self,
            DetectorId::OutputVolume
                | DetectorId::LogprobHarvest
                | DetectorId::TemplateSpread
                | DetectorId::Propagation
        )
    }
}

/// Below this share of requests with a SimHash or a template fingerprint, a subject's
/// coverage (`template_sweep`, `prompt_diversity`) cannot be observed: the host sends no
/// prompt features, or almost none.
pub(crate) const FEATURELESS_SHARE: f32 = 0.1;

/// One detector's output: strength in `[0, 2]`, and the measured value and the threshold it
/// is compared with (for reports).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Finding {
    pub(crate) strength: f32,
    pub(crate) value: f32,
    pub(crate) threshold: f32,
}

/// All findings of one evaluation, plus the propagation floors. Lives on the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Assessment {
    /// Findings with every enabled detector (the reported view).
    pub(crate) findings: [Finding; DETECTORS],
    /// The `propagation` finding counting enforced escalations only.
    pub(crate) propagation_enforced: Finding,
    /// Lowest level from propagation, reported view.
    pub(crate) floor_reported: Level,
    /// Lowest level from propagation, enforced view.
    pub(crate) floor_enforced: Level,
    /// The subject's requests carry (almost) no prompt features, so the coverage class
    /// cannot be observed: the gate asks for `featureless_min_classes` classes.
    pub(crate) featureless: bool,
}

/// Score and evidence of one view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Tally {
    pub(crate) score: f32,
    /// Distinct evidence classes with a firing detector.
    pub(crate) classes: u32,
    /// Whether a volume-measuring detector fired.
    pub(crate) volume: bool,
    /// Evidence classes the gate asks for (see `Assessment::featureless`).
    pub(crate) needed: u32,
}

impl Tally {
    /// Whether the evidence allows levels above `watch`.
    pub(crate) fn gate(&self, p: &BehaviorParams) -> bool {
        self.classes >= self.needed && (self.volume || !p.policy().levels.require_volume)
    }
}

impl Assessment {
    fn set(&mut self, id: DetectorId, strength: f32, value: f32, threshold: f32) {
        let strength = if strength.is_finite() {
            strength.clamp(0.0, 2.0)
        } else {
            0.0
        };
        self.findings[id.idx()] = Finding {
            strength,
            value,
            threshold,
        };
    }

    /// The finding as the given view sees it; `None` if the detector is disabled or (for the
    /// enforced view) in shadow mode.
    fn finding(&self, id: DetectorId, p: &BehaviorParams, reported: bool) -> Option<Finding> {
        let d = &p.detectors[id.idx()];
        if !d.enabled || (!reported && (d.shadow || p.policy().shadow)) {
            return None;
        }
        Some(if id == DetectorId::Propagation && !reported {
            self.propagation_enforced
        } else {
            self.findings[id.idx()]
        })
    }

    /// Weighted score and number of distinct evidence classes that fired.
    pub(crate) fn tally(&self, p: &BehaviorParams, reported: bool) -> Tally {
        let mut score = 0.0;
        let mut classes = 0_u8;
        let mut volume = false;
        for id in DetectorId::ALL {
            let Some(f) = self.finding(id, p, reported) else {
                continue;
            };
            score += p.detectors[id.idx()].weight * f.strength;
            if f.strength >= p.fire_strength {
                classes |= id.class().bit();
                volume |= id.measures_volume();
            }
        }
        Tally {
            score,
            classes: classes.count_ones(),
            volume,
            needed: if self.featureless {
                p.featureless_min_classes
            } else {
                p.min_classes
            },
        }
    }

    /// Reasons of the view, strongest contribution first; detectors with zero strength are
    /// left out. Allocates; only for transitions and explanations.
    pub(crate) fn reasons(&self, p: &BehaviorParams, reported: bool) -> Vec<Reason> {
        let mut out: Vec<Reason> = DetectorId::ALL
            .iter()
            .filter_map(|&id| {
                let f = self.finding(id, p, reported)?;
                (f.strength > 0.0).then(|| Reason {
                    detector: Cow::Borrowed(id.name()),
                    value: f64::from(f.value),
                    threshold: f64::from(f.threshold),
                    contribution: f64::from(p.detectors[id.idx()].weight * f.strength),
                })
            })
            .collect();
        out.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
        out
    }
}

/// 0 at or below `lo`, 1 at or above `hi`, linear between; NaN gives 0.
#[inline]
pub(crate) fn ramp(x: f32, lo: f64, hi: f64) -> f32 {
    let (lo, hi) = (lo as f32, hi as f32);
    if x.is_nan() || x <= lo {
        0.0
    } else if x >= hi {
        1.0
    } else {
        (x - lo) / (hi - lo)
    }
}

/// Like [`ramp`], then on to 2 at `extreme` (if `extreme > hi`).
#[inline]
fn ramp2(x: f32, lo: f64, hi: f64, extreme: f64) -> f32 {
    let second = if extreme > hi {
        ramp(x, hi, extreme)
    } else {
        0.0
    };
    ramp(x, lo, hi) + second
}

/// Breadth of prompts as `(strength, value, threshold)`: distinct templates in the window when
/// most requests carry one, else distinct SimHash clusters among the last eight prompts.
fn breadth(v: &SignalView, min_t: f64, full_t: f64, min_r: f64, full_r: f64) -> (f32, f32, f32) {
    if v.template_share >= 0.5 {
        return (ramp(v.templates, min_t, full_t), v.templates, full_t as f32);
    }
    let r = v.recent_families.unwrap_or(0.0);
    (ramp(r, min_r, full_r), r, full_r as f32)
}

/// How much an org, taken as a whole, looks like harvesting, in `[0, 1]`: the strongest of
/// its traffic's concentration on one family (ramped as `template_sweep` ramps a subject's),
/// its output/input token ratio (ramped from `org_min_ratio` to `org_full_ratio`) and its
/// output per active key ([`group_keys`]; ramped as `output_volume` ramps one key's, from
/// `min_tokens_per_min` to `full_tokens_per_min`: its average key harvests). `None` while it
/// has fewer than two active keys: a one-key org is its key. Its keys' sweeps count at
/// `org_weight` at 0, in full at 1 (see `TemplateSweepPolicy::org_weight`).
pub(crate) fn org_shape(v: &SignalView, p: &BehaviorParams) -> Option<f32> {
    let d = &p.policy().detectors;
    let (t, o) = (&d.template_sweep, &d.output_volume);
    (v.peers >= 1.5).then(|| {
        ramp(v.concentration, t.min_share, t.full_share)
            .max(ramp(v.out_in_ratio, t.org_min_ratio, t.org_full_ratio))
            .max(ramp(
                v.out_per_min / group_keys(v),
                o.min_tokens_per_min,
                o.full_tokens_per_min,
            ))
    })
}

/// Requests a group's previous window needs before its keys can count as transient.
const MIN_PREV_REQUESTS: u32 = 16;

/// Whether a group's keys are transient: fewer than half of the current window's keys (at
/// least two) were active in the previous window, *and* more than half of its recent
/// requests came from keys that were not ([`SignalView::fresh_request_share`]). A campaign
/// that throws each key away after a few requests has many distinct keys, but they do not
/// send side by side, and nearly all its requests come from new keys; a group with one
/// busy stable key and many occasional ones has many new keys too, but few of its requests
/// are theirs. Never in a group's first window, nor after a previous window of under 16
/// requests (a new customer that sent a few requests before it started in earnest), nor
/// with more keys than the sketch counts (new and old cannot be told apart).
fn transient_keys(v: &SignalView) -> bool {
    !v.peers_saturated
        && v.prev_window_requests >= MIN_PREV_REQUESTS
        && v.window_peers >= 2.0
        && 2.0 * v.persistent_peers < v.window_peers
        && v.fresh_request_share > 0.5
}

/// The number of keys a group's output is shared by: its distinct keys in the windows or,
/// when they are transient ([`transient_keys`]), the larger of the keys sending at once
/// ([`SignalView::streams`]) and its stable keys, since rotation inflates the distinct count
/// without adding capacity. At least 1.
pub(crate) fn group_keys(v: &SignalView) -> f32 {
    group_share(v).0
}

/// [`group_keys`], and the output per key sending at once when the keys are transient:
/// such a group is also judged as one key would be (`output_volume`'s key thresholds).
/// `None` for a group with stable keys (an enterprise's service keys, in every window but
/// its first) or fewer than two keys in the window: its output counts only as a group's.
/// One call works out `streams` (a bisection) once.
fn group_share(v: &SignalView) -> (f32, Option<f32>) {
    if transient_keys(v) {
        let keys = v.streams().max(v.persistent_peers).max(1.0);
        (keys, Some(v.out_per_min / keys))
    } else {
        (v.peers.max(1.0), None)
    }
}

/// The second half of [`group_share`].
#[cfg(test)]
fn per_stream_output(v: &SignalView) -> Option<f32> {
    group_share(v).1
}

/// Runs every detector for one subject; `families` are the cross-index statistics of the
/// subject's probe families (`SignalView::probe`) that the index holds.
pub(crate) fn assess(
    kind: SubjectKind,
    v: &SignalView,
    families: &[FamilyStats],
    p: &BehaviorParams,
) -> Assessment {
    let d = &p.policy().detectors;
    let key = kind == SubjectKind::ApiKey;
    let enough = v.window_requests >= p.policy().min_requests;
    let mut a = Assessment {
        featureless: v.feature_share < FEATURELESS_SHARE,
        ..Assessment::default()
    };

    // Extraction: new output, large relative to the input.
    {
        let o = &d.output_volume;
        let ratio = ramp(v.out_in_ratio, o.min_output_ratio, o.full_output_ratio);
        let novelty = v
            .distinct_ratio
            .map_or(1.0, |r| ramp(r, o.min_distinct, o.full_distinct));
        let as_key = |volume| {
            ramp2(
                volume,
                o.min_tokens_per_min,
                o.full_tokens_per_min,
                o.extreme_tokens_per_min,
            )
        };
        let (s, volume, hi) = if key {
            (as_key(v.out_per_min), v.out_per_min, o.full_tokens_per_min)
        } else {
            let concentrated = v.out_per_min * v.concentration;
            let (keys, per) = group_share(v);
            let group = ramp2(
                concentrated,
                o.group_min_tokens_per_min,
                o.group_full_tokens_per_min,
                o.group_extreme_tokens_per_min,
            ) * ramp(
                concentrated / keys,
                o.group_min_tokens_per_key,
                o.group_full_tokens_per_key,
            );
            let stream = per.map_or(0.0, as_key);
            if stream > group {
                (stream, per.unwrap_or(0.0), o.full_tokens_per_min)
            } else {
                (group, concentrated, o.group_full_tokens_per_min)
            }
        };
        a.set(
            DetectorId::OutputVolume,
            s * ratio * novelty,
            volume,
            hi as f32,
        );
    }

    // Extraction: logprobs on nearly everything, at a rate, over many prompt families.
    {
        let l = &d.logprob_harvest;
        let (wide, _, _) = breadth(
            v,
            l.min_templates,
            l.full_templates,
            l.min_recent_families,
            l.full_recent_families,
        );
        let s = ramp(v.logprob_share, l.min_share, l.full_share)
            * ramp2(
                v.logprob_per_min,
                l.min_per_min,
                l.full_per_min,
                l.extreme_per_min,
            )
            * wide;
        a.set(
            DetectorId::LogprobHarvest,
            s,
            v.logprob_per_min,
            l.full_per_min as f32,
        );
    }

    // Coverage: one family, ever new prompts.
    if enough {
        if let Some(distinct) = v.distinct_ratio {
            let t = &d.template_sweep;
            // A key of an org whose traffic as a whole is not shaped like harvesting counts
            // its sweep at `org_weight` (see `TemplateSweepPolicy::org_weight`).
            let org = match v.org_shape {
                Some(h) if key => {
                    let w = t.org_weight as f32;
                    w + (1.0 - w) * h
                }
                _ => 1.0,
            };
            let s = ramp(v.concentration, t.min_share, t.full_share)
                * ramp(distinct, t.min_distinct, t.full_distinct)
                * org;
            a.set(
                DetectorId::TemplateSweep,
                s,
                v.concentration,
                t.full_share as f32,
            );
        }
    }

    // Coverage: many unrelated families (keys only).
    if key && enough {
        let q = &d.prompt_diversity;
        let (wide, value, threshold) = breadth(
            v,
            q.min_templates,
            q.full_templates,
            q.min_recent_families,
            q.full_recent_families,
        );
        let novelty = v
            .distinct_ratio
            .map_or(1.0, |r| ramp(r, q.min_distinct, q.full_distinct));
        a.set(
            DetectorId::PromptDiversity,
            wide * novelty,
            value,
            threshold,
        );
    }

    // Network: one key, many IP clusters. A key that changes cluster on (nearly) every
    // request reaches full strength as soon as it used more than `min_clusters`: at a few
    // requests per minute, waiting for `full_clusters` would take many minutes.
    if key {
        let i = &d.ip_spread;
        let full = (i.full_share * f64::from(v.window_requests))
            .min(i.full_clusters)
            .max(i.min_clusters + 1.0);
        a.set(
            DetectorId::IpSpread,
            ramp(v.peers, i.min_clusters, full),
            v.peers,
            full as f32,
        );
    }

    // Population: the subject's family is harvested by many orgs, each drawing a lot. Of the
    // four SimHash bands of the subject's centroid, the *second* strongest counts: a real
    // family member shares most bands with the family's other keys, while a chance match of
    // one 16-bit band (one in 16,000 per hot band) is not enough. The dominant template is one
    // family of its own. Each counts only if the subject is mostly in it.
    let t = &d.template_spread;
    if v.window_requests >= t.min_subject_requests {
        let min_share = t.min_subject_share as f32;
        let (mut best, mut second, mut template) = ((0.0_f32, 0.0), (0.0_f32, 0.0), (0.0, 0.0));
        for f in families {
            let per_org = f.out_per_min / f.orgs.max(1.0);
            let s = ramp(f.orgs, t.min_orgs, t.full_orgs)
                * ramp(f.out_per_min, t.min_tokens_per_min, t.full_tokens_per_min)
                * ramp(per_org, t.min_tokens_per_org, t.full_tokens_per_org);
            if !f.band {
                template = (s, f.orgs);
            } else if s >= best.0 {
                second = best;
                best = (s, f.orgs);
            } else if s >= second.0 {
                second = (s, f.orgs);
            }
        }
        if v.family_share < min_share {
            second = (0.0, 0.0);
        }
        if v.template_family_share < min_share {
            template = (0.0, 0.0);
        }
        let (s, orgs) = if template.0 > second.0 {
            template
        } else {
            second
        };
        a.set(DetectorId::TemplateSpread, s, orgs, t.full_orgs as f32);
    }

    // Population: many keys, fresh keys (orgs and clusters).
    if !key {
        let k = &d.key_fanout;
        let (lo, hi) = if kind == SubjectKind::Org {
            (k.org_min_keys, k.org_full_keys)
        } else {
            (k.cluster_min_keys, k.cluster_full_keys)
        };
        a.set(
            DetectorId::KeyFanout,
            ramp(v.peers, lo, hi),
            v.peers,
            hi as f32,
        );
        let c = &d.key_churn;
        a.set(
            DetectorId::KeyChurn,
            ramp(v.fresh_peers, c.min_new_keys, c.full_new_keys),
            v.fresh_peers,
            c.full_new_keys as f32,
        );
    }

    // Corroborating: machine-regular timing (keys).
    if key && enough {
        if let Some(cv) = v.cv {
            let r = &d.regular_timing;
            a.set(
                DetectorId::RegularTiming,
                1.0 - ramp(cv, r.full_cv, r.max_cv),
                cv,
                r.full_cv as f32,
            );
        }
    }

    // Corroborating: pinned at a limit.
    if enough {
        let q = &d.pinned;
        a.set(
            DetectorId::Pinned,
            ramp(v.pinned_share, q.min_share, q.full_share),
            v.pinned_share,
            q.full_share as f32,
        );
    }

    // Population: escalated keys raise their org or cluster.
    if !key {
        let prop = &p.policy().propagation;
        let rule = if kind == SubjectKind::Org {
            &prop.org
        } else {
            &prop.ip_cluster
        };
        // The group's own evidence, before propagation is added.
        let own_reported = a.tally(p, true).score;
        let own_enforced = a.tally(p, false).score;
        let watch = p.up[Level::Watch.idx()];
        let floor = |kids: f32, own: f32| -> Level {
            // Escalated keys must be a real share of the group's active keys, and the group
            // must look suspicious itself: a residential /24 that escalated keys only pass
            // through is not raised.
            if kids < 0.5 || kids < prop.min_share as f32 * v.peers.max(kids) || own < watch {
                return Level::Normal;
            }
            let mut level = Level::Normal;
            for (at, l) in [
                (rule.throttle_at, Level::Throttle),
                (rule.challenge_at, Level::Challenge),
                (rule.block_at, Level::Block),
            ] {
                if at > 0 && kids + 0.5 >= at as f32 {
                    level = l;
                }
            }
            level
        };
        // Full strength once a floor applies, nothing before: escalated keys below the count
        // or share are no evidence about the group.
        let finding = |kids: f32, floor: Level| Finding {
            strength: if floor > Level::Normal { 1.0 } else { 0.0 },
            value: kids,
            threshold: rule.throttle_at as f32,
        };
        let (rep, enf) = (v.kids_reported, v.kids_enforced);
        let (floor_rep, floor_enf) = (floor(rep, own_reported), floor(enf, own_enforced));
        a.findings[DetectorId::Propagation.idx()] = finding(rep, floor_rep);
        a.propagation_enforced = finding(enf, floor_enf);
        let pd = &p.detectors[DetectorId::Propagation.idx()];
        if pd.enabled {
            a.floor_reported = floor_rep;
            if !pd.shadow && !p.policy().shadow {
                a.floor_enforced = floor_enf;
            }
        }
    }

    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behavior::BehaviorPolicy;

    fn params(policy: &BehaviorPolicy) -> BehaviorParams {
        BehaviorParams::new(policy, "behavior")
            .unwrap()
            .with_seed(3)
    }

    /// Signals of a key that sweeps one template with long outputs at 60 rpm.
    fn sweeping_key() -> SignalView {
        SignalView {
            req_per_min: 60.0,
            out_per_min: 60_000.0,
            logprob_per_min: 0.0,
            logprob_share: 0.0,
            pinned_share: 0.0,
            out_in_ratio: 8.0,
            window_requests: 400,
            prev_window_requests: 200,
            distinct_ratio: Some(1.0),
            distinct_prompts: 400.0,
            templates: 1.0,
            template_share: 1.0,
            feature_share: 1.0,
            probe: Families::template(5),
            family_share: 1.0,
            template_family_share: 1.0,
            concentration: 1.0,
            recent_families: Some(1.0),
            peers: 1.0,
            fresh_peers: 0.0,
            window_peers: 1.0,
            peers_saturated: false,
            persistent_peers: 1.0,
            block_keys: 0.0,
            fresh_request_share: 0.0,
            cv: Some(0.9),
            org_shape: None,
            kids_enforced: 0.0,
            kids_reported: 0.0,
        }
    }

    #[test]
    fn names_are_unique_and_snake_case() {
        let mut names: Vec<_> = DetectorId::ALL.iter().map(|d| d.name()).collect();
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DETECTORS);
        for (i, id) in DetectorId::ALL.iter().enumerate() {
            assert_eq!(id.idx(), i);
        }
    }

    #[test]
    fn ramps() {
        assert_eq!(ramp(f32::NAN, 0.0, 1.0), 0.0);
        assert_eq!(ramp(0.5, 0.0, 1.0), 0.5);
        assert_eq!(ramp(5.0, 0.0, 1.0), 1.0);
        assert_eq!(ramp2(2.5, 0.0, 1.0, 4.0), 1.5);
        assert_eq!(ramp2(9.0, 0.0, 1.0, 0.0), 1.0);
    }

    #[test]
    fn volume_and_sweep_make_two_classes() {
        let p = params(&BehaviorPolicy::default());
        let a = assess(SubjectKind::ApiKey, &sweeping_key(), &[], &p);
        let vol = a.findings[DetectorId::OutputVolume.idx()];
        assert!((vol.strength - 1.167).abs() < 0.01, "{vol:?}");
        assert_eq!(a.findings[DetectorId::TemplateSweep.idx()].strength, 1.0);
        let t = a.tally(&p, true);
        assert_eq!(t.classes, 2);
        assert!(t.score > 2.1);
        let reasons = a.reasons(&p, true);
        assert_eq!(reasons[0].detector, "output_volume");
        assert_eq!(reasons[1].detector, "template_sweep");
    }

    /// An org that sends through one key at a time and replaces it every few requests is
    /// judged by its output per concurrent key, as one key would be; the same output from
    /// the same number of stable keys sending side by side is a group's, and does not fire.
    #[test]
    fn a_group_of_transient_keys_is_judged_per_concurrent_key() {
        let p = params(&BehaviorPolicy::default());
        let o = &BehaviorPolicy::default().detectors.output_volume;
        // `streams` keys sending evenly: the distinct keys a block of 16 requests holds.
        let org = |persistent_peers, streams: f32| SignalView {
            out_per_min: 60_000.0,
            peers: 50.0,
            window_peers: 25.0,
            persistent_peers,
            block_keys: streams * (1.0 - (1.0 - 1.0 / streams).powi(16)),
            fresh_request_share: 0.95,
            cv: None,
            ..sweeping_key()
        };
        let near = |a: f32, b: f32| (a - b).abs() < 0.01 * b;
        let vol = |v: &SignalView| {
            assess(SubjectKind::Org, v, &[], &p).findings[DetectorId::OutputVolume.idx()]
        };
        // Rotation: 50 keys in the two windows, none in both, one sending at a time.
        let rotating = org(0.0, 1.05);
        let per = per_stream_output(&rotating).unwrap();
        assert!(near(per, 60_000.0 / 1.05), "{per}");
        let f = vol(&rotating);
        assert!(f.strength >= 1.0, "{f:?}");
        assert_eq!(f.threshold, o.full_tokens_per_min as f32);
        // Stable keys, or transient keys sending side by side: a group's 60k/min is below
        // its minimum.
        for v in [org(25.0, 1.05), org(0.0, 50.0)] {
            let f = vol(&v);
            assert!(f.strength < 0.1, "{v:?} {f:?}");
        }
        assert_eq!(per_stream_output(&org(25.0, 1.05)), None);
        // Per key, a stable group's output is shared by its distinct keys, a transient
        // group's by its keys sending at once.
        assert_eq!(group_keys(&org(25.0, 1.05)), 50.0);
        assert!(near(group_keys(&org(0.0, 7.0)), 7.0));
        assert_eq!(group_keys(&org(3.0, 1.05)), 3.0);
        // Many new keys, but most requests from stable ones (one busy key and occasional
        // others), or more keys than the sketch counts: a group.
        let busy_stable = SignalView {
            fresh_request_share: 0.3,
            ..org(0.0, 1.05)
        };
        assert_eq!(group_keys(&busy_stable), 50.0);
        assert_eq!(per_stream_output(&busy_stable), None);
        let crowded = SignalView {
            peers_saturated: true,
            ..org(0.0, 1.05)
        };
        assert_eq!(group_keys(&crowded), 50.0);
        // A new customer's first busy window after a handful of requests: a group.
        let onboarding = SignalView {
            prev_window_requests: 10,
            ..org(0.0, 1.05)
        };
        assert_eq!(per_stream_output(&onboarding), None);
        // Just over half of the window's keys stable: a group.
        assert_eq!(per_stream_output(&org(12.6, 1.05)), None);
        assert!(per_stream_output(&org(12.4, 1.05)).is_some());
        assert_eq!(
            per_stream_output(&SignalView {
                window_peers: 1.0,
                ..rotating
            }),
            None
        );
    }

    /// An org's shape: the strongest of its concentration on one family, its output/input
    /// ratio and its output per key, each ramped; none for a one-key org.
    #[test]
    fn an_orgs_shape_is_its_concentration_or_its_output_ratio() {
        let p = params(&BehaviorPolicy::default());
        let org = |concentration, out_in_ratio, out_per_key: f32, peers| {
            let v = SignalView {
                concentration,
                out_in_ratio,
                out_per_min: out_per_key * peers,
                peers,
                ..sweeping_key()
            };
            org_shape(&v, &p)
        };
        // An enterprise: many services, reads more than it writes, modest keys.
        assert_eq!(org(0.1, 0.4, 3_000.0, 120.0), Some(0.0));
        // Half way up each ramp (concentration 0.5-0.8, ratio 1-2, 8k-40k tokens per key).
        let near = |h: Option<f32>, x: f32| h.is_some_and(|h| (h - x).abs() < 1e-5);
        assert!(near(org(0.65, 0.4, 1_500.0, 120.0), 0.5));
        assert!(near(org(0.1, 1.5, 1_500.0, 120.0), 0.5));
        assert!(near(org(0.1, 0.4, 24_000.0, 120.0), 0.5));
        // A campaign: one family, short questions for long answers, or every key heavy.
        assert_eq!(org(1.0, 0.4, 1_500.0, 30.0), Some(1.0));
        assert_eq!(org(0.1, 3.5, 1_500.0, 30.0), Some(1.0));
        assert_eq!(org(0.1, 0.4, 45_000.0, 30.0), Some(1.0));
        // One key: no shape (the key is the org).
        assert_eq!(org(0.1, 0.4, 1_500.0, 1.0), None);
    }

    /// A key's sweep counts at `org_weight` when its org looks nothing like harvesting, in
    /// full when it does, linearly between; an org's own sweep ignores the field.
    #[test]
    fn a_keys_sweep_weighs_its_orgs_shape() {
        let p = params(&BehaviorPolicy::default());
        let sweep = |kind, org_shape| {
            let v = SignalView {
                org_shape,
                ..sweeping_key()
            };
            assess(kind, &v, &[], &p).findings[DetectorId::TemplateSweep.idx()].strength
        };
        assert_eq!(sweep(SubjectKind::ApiKey, None), 1.0);
        assert_eq!(sweep(SubjectKind::ApiKey, Some(0.0)), 0.5);
        assert_eq!(sweep(SubjectKind::ApiKey, Some(0.5)), 0.75);
        assert_eq!(sweep(SubjectKind::ApiKey, Some(1.0)), 1.0);
        assert_eq!(sweep(SubjectKind::Org, Some(0.0)), 1.0);

        // At half volume, an enterprise's service key stays below throttle; the same key in a
        // campaign org does not.
        let half = |org_shape| {
            let v = SignalView {
                out_per_min: 24_000.0,
                out_in_ratio: 2.4,
                org_shape,
                ..sweeping_key()
            };
            assess(SubjectKind::ApiKey, &v, &[], &p)
                .tally(&p, false)
                .score
        };
        let throttle = p.policy().levels.throttle.up as f32;
        assert!(half(Some(0.0)) < throttle, "{}", half(Some(0.0)));
        assert!(half(Some(1.0)) >= throttle, "{}", half(Some(1.0)));

        // `org_weight = 1` turns the org context off.
        let mut policy = BehaviorPolicy::default();
        policy.detectors.template_sweep.org_weight = 1.0;
        let p = params(&policy);
        let v = SignalView {
            org_shape: Some(0.0),
            ..sweeping_key()
        };
        let a = assess(SubjectKind::ApiKey, &v, &[], &p);
        assert_eq!(a.findings[DetectorId::TemplateSweep.idx()].strength, 1.0);
    }

    /// A batch job that translates or rewrites its documents writes about what it reads: at
    /// any volume its output is not harvesting, so a sweep alone is all it shows. A sweep
    /// with short prompts and long answers is.
    #[test]
    fn a_batch_that_writes_what_it_reads_is_not_harvesting() {
        let p = params(&BehaviorPolicy::default());
        let job = |out_in_ratio| {
            let v = SignalView {
                out_per_min: 60_000.0,
                out_in_ratio,
                ..sweeping_key()
            };
            assess(SubjectKind::ApiKey, &v, &[], &p)
        };
        for ratio in [0.5, 1.0] {
            let a = job(ratio);
            assert_eq!(a.findings[DetectorId::OutputVolume.idx()].strength, 0.0);
            assert!(!a.tally(&p, false).gate(&p), "ratio {ratio}");
        }
        let a = job(2.5);
        assert!(a.findings[DetectorId::OutputVolume.idx()].strength >= 1.0);
        assert!(a.tally(&p, false).gate(&p));
    }

    /// Without prompt features the coverage class cannot be observed: a key pinned at its
    /// limit with long answers passes the gate on extraction volume alone, while the same
    /// traffic with features that show no coverage does not. Asking featureless subjects for
    /// `min_evidence_classes` restores the full gate.
    #[test]
    fn featureless_keys_need_one_class_fewer() {
        let heavy = SignalView {
            req_per_min: 120.0,
            out_per_min: 150_000.0,
            out_in_ratio: 3.0,
            window_requests: 600,
            pinned_share: 1.0,
            ..SignalView::default()
        };
        let p = params(&BehaviorPolicy::default());
        let a = assess(SubjectKind::ApiKey, &heavy, &[], &p);
        assert!(a.featureless);
        let t = a.tally(&p, false);
        assert_eq!((t.classes, t.needed), (1, 1), "{t:?}");
        assert!(t.volume && t.gate(&p));
        assert!(t.score >= p.up[Level::Throttle.idx()], "{t:?}");

        let featured = SignalView {
            feature_share: 1.0,
            ..heavy
        };
        let a = assess(SubjectKind::ApiKey, &featured, &[], &p);
        assert!(!a.featureless);
        let t = a.tally(&p, false);
        assert_eq!((t.classes, t.needed), (1, 2), "{t:?}");
        assert!(!t.gate(&p));
        // Just under the share that counts as featureless.
        let sparse = SignalView {
            feature_share: FEATURELESS_SHARE,
            ..heavy
        };
        assert!(!assess(SubjectKind::ApiKey, &sparse, &[], &p).featureless);

        let mut policy = BehaviorPolicy::default();
        policy.levels.featureless_min_evidence_classes = Some(2);
        let p = params(&policy);
        let t = assess(SubjectKind::ApiKey, &heavy, &[], &p).tally(&p, false);
        assert_eq!(t.needed, 2);
        assert!(!t.gate(&p));
        // Unset, it follows a stricter min_evidence_classes: one fewer.
        let mut policy = BehaviorPolicy::default();
        policy.levels.min_evidence_classes = 3;
        let p = params(&policy);
        let t = assess(SubjectKind::ApiKey, &heavy, &[], &p).tally(&p, false);
        assert_eq!(t.needed, 2);
    }

    #[test]
    fn batch_classifier_is_coverage_only() {
        // B2: one template, all prompts distinct, tiny outputs, logprobs often.
        let p = params(&BehaviorPolicy::default());
        let v = SignalView {
            out_per_min: 300.0,
            out_in_ratio: 0.003,
            logprob_per_min: 70.0,
            logprob_share: 0.75,
            pinned_share: 0.1,
            cv: Some(0.05),
            ..sweeping_key()
        };
        let t = assess(SubjectKind::ApiKey, &v, &[], &p).tally(&p, true);
        assert_eq!(t.classes, 1, "{t:?}");
        assert!(!t.volume && !t.gate(&p));
        // Even with another class (coordination), no volume means no throttle.
        let v = SignalView { peers: 20.0, ..v };
        let t = assess(SubjectKind::ApiKey, &v, &[], &p).tally(&p, true);
        assert_eq!(t.classes, 2, "{t:?}");
        assert!(!t.gate(&p));
    }

    #[test]
    fn shadow_detectors_only_in_reported_view() {
        let mut policy = BehaviorPolicy::default();
        policy.detectors.output_volume.shadow = true;
        let p = params(&policy);
        let a = assess(SubjectKind::ApiKey, &sweeping_key(), &[], &p);
        assert_eq!(a.tally(&p, true).classes, 2);
        assert_eq!(a.tally(&p, false).classes, 1);
        assert!(a
            .reasons(&p, false)
            .iter()
            .all(|r| r.detector != "output_volume"));

        policy.detectors.output_volume.shadow = false;
        policy.detectors.output_volume.enabled = false;
        let p = params(&policy);
        let a = assess(SubjectKind::ApiKey, &sweeping_key(), &[], &p);
        assert_eq!(a.tally(&p, true).classes, 1);
    }

    #[test]
    fn template_spread_needs_per_org_intensity() {
        let p = params(&BehaviorPolicy::default());
        let v = SignalView {
            out_per_min: 3000.0,
            ..sweeping_key()
        };
        // Distillation: 100 orgs, 300k tokens/min on the family (its template).
        let hot = FamilyStats {
            orgs: 100.0,
            req_per_min: 300.0,
            out_per_min: 300_000.0,
            band: false,
        };
        // Homework: 300 orgs, 30k tokens/min: 100 per org.
        let homework = FamilyStats {
            orgs: 300.0,
            req_per_min: 100.0,
            out_per_min: 30_000.0,
            band: false,
        };
        let spread = |v: &SignalView, f: &[FamilyStats]| {
            assess(SubjectKind::ApiKey, v, f, &p).findings[DetectorId::TemplateSpread.idx()]
                .strength
        };
        assert_eq!(spread(&v, &[hot]), 1.0);
        assert_eq!(spread(&v, &[homework]), 0.0);
        // Of the four bands of a SimHash centroid, the second strongest counts: a family
        // member shares several bands with the family, a chance match only one.
        let (hot_band, homework_band) = (
            FamilyStats { band: true, ..hot },
            FamilyStats {
                band: true,
                ..homework
            },
        );
        let v_bands = SignalView {
            probe: Families::bands(0x0123_4567_89AB_CDEF),
            ..v
        };
        assert_eq!(spread(&v_bands, &[hot_band, homework_band, hot_band]), 1.0);
        assert_eq!(
            spread(&v_bands, &[homework_band, hot_band, homework_band]),
            0.0
        );
        assert_eq!(spread(&v_bands, &[hot_band]), 0.0);
        // A band chance match does not hide a hot template; the stronger of the two counts.
        assert_eq!(spread(&v, &[homework_band, hot_band, hot]), 1.0);
        // A subject that is not mostly in the family is not linked to it: each family is gated
        // by the subject's own share in it.
        let off_centroid = SignalView {
            family_share: 0.3,
            ..v
        };
        assert_eq!(spread(&off_centroid, &[hot_band, hot_band]), 0.0);
        assert_eq!(spread(&off_centroid, &[hot]), 1.0);
        let off_template = SignalView {
            template_family_share: 0.3,
            ..v
        };
        assert_eq!(spread(&off_template, &[hot]), 0.0);
        assert_eq!(spread(&off_template, &[hot_band, hot_band]), 1.0);
    }

    #[test]
    fn propagation_floors_need_count_and_share() {
        let p = params(&BehaviorPolicy::default());
        // The group shows some evidence of its own (a template sweep).
        let base = SignalView {
            peers: 10.0,
            window_requests: 100,
            distinct_ratio: Some(1.0),
            concentration: 1.0,
            ..SignalView::default()
        };
        let v = SignalView {
            kids_reported: 6.0,
            kids_enforced: 3.0,
            ..base
        };
        let a = assess(SubjectKind::Org, &v, &[], &p);
        assert_eq!(a.floor_reported, Level::Challenge);
        assert_eq!(a.floor_enforced, Level::Throttle);
        // 6 escalated keys among 300 active ones: below min_share.
        let v = SignalView {
            kids_reported: 6.0,
            kids_enforced: 6.0,
            peers: 300.0,
            ..base
        };
        let a = assess(SubjectKind::IpCluster, &v, &[], &p);
        assert_eq!(a.floor_reported, Level::Normal);
        // Without evidence of its own, the group is not raised.
        let v = SignalView {
            kids_reported: 6.0,
            kids_enforced: 6.0,
            peers: 10.0,
            ..SignalView::default()
        };
        assert_eq!(
            assess(SubjectKind::Org, &v, &[], &p).floor_reported,
            Level::Normal
        );
        // Keys never get a floor.
        let v = SignalView {
            kids_reported: 6.0,
            kids_enforced: 6.0,
            ..base
        };
        assert_eq!(
            assess(SubjectKind::ApiKey, &v, &[], &p).floor_enforced,
            Level::Normal
        );
    }
}
