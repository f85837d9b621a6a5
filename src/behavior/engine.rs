//! Glue between the warden and the behavioural state: per-entry slots with a cached level,
//! the per-check observe/evaluate pass, propagation, and event dispatch after every lock is
//! released.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    BehaviorParams, BehaviorPolicy, CrossIndex, Level, Observation, SubjectBehavior, Transition,
    ORG_SHAPE_NONE,
};
use crate::hooks::{EscalationEvent, EscalationHook, EventQueue, HookRunner};
use crate::policy::ConfigError;
use crate::subject::SubjectKind;
use crate::table::Entry;

/// The runtime behavioural settings of one compiled policy, shared by all its limit sets.
#[derive(Debug)]
pub(crate) struct BehaviorRt {
    pub(crate) params: BehaviorParams,
    pub(crate) cross: Arc<CrossIndex>,
}

impl BehaviorRt {
    /// Validates `policy`. The sketch seed and the cross index carry over from `prev` (the
    /// policy being replaced) so that state filled under it stays meaningful.
    pub(crate) fn new(
        policy: &BehaviorPolicy,
        seed: u64,
        prev: Option<&BehaviorRt>,
    ) -> Result<Self, ConfigError> {
        let params = BehaviorParams::new(policy, "behavior")?.with_seed(seed);
        let cross = match prev {
            Some(p) if p.params.policy().cross == policy.cross => p.cross.clone(),
            _ => Arc::new(CrossIndex::new(&params)),
        };
        Ok(Self { params, cross })
    }
}

/// The cached levels take the low 8 bits of `Slot::cache` (4 each), an org's published shape
/// the next 8 (read by its keys without its lock, see `detect::org_shape`); the time from
/// which the cache must be refreshed under the lock (a manual level's expiry) takes the high
/// 48, in units of `2^RECHECK_SHIFT` ns (about 1 ms), rounded down so that the refresh is
/// never late.
const RECHECK_SHIFT: u32 = 20;
/// No manual level expires: the cached levels stay valid until the next locked update. No
/// `now >> RECHECK_SHIFT` reaches it (that would take 2^68 ns).
const NEVER: u64 = (1 << 48) - 1;

// Each cached level takes 4 bits.
const _: () = assert!(Level::Block as u8 <= 0xF);

/// One subject's behavioural state, boxed inside its table entry: the state behind a short
/// mutex, and its current levels cached in one atomic word so that reading them costs one
/// load.
///
/// `repr(C)` puts the cache word first and the mutex right after it, so that the check's
/// first read of a slot (its levels) also brings in the lock's cache line; with the default
/// layout they sat six lines apart. One word instead of two also saves 8 bytes per subject.
/// (On the benchmark VM the wall time of a check with behaviour on did not move measurably;
/// see `benches/README.md`.) `align(16)` (free: 384 is a multiple of 16) keeps the cache
/// word and the lock byte, 9 bytes in all, within one 64-byte line wherever the slot lands.
/// A test checks the offsets and the alignment.
#[derive(Debug)]
#[repr(C, align(16))]
pub(crate) struct Slot {
    /// enforced level | reported level << 4 | org shape << 8 | recheck time (see
    /// `RECHECK_SHIFT`) << 16.
    cache: AtomicU64,
    state: Mutex<SubjectBehavior>,
}

impl Slot {
    pub(crate) fn new(kind: SubjectKind, now: u64, exempt: bool) -> Self {
        let mut s = SubjectBehavior::new(kind, now);
        s.set_exempt(exempt);
        Self {
            cache: AtomicU64::new(NEVER << 16 | u64::from(ORG_SHAPE_NONE) << 8),
            state: Mutex::new(s),
        }
    }

    pub(crate) fn clone_state(&self) -> Self {
        // The cache word is read under the lock, so that it matches the state it describes.
        let guard = self.state.lock();
        let cache = self.cache.load(Ordering::Relaxed);
        Self {
            cache: AtomicU64::new(cache),
            state: Mutex::new(guard.clone()),
        }
    }

    pub(crate) fn evictable(&self, now: u64) -> bool {
        !self.state.lock().must_keep(now)
    }

    /// Starts loading every cache line of the slot without waiting for them (see
    /// `crate::prefetch`).
    #[inline(always)]
    pub(crate) fn prefetch(&self) {
        crate::prefetch::prefetch_value(self);
    }

    /// (enforced, reported) at `now`.
    #[inline]
    pub(crate) fn levels(&self, now: u64) -> (Level, Level) {
        let mut w = self.cache.load(Ordering::Acquire);
        if now >> RECHECK_SHIFT >= w >> 16 {
            let s = self.state.lock();
            w = self.store(&s, now);
        }
        (
            Level::from_u8((w & 0xF) as u8).unwrap_or(Level::Normal),
            Level::from_u8((w >> 4 & 0xF) as u8).unwrap_or(Level::Normal),
        )
    }

