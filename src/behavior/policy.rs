//! What users configure for the behavioural layer: serde structs with principled defaults, and
//! their validation. The defaults are the `llm_api` preset's; each field's doc says why.
//!
//! Every struct denies unknown fields and takes its defaults for missing ones, so a TOML table
//! needs to name only what it changes:
//!
//! ```toml
//! [behavior]
//! shadow = true
//! [behavior.detectors.template_spread]
//! min_orgs = 6
//! ```
//!
//! Detector ramps use one convention: a detector's strength is 0 at or below `min_*`, rises
//! linearly to 1 at `full_*`, and (for the two volume detectors only) goes on rising to 2 at
//! `extreme_*`. The score of a subject is the sum of `weight × strength` over its detectors.

use serde::{Deserialize, Serialize};

use crate::policy::ConfigError;

/// Configuration of the behavioural layer (signals → score → level).
///
/// # Examples
///
/// ```
/// use ratewarden::BehaviorPolicy;
/// let p = BehaviorPolicy { shadow: true, ..BehaviorPolicy::default() };
/// assert!(p.enabled && p.shadow);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BehaviorPolicy {
    /// Whether the behavioural layer runs at all. Default `true`. When `false`, no subject
    /// has behavioural state: checks apply the classic limits only, manual levels cannot be
    /// set (`ControlError::BehaviorDisabled`), and a swap to a policy with the layer off
    /// drops the state of every subject on its next check, manual levels and host
    /// exemptions included. Use `shadow` to keep manual levels while computed ones never
    /// deny.
    pub enabled: bool,
    /// Global shadow mode: everything is computed and reported (with `shadow: true` on
    /// events), but the enforced level stays `normal` unless a manual level is set.
    /// Default `false`.
    pub shadow: bool,
    /// Share of its classic limits that a throttled subject keeps, from `0.000001` to `1`.
    /// Default `0.25`: a quarter
    /// cuts the yield of an extractor running at its limits by three quarters while a benign
    /// subject that was throttled by mistake can still work. It does not slow a subject that
    /// runs far below its limits (a key among many, at a few requests per minute); such a
    /// subject is challenged once the evidence persists (`levels.promote_after_s`).
    pub throttle_factor: f64,
    /// A subject is re-evaluated at most this often (milliseconds of its own traffic).
    /// Default `1000`: detection latency is dominated by signal build-up (minutes), so one
    /// evaluation per second per active subject costs nothing in latency and keeps the score
    /// computation off almost every request.
    pub evaluate_every_ms: u64,
    /// Once `evaluate_every_ms` has passed, a subject waits for this many requests since its
    /// last evaluation before the next one, unless `evaluate_max_ms` has passed. Default `4`:
    /// a subject that sends a request every few seconds is scored every few requests instead
    /// of on each one (the evaluation is the costly part of the behavioural layer), while an
    /// extractor, at several requests per second, is scored every second as before.
    pub evaluate_min_requests: u32,
    /// A subject is re-evaluated on its next request once this long has passed since its
    /// last evaluation, whatever `evaluate_min_requests` says (milliseconds; a value below
    /// `evaluate_every_ms` counts as `evaluate_every_ms`). Default `30000`: a slow subject's
    /// level changes (up or down) are delayed by at most half a minute, against signals that
    /// take minutes to build.
    pub evaluate_max_ms: u64,
    /// Half-life of the decayed rate counters (requests, output tokens, logprob requests,
    /// pinned requests), in seconds. Default `120`: a human burst of twenty requests is
    /// smoothed to a few per minute, while a sustained extractor reaches half its true rate
    /// in two minutes and 80% in under five.
    pub rate_half_life_s: u64,
    /// Length of one window of the distinct-count sketches, in seconds; counts cover the
    /// current and the previous window, so 1–2 windows. Default `300`: long enough for a key
    /// at three requests per minute to show its spread, short enough to forget a finished
    /// batch within ten minutes.
    pub window_s: u64,
    /// Ratio-based detectors (sweep, diversity, timing, pinned) stay silent until the subject
    /// made at least this many requests in the current and previous window. Default `16`:
    /// below that a share or a coefficient of variation is noise, and one human session
    /// rarely has more. At most 65535. The distinct-prompt ratio asks for at most 384 prompts
    /// (one full prompt window), whatever this says.
    pub min_requests: u32,
    /// A prompt whose SimHash is at most this many bits from the subject's SimHash centroid
    /// (the majority of its recent prompts) belongs to the subject's prompt family; the
    /// same distance clusters the recent prompts for breadth. Default `16`: unrelated 64-bit
    /// SimHashes differ in 32 ± 4 bits, so 16 or fewer happens by chance about once in 20,000
    /// pairs, while fillings of one template, or of variants of it, sit a few bits apart.
    pub near_bits: u32,
    /// Score thresholds, hysteresis and cool-downs of the levels.
    pub levels: LevelsPolicy,
    /// Per-detector settings.
    pub detectors: DetectorsPolicy,
    /// Raising an org or IP cluster when enough of its keys are escalated.
    pub propagation: PropagationPolicy,
    /// The global index that links subjects through shared prompt families.
    pub cross: CrossPolicy,
}

impl Default for BehaviorPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            throttle_factor: 0.25,
            evaluate_every_ms: 1000,
            evaluate_min_requests: 4,
            evaluate_max_ms: 30_000,
            rate_half_life_s: 120,
            window_s: 300,
            min_requests: 16,
            near_bits: 16,
            levels: LevelsPolicy::default(),
            detectors: DetectorsPolicy::default(),
            propagation: PropagationPolicy::default(),
            cross: CrossPolicy::default(),
        }
    }
}

