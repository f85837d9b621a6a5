//! Per-subject signals: exponentially decayed counters, EWMAs and tiny distinct-count
//! sketches, updated in O(1) without allocation on every observed request.
//!
//! | signal | state |
//! |---|---|
//! | request, output-token and logprob rates; logprob share | decayed sums |
//! | time pinned near a limit (`pressure`, `denied_by_limit`) | decayed sum of pinned requests |
//! | output/input ratio | EWMAs of input and (settled) output tokens |
//! | distinct-prompt ratio | 2 × 256-bit bitmap of prompt fingerprints + counts |
//! | distinct templates; dominant template and its share | 2 × 64-bit bitmap; one-counter Misra–Gries |
//! | prompt family: majority SimHash (the *centroid*) of recent prompts | 3 × 64-bit bit-sliced saturating counters |
//! | family share (prompts within `near_bits` of the centroid) | decayed sums |
//! | prompt breadth without templates | ring of the last 8 SimHashes, clustered at evaluation |
//! | key: distinct IP clusters; org/cluster: distinct keys, new keys and stable keys | 2 × 128-bit bitmap |
//! | key: inter-arrival regularity (coefficient of variation) | EW Welford mean and variance |
//! | org/cluster: keys sending at once (distinct keys per block of 16 requests) | 32-bit bitmap, request count and smoothed count, in the bytes of a key's timing state |
//! | escalated child keys (propagation), org and cluster only | 2 × 2 × 64-bit bitmaps, boxed on the first one |
//!
//! # Why hand-written sketches
//!
//! A subject's whole state must fit in 512 bytes in one fixed-size allocation (no growth, and
//! for a key no further pointer chase), forget old behaviour, and cost a few nanoseconds per
//! request. Sketch
//! crates are built for the opposite trade-off: HyperLogLog implementations allocate kilobytes
//! of registers, count forever (no decay or windowing), hash internally with their own hasher,
//! and are generic over more than we need. What we need is small counts (tens to a few
//! thousand distinct items per window) with a few percent error, where **linear counting**
//! on a fixed bitmap is the best estimator there is for its size: 32 bytes count distinct
//! prompts up to about 1,000 within 10% (the prompt window closes early after 384 of them),
//! 8 bytes count templates or escalated children up to ~100. Decay comes from two bitmaps per sketch (current and previous window, rotated by
//! time), so counts cover the last one to two windows. Rates use exponentially decayed sums
//! that are folded at most once per second (one `exp2` per second per subject instead of per
//! request; the error of adding up to one second "late" is below 0.6% at a two-minute
//! half-life). Inter-arrival regularity uses an exponentially weighted Welford variance.
//! Bit positions come from the caller's 64-bit hashes mixed with a per-process secret seed,
//! so clients cannot craft fingerprints that collide on purpose.
//!
//! # The prompt family: a majority-vote SimHash
//!
//! A SimHash is the sign of a sum of feature hashes, so the SimHashes of prompts filled into
//! one template (or into several variants of one template) scatter by a few bits around the
//! template's own SimHash. The bitwise majority of a subject's recent SimHashes recovers that
//! centre: each bit is a 3-bit saturating up/down counter (0–7, the centroid bit is set at 4
//! or more), kept bit-sliced in three words, so one update is a dozen word operations for all
//! 64 bits. Two keys harvesting the same family converge on (nearly) the same centroid, however
//! many template variants and fillings they use, which is what lets the [`CrossIndex`] link
//! them (see `cross.rs`). A bit that one template variant in three flips is wrong about 6% of
//! the time, so centroids of one family agree on most 16-bit bands.
//!
//! [`CrossIndex`]: super::CrossIndex
//!
//! Everything saturates: counters are `f32` (no overflow), counts `saturating_add`, and a
//! clock that goes backwards gives zero elapsed time and re-anchors the reference times, so
//! nothing stalls until it catches up.

use super::{BehaviorParams, Families, Observation};
use crate::subject::SubjectKind;

/// Decayed counters are folded (multiplied by their decay) at most this often.
pub(crate) const FOLD_NS: u64 = 1_000_000_000;

/// Prompt sketch width in 64-bit words (256 bits per window).
const PROMPT_WORDS: usize = 4;

/// Prompt sketch rotates early after this many inserts in its window, so that its bitmap never
/// saturates (256 bits count up to ~500 items within a few percent).
const PROMPT_FILL: u16 = 384;

/// Above this estimate the union of the two 256-bit prompt windows is too full to count
/// (under 7% zero bits); the two windows are then counted apart and added.
const PROMPT_UNION_MAX: f32 = 700.0;

/// EWMA weights. Tokens: 1/32, so that the output/input ratio of a service whose token counts
/// are lognormal (sigma 0.7–0.9) wanders by about ±15% rather than ±35% (at 1/8), while a
/// change of behaviour shows within a few dozen requests.
const A_TOKENS: f32 = 1.0 / 32.0;
const A_GAP: f32 = 1.0 / 16.0;
/// Weight of one evaluation in the smoothed SimHash breadth.
const A_BREADTH: f32 = 1.0 / 4.0;
/// Recent SimHashes kept for the breadth read-out.
const RECENT: usize = 8;

/// Inter-arrival gaps needed before the coefficient of variation is reported.
const MIN_GAPS: u16 = 12;

const SALT_PROMPT: u64 = 0x243F_6A88_85A3_08D3;
const SALT_TEMPLATE: u64 = 0x1319_8A2E_0370_7344;
const SALT_PEER: u64 = 0xA409_3822_299F_31D0;
const SALT_CHILD: u64 = 0x082E_FA98_EC4E_6C89;

/// `Signals::org_shape` holds a value in `[0, 1]` in steps of 1/`ORG_SHAPE_SCALE`.
const ORG_SHAPE_SCALE: f32 = 254.0;
/// `Signals::org_shape` when there is no org shape to apply.
pub(crate) const ORG_SHAPE_NONE: u8 = u8::MAX;

/// An org shape (see `detect::org_shape`) as stored in `Signals::org_shape`: `None` and NaN
/// give `ORG_SHAPE_NONE`.
pub(crate) fn quantize_shape(h: Option<f32>) -> u8 {
    match h {
        Some(h) if !h.is_nan() => (h.clamp(0.0, 1.0) * ORG_SHAPE_SCALE).round() as u8,
        _ => ORG_SHAPE_NONE,
    }
}
const F_ARRIVAL: u8 = 1;
const F_SIMHASH: u8 = 2;
const F_INPUT: u8 = 4;
const F_SETTLED: u8 = 8;
const F_BREADTH: u8 = 16;
/// `recent` holds `RECENT` SimHashes.
const F_RING_FULL: u8 = 32;
/// The subject was evaluated since it last asked for a prompt evaluation (see
/// `SubjectBehavior::evaluate`).
const F_EVALUATED: u8 = 64;

/// Mixes a secret seed (and salt) into a 64-bit hash with a full-avalanche finaliser, so that
/// even structured inputs spread like random ones (which linear counting assumes).
#[inline]
pub(crate) fn mix(h: u64, seed: u64) -> u64 {
    let mut x = h ^ seed;
    x ^= x >> 32;
    x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^= x >> 32;
    x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^ (x >> 32)
}

