//! The bounded keyed store of subjects: a sharded `DashMap` whose values are the subjects'
//! limit cells stored inline, a hard cap on tracked subjects, and idle eviction amortised on
//! caller threads.
//!
//! Subjects are not stored by name. Each api key or org name (and each IP cluster's prefix
//! bits) is hashed once per check with a randomly seeded ahash into a 64-bit [`Id`], and the
//! table is keyed by that id through a pass-through hasher, since it is already uniformly
//! random. A lookup therefore touches the bucket and nothing else: no string comparison, no
//! pointer chase, one hash pass. Two different live subjects share an id with probability about
//! n²/2⁶⁵ for n tracked subjects (≈ 3·10⁻⁸ for a million keys tracked at once); the seed is
//! random per process, so clients cannot aim for a collision, and a collision's only effect is
//! that two subjects share one set of limits.

use std::hash::{BuildHasher, Hash, Hasher};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::mapref::one::Ref;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::limit::AtomicU64 as Cell;
use crate::policy::{Compiled, LimitSet};

/// Only touch `last_seen` when it is this stale, so a hot subject does not write it on every
/// check.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000;

/// Limit cells kept inline in the table bucket; larger limit sets spill to the heap.
const INLINE_CELLS: usize = 2;

/// A 64-bit keyed hash of a subject's name (or of an IP cluster's prefix bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Id(pub(crate) u64);

impl Hash for Id {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

/// Hashes names and cluster prefixes into [`Id`]s with a random per-process seed.
#[derive(Debug)]
pub(crate) struct Namer {
    a: ahash::RandomState,
}

impl Namer {
    /// A namer with a random seed, or with `seed` (reproducible ids).
    pub(crate) fn new(seed: Option<u64>) -> Self {
        Self {
            a: match seed {
                None => ahash::RandomState::new(),
                Some(s) => ahash::RandomState::with_seeds(
                    s,
                    s ^ 0x243F_6A88_85A3_08D3,
                    s ^ 0x1319_8A2E_0370_7344,
                    s ^ 0xA409_3822_299F_31D0,
                ),
            },
        }
    }

    #[inline]
    pub(crate) fn id(&self, name: &str) -> Id {
        Id(self.a.hash_one(name))
    }

    /// The id of the anonymous key of an IP cluster (requests without an API key). Hashed
    /// from the prefix bits with a tag, so no API key string can land on it.
    #[inline]
    pub(crate) fn anonymous(&self, bits: u128) -> Id {
        Id(self.a.hash_one((0x00A1_1CE5_u32, bits)))
    }

    /// The id of an IP cluster, from its prefix bits.
    #[inline]
    pub(crate) fn cluster(&self, bits: u128) -> Id {
        Id(self.a.hash_one(bits))
    }
}

/// A hasher for keys that are already random: it passes the first word through.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PassThrough;

#[derive(Debug, Default)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys that are not `Id`; fold them in (never on the hot path).
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;

    #[inline]
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

/// The state of one subject: one atomic cell per limit, plus bookkeeping. Stored inline in
/// the map's bucket.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) set: Arc<LimitSet>,
    inline: [Cell; INLINE_CELLS],
    spill: Option<Box<Box<[Cell]>>>,
    pub(crate) last_seen: AtomicU64,
    /// Behavioural state, when the behavioural layer is on.
    pub(crate) behavior: Option<Box<crate::behavior::Slot>>,
}

impl Entry {
    pub(crate) fn new(
        set: Arc<LimitSet>,
        now: u64,
        behavior: Option<Box<crate::behavior::Slot>>,
    ) -> Self {
        let n = set.limits.len();
        let spill = (n > INLINE_CELLS).then(|| Box::new((0..n).map(|_| Cell::new(0)).collect()));
        Self {
            set,
            inline: [Cell::new(0), Cell::new(0)],
            spill,
            last_seen: AtomicU64::new(now),
            behavior,
        }
    }

    /// One cell per limit of `self.set`, in the same order.
    #[inline]
    pub(crate) fn cells(&self) -> &[Cell] {
        match &self.spill {
            Some(s) => s,
            None => &self.inline[..self.set.limits.len()],
        }
    }