/// Thresholds of one level: the score to enter it, the score to leave it, and the minimum time
/// spent in it before stepping down. All three fields must be given when the table is written.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelRule {
    /// Score at or above which the subject enters this level.
    pub up: f64,
    /// Score below which the subject may step down from this level (after the cool-down).
    pub down: f64,
    /// Minimum time at this level before stepping down one level, in seconds.
    pub cooldown_s: u64,
}

/// Score → level mapping with hysteresis.
///
/// Levels go up at once to the highest level whose `up` the score reaches, and come down one
/// level at a time: only when the score is below that level's `down` and the subject has spent
/// `cooldown_s` at the level. A subject still at throttle strength `promote_after_s` after it
/// was throttled goes on to `challenge`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LevelsPolicy {
    /// Default up 0.75, down 0.5, 5 minutes: a single corroborating signal (weight 0.5)
    /// alone stays `normal`; one strong signal is watched.
    pub watch: LevelRule,
    /// Default up 1.5, down 1.0, 10 minutes: needs at least one full-strength and one
    /// half-strength detector (and see `min_evidence_classes`).
    pub throttle: LevelRule,
    /// Default up 2.0, down 1.5, 15 minutes: two full-strength detectors from different
    /// classes (extraction at full volume *and* full coverage or coordination), or
    /// extraction volume well past its full mark with half-strength support.
    pub challenge: LevelRule,
    /// Default up 3.25, down 2.75, 30 minutes: three or more strong, independent signals.
    pub block: LevelRule,
    /// Throttle and above need firing detectors from at least this many independent evidence
    /// classes (extraction, coverage, population, network; timing and pinning corroborate but
    /// are not a class). Below that the level is capped at `watch`. Default `2`: a batch
    /// classifier (one template, all prompts distinct) shows coverage only and so is never
    /// throttled by its sweep alone.
    pub min_evidence_classes: u32,
    /// `min_evidence_classes` for a subject whose requests carry no prompt features: fewer
    /// than one in ten has a SimHash or a template fingerprint (`Request::prompt_simhash`,
    /// `Request::template_fp`), so the coverage class cannot be observed at all. Default
    /// unset: one class fewer than `min_evidence_classes`, and at least 1 (so `1` with the
    /// default of `2`). Without features, a key that draws extraction volume at a score of
    /// `throttle.up` (for instance one key pinned at its limit with long answers, well past
    /// `output_volume.full_tokens_per_min`) is then throttled on that alone, where with
    /// features it would also need to show coverage or coordination. Set it to
    /// `min_evidence_classes` to ask featureless traffic for the same evidence (with the
    /// defaults and no features, nothing is then ever throttled). Validated to
    /// `1..=min_evidence_classes`.
    pub featureless_min_evidence_classes: Option<u32>,
    /// Throttle and above also need a firing detector that measures *volume* of extracted
    /// information: `output_volume`, `logprob_harvest`, `template_spread` (the family's
    /// volume per org) or `propagation` (escalated keys each had one). Default `true`: without
    /// volume there is no extraction to stop, however coordinated or systematic the traffic
    /// looks (an enterprise whose service keys share one template and start together).
    pub require_volume: bool,
    /// A detector "fires" (counts towards `min_evidence_classes`) at this strength.
    /// Default `0.5`.
    pub fire_strength: f64,
    /// After a host clears a challenge, the computed level is capped at `throttle` for this
    /// long, so that a re-verified subject is not re-challenged on its very next request.
    /// Default `900` (15 minutes).
    pub challenge_grace_s: u64,
    /// A subject that has been at `throttle` for this long (seconds) and still scores at
    /// least `throttle.up` (with the evidence gate met) is promoted to `challenge`; `0`
    /// never promotes. Default `600` (the throttle cool-down): throttling scales limits, so it
    /// cannot slow a subject that extracts far below them (many keys, each a few requests per
    /// minute); ten minutes of unchanged evidence under throttle means it did not work.
    pub promote_after_s: u64,
}

impl Default for LevelsPolicy {
    fn default() -> Self {
        Self {
            watch: LevelRule {
                up: 0.75,
                down: 0.5,
                cooldown_s: 300,
            },
            throttle: LevelRule {
                up: 1.5,
                down: 1.0,
                cooldown_s: 600,
            },
            challenge: LevelRule {
                up: 2.0,
                down: 1.5,
                cooldown_s: 900,
            },
            block: LevelRule {
                up: 3.25,
                down: 2.75,
                cooldown_s: 1800,
            },
            min_evidence_classes: 2,
            featureless_min_evidence_classes: None,
            require_volume: true,
            fire_strength: 0.5,
            challenge_grace_s: 900,
            promote_after_s: 600,
        }
    }
}

/// Settings of every detector. Each has `enabled`, its own `shadow` (computed and reported,
/// but left out of the enforced score) and a `weight`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorsPolicy {
    /// `output_volume` (extraction): sustained output-token rate.
    pub output_volume: OutputVolumePolicy,
    /// `logprob_harvest` (extraction): logprobs requested broadly and often.
    pub logprob_harvest: LogprobHarvestPolicy,
    /// `template_sweep` (coverage): one family filled with ever new content.
    pub template_sweep: TemplateSweepPolicy,
    /// `prompt_diversity` (coverage, keys only): many unrelated prompt families.
    pub prompt_diversity: PromptDiversityPolicy,
    /// `ip_spread` (network, keys only): one key used from many IP clusters.
    pub ip_spread: IpSpreadPolicy,
    /// `template_spread` (population): the subject's prompt family is harvested by many orgs.
    pub template_spread: TemplateSpreadPolicy,
    /// `key_fanout` (population, orgs and clusters): many distinct keys.
    pub key_fanout: KeyFanoutPolicy,
    /// `key_churn` (population, orgs and clusters): keys appearing in a burst.
    pub key_churn: KeyChurnPolicy,
    /// `regular_timing` (corroborating, keys only): machine-regular inter-arrival times.
    pub regular_timing: RegularTimingPolicy,
    /// `pinned` (corroborating): time spent at or near a classic limit.
    pub pinned: PinnedPolicy,
}