    /// The shape this org published at its last evaluation (see
    /// `SubjectBehavior::org_shape`), without its lock.
    #[inline]
    pub(crate) fn org_shape(&self) -> u8 {
        (self.cache.load(Ordering::Relaxed) >> 8) as u8
    }

    /// Refreshes the cache from the state (call with the lock held); returns the new word.
    /// The recheck time is rounded down, so in the last ~1 ms before a manual level expires
    /// every `levels` call takes the lock (and stores the same word) until it has expired.
    fn store(&self, s: &SubjectBehavior, now: u64) -> u64 {
        // `u64::MAX >> RECHECK_SHIFT` is below `NEVER`: the shift cannot reach the level bits.
        let recheck = s.manual_until(now).map_or(NEVER, |t| t >> RECHECK_SHIFT);
        let w = u64::from(s.level(now) as u8)
            | (u64::from(s.reported_level(now) as u8) << 4)
            | (u64::from(s.org_shape()) << 8)
            | (recheck << 16);
        self.cache.store(w, Ordering::Release);
        w
    }

    /// Runs `f` on the state under the lock and refreshes the cache.
    pub(crate) fn with<R>(&self, now: u64, f: impl FnOnce(&mut SubjectBehavior) -> R) -> R {
        let mut s = self.state.lock();
        let r = f(&mut s);
        self.store(&s, now);
        r
    }
}

/// Level changes found during a check, dispatched once its locks are released.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    changes: [Option<Transition>; 3],
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.changes.iter().all(Option::is_none)
    }
}

/// How a check ended, as the signals see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// A classic limit refused: pinned evidence for every subject.
    DeniedByLimit,
    /// A subject at challenge or block refused: not served, but no evidence of pressure
    /// for the request's other subjects (the denying one is restrained and counts none).
    DeniedByBehavior,
}

/// The subjects of one check, as the behavioural pass sees them.
pub(crate) type Subjects<'a> = [Option<&'a Entry>; 3];

/// Per-warden behavioural machinery: event queue and hooks.
#[derive(Debug)]
pub(crate) struct Engine {
    queue: EventQueue,
    hooks: HookRunner,
}

impl Engine {
    pub(crate) fn new(hooks: Vec<Box<dyn EscalationHook>>, capacity: usize) -> Self {
        Self {
            queue: EventQueue::new(capacity),
            hooks: HookRunner::new(hooks),
        }
    }

    /// (enforced, reported) level of each subject.
    #[inline]
    pub(crate) fn levels(&self, subjects: &Subjects<'_>, now: u64) -> [(Level, Level); 3] {
        subjects.map(|e| match e.and_then(|e| e.behavior.as_deref()) {
            Some(b) => b.levels(now),
            None => (Level::Normal, Level::Normal),
        })
    }

    /// The cost multiplier of a subject at `level`: a throttled subject pays `1 / factor` per
    /// unit, which scales all its limits by `factor` (rounded to a whole multiplier).
    #[inline]
    pub(crate) fn multiplier(level: Level, rt: &BehaviorRt) -> u64 {
        if level == Level::Throttle {
            let f = rt.params.throttle_factor;
            if f > 0.0 && f < 1.0 {
                return (1.0 / f).round().max(1.0) as u64;
            }
        }
        1
    }

    /// The subject and level that deny the request outright (challenge or block), the
    /// highest first.
    #[inline]
    pub(crate) fn denying(levels: &[(Level, Level); 3]) -> Option<(usize, Level)> {
        let (i, l) = levels
            .iter()
            .enumerate()
            .map(|(i, l)| (i, l.0))
            .max_by_key(|&(i, l)| (l, std::cmp::Reverse(i)))?;
        (l >= Level::Challenge).then_some((i, l))
    }

