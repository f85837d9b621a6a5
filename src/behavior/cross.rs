//! The cross-subject index: what links keys and orgs that look unrelated.
//!
//! Distillation spread over many keys, orgs and IP clusters stays under every per-subject
//! limit, but it has to send the same *kind* of prompt everywhere: one prompt family (one
//! template, or several variants of one, filled with ever new content). This index keeps, per
//! prompt family, the distinct orgs that used it in the last one to two windows, and the decayed
//! request and output volume. A family is a 16-bit band of a SimHash *centroid* (the majority
//! SimHash of a key's recent prompts, see `signals.rs`), or, for requests without a SimHash,
//! a template fingerprint (see [`Families`]). Keys that fill one template family converge on
//! nearly the same centroid, so they meet in the same bands even when every prompt, and every
//! template variant, differs. Each request is filed under one band of its key's centroid
//! (picked by a hash, so a quarter of the traffic per band; [`CrossIndex::stats`] scales the
//! volumes back up), at the key's mean output per request. A subject's detectors ask about the
//! four bands of its own centroid and keep the strongest (`template_spread`).
//!
//! Bounded memory: a fixed array of `capacity` slots (88 bytes each with their tag), 8-way
//! set-associative (the bucket's eight family ids share one cache line, so a look-up that
//! finds nothing reads one line), split into up to 64 shards behind short `parking_lot`
//! mutexes. A new
//! family takes an empty or stale slot of its bucket, else the slot with the least decayed
//! volume, so one-off families churn among themselves while heavy families stay. Buckets are
//! chosen with the per-process secret seed, so clients cannot aim families at one bucket.

use parking_lot::Mutex;

use super::signals::{decay, mix, Windowed, FOLD_NS};
#[cfg(test)]
use super::Families;
use super::{is_band, BehaviorParams, Observation, BANDS};

/// Slots per bucket.
const WAYS: usize = 8;
const MAX_SHARDS: usize = 64;
const SALT_ORG: u64 = 0xBE54_66CF_34E9_0C6C;
const SALT_BUCKET: u64 = 0x3F84_D5B5_B547_0917;

/// What the index knows about one prompt family.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct FamilyStats {
    /// Distinct orgs in the last one to two windows.
    pub(crate) orgs: f32,
    /// Requests per minute (decayed), all subjects together.
    pub(crate) req_per_min: f32,
    /// Output tokens per minute (decayed), all subjects together.
    pub(crate) out_per_min: f32,
    /// Whether the family is a SimHash band (else a template fingerprint).
    pub(crate) band: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Slot {
    family: u64,
    last_ns: u64,
    fold_ns: u64,
    win_ns: u64,
    reqs: f32,
    out: f32,
    used: bool,
    orgs: Windowed<2>,
}

impl Slot {
    const EMPTY: Self = Self {
        family: 0,
        last_ns: 0,
        fold_ns: 0,
        win_ns: 0,
        reqs: 0.0,
        out: 0.0,
        used: false,
        orgs: Windowed::ZERO,
    };

    fn fresh(family: u64, now_ns: u64) -> Self {
        Self {
            family,
            last_ns: now_ns,
            fold_ns: now_ns,
            win_ns: now_ns,
            used: true,
            ..Self::EMPTY
        }
    }

    fn advance(&mut self, now_ns: u64, inv_half_life_ns: f64, window_ns: u64) {
        // A clock that went backwards re-anchors (no time passed).
        self.fold_ns = self.fold_ns.min(now_ns);
        self.win_ns = self.win_ns.min(now_ns);
        if now_ns >= self.fold_ns.saturating_add(FOLD_NS) {
            let f = decay(now_ns - self.fold_ns, inv_half_life_ns);
            self.reqs *= f;
            self.out *= f;
            self.fold_ns = now_ns;
        }
        let elapsed = now_ns.saturating_sub(self.win_ns);
        if elapsed >= window_ns {
            let n = elapsed / window_ns;
            self.orgs.rotate(n);
            self.win_ns = self.win_ns.saturating_add(n.saturating_mul(window_ns));
        }
    }