/// `output_volume`: the output tokens a subject obtains per minute, counted only for output
/// that is new (distinct prompts) and large relative to the input. For an org or IP cluster,
/// which aggregate many independent users, only the volume concentrated on its prompt family
/// counts (its output rate times the share of its requests in the family, measured as for
/// `template_sweep`: many keys filling variants of one template make one family, unrelated
/// services of one enterprise do not), and only as far as each active key draws a lot of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputVolumePolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `1.0`.
    pub weight: f64,
    /// Key: strength starts above this many output tokens per minute. Default `8000`: four
    /// to eight times what a person reading answers sustains.
    pub min_tokens_per_min: f64,
    /// Key: full strength. Default `40000`: forty 1000-token answers a minute, sustained
    /// (58M tokens a day), automation at a third of the key's request limit.
    pub full_tokens_per_min: f64,
    /// Key: strength 2. Default `160000`: beyond the whole request limit at 1000 tokens each.
    pub extreme_tokens_per_min: f64,
    /// Org or cluster: start. Default `150000`. Groups aggregate many users, so their marks
    /// sit thirty times above a key's, and count only output concentrated in one family.
    pub group_min_tokens_per_min: f64,
    /// Org or cluster: full strength. Default `900000`: over a fifth of the org token limit
    /// (4M/min) spent as output of one prompt family. An enterprise whose forty modest keys
    /// share a corporate template draws about 350k.
    pub group_full_tokens_per_min: f64,
    /// Org or cluster: strength 2. Default `3600000`.
    pub group_extreme_tokens_per_min: f64,
    /// Org or cluster: the concentrated output per active key where it starts to count.
    /// Default `2000` (per minute): a carrier NAT or a popular app's user base draws a lot in
    /// total but little per key; a group of scripted keys draws a lot per key.
    pub group_min_tokens_per_key: f64,
    /// Org or cluster: per-key output for full strength. Default `8000`.
    pub group_full_tokens_per_key: f64,
    /// Output/input token ratio at or below which output counts nothing. Default `1.0`
    /// (`0.25` before the seventh session): a job that writes no more than it reads
    /// (classifying, summarising, translating, rewriting its documents) transforms what it
    /// is given rather than drawing out what the model knows. At `0.25`, a batch customer
    /// translating its documents near its key limits was throttled and then blocked.
    pub min_output_ratio: f64,
    /// Output/input ratio at which output counts fully. Default `2.0`: harvesting asks short
    /// questions for long answers; chat-like services (about 1 to 1.5) count little.
    pub full_output_ratio: f64,
    /// Distinct-prompt ratio at or below which output counts nothing (repeats of one prompt
    /// reveal nothing new). Default `0.2`.
    pub min_distinct: f64,
    /// Distinct-prompt ratio at which output counts fully. Default `0.5`.
    pub full_distinct: f64,
}

impl Default for OutputVolumePolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 1.0,
            min_tokens_per_min: 8_000.0,
            full_tokens_per_min: 40_000.0,
            extreme_tokens_per_min: 160_000.0,
            group_min_tokens_per_min: 150_000.0,
            group_full_tokens_per_min: 900_000.0,
            group_extreme_tokens_per_min: 3_600_000.0,
            group_min_tokens_per_key: 2_000.0,
            group_full_tokens_per_key: 8_000.0,
            min_output_ratio: 1.0,
            full_output_ratio: 2.0,
            min_distinct: 0.2,
            full_distinct: 0.5,
        }
    }
}

/// `logprob_harvest`: log-probabilities leak a whole distribution per token. Requested on
/// nearly every request, at a sustained rate, over *many* prompt families, they harvest the
/// model broadly; a classifier asking for logprobs on its one template does not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogprobHarvestPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `1.0`.
    pub weight: f64,
    /// Share of requests with logprobs where strength starts. Default `0.5`.
    pub min_share: f64,
    /// Share for full strength. Default `0.9` ("nearly every request").
    pub full_share: f64,
    /// Logprob requests per minute where strength starts. Default `10`.
    pub min_per_min: f64,
    /// Full strength. Default `40` (a third of the key request limit).
    pub full_per_min: f64,
    /// Strength 2. Default `120` (the key request limit).
    pub extreme_per_min: f64,
    /// Distinct templates in the window where breadth starts. Default `4`: a classifier or
    /// eval pipeline with a handful of tasks stays below.
    pub min_templates: f64,
    /// Distinct templates for full breadth. Default `12`.
    pub full_templates: f64,
    /// When most requests carry no template fingerprint: distinct SimHash clusters among the
    /// last 8 prompts (smoothed) where breadth starts. Default `5`: a pipeline cycling through
    /// five tasks shows at most five.
    pub min_recent_families: f64,
    /// Distinct clusters among the last 8 for full breadth. Default `7.5` (8 = all unrelated).
    pub full_recent_families: f64,
}

impl Default for LogprobHarvestPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 1.0,
            min_share: 0.5,
            full_share: 0.9,
            min_per_min: 10.0,
            full_per_min: 40.0,
            extreme_per_min: 120.0,
            min_templates: 4.0,
            full_templates: 12.0,
            min_recent_families: 5.0,
            full_recent_families: 7.5,
        }
    }
}

