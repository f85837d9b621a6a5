//! Counters, striped across cache lines so that threads do not contend on them.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

const STRIPES: usize = 16;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe {
    c: [AtomicU64; Counter::COUNT],
}

/// Which counter to bump.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    Allowed = 0,
    DeniedRate = 1,
    DeniedTokens = 2,
    DeniedConcurrency = 3,
    DeniedBehavior = 4,
}

impl Counter {
    const COUNT: usize = 5;
}

#[derive(Debug)]
pub(crate) struct Counters {
    stripes: Box<[Stripe]>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            stripes: (0..2 * STRIPES).map(|_| Stripe::default()).collect(),
        }
    }
}

/// This thread's stripe: `(index, owned)`. The first [`STRIPES`] threads to count each own a
/// stripe for good and bump it with a plain load and store (no locked instruction on the hot
/// path); later threads share the second set of stripes and bump them atomically. Both are
/// exact.
#[inline]
fn stripe_index() -> (usize, bool) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static IDX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    let v = IDX.with(|i| {
        let mut v = i.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, Ordering::Relaxed);
            i.set(v);
        }
        v
    });
    if v < STRIPES {
        (v, true)
    } else {
        (STRIPES + v % STRIPES, false)
    }
}

impl Counters {
    #[inline]
    pub(crate) fn bump(&self, c: Counter) {
        let (i, owned) = stripe_index();
        let cell = &self.stripes[i].c[c as usize];
        if owned {
            // Only this thread ever writes this stripe.
            cell.store(cell.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        } else {
            cell.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn sum(&self, c: Counter) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.c[c as usize].load(Ordering::Relaxed))
            .sum()
    }
}

/// A snapshot of a warden's counters, from [`Warden::stats`](crate::Warden::stats).
///
/// Counters are read one at a time without a global lock, so a snapshot taken while checks run
/// may be off by the checks in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WardenStats {
    /// Requests allowed.
    pub allowed: u64,
    /// Requests denied by a request-rate limit (token bucket or sliding window).
    pub denied_rate: u64,
    /// Requests denied by a token-cost limit.
    pub denied_tokens: u64,
    /// Requests denied by a concurrency limit.
    pub denied_concurrency: u64,
    /// Requests denied for behaviour (challenge or block).
    pub denied_behavior: u64,
    /// Subjects tracked now: api keys, orgs, ip clusters.
    pub tracked: [usize; 3],
    /// Subjects evicted so far, all kinds.
    pub evictions: u64,
    /// Checks that used a kind's shared overflow entry because its table was full.
    pub overflow_hits: u64,
    /// Escalation events dropped because the event queue was full.
    pub events_dropped: u64,
    /// Hooks disabled after a panic.
    pub hooks_panicked: u64,
}