    /// Feeds one check to the subjects' signals and the cross index, re-evaluates them (each
    /// at most once per `evaluate_every_ms`), and propagates escalated keys to their org and
    /// cluster. Returns the level changes to dispatch after the caller releases its locks.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn observe(
        &self,
        subjects: &Subjects<'_>,
        hashes: [u64; 3],
        req: &crate::Request<'_>,
        now: u64,
        rt: &BehaviorRt,
        pressure: [f32; 3],
        verdict: Verdict,
    ) -> Pending {
        let mut obs = Observation {
            now_ns: now,
            input_tokens: req.input_tokens,
            expected_output_tokens: req.expected_output_tokens,
            prompt_fp: req.prompt_fp,
            prompt_simhash: req.prompt_simhash,
            template_fp: req.template_fp,
            logprobs: req.logprobs,
            key_hash: hashes[0],
            org_hash: hashes[1],
            cluster_hash: hashes[2],
            pressure: 0.0,
            denied_by_limit: verdict == Verdict::DeniedByLimit,
            refused: verdict != Verdict::Allowed,
        };
        let p = &rt.params;
        let mut pending = Pending::default();
        let mut key_levels = None;
        // The first tracked subject (the key, unless keys are not tracked) files the request
        // in the cross index under its family (a band of its SimHash centroid, or its
        // template), at its mean output, once its lock is released.
        let mut filed = false;
        let org = subjects[1].and_then(|e| e.behavior.as_deref());
        for (i, e) in subjects.iter().enumerate() {
            let Some(b) = e.and_then(|e| e.behavior.as_deref()) else {
                continue;
            };
            obs.pressure = pressure[i];
            let (change, levels, file) = b.with(now, |s| {
                if let Some((rep, enf)) = key_levels {
                    s.child_escalated(hashes[0], rep, enf, now, p);
                }
                // The family as the state stands before this request (nearly always the
                // one it is filed under) lets the index's bucket load during `observe`.
                if let Some(family) = (!filed).then(|| s.family_of(&obs)).flatten() {
                    rt.cross.prefetch(family);
                }
                s.observe(&obs, p);
                let file = (!filed).then(|| (s.family_of(&obs), s.mean_output()));
                let t = if i == 0 {
                    // A key's evaluation weighs what its org publishes.
                    s.evaluate_key(now, p, &rt.cross, || {
                        org.map_or(ORG_SHAPE_NONE, Slot::org_shape)
                    })
                } else {
                    s.evaluate(now, p, &rt.cross)
                };
                (t, (s.reported_level(now), s.level(now)), file)
            });
            if let Some((family, output)) = file {
                filed = true;
                if let Some(family) = family {
                    rt.cross.observe(family, &obs, output);
                }
            }
            if i == 0 && levels.0.max(levels.1) >= Level::Throttle {
                key_levels = Some(levels);
            }
            pending.changes[i] = change;
        }
        pending
    }

    /// Records the actual output of a finished response.
    pub(crate) fn settle(slot: &Slot, output_tokens: u64, now: u64) {
        slot.with(now, |s| s.settle(output_tokens));
    }

    /// Turns pending changes into events: queued and handed to the hooks. Call with no lock
    /// of the warden held.
    pub(crate) fn dispatch(&self, pending: Pending, names: impl Fn(usize) -> String, now: u64) {
        for (i, t) in pending.changes.into_iter().enumerate() {
            let Some(t) = t else { continue };
            let event = t.into_event(SubjectKind::ALL[i], names(i), now / 1_000_000);
            self.emit(event);
        }
    }

    /// Queues an event and runs the hooks on it.
    pub(crate) fn emit(&self, event: EscalationEvent) {
        self.hooks.run(&event);
        let _ = self.queue.push(event);
    }

    pub(crate) fn drain(&self) -> Vec<EscalationEvent> {
        self.queue.drain()
    }

    pub(crate) fn events_dropped(&self) -> u64 {
        self.queue.dropped()
    }

    pub(crate) fn hooks_panicked(&self) -> u64 {
        self.hooks.panicked_hooks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of levels and every kind of org shape survives the cache word: `levels`
    /// and `org_shape` read back what `store` packed, with and without a manual level's
    /// recheck time in the high bits. Fails if a field is shifted onto another.
    #[test]
    fn the_cache_word_round_trips_levels_and_org_shape() {
        use crate::behavior::signals::quantize_shape;
        let slot = Slot::new(SubjectKind::Org, 0, false);
        for enforced in Level::ALL {
            for reported in Level::ALL {
                for shape in [Some(0.0), Some(0.5), Some(1.0), None] {
                    let mut s = SubjectBehavior::new(SubjectKind::Org, 0);
                    s.escalation.enforced.force(enforced, 0);
                    s.escalation.reported.force(reported, 0);
                    s.signals.set_org_shape(quantize_shape(shape));
                    slot.store(&s, 0);
                    assert_eq!(slot.levels(0), (enforced, reported));
                    assert_eq!(slot.org_shape(), quantize_shape(shape));
                    // A manual level with an expiry fills the recheck bits; before it
                    // expires, the cached word still reads back the same.
                    s.set_manual(enforced, Some(5_000_000_000));
                    slot.store(&s, 0);
                    assert_eq!(slot.levels(0).0, enforced);
                    assert_eq!(slot.org_shape(), quantize_shape(shape));
                }
            }
        }
    }

    /// A check's first read of a slot (its cached levels) also brings in the lock: the lock
    /// byte sits right after the cache word, before the state, and the slot is 16-byte
    /// aligned, so the two share a cache line wherever the slot lands.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_lock_shares_the_cache_words_line() {
        assert!(std::mem::align_of::<Slot>() >= 16);
        let slot = Box::new(Slot::new(SubjectKind::ApiKey, 0, false));
        let base = std::ptr::from_ref(&*slot) as usize;
        let state = std::ptr::from_ref(&slot.state) as usize - base;
        let data = slot.state.data_ptr() as usize - base;
        assert_eq!(
            base / 64,
            (base + state) / 64,
            "the lock byte is on another line"
        );
        assert_eq!(state, 8, "the mutex must follow the cache word");
        assert_eq!(
            data, 16,
            "the lock byte must sit between the cache word and the data"
        );
        assert_eq!(std::mem::size_of::<Slot>(), 8 + 8 + SubjectBehavior::SIZE);
    }
}