/// `template_sweep`: most requests share one prompt family while nearly every prompt is
/// distinct: a template (or a few variants of one) filled from a list. The share in the family
/// is the larger of the dominant template fingerprint's share (when most requests carry one)
/// and the share of prompts within `near_bits` of the subject's SimHash centroid, so that a
/// sweep over several variants of one template counts as one family. Legitimate batch jobs
/// look like this too, which is why it is coverage evidence only and never throttles alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSweepPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `1.0`.
    pub weight: f64,
    /// Share of requests in the dominant family where strength starts. Default `0.5`.
    pub min_share: f64,
    /// Share for full strength. Default `0.8`.
    pub full_share: f64,
    /// Distinct-prompt ratio where strength starts. Default `0.6`.
    pub min_distinct: f64,
    /// Distinct-prompt ratio for full strength. Default `0.9`.
    pub full_distinct: f64,
    /// Keys only: the share of the sweep's strength that counts when the key's org, taken as
    /// a whole, looks nothing like harvesting. With at least two active keys, an org's
    /// *shape* is the strongest of its own concentration on one family (ramped from
    /// `min_share` to `full_share`, as for this detector), its output/input token ratio
    /// (ramped from `org_min_ratio` to `org_full_ratio`) and its output per active key
    /// (ramped like a key's `output_volume`, from its `min_tokens_per_min` to
    /// `full_tokens_per_min`); the key's sweep counts at `org_weight` at shape 0, in full at
    /// shape 1, linearly between. Default `0.5`: one long-answer service among an
    /// enterprise's many modest keys, which read more than they write, is coverage evidence
    /// at half strength; a campaign, whose keys share one family, ask short questions for
    /// long answers or each draw a lot, keeps it whole. `1` turns the org context off.
    ///
    /// The key's `template_sweep` reason keeps its value (the key's own concentration); its
    /// contribution shows the weight. The three ramps are this policy's own fields (the
    /// ratio ramp's default happens to equal `output_volume.full_output_ratio`, the per-key
    /// ramp reuses `output_volume.min_tokens_per_min` and `full_tokens_per_min`). An org
    /// publishes its shape at its evaluations, so after a policy swap its keys see shapes
    /// under the new thresholds from the org's next evaluation (within `evaluate_max_ms`
    /// while it is active).
    pub org_weight: f64,
    /// The org's output/input ratio at or below which the ratio adds nothing to its shape.
    /// Default `1.0`: the org as a whole reads at least as much as it writes.
    pub org_min_ratio: f64,
    /// The org's output/input ratio at which its shape is 1. Default `2.0`, the ratio at
    /// which `output_volume` counts output in full.
    pub org_full_ratio: f64,
}

impl Default for TemplateSweepPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 1.0,
            min_share: 0.5,
            full_share: 0.8,
            min_distinct: 0.6,
            full_distinct: 0.9,
            org_weight: 0.5,
            org_min_ratio: 1.0,
            org_full_ratio: 2.0,
        }
    }
}

/// `prompt_diversity` (keys only): many distinct templates (or, when requests carry no
/// template fingerprint, consecutive prompts unrelated to each other), with few repeats: broad
/// coverage of the model's abilities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptDiversityPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `1.0`.
    pub weight: f64,
    /// Distinct templates in the window where strength starts. Default `6`: an application
    /// backend with a handful of features stays below.
    pub min_templates: f64,
    /// Distinct templates for full strength. Default `16`.
    pub full_templates: f64,
    /// When most requests carry no template fingerprint: distinct SimHash clusters among the
    /// last 8 prompts (smoothed) where strength starts. Default `5`: a person who mostly edits
    /// the previous prompt shows three or four.
    pub min_recent_families: f64,
    /// Distinct clusters among the last 8 for full strength. Default `7.5`.
    pub full_recent_families: f64,
    /// Distinct-prompt ratio where strength starts. Default `0.6`.
    pub min_distinct: f64,
    /// Distinct-prompt ratio for full strength. Default `0.9`.
    pub full_distinct: f64,
}

impl Default for PromptDiversityPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 1.0,
            min_templates: 6.0,
            full_templates: 16.0,
            min_recent_families: 5.0,
            full_recent_families: 7.5,
            min_distinct: 0.6,
            full_distinct: 0.9,
        }
    }
}

/// `ip_spread` (keys only): distinct IP clusters one key used in the window. People use one or
/// two; a key rotated through a residential proxy pool uses a new one per request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpSpreadPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `1.0`.
    pub weight: f64,
    /// Distinct clusters where strength starts. Default `4` (home, office, phone, VPN).
    pub min_clusters: f64,
    /// Distinct clusters for full strength. Default `10`.
    pub full_clusters: f64,
    /// Full strength also when the distinct clusters reach this share of the key's requests
    /// in the window (but at least `min_clusters + 1` clusters). Default `0.9`: a key that
    /// comes from a new network on nine requests in ten is a rotated proxy pool, whatever
    /// its rate, and at a few requests per minute `full_clusters` would take many minutes;
    /// a person's few requests come from their one or two usual places.
    pub full_share: f64,
}

impl Default for IpSpreadPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 1.0,
            min_clusters: 4.0,
            full_clusters: 10.0,
            full_share: 0.9,
        }
    }
}