/// The factor by which a decayed counter shrinks over `dt_ns`.
#[inline]
pub(crate) fn decay(dt_ns: u64, inv_half_life_ns: f64) -> f32 {
    if dt_ns == 0 {
        return 1.0;
    }
    let halvings = dt_ns as f64 * inv_half_life_ns;
    if halvings >= 64.0 {
        0.0
    } else {
        (-halvings).exp2() as f32
    }
}

/// `u64` to `f32` through `i64`, which is one instruction on x86-64 (a direct `u64` cast is a
/// branchy sequence); values above `i64::MAX` saturate there.
#[inline]
pub(crate) fn to_f32(v: u64) -> f32 {
    v.min(i64::MAX as u64) as i64 as f32
}

/// Linear counting: the number of distinct items that set `ones` of `bits` bits.
pub(crate) fn linear_count(ones: u32, bits: u32) -> f32 {
    let m = bits as f32;
    let zeros = m - ones as f32;
    if zeros < 1.0 {
        m * m.ln()
    } else {
        m * (m / zeros).ln()
    }
}

/// One majority vote: every bit-sliced 3-bit counter of `c` moves one step towards the bit of
/// `sim` (up where it is set, down where it is clear), saturating at 0 and 7.
#[inline]
pub(crate) fn vote(c: [u64; 3], sim: u64) -> [u64; 3] {
    let [mut c0, mut c1, mut c2] = c;
    let up = sim & !(c0 & c1 & c2);
    let down = !sim & (c0 | c1 | c2);
    // Increment where `up`: ripple the carry.
    let carry1 = c0 & up;
    c0 ^= up;
    let carry2 = c1 & carry1;
    c1 ^= carry1;
    c2 ^= carry2;
    // Decrement where `down` (disjoint from `up`): ripple the borrow.
    let borrow1 = !c0 & down;
    c0 ^= down;
    let borrow2 = !c1 & borrow1;
    c1 ^= borrow1;
    c2 ^= borrow2;
    [c0, c1, c2]
}

/// A bitmap of `64 * W` bits for linear counting; `W` is a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bitmap<const W: usize>([u64; W]);

impl<const W: usize> Bitmap<W> {
    const MASK: usize = {
        assert!(W.is_power_of_two());
        64 * W - 1
    };
    pub(crate) const ZERO: Self = Self([0; W]);

    /// Sets the item's bit; returns whether it was clear.
    #[inline]
    pub(crate) fn insert(&mut self, mixed: u64) -> bool {
        let idx = (mixed >> 40) as usize & Self::MASK;
        let word = &mut self.0[idx >> 6];
        let bit = 1 << (idx & 63);
        let was_clear = *word & bit == 0;
        *word |= bit;
        was_clear
    }

    /// Whether the item's bit is set: the item may have been inserted (false positives at
    /// the bitmap's density), or certainly was not.
    #[inline]
    pub(crate) fn contains(&self, mixed: u64) -> bool {
        let idx = (mixed >> 40) as usize & Self::MASK;
        self.0[idx >> 6] & (1 << (idx & 63)) != 0
    }

    pub(crate) fn ones(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    pub(crate) fn or(&self, other: &Self) -> Self {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(other.0.iter()) {
            *a |= *b;
        }
        out
    }

    pub(crate) fn estimate(&self) -> f32 {
        linear_count(self.ones(), 64 * W as u32)
    }
}

/// A bitmap sketch over the current and the previous window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Windowed<const W: usize> {
    cur: Bitmap<W>,
    prev: Bitmap<W>,
}

impl<const W: usize> Windowed<W> {
    pub(crate) const ZERO: Self = Self {
        cur: Bitmap::ZERO,
        prev: Bitmap::ZERO,
    };

    /// Adds an item to the current window; returns whether its bit was clear there.
    #[inline]
    pub(crate) fn insert(&mut self, mixed: u64) -> bool {
        self.cur.insert(mixed)
    }

    /// Moves `windows` windows on.
    pub(crate) fn rotate(&mut self, windows: u64) {
        match windows {
            0 => {}
            1 => {
                self.prev = self.cur;
                self.cur = Bitmap::ZERO;
            }
            _ => *self = Self::ZERO,
        }
    }

    /// Distinct items over both windows.
    pub(crate) fn distinct(&self) -> f32 {
        self.cur.or(&self.prev).estimate()
    }

    /// Whether the union of both windows has at most one bit in 16 clear: linear counting
    /// then no longer tells a few hundred items from many more, nor old ones from new.
    pub(crate) fn saturated(&self) -> bool {
        self.cur.or(&self.prev).ones() * 16 >= 15 * 64 * W as u32
    }

    /// Distinct items of the current window that were not in the previous one (as
    /// `Signals::view` computes `fresh_peers` from the estimates it reads once).
    #[cfg(test)]
    pub(crate) fn fresh(&self) -> f32 {
        (self.distinct() - self.prev.estimate()).max(0.0)
    }

    pub(crate) fn cur_estimate(&self) -> f32 {
        self.cur.estimate()
    }

    pub(crate) fn prev_estimate(&self) -> f32 {
        self.prev.estimate()
    }

    /// Whether the item may have been in the previous window (see [`Bitmap::contains`]).
    #[inline]
    pub(crate) fn in_prev(&self, mixed: u64) -> bool {
        self.prev.contains(mixed)
    }
}

/// Moves a window start on; returns how many whole windows passed (0 if none or if the clock
/// went backwards).
#[inline]
fn windows_passed(start_ns: &mut u64, now_ns: u64, window_ns: u64) -> u64 {
    let elapsed = now_ns.saturating_sub(*start_ns);
    if elapsed < window_ns {
        return 0;
    }
    let n = elapsed / window_ns;
    *start_ns = start_ns.saturating_add(n.saturating_mul(window_ns));
    n
}

/// Requests per block of a group's key count (see `SignalView::streams`).
const BLOCK: u16 = 16;
/// A group's `gaps` packs the current block's position (bits 0–4), the block's requests
/// from keys not in the previous window (bits 5–9), and their share over recent blocks,
/// smoothed, in 6-bit fixed point (bits 10–15, 63 = all).
const BLOCK_POS_MASK: u16 = 0x1F;
const BLOCK_FRESH_SHIFT: u16 = 5;
const FRESH_SHARE_SHIFT: u16 = 10;
const FRESH_SHARE_ONE: u16 = 63;
/// Smoothing of the per-block key count over blocks.
const A_BLOCK: f32 = 0.25;