    #[inline]
    pub(crate) fn touch(&self, now: u64) {
        let seen = self.last_seen.load(Ordering::Relaxed);
        if now > seen.saturating_add(LAST_SEEN_GRANULARITY_NS) {
            self.last_seen.store(now, Ordering::Relaxed);
        }
    }

    /// This entry laid out as `fresh` (made for the same subject under a newer policy),
    /// keeping the state of limits that did not change and the behavioural state.
    ///
    /// Behavioural state starts when the new policy switches the layer on and is dropped when
    /// it switches it off. A change to the policy's exemption of this subject applies; a
    /// swap that leaves it alone keeps an exemption the host set at runtime.
    fn migrate(&self, fresh: Entry, now: u64) -> Entry {
        let Entry { set, behavior, .. } = fresh;
        let carry = set.carry_from(&self.set);
        let behavior = match (&self.behavior, behavior) {
            (Some(old), Some(_)) => {
                let b = old.clone_state();
                if set.exempt != self.set.exempt {
                    b.with(now, |s| s.set_exempt(set.exempt));
                }
                Some(Box::new(b))
            }
            (None, started) => started,
            (Some(_), None) => None,
        };
        let e = Entry::new(set, self.last_seen.load(Ordering::Relaxed), behavior);
        let old = self.cells();
        for (c, from) in e.cells().iter().zip(carry) {
            if let Some(j) = from {
                c.store(old[j].load(Ordering::Acquire), Ordering::Release);
            }
        }
        e
    }

    /// Whether evicting this entry loses nothing: untouched for the idle timeout, limits back
    /// to their initial state (so no slot is held and no debt is pending), and not escalated.
    fn evictable(&self, now: u64, idle_ns: u64) -> bool {
        now.saturating_sub(self.last_seen.load(Ordering::Relaxed)) >= idle_ns
            && self
                .set
                .limits
                .iter()
                .zip(self.cells())
                .all(|(l, c)| l.algo.is_fresh(c, now))
            && self.behavior.as_ref().map_or(true, |b| b.evictable(now))
    }
}

/// A subject's entry during a check: a read guard into the map, or the shared overflow entry.
pub(crate) enum Slot<'a, K> {
    Mapped(Ref<'a, K, Entry>),
    Overflow(Arc<Entry>),
}

impl<K: Eq + Hash> Deref for Slot<'_, K> {
    type Target = Entry;

    #[inline]
    fn deref(&self) -> &Entry {
        match self {
            Slot::Mapped(r) => r.value(),
            Slot::Overflow(e) => e,
        }
    }
}

impl<K> Slot<'_, K> {
    pub(crate) fn is_overflow(&self) -> bool {
        matches!(self, Slot::Overflow(_))
    }
}

/// One shard of a table as dashmap stores it.
type RawShard<K> = hashbrown::raw::RawTable<(K, dashmap::SharedValue<Entry>)>;

/// A read-locked shard and the key to look up in it (see [`Table::read_shard`]).
pub(crate) struct ShardRead<'a, K> {
    guard: dashmap::RwLockReadGuard<'a, RawShard<K>>,
    key: K,
    hash: u64,
}

impl<K: Eq> ShardRead<'_, K> {
    /// The key's entry, if it is tracked, whatever policy it was laid out for (as
    /// [`Table::get`]).
    #[inline]
    pub(crate) fn get(&self) -> Option<&Entry> {
        let (_, v) = self.guard.get(self.hash, |(k, _)| *k == self.key)?;
        Some(v.get())
    }

    /// The key's entry, if it is tracked and laid out for `generation` or a newer policy
    /// (touched, as a look-up through [`Table::get_or_insert`] would).
    #[inline]
    pub(crate) fn find(&self, generation: u64, now: u64) -> Option<&Entry> {
        let e = self.get()?;
        if e.set.generation < generation {
            return None;
        }
        e.touch(now);
        Some(e)
    }
}

/// One kind's subjects.
pub(crate) struct Table<K, S> {
    map: DashMap<K, Entry, S>,
    tracked: AtomicUsize,
    max: AtomicUsize,
    idle_ns: AtomicU64,
    overflow: ArcSwap<Entry>,
    next_maintain: AtomicU64,
    next_full_scan: AtomicU64,
    maintain_lock: Mutex<()>,
    pub(crate) evictions: AtomicU64,
    pub(crate) overflow_hits: AtomicU64,
}

