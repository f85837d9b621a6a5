//! The bounded keyed store of subjects: a sharded `DashMap` with a random ahash seed, a hard
//! cap on tracked subjects, and idle eviction amortised on caller threads.

use std::borrow::Borrow;
use std::hash::Hash;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

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

/// The state of one subject: one atomic cell per limit, plus bookkeeping.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) set: Arc<LimitSet>,
    pub(crate) cells: Box<[Cell]>,
    pub(crate) last_seen: AtomicU64,
    /// Policy generation this entry was laid out for.
    pub(crate) generation: u64,
    /// Set when a policy swap replaced this entry: late settlements follow it.
    pub(crate) forward: OnceLock<Arc<Entry>>,
    /// Behavioural state, when the behavioural layer is on.
    pub(crate) behavior: Option<crate::behavior::Slot>,
}

impl Entry {
    pub(crate) fn new(
        set: Arc<LimitSet>,
        generation: u64,
        now: u64,
        behavior: Option<crate::behavior::Slot>,
    ) -> Self {
        let cells = (0..set.limits.len()).map(|_| Cell::new(0)).collect();
        Self {
            set,
            cells,
            last_seen: AtomicU64::new(now),
            generation,
            forward: OnceLock::new(),
            behavior,
        }
    }

    #[inline]
    pub(crate) fn touch(&self, now: u64) {
        let seen = self.last_seen.load(Ordering::Relaxed);
        if now > seen.saturating_add(LAST_SEEN_GRANULARITY_NS) {
            self.last_seen.store(now, Ordering::Relaxed);
        }
    }

    /// The entry that replaced this one, if a policy swap migrated it (followed to the end).
    pub(crate) fn latest(self: &Arc<Self>) -> Arc<Entry> {
        let mut cur = self.clone();
        while let Some(next) = cur.forward.get() {
            cur = next.clone();
        }
        cur
    }

    /// A copy laid out for `set`, keeping the state of limits that did not change.
    fn migrate(&self, set: Arc<LimitSet>, generation: u64) -> Entry {
        let carry = set.carry_from(&self.set);
        let cells = carry
            .iter()
            .map(|c| Cell::new(c.map_or(0, |j| self.cells[j].load(Ordering::Acquire))))
            .collect();
        Entry {
            set,
            cells,
            last_seen: AtomicU64::new(self.last_seen.load(Ordering::Relaxed)),
            generation,
            forward: OnceLock::new(),
            behavior: self.behavior.as_ref().map(|b| b.clone_state()),
        }
    }

    /// Whether evicting this entry loses nothing: limits back to their initial state, not
    /// escalated, no permit outstanding (the caller checks the reference count).
    fn evictable(&self, now: u64, idle_ns: u64) -> bool {
        now.saturating_sub(self.last_seen.load(Ordering::Relaxed)) >= idle_ns
            && self
                .set
                .limits
                .iter()
                .zip(self.cells.iter())
                .all(|(l, c)| l.algo.is_fresh(c, now))
            && self.behavior.as_ref().is_none_or(|b| b.evictable(now))
    }
}

/// A subject's entry during a check: a read guard into the map, or the shared overflow entry.
pub(crate) enum Slot<'a, K> {
    Mapped(Ref<'a, K, Arc<Entry>>),
    Overflow(Arc<Entry>),
}

impl<K: Eq + Hash> Deref for Slot<'_, K> {
    type Target = Arc<Entry>;

    #[inline]
    fn deref(&self) -> &Arc<Entry> {
        match self {
            Slot::Mapped(r) => r.value(),
            Slot::Overflow(e) => e,
        }
    }
}

/// One kind's subjects.
pub(crate) struct Table<K> {
    map: DashMap<K, Arc<Entry>, ahash::RandomState>,
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

impl<K> std::fmt::Debug for Table<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("tracked", &self.tracked.load(Ordering::Relaxed))
            .field("max", &self.max.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone> Table<K> {
    pub(crate) fn new(max: usize, idle_ns: u64, overflow: Entry) -> Self {
        Self {
            // Many shards keep the write lock of a first-seen key (and of maintenance) away
            // from most readers.
            map: DashMap::with_capacity_and_hasher_and_shard_amount(
                0,
                ahash::RandomState::new(),
                64,
            ),
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

    /// Finds the subject, or inserts it with `make`. When the table is full even after
    /// amortised maintenance, returns the shared overflow entry instead.
    ///
    /// Concurrency: a shard read lock when the key is known; the shard write lock the first time
    /// a key is seen. The returned guard holds the read lock until dropped.
    #[inline]
    pub(crate) fn get_or_insert<Q>(
        &self,
        key: &Q,
        now: u64,
        generation: u64,
        to_owned: impl FnOnce() -> K,
        make: impl Fn(&Compiled) -> Entry,
        policy: &ArcSwap<Compiled>,
    ) -> Slot<'_, K>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(r) = self.map.get(key) {
            // Entries are never migrated backwards: one laid out by a newer policy than the
            // generation this check read is used as it is.
            if r.generation >= generation {
                r.touch(now);
                return Slot::Mapped(r);
            }
            drop(r);
            if let Some(slot) = self.migrate(key, &make, policy) {
                return slot;
            }
        }
        self.insert_slow(now, to_owned, &make, policy)
    }

    #[cold]
    fn insert_slow(
        &self,
        now: u64,
        to_owned: impl FnOnce() -> K,
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
        match self.map.entry(to_owned()) {
            MapEntry::Occupied(o) => {
                self.tracked.fetch_sub(1, Ordering::Relaxed);
                o.into_ref().downgrade().into()
            }
            MapEntry::Vacant(v) => v.insert(Arc::new(make(&policy.load()))).downgrade().into(),
        }
    }

    #[cold]
    fn migrate<Q>(
        &self,
        key: &Q,
        make: &impl Fn(&Compiled) -> Entry,
        policy: &ArcSwap<Compiled>,
    ) -> Option<Slot<'_, K>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut r = self.map.get_mut(key)?;
        let pol = policy.load();
        if r.generation < pol.generation {
            let fresh = make(&pol);
            let next = Arc::new(r.migrate(fresh.set.clone(), pol.generation));
            let _ = r.forward.set(next.clone());
            *r = next;
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
            let keep = Arc::strong_count(e) > 1 || !e.evictable(now, idle);
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
    pub(crate) fn reconfigure(&self, max: usize, idle_ns: u64, overflow: Entry) {
        self.max.store(max, Ordering::Relaxed);
        self.idle_ns.store(idle_ns, Ordering::Relaxed);
        let old = self.overflow.swap(Arc::new(overflow));
        let _ = old.forward.set(self.overflow.load_full());
    }

    pub(crate) fn overflow_generation(&self) -> u64 {
        self.overflow.load().generation
    }

    /// Looks a subject up without inserting it.
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<Entry>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|r| r.value().clone())
    }

    /// Visits every tracked entry (read locks, one shard at a time).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&K, &Arc<Entry>)) {
        for r in self.map.iter() {
            f(r.key(), r.value());
        }
    }
}

impl<'a, K: Eq + Hash> From<Ref<'a, K, Arc<Entry>>> for Slot<'a, K> {
    fn from(r: Ref<'a, K, Arc<Entry>>) -> Self {
        Slot::Mapped(r)
    }
}