/// The number of keys `k` sending side by side, evenly and in any order, whose blocks of
/// `BLOCK` requests hold `d` distinct keys on average: the root of
/// `k · (1 − (1 − 1/k)^BLOCK) = d`, found by bisection (the left side grows with `k`, from
/// 1 at `k = 1` towards `BLOCK`). Capped at 1,000 (as many as `d` close to `BLOCK` says).
pub(crate) fn keys_for_block_distinct(d: f32) -> f32 {
    let n = i32::from(BLOCK);
    let seen = |k: f32| k * (1.0 - (1.0 - 1.0 / k).powi(n));
    let (mut lo, mut hi) = (1.0_f32, 1000.0_f32);
    if d <= seen(lo) {
        return 1.0;
    }
    if d.is_nan() || d >= seen(hi) {
        return hi;
    }
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if seen(mid) < d {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Rotates a pair of per-window counts.
fn rotate_counts(counts: &mut [u16; 2], windows: u64) {
    match windows {
        0 => {}
        1 => *counts = [0, counts[0]],
        _ => *counts = [0, 0],
    }
}

/// Escalated child keys of an org or cluster (propagation). Boxed on the first one: keys
/// never have children, and most groups never see one escalate.
#[derive(Clone, Debug, PartialEq)]
struct Kids {
    win_ns: u64,
    enforced: Windowed<1>,
    reported: Windowed<1>,
}

impl Kids {
    /// Rotates the windows when due (a clock that went backwards re-anchors the window).
    fn advance(&mut self, now_ns: u64, window_ns: u64) {
        self.win_ns = self.win_ns.min(now_ns);
        let n = windows_passed(&mut self.win_ns, now_ns, window_ns);
        self.enforced.rotate(n);
        self.reported.rotate(n);
    }
}

/// The per-subject signal state (most of `SubjectBehavior::SIZE`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Signals {
    fold_ns: u64,
    win_ns: u64,
    prompt_win_ns: u64,
    last_ns: u64,
    top_template: u64,
    /// Bit-sliced 3-bit saturating counters of the SimHash bits (`cen[k]` holds bit `k` of
    /// every counter); the centroid is `cen[2]`.
    cen: [u64; 3],
    /// The last `RECENT` prompt SimHashes, a ring.
    recent: [u64; RECENT],

    // Exponentially decayed sums, as of `fold_ns`.
    reqs: f32,
    logprobs: f32,
    out: f32,
    pinned: f32,
    template_reqs: f32,
    top_hits: f32,
    top_weight: f32,
    /// Requests with a SimHash, and those within `near_bits` of the centroid.
    sim_reqs: f32,
    near: f32,

    // EWMAs.
    ewma_out: f32,
    ewma_in: f32,
    /// Key: the mean inter-arrival gap (s), exponentially weighted. Org and cluster: the
    /// distinct keys per block of `BLOCK` requests, smoothed over blocks (0 before the first
    /// block; see `SignalView::streams`). Groups have no timing detector and keys no block
    /// count, so the two share these bytes and `block`/`gaps`.
    timing: f32,
    /// Key: the exponentially weighted variance of the gaps, as `f32` bits. Org and
    /// cluster: the 32-bit bitmap of the current block's keys.
    block: u32,
    /// Smoothed number of distinct SimHash clusters among the recent prompts.
    breadth: f32,

    /// Requests in the current and previous window (saturating; the thresholds it is compared
    /// with are validated to at most 65,535).
    win_reqs: [u16; 2],
    /// Prompt fingerprints inserted in the current and previous prompt window (at most
    /// `PROMPT_FILL` each).
    prompt_n: [u16; 2],
    /// Key: inter-arrival gaps seen (saturating). Org and cluster: the current block's
    /// position and its requests from keys not in the previous window, and their smoothed
    /// share (see `BLOCK_POS_MASK`).
    gaps: u16,
    /// Requests observed since the subject's last evaluation (saturating). It and
    /// `F_EVALUATED` are the evaluation cadence's bookkeeping, kept here so that they share
    /// this struct's small fields (see `SubjectBehavior::SIZE`).
    since_eval: u16,
    flags: u8,
    /// The next slot of `recent` to write.
    recent_head: u8,
    /// Key: how much its org as a whole looks like harvesting, as the key last saw it. Org:
    /// its own, as published at its last evaluation. See `quantize_shape`.
    org_shape: u8,
    kind: SubjectKind,

    prompts: Windowed<PROMPT_WORDS>,
    templates: Windowed<1>,
    /// Key: IP clusters. Org and cluster: keys.
    peers: Windowed<2>,
    /// Org and cluster, once a child key escalated.
    kids: Option<Box<Kids>>,
}

/// A read-out of the signals at one instant, in natural units.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct SignalView {
    /// Requests per minute (decayed).
    pub(crate) req_per_min: f32,
    /// Output tokens per minute (decayed; each request counts the subject's mean output).
    pub(crate) out_per_min: f32,
    /// Logprob requests per minute.
    pub(crate) logprob_per_min: f32,
    /// Share of requests asking for logprobs.
    pub(crate) logprob_share: f32,
    /// Share of requests made at or near a limit.
    pub(crate) pinned_share: f32,
    /// Mean output tokens over mean input tokens.
    pub(crate) out_in_ratio: f32,
    /// Requests in the current and previous window.
    pub(crate) window_requests: u32,
    /// Requests in the previous window.
    pub(crate) prev_window_requests: u32,
    /// Distinct prompts / prompts, over the prompt windows (None: too few fingerprints).
    pub(crate) distinct_ratio: Option<f32>,
    /// Distinct prompts over the prompt windows.
    pub(crate) distinct_prompts: f32,
    /// Distinct templates over the windows.
    pub(crate) templates: f32,
    /// Share of requests that carry a template fingerprint.
    pub(crate) template_share: f32,
    /// The larger of the shares of requests that carry a SimHash and a template
    /// fingerprint: below `detect::FEATURELESS_SHARE`, coverage cannot be observed.
    pub(crate) feature_share: f32,
    /// Families to look up in the cross index: the four bands of the SimHash centroid, and
    /// the dominant template when most requests carry one.
    pub(crate) probe: Families,
    /// Share of all the subject's requests within `near_bits` of its SimHash centroid.
    pub(crate) family_share: f32,
    /// Share of all the subject's requests with its dominant template (0 unless most
    /// requests carry a template).
    pub(crate) template_family_share: f32,
    /// Concentration on one family: the larger of the dominant template's share of
    /// templated requests (when most requests carry a template) and the share of prompts
    /// within `near_bits` of the SimHash centroid.
    pub(crate) concentration: f32,
    /// Distinct SimHash clusters among the last 8 prompts, smoothed over evaluations.
    pub(crate) recent_families: Option<f32>,
    /// Key: distinct IP clusters. Org and cluster: distinct keys.
    pub(crate) peers: f32,
    /// Peers of the current window that were not in the previous one.
    pub(crate) fresh_peers: f32,
    /// Peers of the current window.
    pub(crate) window_peers: f32,
    /// Too many peers to count (about 350 or more over the windows; see
    /// `Windowed::saturated`): `peers`, `window_peers` and `persistent_peers` are then lower
    /// bounds at best.
    pub(crate) peers_saturated: bool,
    /// Peers of the current window that were also in the previous one (while the previous
    /// window is empty, as in a subject's first window, all of them): a group's stable keys.
    pub(crate) persistent_peers: f32,
    /// Org and cluster: distinct keys per block of 16 requests, smoothed over blocks (0 for
    /// keys and before a group's first block); see [`streams`](Self::streams).
    pub(crate) block_keys: f32,
    /// Org and cluster: the share of recent requests (smoothed over blocks of 16) whose key
    /// was not in the previous window's sketch (0 for keys and before the first block). A
    /// campaign that replaces its keys sends nearly all its requests from new keys; a group
    /// with one busy stable key and many occasional ones does not.
    pub(crate) fresh_request_share: f32,
    /// Coefficient of variation of inter-arrival times.
    pub(crate) cv: Option<f32>,
    /// Key: how much its org as a whole looks like harvesting, in `[0, 1]`, when the org has
    /// at least two active keys (see `detect::org_shape`).
    pub(crate) org_shape: Option<f32>,
    /// Distinct escalated children (enforced).
    pub(crate) kids_enforced: f32,
    /// Distinct escalated children (reported, shadow included).
    pub(crate) kids_reported: f32,
}