impl<K, S> std::fmt::Debug for Table<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("tracked", &self.tracked.load(Ordering::Relaxed))
            .field("max", &self.max.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Copy, S: BuildHasher + Clone> Table<K, S> {
    pub(crate) fn new(max: usize, idle_ns: u64, overflow: Entry, hasher: S) -> Self {
        Self {
            // Many shards keep the write lock of a first-seen key (and of maintenance) away
            // from most readers.
            map: DashMap::with_capacity_and_hasher_and_shard_amount(0, hasher, 64),
            tracked: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            idle_ns: AtomicU64::new(idle_ns),
            overflow: ArcSwap::from_pointee(overflow),
            next_maintain: AtomicU64::new(0),
            next_full_scan: AtomicU64::new(0),
            maintain_lock: Mutex::new(()),
            evictions: AtomicU64::new(0),
            overflow_hits: AtomicU64::new(0),
        }
    }

    pub(crate) fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Read-locks the shard that holds `key`, without looking it up yet.
    ///
    /// A check locks each of its subjects' shards first and then looks all of them up: on
    /// x86-64 a locked instruction waits for every load before it, so a look-up placed
    /// between two lock acquisitions cannot overlap its cache misses with the next one's.
    /// Callers that hold several must take them in the tables' fixed order (keys, orgs,
    /// clusters), as every other path does, and must not ask for a write lock while they
    /// hold one.
    #[inline]
    pub(crate) fn read_shard(&self, key: K) -> ShardRead<'_, K> {
        let hash = self.map.hasher().hash_one(key);
        let shard = &self.map.shards()[self.map.determine_shard(hash as usize)];
        ShardRead {
            guard: shard.read(),
            key,
            hash,
        }
    }

    /// Finds the subject, or inserts it with `make`. When the table is full even after
    /// amortised maintenance, returns the shared overflow entry instead. (A check whose
    /// subjects are all tracked and current finds them through [`read_shard`](Self::read_shard)
    /// instead; one with a new or stale subject comes here for each of its subjects.)
    ///
    /// Concurrency: a shard read lock when the key is known; the shard write lock the first time
    /// a key is seen. The returned guard holds the read lock until dropped.
    #[inline]
    pub(crate) fn get_or_insert(
        &self,
        key: K,
        now: u64,
        generation: u64,
        make: impl Fn(&Compiled) -> Entry,
        policy: &ArcSwap<Compiled>,
    ) -> Slot<'_, K> {
        if let Some(r) = self.map.get(&key) {
            // Entries are never migrated backwards: one laid out by a newer policy than the
            // generation this check read is used as it is.
            if r.set.generation >= generation {
                r.touch(now);
                return Slot::Mapped(r);
            }
            drop(r);
            if let Some(slot) = self.migrate(key, now, &make, policy) {
                return slot;
            }
        }
        self.insert_slow(key, now, &make, policy)
    }

    #[cold]
    fn insert_slow(
        &self,
        key: K,
        now: u64,
        make: &impl Fn(&Compiled) -> Entry,
        policy: &ArcSwap<Compiled>,
    ) -> Slot<'_, K> {
        if !self.reserve() {
            self.maybe_maintain(now, true);
            if !self.reserve() {
                self.overflow_hits.fetch_add(1, Ordering::Relaxed);
                let e = self.overflow.load_full();
                e.touch(now);
                return Slot::Overflow(e);
            }
        } else {
            self.maybe_maintain(now, false);
        }
        match self.map.entry(key) {
            MapEntry::Occupied(o) => {
                self.tracked.fetch_sub(1, Ordering::Relaxed);
                Slot::Mapped(o.into_ref().downgrade())
            }
            MapEntry::Vacant(v) => Slot::Mapped(v.insert(make(&policy.load())).downgrade()),
        }
    }

    #[cold]
    fn migrate(
        &self,
        key: K,
        now: u64,
        make: &impl Fn(&Compiled) -> Entry,
        policy: &ArcSwap<Compiled>,
    ) -> Option<Slot<'_, K>> {
        let mut r = self.map.get_mut(&key)?;
        let pol = policy.load();
        if r.set.generation < pol.generation {
            *r = r.migrate(make(&pol), now);
        }
        Some(Slot::Mapped(r.downgrade()))
    }

    fn reserve(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        if self.tracked.fetch_add(1, Ordering::AcqRel) >= max {
            self.tracked.fetch_sub(1, Ordering::AcqRel);
            false
        } else {
            true
        }
    }

    /// Runs maintenance if it is due, unless another thread is on it. A full table may scan
    /// sooner than the schedule, but at most once per 1/16 of the idle timeout (at least 100 ms),
    /// so a flood of unseen subjects cannot turn every check into a scan.
    fn maybe_maintain(&self, now: u64, full: bool) {
        let due = if full {
            self.next_full_scan.load(Ordering::Relaxed)
        } else {
            self.next_maintain.load(Ordering::Relaxed)
        };
        if now < due {
            return;
        }
        if let Some(_g) = self.maintain_lock.try_lock() {
            let idle = self.idle_ns.load(Ordering::Relaxed);
            self.next_full_scan.store(
                now.saturating_add((idle / 16).max(100_000_000)),
                Ordering::Relaxed,
            );
            self.retain(now);
        }
    }

    /// Evicts every evictable entry. Returns how many went.
    pub(crate) fn retain(&self, now: u64) -> usize {
        let idle = self.idle_ns.load(Ordering::Relaxed);
        // Next scheduled run: a quarter of the idle timeout from now, at least 1 s apart.
        self.next_maintain.store(
            now.saturating_add((idle / 4).max(1_000_000_000)),
            Ordering::Relaxed,
        );
        let mut removed = 0usize;
        self.map.retain(|_, e| {
            let keep = !e.evictable(now, idle);
            if !keep {
                removed += 1;
            }
            keep
        });
        if removed > 0 {
            self.tracked.fetch_sub(removed, Ordering::AcqRel);
            self.evictions.fetch_add(removed as u64, Ordering::Relaxed);
        }
        removed
    }

    /// Applies new bounds and a new overflow entry after a policy swap.
    /// New limits for the table. The overflow entry `fresh` takes over the state of the
    /// current one as a subject's entry would on migration (`Entry::migrate`), so that
    /// permits charged to it release into it and its shared allowance is not reset.
    pub(crate) fn reconfigure(&self, max: usize, idle_ns: u64, fresh: Entry, now: u64) {
        self.max.store(max, Ordering::Relaxed);
        self.idle_ns.store(idle_ns, Ordering::Relaxed);
        let migrated = self.overflow.load().migrate(fresh, now);
        self.overflow.store(Arc::new(migrated));
    }

    /// Looks a subject up without inserting it.
    pub(crate) fn get(&self, key: &K) -> Option<Ref<'_, K, Entry>> {
        self.map.get(key)
    }

    /// The shared overflow entry.
    pub(crate) fn overflow(&self) -> Arc<Entry> {
        self.overflow.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, Policy};
    use crate::subject::SubjectKind;

    /// The batched look-up (`read_shard` then `find`) lands on the entry that
    /// `get_or_insert` made, and on nothing else.
    #[test]
    fn read_shard_finds_what_get_or_insert_made() {
        let compiled = compile(&Policy::llm_api(), 1, 7, None).unwrap();
        let set = compiled.defaults[SubjectKind::ApiKey.index()].clone();
        let policy = ArcSwap::from_pointee(compiled);
        let table = Table::new(
            10_000,
            u64::MAX,
            Entry::new(set.clone(), 0, None),
            PassThrough,
        );
        let namer = Namer::new(Some(3));
        let ids: Vec<Id> = (0..2_000).map(|i| namer.id(&format!("sk-{i}"))).collect();
        for &id in &ids {
            let slot = table.get_or_insert(id, 5, 1, |_| Entry::new(set.clone(), 5, None), &policy);
            assert!(!slot.is_overflow());
        }
        for &id in &ids {
            let slot = table.get_or_insert(id, 6, 1, |_| unreachable!("known id"), &policy);
            let via_get: &Entry = &slot;
            let shard = table.read_shard(id);
            let found = shard.find(1, 6).expect("tracked and current");
            assert!(std::ptr::eq(found, via_get));
            // An entry laid out for generation 1 is stale for a policy of generation 2.
            assert!(shard.find(2, 6).is_none());
        }
        assert!(table
            .read_shard(namer.id("never seen"))
            .find(1, 6)
            .is_none());
        assert_eq!(table.tracked(), ids.len());
    }
}