/// `template_spread` (the cross-subject signal): the subject's prompt family is, in the global
/// [`CrossPolicy`] index, used by many distinct orgs, with a high output volume in total *and
/// per org*. Homework templates or a popular framework's system prompt reach many orgs too, but
/// each org draws little output from them. The family is the subject's SimHash centroid, looked
/// up as four 16-bit bands of which the *second* strongest counts (a family member shares most
/// bands with the family's other keys; one band matching by chance is not enough), or without
/// SimHashes its dominant template fingerprint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSpreadPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `1.0`.
    pub weight: f64,
    /// Distinct orgs on the family where strength starts. Default `4`.
    pub min_orgs: f64,
    /// Distinct orgs for full strength. Default `16`.
    pub full_orgs: f64,
    /// Family output tokens per minute (all orgs) where strength starts. Default `20000`.
    pub min_tokens_per_min: f64,
    /// Family output per minute for full strength. Default `100000`.
    pub full_tokens_per_min: f64,
    /// Family output per minute per active org where strength starts. Default `500`.
    pub min_tokens_per_org: f64,
    /// Per-org output per minute for full strength. Default `2000`: more than a person
    /// sustains, what a script at a few requests per minute draws.
    pub full_tokens_per_org: f64,
    /// The subject's own share of requests in that family (prompts near its centroid, or its
    /// dominant template's share) must be at least this. Default `0.5`.
    pub min_subject_share: f64,
    /// The subject must have made at least this many requests in the window before it is
    /// linked to its family. Default `4`: four prompts place a key's centroid in its family
    /// (chance matches are kept out by the second-band rule and the share), so a key at one
    /// request a minute is linked within minutes; one request from a hot family says nothing
    /// about the residential address it came from, and a /24 that proxy-rotated keys pass
    /// through rarely sees four of their requests in a window.
    pub min_subject_requests: u32,
}

impl Default for TemplateSpreadPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 1.0,
            min_orgs: 4.0,
            full_orgs: 16.0,
            min_tokens_per_min: 20_000.0,
            full_tokens_per_min: 100_000.0,
            min_tokens_per_org: 500.0,
            full_tokens_per_org: 2_000.0,
            min_subject_share: 0.5,
            min_subject_requests: 4,
        }
    }
}

/// `key_fanout` (orgs and clusters): distinct keys active in the window. Enterprises and NATs
/// have many, so the default weight is only `0.5`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyFanoutPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `0.5`.
    pub weight: f64,
    /// Org: distinct keys where strength starts. Default `8`.
    pub org_min_keys: f64,
    /// Org: full strength. Default `32`.
    pub org_full_keys: f64,
    /// IP cluster: start. Default `16`.
    pub cluster_min_keys: f64,
    /// IP cluster: full strength. Default `64`.
    pub cluster_full_keys: f64,
}

impl Default for KeyFanoutPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 0.5,
            org_min_keys: 8.0,
            org_full_keys: 32.0,
            cluster_min_keys: 16.0,
            cluster_full_keys: 64.0,
        }
    }
}

/// `key_churn` (orgs and clusters): keys active in the current window that were not active in
/// the previous one: fresh keys appearing together (for a new org or cluster, every key is
/// new, so this also catches synchronised starts). Weight `0.5`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyChurnPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `0.5`.
    pub weight: f64,
    /// New keys per window where strength starts. Default `4`.
    pub min_new_keys: f64,
    /// New keys per window for full strength. Default `16`.
    pub full_new_keys: f64,
}

impl Default for KeyChurnPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 0.5,
            min_new_keys: 4.0,
            full_new_keys: 16.0,
        }
    }
}

/// `regular_timing` (keys only, corroborating): coefficient of variation of inter-arrival
/// times. Scripts are regular, people are bursty; CI bots are regular too, so weight `0.5`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegularTimingPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `0.5`.
    pub weight: f64,
    /// Strength is 0 at or above this CV. Default `0.35` (Poisson arrivals have CV 1).
    pub max_cv: f64,
    /// Strength is 1 at or below this CV. Default `0.1`.
    pub full_cv: f64,
}

impl Default for RegularTimingPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 0.5,
            max_cv: 0.35,
            full_cv: 0.1,
        }
    }
}

/// `pinned` (corroborating): share of requests made while a classic limit of the subject was
/// nearly exhausted or refused. Wanting more than the limit allows is what extractors do, but
/// so do eager batch jobs, so weight `0.5`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PinnedPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Default `0.5`.
    pub weight: f64,
    /// A request counts as pinned when `pressure` is at least this, or it was refused.
    /// Default `0.9`.
    pub pressure: f64,
    /// Pinned share where strength starts. Default `0.2`.
    pub min_share: f64,
    /// Pinned share for full strength. Default `0.6`.
    pub full_share: f64,
}

impl Default for PinnedPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 0.5,
            pressure: 0.9,
            min_share: 0.2,
            full_share: 0.6,
        }
    }
}

/// How many escalated keys raise their org or cluster to which level (`0` = never).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropagationRule {
    /// Distinct escalated keys in the window that raise the subject to `throttle`.
    pub throttle_at: u32,
    /// Distinct escalated keys that raise it to `challenge`.
    pub challenge_at: u32,
    /// Distinct escalated keys that raise it to `block`.
    pub block_at: u32,
}

/// `propagation`: keys at throttle or higher raise their org and IP cluster. Each rule also
/// needs the escalated keys to be at least `min_share` of the keys active in the group, so that
/// a few bad keys behind a campus NAT do not take the whole campus down, and the group's own
/// score (without propagation) to reach `levels.watch.up`, so that a residential /24 which
/// proxy-rotated keys merely pass through is not raised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PropagationPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Default `false`.
    pub shadow: bool,
    /// Weight of the `propagation` reason in the group's score. Default `1.0`.
    pub weight: f64,
    /// Escalated keys are remembered for 1–2 windows of this length, in seconds. Default `600`.
    pub window_s: u64,
    /// Escalated keys must be at least this share of the group's active keys. Default `0.2`.
    pub min_share: f64,
    /// Default throttle at 3 keys, challenge at 6, never block.
    pub org: PropagationRule,
    /// Default throttle at 3 keys, challenge at 8, never block.
    pub ip_cluster: PropagationRule,
}

impl Default for PropagationPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
            weight: 1.0,
            window_s: 600,
            min_share: 0.2,
            org: PropagationRule {
                throttle_at: 3,
                challenge_at: 6,
                block_at: 0,
            },
            ip_cluster: PropagationRule {
                throttle_at: 3,
                challenge_at: 8,
                block_at: 0,
            },
        }
    }
}