impl SignalView {
    /// Org and cluster: the number of keys sending at once, read from `block_keys` as `k`
    /// keys sending evenly in any order would give them (`keys_for_block_distinct`), in
    /// `[1, peers]`: about 1 for one key at a time, however often it is replaced; 2 for two
    /// keys that alternate. Blocks see up to about a dozen keys, so it tells "few" from
    /// "many" rather than counting many. 1 before a group's first block (and for keys).
    pub(crate) fn streams(&self) -> f32 {
        if self.block_keys > 0.0 {
            keys_for_block_distinct(self.block_keys).clamp(1.0, self.peers.max(1.0))
        } else {
            1.0
        }
    }
}

impl Signals {
    pub(crate) const fn new(kind: SubjectKind, now_ns: u64) -> Self {
        Self {
            fold_ns: now_ns,
            win_ns: now_ns,
            prompt_win_ns: now_ns,
            last_ns: now_ns,
            top_template: 0,
            cen: [0; 3],
            recent: [0; RECENT],
            reqs: 0.0,
            logprobs: 0.0,
            out: 0.0,
            pinned: 0.0,
            template_reqs: 0.0,
            top_hits: 0.0,
            top_weight: 0.0,
            sim_reqs: 0.0,
            near: 0.0,
            ewma_out: 0.0,
            ewma_in: 0.0,
            timing: 0.0,
            block: 0,
            breadth: 0.0,
            win_reqs: [0; 2],
            prompt_n: [0; 2],
            gaps: 0,
            since_eval: 0,
            flags: 0,
            recent_head: 0,
            org_shape: ORG_SHAPE_NONE,
            kind,
            prompts: Windowed::ZERO,
            templates: Windowed::ZERO,
            peers: Windowed::ZERO,
            kids: None,
        }
    }

    #[cfg(test)]
    /// Time of the last observed request (as the clock read then, even if it went backwards).
    pub(crate) const fn last_ns(&self) -> u64 {
        self.last_ns
    }

    /// The subject's kind.
    #[inline]
    pub(crate) const fn kind(&self) -> SubjectKind {
        self.kind
    }

    /// Key: the org shape its org last published, as recorded by
    /// [`set_org_shape`](Self::set_org_shape). Org: the shape it publishes. See
    /// `quantize_shape`.
    #[inline]
    pub(crate) const fn org_shape(&self) -> u8 {
        self.org_shape
    }

    /// See [`org_shape`](Self::org_shape).
    #[inline]
    pub(crate) fn set_org_shape(&mut self, q: u8) {
        self.org_shape = q;
    }

    /// Requests observed since the last [`evaluated`](Self::evaluated) call (saturating).
    #[inline]
    pub(crate) const fn since_eval(&self) -> u16 {
        self.since_eval
    }

    /// Whether the subject was evaluated since it last asked for a prompt evaluation.
    #[inline]
    pub(crate) const fn is_evaluated(&self) -> bool {
        self.flags & F_EVALUATED != 0
    }

    /// Records an evaluation (`true`: resets the request count) or asks for a prompt one
    /// (`false`).
    #[inline]
    pub(crate) fn evaluated(&mut self, done: bool) {
        if done {
            self.flags |= F_EVALUATED;
            self.since_eval = 0;
        } else {
            self.flags &= !F_EVALUATED;
        }
    }

    /// Folds decayed counters and rotates windows when due. O(1); four compares when not due.
    #[inline]
    pub(crate) fn advance(&mut self, now_ns: u64, p: &BehaviorParams) {
        if now_ns < self.fold_ns
            || now_ns - self.fold_ns >= FOLD_NS
            || now_ns.saturating_sub(self.win_ns) >= p.window_ns
            || now_ns.saturating_sub(self.prompt_win_ns) >= p.window_ns
        {
            self.housekeep(now_ns, p);
        }
    }

    #[cold]
    fn housekeep(&mut self, now_ns: u64, p: &BehaviorParams) {
        if now_ns < self.fold_ns {
            // The clock went backwards: no time passed; re-anchor every reference time that
            // is now in the future, so that nothing stalls until the clock catches up.
            self.fold_ns = now_ns;
            self.win_ns = self.win_ns.min(now_ns);
            self.prompt_win_ns = self.prompt_win_ns.min(now_ns);
        }
        if now_ns >= self.fold_ns.saturating_add(FOLD_NS) {
            let f = decay(now_ns - self.fold_ns, p.inv_half_life_ns);
            self.scale(f);
            self.fold_ns = now_ns;
        }
        let n = windows_passed(&mut self.win_ns, now_ns, p.window_ns);
        self.templates.rotate(n);
        self.peers.rotate(n);
        rotate_counts(&mut self.win_reqs, n);
        let n = windows_passed(&mut self.prompt_win_ns, now_ns, p.window_ns);
        self.prompts.rotate(n);
        rotate_counts(&mut self.prompt_n, n);
    }

    fn scale(&mut self, f: f32) {
        self.reqs *= f;
        self.logprobs *= f;
        self.out *= f;
        self.pinned *= f;
        self.template_reqs *= f;
        self.top_hits *= f;
        self.top_weight *= f;
        self.sim_reqs *= f;
        self.near *= f;
    }