    /// Decayed request count as of `now_ns`, to within a factor of two (whole half-lives
    /// only, no `exp2`); 0 when empty or stale. For choosing a victim.
    fn weight(&self, now_ns: u64, inv_half_life_ns: f64, stale_ns: u64) -> f32 {
        let idle = now_ns.saturating_sub(self.last_ns);
        if !self.used || idle >= stale_ns {
            return 0.0;
        }
        let halvings = (now_ns.saturating_sub(self.fold_ns) as f64 * inv_half_life_ns) as u32;
        // 2^-halvings, built from the exponent bits.
        let factor = f32::from_bits((127 - halvings.min(126)) << 23);
        self.reqs * factor
    }
}

/// One bucket: the family ids of its slots packed in one cache line, so that looking a family
/// up (most look-ups of a subject's bands find nothing) reads one line, not eight slots.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Bucket {
    /// `tags[i]` is `slots[i].family` when the slot is used (a match is confirmed on the slot).
    tags: [u64; WAYS],
    slots: [Slot; WAYS],
}

impl Bucket {
    const EMPTY: Self = Self {
        tags: [0; WAYS],
        slots: [Slot::EMPTY; WAYS],
    };

    /// The index of `family`'s slot, if the bucket holds it.
    #[inline]
    fn find(&self, family: u64) -> Option<usize> {
        (0..WAYS).find(|&i| self.tags[i] == family && self.slots[i].used)
    }
}

/// Global, bounded index of prompt families across all subjects.
///
/// **Concurrency:** every method takes one shard mutex for a few dozen nanoseconds; nothing
/// else is locked and nothing allocates after construction.
pub(crate) struct CrossIndex {
    shards: Box<[Mutex<Box<[Bucket]>>]>,
    /// Address of each shard's first bucket, for [`CrossIndex::prefetch`] only (the buckets
    /// never move: they are allocated once, in `new`).
    bases: Box<[usize]>,
    shard_mask: u64,
    bucket_mask: u64,
    enabled: bool,
    inv_half_life_ns: f64,
    per_min: f32,
    window_ns: u64,
    stale_ns: u64,
    seed: u64,
}