/// The global cross-subject index of prompt families (a 16-bit band of the requesting key's
/// SimHash centroid, else a template fingerprint): distinct orgs, request and output volume per
/// family, over the rate half-life and the sketch window. One index update per check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrossPolicy {
    /// Default `true`.
    pub enabled: bool,
    /// Families tracked at once (rounded up to a power of two, at least 64). 88 bytes
    /// each. Default `4096` (about 352 KiB). When full, the least active family of a bucket
    /// is replaced.
    pub capacity: usize,
    /// A family idle this long (seconds) is free for reuse. Default `3600`.
    pub stale_after_s: u64,
}

impl Default for CrossPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            capacity: 4096,
            stale_after_s: 3600,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn invalid(path: &str, field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: format!("{path}.{field}"),
        reason: reason.into(),
    }
}

/// Finite, >= 0, and finite as the `f32` the runtime uses (a weight of `1e39` would become
/// infinite there, and infinity × a zero strength a NaN score).
fn finite_nonneg(path: &str, field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 && v <= f64::from(f32::MAX) {
        Ok(())
    } else {
        Err(invalid(
            path,
            field,
            "must be a finite number >= 0 (at most 3.4e38)",
        ))
    }
}

fn unit(path: &str, field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(path, field, "must be between 0 and 1"))
    }
}

fn positive_secs(path: &str, field: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(ConfigError::Zero {
            path: format!("{path}.{field}"),
        })
    } else {
        Ok(())
    }
}

/// `min_name < full_name`, both finite and >= 0.
fn ramp(
    path: &str,
    min_name: &str,
    min: f64,
    full_name: &str,
    full: f64,
) -> Result<(), ConfigError> {
    finite_nonneg(path, min_name, min)?;
    finite_nonneg(path, full_name, full)?;
    if full > min {
        Ok(())
    } else {
        Err(invalid(
            path,
            full_name,
            format!("must be greater than {min_name}"),
        ))
    }
}

fn unit_ramp(
    path: &str,
    min_name: &str,
    min: f64,
    full_name: &str,
    full: f64,
) -> Result<(), ConfigError> {
    unit(path, min_name, min)?;
    unit(path, full_name, full)?;
    ramp(path, min_name, min, full_name, full)
}

fn extreme(path: &str, name: &str, full: f64, v: f64, full_name: &str) -> Result<(), ConfigError> {
    finite_nonneg(path, name, v)?;
    if v == 0.0 || v > full {
        Ok(())
    } else {
        Err(invalid(
            path,
            name,
            format!("must be greater than {full_name}, or 0 to cap strength at 1"),
        ))
    }
}

impl BehaviorPolicy {
    /// Checks every field; `path` is the prefix of the reported field path (for example
    /// `behavior`).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first bad field, e.g.
    /// `behavior.detectors.template_spread.full_orgs`.
    pub(crate) fn validate(&self, path: &str) -> Result<(), ConfigError> {
        // At least 1e-6, so that the cost multiplier (1 / factor, in f32) stays finite and
        // a tiny factor does not round to 0 (which would turn throttling off).
        if !(self.throttle_factor.is_finite()
            && self.throttle_factor >= 1e-6
            && self.throttle_factor <= 1.0)
        {
            return Err(invalid(
                path,
                "throttle_factor",
                "must be between 0.000001 and 1",
            ));
        }
        if self.evaluate_min_requests > u32::from(u16::MAX) {
            return Err(invalid(
                path,
                "evaluate_min_requests",
                "must be at most 65535",
            ));
        }
        // Window counts saturate at 65,535 per window.
        if self.min_requests > u32::from(u16::MAX) {
            return Err(invalid(path, "min_requests", "must be at most 65535"));
        }
        positive_secs(path, "rate_half_life_s", self.rate_half_life_s)?;
        positive_secs(path, "window_s", self.window_s)?;
        if self.near_bits == 0 || self.near_bits > 32 {
            return Err(invalid(path, "near_bits", "must be between 1 and 32"));
        }
        self.levels.validate(&format!("{path}.levels"))?;
        self.detectors.validate(&format!("{path}.detectors"))?;
        self.propagation.validate(&format!("{path}.propagation"))?;
        self.cross.validate(&format!("{path}.cross"))
    }
}