    /// Records one request. O(1), no allocation.
    #[inline]
    /// `pinned_counts: false` leaves the request out of the pinned share (see
    /// `SubjectBehavior::observe`).
    pub(crate) fn observe(&mut self, obs: &Observation, pinned_counts: bool, p: &BehaviorParams) {
        let now = obs.now_ns;
        self.advance(now, p);

        self.reqs += 1.0;
        self.win_reqs[0] = self.win_reqs[0].saturating_add(1);
        self.since_eval = self.since_eval.saturating_add(1);
        if obs.logprobs {
            self.logprobs += 1.0;
        }
        if pinned_counts && (obs.denied_by_limit || obs.pressure >= p.pinned_pressure) {
            self.pinned += 1.0;
        }

        // Output: every request, served or not, counts the subject's mean output so far, so
        // that a subject that keeps asking after being denied keeps its volume evidence. The
        // host's estimate seeds the mean until the first settle.
        if self.flags & F_SETTLED == 0 && obs.expected_output_tokens > 0 {
            self.ewma_out = to_f32(obs.expected_output_tokens);
        }
        self.out += self.ewma_out;
        let input = to_f32(obs.input_tokens);
        if self.flags & F_INPUT == 0 {
            self.ewma_in = input;
            self.flags |= F_INPUT;
        } else {
            self.ewma_in += (input - self.ewma_in) * A_TOKENS;
        }

        let peer = match self.kind {
            SubjectKind::ApiKey => obs.cluster_hash,
            SubjectKind::Org | SubjectKind::IpCluster => obs.key_hash,
        };
        let peer = mix(peer, p.seed ^ SALT_PEER);
        if self.kind != SubjectKind::ApiKey {
            // Distinct keys per block of requests, and the share of requests from keys not
            // seen in the previous window (groups have no timing detector; see the fields'
            // docs and `BLOCK_POS_MASK`).
            let first = self.timing == 0.0;
            self.block |= 1 << (peer >> 59);
            let pos = (self.gaps & BLOCK_POS_MASK) + 1;
            let fresh = ((self.gaps >> BLOCK_FRESH_SHIFT) & BLOCK_POS_MASK)
                + u16::from(!self.peers.in_prev(peer));
            let mut share = self.gaps >> FRESH_SHARE_SHIFT;
            if pos >= BLOCK {
                let d = linear_count(self.block.count_ones(), 32);
                self.timing = if first {
                    d
                } else {
                    self.timing + (d - self.timing) * A_BLOCK
                };
                let target = fresh * FRESH_SHARE_ONE / BLOCK;
                share = if first {
                    target
                } else {
                    // A quarter of the way, as `A_BLOCK` (integer steps stop within 3/63).
                    let step = (i32::from(target) - i32::from(share)) / 4;
                    (i32::from(share) + step).clamp(0, i32::from(FRESH_SHARE_ONE)) as u16
                };
                self.block = 0;
                self.gaps = share << FRESH_SHARE_SHIFT;
            } else {
                self.gaps = pos | fresh << BLOCK_FRESH_SHIFT | share << FRESH_SHARE_SHIFT;
            }
        } else if self.flags & F_ARRIVAL != 0 {
            // Inter-arrival regularity: exponentially weighted Welford (`timing` is the mean,
            // `block` the variance's bits).
            let gap = to_f32(now.saturating_sub(self.last_ns)) * 1e-9;
            if self.gaps == 0 {
                self.timing = gap;
                self.block = 0.0_f32.to_bits();
            } else {
                let diff = gap - self.timing;
                let incr = A_GAP * diff;
                self.timing += incr;
                let var = f32::from_bits(self.block);
                self.block = ((1.0 - A_GAP) * (var + diff * incr)).to_bits();
            }
            self.gaps = self.gaps.saturating_add(1);
        }
        self.flags |= F_ARRIVAL;
        self.last_ns = now;

        if let Some(sim) = obs.prompt_simhash {
            if self.flags & F_SIMHASH == 0 {
                // Counters start at the middle (3 or 4), on the first prompt's side.
                self.cen = [!sim, !sim, sim];
            } else {
                self.sim_reqs += 1.0;
                if (sim ^ self.cen[2]).count_ones() <= p.near_bits {
                    self.near += 1.0;
                }
                self.cen = vote(self.cen, sim);
            }
            self.recent[usize::from(self.recent_head) % RECENT] = sim;
            self.recent_head = ((usize::from(self.recent_head) + 1) % RECENT) as u8;
            if self.recent_head == 0 {
                self.flags |= F_RING_FULL;
            }
            self.flags |= F_SIMHASH;
        }

        if let Some(t) = obs.template_fp {
            self.template_reqs += 1.0;
            self.templates.insert(mix(t, p.seed ^ SALT_TEMPLATE));
            // Misra–Gries with one counter: the dominant template and its (decayed) hits.
            if t == self.top_template && self.top_weight > 0.0 {
                self.top_weight += 1.0;
                self.top_hits += 1.0;
            } else {
                self.top_weight -= 1.0;
                if self.top_weight <= 0.0 {
                    self.top_template = t;
                    self.top_weight = 1.0;
                    self.top_hits = 1.0;
                }
            }
        }

        // Distinct prompts are counted over requests the classic limits let through, so that
        // a client retrying a refused prompt does not look repetitive.
        if !obs.refused {
            if let Some(fp) = obs.prompt_fp {
                self.prompts.insert(mix(fp, p.seed ^ SALT_PROMPT));
                self.prompt_n[0] = self.prompt_n[0].saturating_add(1);
                if self.prompt_n[0] >= PROMPT_FILL {
                    self.prompts.rotate(1);
                    rotate_counts(&mut self.prompt_n, 1);
                    self.prompt_win_ns = now.max(self.prompt_win_ns);
                }
            }
        }

        self.peers.insert(peer);
    }

    /// The majority SimHash of the recent prompts (see the module docs), once a prompt
    /// SimHash was seen.
    #[inline]
    pub(crate) fn centroid(&self) -> Option<u64> {
        (self.flags & F_SIMHASH != 0).then_some(self.cen[2])
    }

    /// Whether the subject is more concentrated on its dominant template than on its SimHash
    /// centroid (most requests carry a template): one system prompt over diverse content. Its
    /// requests are then filed under their template in the cross index, else under a band of
    /// the centroid.
    #[inline]
    pub(crate) fn by_template(&self) -> bool {
        if self.template_reqs * 2.0 < self.reqs || self.top_weight <= 0.0 {
            return false;
        }
        let tc = self.top_hits / self.template_reqs.max(1e-3);
        let sc = if self.sim_reqs > 0.5 {
            self.near / self.sim_reqs
        } else {
            0.0
        };
        tc > sc
    }

    /// The subject's mean output tokens per request so far (the host's estimate until the
    /// first settle).
    #[inline]
    pub(crate) fn mean_output(&self) -> f32 {
        self.ewma_out
    }

    /// Distinct SimHash clusters (greedy: a prompt further than `near_bits` from every
    /// earlier one starts a new cluster) among the recent prompts, once the ring is full.
    fn recent_clusters(&self, near_bits: u32) -> Option<f32> {
        if self.flags & F_RING_FULL == 0 {
            return None;
        }
        let mut clusters = 0_u32;
        for (i, a) in self.recent.iter().enumerate() {
            if self.recent[..i]
                .iter()
                .all(|b| (a ^ b).count_ones() > near_bits)
            {
                clusters += 1;
            }
        }
        Some(clusters as f32)
    }

    /// Records the actual output of a finished response.
    pub(crate) fn settle(&mut self, output_tokens: u64) {
        let x = to_f32(output_tokens);
        if self.flags & F_SETTLED == 0 {
            self.ewma_out = x;
            self.flags |= F_SETTLED;
        } else {
            self.ewma_out += (x - self.ewma_out) * A_TOKENS;
        }
    }

    /// Records a child (key) at throttle or higher; returns whether it was new in the current
    /// window (so that the group needs re-evaluating).
    pub(crate) fn child(
        &mut self,
        child_hash: u64,
        enforced: bool,
        now_ns: u64,
        p: &BehaviorParams,
    ) -> bool {
        self.advance(now_ns, p);
        let kids = self.kids.get_or_insert_with(|| {
            Box::new(Kids {
                win_ns: now_ns,
                enforced: Windowed::ZERO,
                reported: Windowed::ZERO,
            })
        });
        kids.advance(now_ns, p.kids_window_ns);
        let h = mix(child_hash, p.seed ^ SALT_CHILD);
        let mut new = kids.reported.insert(h);
        if enforced {
            new |= kids.enforced.insert(h);
        }
        new
    }