impl std::fmt::Debug for CrossIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossIndex")
            .field("enabled", &self.enabled)
            .field("capacity", &self.capacity())
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl CrossIndex {
    /// An empty index sized by `cross.capacity` (rounded up to a power of two, at least 64).
    /// Allocates all its memory here.
    pub(crate) fn new(p: &BehaviorParams) -> Self {
        let cfg = &p.policy().cross;
        let capacity = cfg.capacity.clamp(64, 1 << 24).next_power_of_two();
        let buckets = capacity / WAYS;
        let shards = (buckets / 4).clamp(1, MAX_SHARDS);
        let per_shard = buckets / shards;
        let shard_vec: Vec<Mutex<Box<[Bucket]>>> = (0..shards)
            .map(|_| Mutex::new(vec![Bucket::EMPTY; per_shard].into_boxed_slice()))
            .collect();
        let bases = shard_vec
            .iter()
            .map(|s| s.lock().as_ptr() as usize)
            .collect();
        Self {
            shards: shard_vec.into_boxed_slice(),
            bases,
            shard_mask: shards as u64 - 1,
            bucket_mask: per_shard as u64 - 1,
            enabled: cfg.enabled && p.policy().enabled,
            inv_half_life_ns: p.inv_half_life_ns,
            per_min: p.per_min,
            window_ns: p.window_ns,
            stale_ns: cfg.stale_after_s.saturating_mul(1_000_000_000),
            seed: p.seed,
        }
    }

    /// Number of slots.
    pub(crate) fn capacity(&self) -> usize {
        self.shards.len() * (self.bucket_mask as usize + 1) * WAYS
    }

    #[cfg(test)]
    /// Bytes held by the slots.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.capacity() / WAYS * std::mem::size_of::<Bucket>()
            + self.shards.len() * std::mem::size_of::<Mutex<Box<[Bucket]>>>()
    }

    #[cfg(test)]
    /// Families currently held (takes every shard lock in turn; for diagnostics).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .iter()
                    .map(|b| b.slots.iter().filter(|x| x.used).count())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Shard and bucket of the family, from a seeded full-avalanche mix.
    #[inline]
    fn locate(&self, family: u64) -> (usize, usize) {
        let h = mix(family, self.seed ^ SALT_BUCKET);
        let shard = ((h >> 40) & self.shard_mask) as usize;
        let bucket = (h & self.bucket_mask) as usize;
        (shard, bucket)
    }

    /// Starts loading the tags of `family`'s bucket without waiting (see `crate::prefetch`),
    /// for a look-up or a filing that follows shortly.
    #[inline]
    pub(crate) fn prefetch(&self, family: u64) {
        if self.enabled {
            let (shard, b) = self.locate(family);
            let addr = self.bases[shard] + b * std::mem::size_of::<Bucket>();
            crate::prefetch::prefetch(addr as *const u8, 64);
        }
    }

    /// Records one request under `family` (see [`Observation::family_id`]), counting
    /// `output_tokens` for it (the key's mean output per request: the index never waits for
    /// the response). Called once per check, not per subject.
    pub(crate) fn observe(&self, family: u64, obs: &Observation, output_tokens: f32) {
        if !self.enabled {
            return;
        }
        let now = obs.now_ns;
        let (shard, b) = self.locate(family);
        let mut guard = self.shards[shard].lock();
        let bucket = &mut guard[b];
        let i = match bucket.find(family) {
            Some(i) => i,
            None => {
                let mut victim = 0;
                let mut least = f32::INFINITY;
                for (j, s) in bucket.slots.iter().enumerate() {
                    let w = s.weight(now, self.inv_half_life_ns, self.stale_ns);
                    if w < least {
                        least = w;
                        victim = j;
                        if w == 0.0 {
                            break;
                        }
                    }
                }
                bucket.slots[victim] = Slot::fresh(family, now);
                bucket.tags[victim] = family;
                victim
            }
        };
        let slot = &mut bucket.slots[i];
        slot.advance(now, self.inv_half_life_ns, self.window_ns);
        slot.reqs += 1.0;
        if output_tokens.is_finite() && output_tokens > 0.0 {
            slot.out += output_tokens;
        }
        slot.orgs.insert(mix(obs.org_hash, self.seed ^ SALT_ORG));
        slot.last_ns = now;
    }

    /// What the index knows about `family` as of `now_ns`. Volumes of a SimHash band are
    /// scaled by the four bands a request is sampled among; `orgs` is not (an org with very
    /// few requests may be missing from some bands, which is the weight it deserves).
    pub(crate) fn stats(&self, family: u64, now_ns: u64) -> Option<FamilyStats> {
        if !self.enabled {
            return None;
        }
        let (shard, b) = self.locate(family);
        let mut guard = self.shards[shard].lock();
        let bucket = &mut guard[b];
        let i = bucket.find(family)?;
        let slot = &mut bucket.slots[i];
        slot.advance(now_ns, self.inv_half_life_ns, self.window_ns);
        let mut f =
            decay(now_ns.saturating_sub(slot.fold_ns), self.inv_half_life_ns) * self.per_min;
        if is_band(family) {
            // A band is filed for one request in four of its family.
            f *= BANDS as f32;
        }
        Some(FamilyStats {
            orgs: slot.orgs.distinct(),
            req_per_min: slot.reqs * f,
            out_per_min: slot.out * f,
            band: is_band(family),
        })
    }

    /// Frees slots idle for `cross.stale_after_s`. Skips shards that are busy; for a host's
    /// housekeeping thread. Returns the number of slots freed.
    pub(crate) fn maintain(&self, now_ns: u64) -> usize {
        let mut freed = 0;
        for shard in self.shards.iter() {
            let Some(mut guard) = shard.try_lock() else {
                continue;
            };
            for s in guard.iter_mut().flat_map(|b| b.slots.iter_mut()) {
                if s.used && now_ns.saturating_sub(s.last_ns) >= self.stale_ns {
                    *s = Slot::EMPTY;
                    freed += 1;
                }
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behavior::{BehaviorPolicy, CrossPolicy};

    const S: u64 = 1_000_000_000;

    fn index(capacity: usize) -> (CrossIndex, BehaviorParams) {
        let mut policy = BehaviorPolicy::default();
        policy.cross.capacity = capacity;
        let p = BehaviorParams::new(&policy, "behavior")
            .unwrap()
            .with_seed(9);
        (CrossIndex::new(&p), p)
    }

    fn obs(now_ns: u64, template: u64, org: u64) -> Observation {
        Observation {
            now_ns,
            template_fp: Some(template),
            org_hash: org,
            expected_output_tokens: 1000,
            ..Observation::default()
        }
    }

    #[test]
    fn counts_orgs_and_volume_per_family() {
        let (x, _) = index(4096);
        // 40 orgs, one request each per second for 15 minutes, 1000 tokens each.
        for t in 0..900_u64 {
            for org in 0..40_u64 {
                x.observe(77, &obs(t * S, 77, org), 1000.0);
            }
            x.observe(88, &obs(t * S, 88, 1), f32::NAN);
        }
        let s = x.stats(77, 900 * S).unwrap();
        assert!((s.orgs - 40.0).abs() < 8.0, "{s:?}");
        // Steady state after 7.5 half-lives: within 1% plus fold error.
        assert!((s.req_per_min - 2400.0).abs() < 60.0, "{s:?}");
        assert!((s.out_per_min - 2_400_000.0).abs() < 60_000.0, "{s:?}");
        let s = x.stats(88, 900 * S).unwrap();
        assert!(s.orgs < 1.5);
        assert!(x.stats(99, 300 * S).is_none());
        assert_eq!(x.len(), 2);
    }

    #[test]
    fn bounded_with_heavy_families_surviving_a_flood() {
        let (x, _) = index(64);
        assert_eq!(x.capacity(), 64);
        for t in 0..200_u64 {
            x.observe(1, &obs(t * S / 10, 1, 1), 100.0);
        }
        // A flood of one-off families.
        for i in 0..100_000_u64 {
            x.observe(1_000_000 + i, &obs(20 * S + i, 1_000_000 + i, i), 100.0);
        }
        assert!(x.len() <= 64);
        assert!(x.stats(1, 21 * S).is_some(), "heavy family was evicted");
        assert!(x.memory_bytes() < 64 * 128);
        // A family's id is in the tag line; a freed or replaced slot is not found by its tag.
        assert!(x.stats(1_000_000, 21 * S).is_none());
    }

    #[test]
    fn slot_size_and_default_memory() {
        assert_eq!(std::mem::size_of::<Slot>(), 80);
        assert_eq!(std::mem::size_of::<Bucket>(), 8 * 88);
        let (x, _) = index(CrossPolicy::default().capacity);
        assert_eq!(x.capacity(), 4096);
        assert!(x.memory_bytes() < 360 * 1024, "{}", x.memory_bytes());
    }

    #[test]
    fn stale_slots_are_freed() {
        let (x, _) = index(64);
        x.observe(5, &obs(0, 5, 1), 0.0);
        assert_eq!(x.maintain(10 * S), 0);
        assert_eq!(x.maintain(3600 * S), 1);
        assert_eq!(x.len(), 0);
    }

    #[test]
    fn one_band_per_request_scaled_back_up() {
        let (x, _) = index(4096);
        let centroid = 0xABCD_0123_4567_89EF_u64;
        // 10 orgs, one request each per second for 15 minutes, 500 tokens each, every
        // request filed under one band of the shared centroid.
        for t in 0..900_u64 {
            for org in 0..10_u64 {
                let o = Observation {
                    now_ns: t * S + org,
                    prompt_fp: Some(t * 100 + org),
                    prompt_simhash: Some(t.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    template_fp: Some(org),
                    org_hash: org,
                    key_hash: org,
                    ..Observation::default()
                };
                let id = o.family_id(Some(centroid), false).unwrap();
                assert!(Families::bands(centroid).ids().contains(&id));
                x.observe(id, &o, 500.0);
            }
        }
        for &id in Families::bands(centroid).ids() {
            let s = x.stats(id, 900 * S).unwrap();
            // 600 requests per minute in all, a quarter filed per band, scaled back.
            assert!((s.req_per_min - 600.0).abs() < 90.0, "{s:?}");
            assert!((s.out_per_min - 300_000.0).abs() < 45_000.0, "{s:?}");
            assert!((s.orgs - 10.0).abs() < 2.0, "{s:?}");
        }
        // Without SimHashes the template is the family; without either, none.
        let o = Observation {
            template_fp: Some(5),
            ..Observation::default()
        };
        assert_eq!(o.family_id(None, false), Some(5));
        assert_eq!(Observation::default().family_id(None, false), None);
    }
}