impl LevelsPolicy {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let rules = [
            ("watch", &self.watch),
            ("throttle", &self.throttle),
            ("challenge", &self.challenge),
            ("block", &self.block),
        ];
        let mut prev_up = 0.0_f64;
        for (name, rule) in rules {
            let p = format!("{path}.{name}");
            finite_nonneg(&p, "up", rule.up)?;
            finite_nonneg(&p, "down", rule.down)?;
            if rule.up <= prev_up {
                return Err(invalid(
                    &p,
                    "up",
                    "must be greater than the level below's up (and > 0)",
                ));
            }
            if rule.down >= rule.up {
                return Err(invalid(&p, "down", "must be lower than up (hysteresis)"));
            }
            prev_up = rule.up;
        }
        if !(1..=4).contains(&self.min_evidence_classes) {
            return Err(invalid(
                path,
                "min_evidence_classes",
                "must be between 1 and 4",
            ));
        }
        if self
            .featureless_min_evidence_classes
            .is_some_and(|n| !(1..=self.min_evidence_classes).contains(&n))
        {
            return Err(invalid(
                path,
                "featureless_min_evidence_classes",
                "must be between 1 and min_evidence_classes",
            ));
        }
        if !(self.fire_strength.is_finite()
            && self.fire_strength > 0.0
            && self.fire_strength <= 1.0)
        {
            return Err(invalid(path, "fire_strength", "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// Validates the fields of one detector's policy. Each rule names its fields once, so the path
/// in an error is always the field's own name. `weight` (finite, >= 0) comes first, then the
/// rules in order: `count(f)` (at most 65,535: window counts are 16-bit), `unit(f)` (in
/// [0, 1]), `ramp(min, full)` (both finite and >= 0, full > min), `unit_ramp(min, full)` (a
/// ramp within [0, 1]) and `extreme(v, full)` (0, or above full).
macro_rules! detector {
    ($path:expr, $d:expr, $name:literal { $($rule:ident($($f:ident),+)),* $(,)? }) => {{
        let d = $d;
        let p = format!("{}.{}", $path, $name);
        finite_nonneg(&p, "weight", d.weight)?;
        $( detector!(@rule p, d, $rule($($f),+)); )*
    }};
    (@rule $p:ident, $d:ident, count($f:ident)) => {
        if $d.$f > u32::from(u16::MAX) {
            return Err(invalid(&$p, stringify!($f), "must be at most 65535"));
        }
    };
    (@rule $p:ident, $d:ident, unit($f:ident)) => {
        unit(&$p, stringify!($f), $d.$f)?
    };
    (@rule $p:ident, $d:ident, ramp($min:ident, $full:ident)) => {
        ramp(&$p, stringify!($min), $d.$min, stringify!($full), $d.$full)?
    };
    (@rule $p:ident, $d:ident, unit_ramp($min:ident, $full:ident)) => {
        unit_ramp(&$p, stringify!($min), $d.$min, stringify!($full), $d.$full)?
    };
    (@rule $p:ident, $d:ident, extreme($v:ident, $full:ident)) => {
        extreme(&$p, stringify!($v), $d.$full, $d.$v, stringify!($full))?
    };
}

impl DetectorsPolicy {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        detector!(path, &self.output_volume, "output_volume" {
            ramp(min_tokens_per_min, full_tokens_per_min),
            extreme(extreme_tokens_per_min, full_tokens_per_min),
            ramp(group_min_tokens_per_min, group_full_tokens_per_min),
            extreme(group_extreme_tokens_per_min, group_full_tokens_per_min),
            ramp(group_min_tokens_per_key, group_full_tokens_per_key),
            ramp(min_output_ratio, full_output_ratio),
            unit_ramp(min_distinct, full_distinct),
        });
        detector!(path, &self.logprob_harvest, "logprob_harvest" {
            unit_ramp(min_share, full_share),
            ramp(min_per_min, full_per_min),
            extreme(extreme_per_min, full_per_min),
            ramp(min_templates, full_templates),
            ramp(min_recent_families, full_recent_families),
        });
        detector!(path, &self.template_sweep, "template_sweep" {
            unit_ramp(min_share, full_share),
            unit_ramp(min_distinct, full_distinct),
            unit(org_weight),
            ramp(org_min_ratio, org_full_ratio),
        });
        detector!(path, &self.prompt_diversity, "prompt_diversity" {
            ramp(min_templates, full_templates),
            ramp(min_recent_families, full_recent_families),
            unit_ramp(min_distinct, full_distinct),
        });
        detector!(path, &self.ip_spread, "ip_spread" {
            ramp(min_clusters, full_clusters),
            unit(full_share),
        });
        detector!(path, &self.template_spread, "template_spread" {
            count(min_subject_requests),
            ramp(min_orgs, full_orgs),
            ramp(min_tokens_per_min, full_tokens_per_min),
            ramp(min_tokens_per_org, full_tokens_per_org),
            unit(min_subject_share),
        });
        detector!(path, &self.key_fanout, "key_fanout" {
            ramp(org_min_keys, org_full_keys),
            ramp(cluster_min_keys, cluster_full_keys),
        });
        detector!(path, &self.key_churn, "key_churn" {
            ramp(min_new_keys, full_new_keys),
        });
        detector!(path, &self.regular_timing, "regular_timing" {
            ramp(full_cv, max_cv),
        });
        detector!(path, &self.pinned, "pinned" {
            unit(pressure),
            unit_ramp(min_share, full_share),
        });
        Ok(())
    }
}

impl PropagationPolicy {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        finite_nonneg(path, "weight", self.weight)?;
        positive_secs(path, "window_s", self.window_s)?;
        unit(path, "min_share", self.min_share)?;
        for (name, rule) in [("org", &self.org), ("ip_cluster", &self.ip_cluster)] {
            let p = format!("{path}.{name}");
            let tiers = [
                ("throttle_at", rule.throttle_at),
                ("challenge_at", rule.challenge_at),
                ("block_at", rule.block_at),
            ];
            let mut lowest = 0_u32;
            for (field, at) in tiers {
                if at == 0 {
                    continue;
                }
                if at < lowest {
                    return Err(invalid(
                        &p,
                        field,
                        "must not be lower than a lower level's count",
                    ));
                }
                lowest = at;
            }
        }
        Ok(())
    }
}

impl CrossPolicy {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if self.capacity == 0 {
            return Err(ConfigError::Zero {
                path: format!("{path}.capacity"),
            });
        }
        if self.capacity > 1 << 24 {
            return Err(invalid(path, "capacity", "must be at most 16777216"));
        }
        positive_secs(path, "stale_after_s", self.stale_after_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        BehaviorPolicy::default().validate("behavior").unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut p = BehaviorPolicy::default();
        p.detectors.template_spread.full_orgs = 2.0;
        let err = p.validate("behavior").unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid { ref path, .. } if path == "behavior.detectors.template_spread.full_orgs"
            ),
            "{err:?}"
        );

        let p = BehaviorPolicy {
            window_s: 0,
            ..BehaviorPolicy::default()
        };
        assert_eq!(
            p.validate("behavior").unwrap_err(),
            ConfigError::Zero {
                path: "behavior.window_s".into()
            }
        );

        // Counts above 65535 cannot be reached (they are u16 in the state).
        type Set = fn(&mut BehaviorPolicy);
        let too_big: [(&str, Set); 3] = [
            ("behavior.evaluate_min_requests", |p| {
                p.evaluate_min_requests = 70_000
            }),
            ("behavior.min_requests", |p| p.min_requests = 70_000),
            (
                "behavior.detectors.template_spread.min_subject_requests",
                |p| p.detectors.template_spread.min_subject_requests = 70_000,
            ),
        ];
        for (field, set) in too_big {
            let mut p = BehaviorPolicy::default();
            set(&mut p);
            assert!(matches!(
                p.validate("behavior").unwrap_err(),
                ConfigError::Invalid { ref path, .. } if path == field
            ));
        }
        // An old config with a long evaluate_every_ms and no evaluate_max_ms stays valid.
        let p = BehaviorPolicy {
            evaluate_every_ms: 60_000,
            ..BehaviorPolicy::default()
        };
        p.validate("behavior").unwrap();

        // The featureless gate asks for 1 to min_evidence_classes classes.
        for bad in [0, 3] {
            let mut p = BehaviorPolicy::default();
            p.levels.featureless_min_evidence_classes = Some(bad);
            let err = p.validate("b").unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { ref path, .. } if path == "b.levels.featureless_min_evidence_classes"),
                "{bad}: {err:?}"
            );
        }

        let mut p = BehaviorPolicy::default();
        p.levels.challenge.up = 1.0;
        let err = p.validate("b").unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { ref path, .. } if path == "b.levels.challenge.up")
        );

        let mut p = BehaviorPolicy::default();
        p.levels.throttle.down = 2.0;
        let err = p.validate("b").unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { ref path, .. } if path == "b.levels.throttle.down")
        );

        let mut p = BehaviorPolicy::default();
        p.propagation.org.challenge_at = 2;
        let err = p.validate("b").unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { ref path, .. } if path == "b.propagation.org.challenge_at")
        );

        let mut p = BehaviorPolicy::default();
        p.detectors.pinned.min_share = f64::NAN;
        let err = p.validate("b").unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { ref path, .. } if path == "b.detectors.pinned.min_share")
        );

        // One broken field per kind of rule, in several detectors, the org context of
        // `template_sweep` (a weight in [0, 1] and an increasing ramp), and a weight that is
        // infinite as an f32 (it made every score NaN): each error names its field.
        let rules: [(&str, Set); 9] = [
            ("b.detectors.template_sweep.org_weight", |p| {
                p.detectors.template_sweep.org_weight = 1.5
            }),
            ("b.detectors.template_sweep.org_full_ratio", |p| {
                p.detectors.template_sweep.org_full_ratio = 0.5
            }),
            ("b.detectors.template_sweep.org_min_ratio", |p| {
                p.detectors.template_sweep.org_min_ratio = f64::INFINITY
            }),
            ("b.detectors.pinned.weight", |p| {
                p.detectors.pinned.weight = 1e39
            }),
            ("b.detectors.output_volume.extreme_tokens_per_min", |p| {
                p.detectors.output_volume.extreme_tokens_per_min = 1.0
            }),
            ("b.detectors.logprob_harvest.full_templates", |p| {
                p.detectors.logprob_harvest.full_templates = 0.0
            }),
            ("b.detectors.key_churn.full_new_keys", |p| {
                p.detectors.key_churn.full_new_keys = p.detectors.key_churn.min_new_keys
            }),
            ("b.detectors.regular_timing.weight", |p| {
                p.detectors.regular_timing.weight = -1.0
            }),
            ("b.detectors.prompt_diversity.min_distinct", |p| {
                p.detectors.prompt_diversity.min_distinct = 2.0
            }),
        ];
        for (field, set) in rules {
            let mut p = BehaviorPolicy::default();
            set(&mut p);
            let err = p.validate("b").unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { ref path, .. } if path == field),
                "{field}: {err:?}"
            );
        }

        let mut p = BehaviorPolicy::default();
        p.detectors.ip_spread.full_share = 1.5;
        let err = p.validate("b").unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { ref path, .. } if path == "b.detectors.ip_spread.full_share")
        );

        // Factors that break in f32 (0, rounding to 0, or an infinite multiplier) are out.
        for factor in [0.0, 1e-50, 1e-40, 1e-7, 1.5] {
            let p = BehaviorPolicy {
                throttle_factor: factor,
                ..BehaviorPolicy::default()
            };
            assert!(p.validate("b").is_err(), "{factor}");
        }
        let p = BehaviorPolicy {
            throttle_factor: 1e-6,
            ..BehaviorPolicy::default()
        };
        p.validate("b").unwrap();
    }

    #[test]
    fn serde_partial_and_unknown_fields() {
        let p: BehaviorPolicy = serde_json::from_str(
            r#"{"shadow":true,"detectors":{"template_spread":{"min_orgs":6}}}"#,
        )
        .unwrap();
        assert!(p.shadow);
        assert_eq!(p.detectors.template_spread.min_orgs, 6.0);
        assert_eq!(p.detectors.template_spread.full_orgs, 16.0);
        assert_eq!(p.levels, LevelsPolicy::default());

        let err = serde_json::from_str::<BehaviorPolicy>(r#"{"shadoww":true}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err =
            serde_json::from_str::<BehaviorPolicy>(r#"{"detectors":{"pinned":{"pressur":0.5}}}"#)
                .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");

        let back: BehaviorPolicy =
            serde_json::from_str(&serde_json::to_string(&BehaviorPolicy::default()).unwrap())
                .unwrap();
        assert_eq!(back, BehaviorPolicy::default());
    }
}