    /// Reads the signals as of `now_ns`.
    pub(crate) fn view(&mut self, now_ns: u64, p: &BehaviorParams) -> SignalView {
        self.advance(now_ns, p);
        let (kids_enforced, kids_reported) = match &mut self.kids {
            Some(k) => {
                k.advance(now_ns, p.kids_window_ns);
                (k.enforced.distinct(), k.reported.distinct())
            }
            None => (0.0, 0.0),
        };
        let f = decay(now_ns.saturating_sub(self.fold_ns), p.inv_half_life_ns);
        let per_min = f * p.per_min;
        let reqs = self.reqs * f;
        let share = |x: f32| {
            if reqs > 1e-3 {
                (x * f / reqs).clamp(0.0, 1.0)
            } else {
                0.0
            }
        };

        let prompt_total = u32::from(self.prompt_n[0]) + u32::from(self.prompt_n[1]);
        // Union of both windows while it can be counted, else the sum of the two windows.
        let union = self.prompts.distinct();
        let distinct = if union < PROMPT_UNION_MAX {
            union
        } else {
            self.prompts.cur_estimate() + self.prompts.prev_estimate()
        }
        .min(prompt_total as f32);
        // At most one full prompt window is asked for: the two windows hold at most
        // 2 × PROMPT_FILL - 1 prompts, so a larger `min_requests` would never be reached.
        let distinct_ratio = (prompt_total >= p.min_requests.clamp(1, u32::from(PROMPT_FILL)))
            .then(|| (distinct / prompt_total as f32).clamp(0.0, 1.0));

        let template_reqs = self.template_reqs * f;
        let top_of_templates = if template_reqs > 1e-3 {
            (self.top_hits * f / template_reqs).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let template_share = share(self.template_reqs);
        let templated = template_share >= 0.5;
        // Two views of "one family": the dominant exact template (when most requests carry
        // one), and the prompts near the SimHash centroid (template variants and fillings
        // alike). The subject is as concentrated as the stronger of the two says.
        let (tc, t_share) = if templated {
            (top_of_templates, share(self.top_hits))
        } else {
            (0.0, 0.0)
        };
        let (sc, s_share) = if self.sim_reqs > 0.5 {
            (
                (self.near / self.sim_reqs).clamp(0.0, 1.0),
                share(self.near),
            )
        } else {
            (0.0, 0.0)
        };
        let concentration = tc.max(sc);
        // The families looked up in the cross index: the bands of the centroid and the
        // dominant template, each with the subject's share in it.
        let probe = Families::probe(
            self.centroid(),
            (templated && self.top_weight > 0.0).then_some(self.top_template),
        );
        // Smoothed over evaluations: eight prompts are a small sample.
        if let Some(c) = self.recent_clusters(p.near_bits) {
            if self.flags & F_BREADTH == 0 {
                self.breadth = c;
                self.flags |= F_BREADTH;
            } else {
                self.breadth += (c - self.breadth) * A_BREADTH;
            }
        }

        let key = self.kind == SubjectKind::ApiKey;
        let cv = (key && self.gaps >= MIN_GAPS && self.timing > 1e-6)
            .then(|| f32::from_bits(self.block).max(0.0).sqrt() / self.timing);
        // The peer sketch's three estimates (one logarithm each), read once.
        let peers = self.peers.distinct();
        let (cur_peers, prev_peers) = (self.peers.cur_estimate(), self.peers.prev_estimate());

        SignalView {
            req_per_min: self.reqs * per_min,
            out_per_min: self.out * per_min,
            logprob_per_min: self.logprobs * per_min,
            logprob_share: share(self.logprobs),
            pinned_share: share(self.pinned),
            out_in_ratio: if self.ewma_in >= 1.0 {
                self.ewma_out / self.ewma_in
            } else if self.ewma_out > 0.0 {
                f32::MAX
            } else {
                0.0
            },
            window_requests: u32::from(self.win_reqs[0]) + u32::from(self.win_reqs[1]),
            prev_window_requests: u32::from(self.win_reqs[1]),
            distinct_ratio,
            distinct_prompts: distinct,
            templates: self.templates.distinct(),
            template_share,
            feature_share: share(self.sim_reqs).max(template_share),
            probe,
            family_share: s_share,
            template_family_share: t_share,
            concentration,
            recent_families: (self.flags & F_BREADTH != 0).then_some(self.breadth),
            peers,
            fresh_peers: (peers - prev_peers).max(0.0),
            window_peers: cur_peers,
            peers_saturated: self.peers.saturated(),
            persistent_peers: if prev_peers > 0.0 {
                (cur_peers + prev_peers - peers).max(0.0)
            } else {
                cur_peers
            },
            block_keys: if key { 0.0 } else { self.timing },
            fresh_request_share: if key || self.timing == 0.0 {
                0.0
            } else {
                f32::from(self.gaps >> FRESH_SHARE_SHIFT) / f32::from(FRESH_SHARE_ONE)
            },
            cv,
            org_shape: (self.kind == SubjectKind::ApiKey && self.org_shape != ORG_SHAPE_NONE)
                .then(|| f32::from(self.org_shape) / ORG_SHAPE_SCALE),
            kids_enforced,
            kids_reported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behavior::BehaviorPolicy;

    const S: u64 = 1_000_000_000;

    #[test]
    fn org_shapes_quantize_into_0_to_254() {
        assert_eq!(quantize_shape(None), ORG_SHAPE_NONE);
        assert_eq!(quantize_shape(Some(f32::NAN)), ORG_SHAPE_NONE);
        assert_eq!(quantize_shape(Some(0.0)), 0);
        assert_eq!(quantize_shape(Some(-1.0)), 0);
        assert_eq!(quantize_shape(Some(f32::NEG_INFINITY)), 0);
        assert_eq!(quantize_shape(Some(0.5)), 127);
        assert_eq!(quantize_shape(Some(1.0)), 254);
        assert_eq!(quantize_shape(Some(2.0)), 254);
        assert_eq!(quantize_shape(Some(f32::INFINITY)), 254);
    }

    fn params() -> BehaviorParams {
        BehaviorParams::new(&BehaviorPolicy::default(), "behavior")
            .unwrap()
            .with_seed(7)
    }

    fn obs(now_ns: u64) -> Observation {
        Observation {
            now_ns,
            input_tokens: 100,
            ..Observation::default()
        }
    }

    #[test]
    fn linear_counting_is_accurate_in_range() {
        let seed = 12345;
        for n in [1_u64, 10, 100, 500, 1000, 2000] {
            let mut b = Bitmap::<8>::ZERO;
            for i in 0..n {
                b.insert(mix(i.wrapping_mul(0xD6E8_FEB8_6659_FD93), seed));
            }
            let est = b.estimate();
            let err = (est - n as f32).abs() / n as f32;
            assert!(err < 0.1, "n={n} est={est}");
        }
        let mut b = Bitmap::<1>::ZERO;
        for i in 0..10_000_u64 {
            b.insert(mix(i, 1));
        }
        assert!(b.estimate().is_finite());
        assert_eq!(Bitmap::<1>::ZERO.estimate(), 0.0);
    }

    /// The distinct-prompt ratio that the 2 × 256-bit sketch reads, over prompt counts from a
    /// few dozen to many windows' worth: all-distinct prompts read at least 0.85 (the
    /// detector's full strength is at 0.9), prompts sent twice each read about 0.5.
    #[test]
    fn distinct_ratio_stays_accurate_across_volumes() {
        let p = params();
        for n in [50_u64, 200, 383, 600, 1000, 3000] {
            let mut sweep = Signals::new(SubjectKind::ApiKey, 0);
            let mut twice = Signals::new(SubjectKind::ApiKey, 0);
            // 50 ms apart: 3,000 prompts take 150 s, inside one 300 s window.
            for i in 0..n {
                let mut o = obs(i * S / 20);
                o.prompt_fp = Some(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n);
                sweep.observe(&o, true, &p);
                o.prompt_fp = Some((i / 2).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n);
                twice.observe(&o, true, &p);
            }
            let at = n * S / 20;
            let all = sweep.view(at, &p).distinct_ratio.unwrap();
            let half = twice.view(at, &p).distinct_ratio.unwrap();
            assert!(all >= 0.85, "n={n}: all distinct read {all}");
            assert!((half - 0.5).abs() < 0.1, "n={n}: half distinct read {half}");
        }
    }

    #[test]
    fn windows_rotate_and_forget() {
        let mut w = Windowed::<2>::ZERO;
        for i in 0..20_u64 {
            w.insert(mix(i, 3));
        }
        assert!((w.distinct() - 20.0).abs() < 3.0);
        w.rotate(1);
        assert!((w.distinct() - 20.0).abs() < 3.0);
        assert!(w.fresh() < 0.5);
        for i in 100..110_u64 {
            w.insert(mix(i, 3));
        }
        assert!((w.fresh() - 10.0).abs() < 2.0);
        w.rotate(2);
        assert_eq!(w.distinct(), 0.0);
    }

    #[test]
    fn rates_converge_to_truth() {
        let p = params();
        let mut s = Signals::new(SubjectKind::ApiKey, 0);
        // 60 requests per minute, 500 output tokens each, for 20 minutes.
        for i in 0..1200_u64 {
            let mut o = obs(i * S);
            o.expected_output_tokens = 500;
            o.logprobs = i % 2 == 0;
            s.observe(&o, true, &p);
            s.settle(500);
        }
        let v = s.view(1200 * S, &p);
        assert!((v.req_per_min - 60.0).abs() < 3.0, "{v:?}");
        assert!((v.out_per_min - 30_000.0).abs() < 1500.0, "{v:?}");
        assert!((v.logprob_share - 0.5).abs() < 0.05, "{v:?}");
        assert!((v.out_in_ratio - 5.0).abs() < 0.01);
        // Regular arrivals.
        assert!(v.cv.unwrap() < 0.01);
        // Decays away.
        let v = s.view(1200 * S + 3600 * S, &p);
        assert!(v.req_per_min < 0.01);
    }

    #[test]
    fn distinct_ratio_and_concentration() {
        let p = params();
        let mut dup = Signals::new(SubjectKind::ApiKey, 0);
        let mut sweep = Signals::new(SubjectKind::ApiKey, 0);
        for i in 0..300_u64 {
            let mut o = obs(i * S);
            o.prompt_fp = Some(42);
            o.template_fp = Some(7);
            dup.observe(&o, true, &p);
            o.prompt_fp = Some(i.wrapping_mul(0x9E37_79B9));
            o.prompt_simhash = Some(0xF0F0_F0F0_0000_0000 ^ (1 << (i % 5)));
            sweep.observe(&o, true, &p);
        }
        let d = dup.view(300 * S, &p);
        let w = sweep.view(300 * S, &p);
        assert!(d.distinct_ratio.unwrap() < 0.02, "{d:?}");
        assert!(w.distinct_ratio.unwrap() > 0.95, "{w:?}");
        assert!(w.concentration > 0.95 && w.family_share > 0.95, "{w:?}");
        assert!((w.templates - 1.0).abs() < 0.01);
        assert_eq!(w.recent_families, Some(1.0));
        assert_eq!(
            w.probe,
            Families::probe(Some(0xF0F0_F0F0_0000_0000), Some(7))
        );
        assert!(!w.probe.ids()[..4].contains(&7));
        // One template, SimHashes a few bits apart: the centroid is at least as concentrated.
        assert!(!sweep.by_template());
        assert_eq!(sweep.centroid(), Some(0xF0F0_F0F0_0000_0000));
        // Without SimHashes the dominant template is the probe.
        assert_eq!(d.probe, Families::template(7));
    }

    #[test]
    fn vote_counts_saturate_both_ways() {
        let value = |c: [u64; 3], bit: u32| (0..3).map(|k| ((c[k] >> bit) & 1) << k).sum::<u64>();
        let s = 0b1010_u64;
        let mut c = [!s, !s, s];
        assert_eq!((value(c, 1), value(c, 0)), (4, 3));
        for _ in 0..10 {
            c = vote(c, s);
        }
        assert_eq!(
            (value(c, 1), value(c, 3), value(c, 0), value(c, 2)),
            (7, 7, 0, 0)
        );
        assert_eq!(c[2] & 0xF, s);
        for step in 1..=7_u64 {
            c = vote(c, !s);
            assert_eq!(value(c, 1), 7 - step);
            assert_eq!(value(c, 0), step.min(7));
        }
        c = vote(c, !s);
        assert_eq!((value(c, 1), value(c, 0)), (0, 7));
        assert_eq!(c[2] & 0xF, !s & 0xF);
    }

    #[test]
    fn keys_of_one_template_family_share_centroid_bands() {
        // A family: a base SimHash, five template variants a few bits off it, each filled
        // with prompts a few more bits off. Every key picks variants at random.
        let p = params();
        let mut rng = 0x1234_5678_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let flip = |x: u64, r: &mut dyn FnMut() -> u64, k: u32| {
            let mut m = 0_u64;
            while m.count_ones() < k {
                m |= 1 << (r() % 64);
            }
            x ^ m
        };
        let base = 0x0123_4567_89AB_CDEF_u64;
        let variants: Vec<u64> = (0..5).map(|i| flip(base, &mut next, 1 + i % 4)).collect();
        let mut agree = 0;
        for key in 0..20_u64 {
            let mut s = Signals::new(SubjectKind::ApiKey, 0);
            for i in 0..200_u64 {
                let mut o = obs(i * S);
                let v = variants[(next() % 5) as usize];
                let k = 1 + (next() % 4) as u32;
                o.prompt_simhash = Some(flip(v, &mut next, k));
                o.prompt_fp = Some(next());
                s.observe(&o, true, &p);
            }
            let c = s.centroid().unwrap();
            assert!((c ^ base).count_ones() <= 4, "key {key}: {:x}", c ^ base);
            let shared = Families::bands(c)
                .ids()
                .iter()
                .filter(|id| Families::bands(base).ids().contains(id))
                .count();
            agree += usize::from(shared >= 2);
            let v = s.view(200 * S, &p);
            assert!(v.concentration > 0.9 && v.family_share > 0.9, "{v:?}");
        }
        assert!(agree >= 18, "{agree}");
        // Unrelated prompts: no concentration.
        let mut s = Signals::new(SubjectKind::ApiKey, 0);
        for i in 0..200_u64 {
            let mut o = obs(i * S);
            o.prompt_simhash = Some(next());
            s.observe(&o, true, &p);
        }
        assert!(s.view(200 * S, &p).concentration < 0.1);
    }

    #[test]
    fn child_sketches_are_boxed_on_first_child_and_forget() {
        let p = params();
        let mut org = Signals::new(SubjectKind::Org, 0);
        for i in 0..50_u64 {
            org.observe(&obs(i * S), true, &p);
        }
        // Ordinary traffic never boxes the children's sketches.
        assert!(org.kids.is_none());
        let v = org.view(50 * S, &p);
        assert_eq!((v.kids_enforced, v.kids_reported), (0.0, 0.0));
        for k in 0..5_u64 {
            assert!(org.child(k, k % 2 == 0, 60 * S, &p), "child {k} is new");
        }
        assert!(!org.child(0, true, 61 * S, &p), "child 0 again");
        assert!(org.kids.is_some());
        let v = org.view(62 * S, &p);
        assert!((v.kids_reported - 5.0).abs() < 0.5, "{v:?}");
        assert!((v.kids_enforced - 3.0).abs() < 0.5, "{v:?}");
        // Two whole windows later they are forgotten.
        let later = 60 * S + 2 * p.kids_window_ns;
        let v = org.view(later, &p);
        assert_eq!((v.kids_enforced, v.kids_reported), (0.0, 0.0));
        // A clock that went backwards re-anchors the window and keeps counting.
        assert!(org.child(9, true, S, &p));
        assert!(org.view(S, &p).kids_reported > 0.5);
    }

    #[test]
    fn peers_count_clusters_for_keys_and_keys_for_groups() {
        let p = params();
        let mut key = Signals::new(SubjectKind::ApiKey, 0);
        let mut org = Signals::new(SubjectKind::Org, 0);
        for i in 0..50_u64 {
            let mut o = obs(i * S);
            o.cluster_hash = i; // a new cluster every request
            o.key_hash = i % 5;
            key.observe(&o, true, &p);
            org.observe(&o, true, &p);
        }
        let peers = key.view(50 * S, &p).peers;
        assert!((peers - 50.0).abs() < 10.0, "{peers}");
        assert!((org.view(50 * S, &p).peers - 5.0).abs() < 1.0);
    }

    /// A group's blocks of requests measure how many keys send at once, and the two windows
    /// which keys are stable: keys replaced every 20 requests look like one stream of new
    /// keys (two streams when two such keys alternate), five keys in turn like five stable
    /// ones, thirty like many.
    #[test]
    fn streams_and_persistent_keys_tell_rotation_from_many_keys() {
        let p = params();
        let window = p.window_ns / S; // seconds
        let run = |key_of: &dyn Fn(u64) -> u64| {
            let mut org = Signals::new(SubjectKind::Org, 0);
            // Two windows and a half at one request per second.
            let n = window * 5 / 2;
            for i in 0..n {
                let mut o = obs(i * S);
                o.key_hash = key_of(i);
                org.observe(&o, true, &p);
            }
            org.view(n * S, &p)
        };
        let rotating = run(&|i| 1000 + i / 20);
        assert!(rotating.streams() < 2.5, "{rotating:?}");
        assert!(
            rotating.persistent_peers < 3.0 && rotating.peers > 10.0,
            "{rotating:?}"
        );
        let alternating = run(&|i| 1000 + (i % 2) * 100_000 + i / 40);
        assert!(
            (1.5..3.5).contains(&alternating.streams()),
            "{alternating:?}"
        );
        assert!(alternating.persistent_peers < 3.0, "{alternating:?}");
        let five = run(&|i| i % 5);
        assert!((3.5..7.0).contains(&five.streams()), "{five:?}");
        assert!((five.persistent_peers - 5.0).abs() < 1.0, "{five:?}");
        let thirty = run(&|i| (i * 7) % 30);
        assert!(thirty.streams() > 12.0, "{thirty:?}");
        // Requests from keys new in this window: nearly all when keys rotate, none when
        // they are stable, and few when one stable key sends most and occasional keys
        // (each seen once) the rest (under 30%, fewer still as the previous window's
        // bitmap, half full here, takes some new keys for old).
        assert!(rotating.fresh_request_share > 0.8, "{rotating:?}");
        assert!(five.fresh_request_share < 0.05, "{five:?}");
        let busy = run(&|i| if i % 10 < 7 { 0 } else { 5000 + i });
        assert!(
            busy.persistent_peers * 2.0 < busy.window_peers,
            "most keys new: {busy:?}"
        );
        assert!(busy.fresh_request_share < 0.3, "{busy:?}");
        // Keys take their timing detector's fields for nothing else.
        let mut key = Signals::new(SubjectKind::ApiKey, 0);
        for i in 0..100_u64 {
            key.observe(&obs(i * S), true, &p);
        }
        let v = key.view(100 * S, &p);
        assert_eq!((v.block_keys, v.streams()), (0.0, 1.0));
        assert!(v.cv.unwrap() < 0.01, "{v:?}");
        assert!(five.cv.is_none() && rotating.cv.is_none());
    }

    #[test]
    fn block_distinct_counts_invert_to_keys() {
        assert_eq!(keys_for_block_distinct(0.5), 1.0);
        assert_eq!(keys_for_block_distinct(1.0), 1.0);
        for k in [2.0_f32, 5.0, 30.0, 200.0] {
            let d = k * (1.0 - (1.0 - 1.0 / k).powi(16));
            let back = keys_for_block_distinct(d);
            assert!((back - k).abs() / k < 0.01, "{k} -> {d} -> {back}");
        }
        assert_eq!(keys_for_block_distinct(16.0), 1000.0);
        assert_eq!(keys_for_block_distinct(f32::NAN), 1000.0);
    }

    #[test]
    fn clock_going_backwards_saturates() {
        let p = params();
        let mut s = Signals::new(SubjectKind::ApiKey, 1000 * S);
        for t in [1000 * S, 10, 0, 2000 * S, 5 * S] {
            s.observe(&obs(t), true, &p);
        }
        let v = s.view(0, &p);
        assert!(v.req_per_min.is_finite() && v.req_per_min >= 0.0);
        assert!(v.cv.is_none() || v.cv.unwrap().is_finite());
        assert_eq!(s.last_ns(), 5 * S);
        // Far-future reading, then back to normal: windows and decay keep working.
        let mut s = Signals::new(SubjectKind::ApiKey, 0);
        s.observe(&obs(u64::MAX / 2), true, &p);
        for i in 0..100_u64 {
            let mut o = obs(i * S);
            o.cluster_hash = i;
            s.observe(&o, true, &p);
        }
        let v = s.view(100 * S + 700 * S, &p);
        assert!(v.peers < 1.0, "windows rotated after the jump: {v:?}");
        assert!(v.req_per_min < 2.0, "decay works after the jump: {v:?}");
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let p = params();
        let mut s = Signals::new(SubjectKind::Org, 0);
        for i in 0..100_u64 {
            let mut o = obs(i);
            o.input_tokens = u64::MAX;
            o.expected_output_tokens = u64::MAX;
            o.pressure = f32::NAN;
            s.observe(&o, true, &p);
            s.settle(u64::MAX);
        }
        let v = s.view(u64::MAX, &p);
        assert!(v.out_in_ratio.is_finite());
        assert!(v.req_per_min.is_finite());
    }
}
