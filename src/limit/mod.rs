//! The limit algorithms: pure math in each submodule, applied here to one atomic cell with a
//! compare-and-swap loop.

pub(crate) mod concurrency;
pub(crate) mod gcra;
pub(crate) mod window;

#[cfg(ratewarden_loom)]
pub(crate) use loom::sync::atomic::AtomicU64;
#[cfg(not(ratewarden_loom))]
pub(crate) use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use gcra::{GcraParams, Step};
use window::WindowParams;

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Unit {
    Requests,
    Tokens,
    InFlight,
}

/// A validated algorithm with its precomputed parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Algo {
    /// Token bucket as GCRA, counting requests.
    Gcra(GcraParams),
    /// Sliding window counter, counting requests.
    Window(WindowParams),
    /// In-flight requests.
    Concurrency(u64),
    /// Token bucket over tokens (input + output), settled after the response.
    Tokens(GcraParams),
}

/// Result of trying one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Conforms; the cell's state after the charge.
    Ok(u64),
    /// Refused; conforms after this many nanoseconds, or never (`None`).
    Refused(Option<u64>),
}

impl Outcome {
    #[cfg(all(test, ratewarden_loom))]
    fn is_ok(self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

impl Algo {
    pub(crate) fn unit(&self) -> Unit {
        match self {
            Algo::Gcra(_) | Algo::Window(_) => Unit::Requests,
            Algo::Tokens(_) => Unit::Tokens,
            Algo::Concurrency(_) => Unit::InFlight,
        }
    }

    /// The configured limit (for headers): burst, window limit, max in flight or token capacity.
    pub(crate) fn quota(&self) -> u64 {
        match self {
            Algo::Gcra(p) | Algo::Tokens(p) => p.burst,
            Algo::Window(p) => p.limit,
            Algo::Concurrency(m) => *m,
        }
    }

    /// The window the quota refers to, in nanoseconds (for `RateLimit-Policy`).
    pub(crate) fn window_ns(&self) -> u64 {
        match self {
            Algo::Gcra(p) | Algo::Tokens(p) => p.tau,
            Algo::Window(p) => p.window,
            Algo::Concurrency(_) => 0,
        }
    }

    #[inline]
    fn pure(&self, state: u64, now: u64, cost: u64) -> Step {
        match self {
            Algo::Gcra(p) | Algo::Tokens(p) => gcra::step(state, now, cost, p),
            Algo::Window(p) => window::step(state, now, cost, p),
            Algo::Concurrency(max) => concurrency::step(state, cost, *max),
        }
    }

    /// Would `cost` conform now? Reads the cell, writes nothing.
    #[inline]
    pub(crate) fn peek(&self, cell: &AtomicU64, now: u64, cost: u64) -> Outcome {
        to_outcome(self.pure(cell.load(Ordering::Acquire), now, cost))
    }

    /// Charges `cost` if it conforms, atomically: a CAS loop that re-evaluates on contention,
    /// so concurrent callers can never together exceed the limit.
    #[inline]
    pub(crate) fn try_charge(&self, cell: &AtomicU64, now: u64, cost: u64) -> Outcome {
        let mut cur = cell.load(Ordering::Acquire);
        loop {
            match self.pure(cur, now, cost) {
                Step::Conform(next) => {
                    if next == cur {
                        return Outcome::Ok(cur);
                    }
                    match cell.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => return Outcome::Ok(next),
                        Err(actual) => cur = actual,
                    }
                }
                other => return to_outcome(other),
            }
        }
    }

    /// Undoes a successful [`try_charge`](Self::try_charge) of `cost` made at `charged_at`,
    /// which left the cell at `written` when the caller kept it (`try_charge`'s state).
    ///
    /// A window or concurrency charge is a count and comes out exactly. A token bucket's
    /// charge moved its TAT by `cost · T`. If the cell still holds `written`, that is undone
    /// exactly. If other threads changed it since, their charges built on ours only if they
    /// came before ours had drained (before `written`, or `charged_at + cost · T` when it is
    /// not known): then ours comes out whole. A later charge started from an empty bucket,
    /// and taking ours out would take its units instead, so then ours stays charged (the
    /// refused request keeps its cost; nothing is ever over-admitted). `real_now` reads the
    /// clock for that test, only when the cell changed.
    pub(crate) fn rollback(
        &self,
        cell: &AtomicU64,
        cost: u64,
        charged_at: u64,
        written: Option<u64>,
        real_now: impl FnOnce() -> u64,
    ) {
        if cost == 0 {
            return;
        }
        match self {
            Algo::Gcra(p) | Algo::Tokens(p) => {
                let undo = |s| gcra::adjust(s, charged_at, 0, cost, p);
                if let Some(w) = written {
                    let exact =
                        cell.compare_exchange(w, undo(w), Ordering::AcqRel, Ordering::Acquire);
                    if exact.is_ok() {
                        return;
                    }
                }
                let drained_at =
                    written.unwrap_or(charged_at.saturating_add(cost.saturating_mul(p.t)));
                if real_now() <= drained_at {
                    let _ =
                        cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(undo(s)));
                }
            }
            Algo::Window(p) => {
                let seq = window::seq_of(charged_at, p);
                let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    Some(window::rollback(s, charged_at, cost, seq, p))
                });
            }
            Algo::Concurrency(_) => self.release(cell, cost),
        }
    }

    /// Gives back `cost` slots of a concurrency limit (a permit's release); other limits
    /// have no slots, and are left alone.
    pub(crate) fn release(&self, cell: &AtomicU64, cost: u64) {
        if let Algo::Concurrency(_) = self {
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(s.saturating_sub(cost))
            });
        }
    }

    /// Settles a token charge of `charged` units made at `charged_at`: `extra` more (debt
    /// allowed) or `refund` back. A refund never returns capacity that the bucket has already
    /// refilled: it is capped at the part of `charged` not refilled since `charged_at` (at
    /// one unit per emission interval). Without the cap, settling old reservations would
    /// hand back their refilled capacity a second time, and a client holding several could
    /// draw several bursts at one instant.
    pub(crate) fn settle(
        &self,
        cell: &AtomicU64,
        now: u64,
        extra: u64,
        refund: u64,
        charged: u64,
        charged_at: u64,
    ) {
        if let Algo::Tokens(p) = self {
            let refilled = now.saturating_sub(charged_at) / p.t;
            let refund = refund.min(charged.saturating_sub(refilled));
            if extra == 0 && refund == 0 {
                return;
            }
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(gcra::adjust(s, now, extra, refund, p))
            });
        }
    }

    /// (remaining, nanoseconds until reset) at `now`, for headers.
    pub(crate) fn remaining(&self, cell: &AtomicU64, now: u64) -> (u64, u64) {
        let s = cell.load(Ordering::Acquire);
        match self {
            Algo::Gcra(p) | Algo::Tokens(p) => gcra::remaining(s, now, p),
            Algo::Window(p) => window::remaining(s, now, p),
            Algo::Concurrency(max) => (max.saturating_sub(s), 0),
        }
    }

    /// Whether the cell holds nothing a fresh cell would not (safe to evict).
    pub(crate) fn is_fresh(&self, cell: &AtomicU64, now: u64) -> bool {
        let s = cell.load(Ordering::Acquire);
        match self {
            Algo::Gcra(_) | Algo::Tokens(_) => s <= now,
            Algo::Window(p) => window::is_fresh(s, now, p),
            Algo::Concurrency(_) => s == 0,
        }
    }
}

#[inline]
fn to_outcome(s: Step) -> Outcome {
    match s {
        Step::Conform(next) => Outcome::Ok(next),
        Step::Wait(ns) => Outcome::Refused(Some(ns)),
        Step::Never => Outcome::Refused(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token bucket of 2, one unit per 10 ns.
    fn bucket() -> Algo {
        Algo::Gcra(GcraParams::new(1, 10, 2).unwrap())
    }

    fn charge(algo: &Algo, cell: &AtomicU64, now: u64) -> u64 {
        match algo.try_charge(cell, now, 1) {
            Outcome::Ok(s) => s,
            other => panic!("expected a charge at {now}, got {other:?}"),
        }
    }

    /// A rollback with nothing in between restores the cell exactly; one with another
    /// charge in between that built on ours takes ours out and keeps theirs.
    #[test]
    fn rollback_takes_out_exactly_its_own_charge() {
        let algo = bucket();
        let cell = AtomicU64::new(0);
        let w = charge(&algo, &cell, 0);
        algo.rollback(&cell, 1, 0, Some(w), || panic!("no clock needed"));
        assert_eq!(cell.load(Ordering::Relaxed), 0);

        // A at 0 (TAT 10), B at 5 builds on it (TAT 20); A rolls back at 5.
        let a = charge(&algo, &cell, 0);
        charge(&algo, &cell, 5);
        algo.rollback(&cell, 1, 0, Some(a), || 5);
        assert_eq!(cell.load(Ordering::Relaxed), 10, "B's unit stays");
    }

    /// Thread A charges at 0 and stalls; B charges at 20, when A's unit has drained, so B
    /// starts from an empty bucket; then A rolls back. Taking A's unit out would take B's:
    /// the old rollback left TAT 20 and admitted a third unit at 20 (three in 20 ns from a
    /// bucket of 2 that had drained only one). A's charge now stays.
    #[test]
    fn a_stalled_rollback_never_takes_out_a_later_charge() {
        let algo = bucket();
        let cell = AtomicU64::new(0);
        let a = charge(&algo, &cell, 0);
        charge(&algo, &cell, 20);
        algo.rollback(&cell, 1, 0, Some(a), || 20);
        assert_eq!(cell.load(Ordering::Relaxed), 30);
        charge(&algo, &cell, 20);
        assert!(matches!(algo.try_charge(&cell, 20, 1), Outcome::Refused(_)));
        // Without the written state, the charge time bounds when A's unit drained.
        let cell = AtomicU64::new(0);
        charge(&algo, &cell, 0);
        charge(&algo, &cell, 20);
        algo.rollback(&cell, 1, 0, None, || 20);
        assert_eq!(cell.load(Ordering::Relaxed), 30);
    }
}

#[cfg(all(test, ratewarden_loom))]
mod loom_tests {
    //! Model-checks the CAS cell: two threads racing on one GCRA cell admit exactly the burst,
    //! and a charge plus its rollback leaves the cell as it was.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn loom_gcra_never_over_admits() {
        loom::model(|| {
            let algo = Algo::Gcra(GcraParams::new(1, 1_000, 2).unwrap());
            let cell = Arc::new(AtomicU64::new(0));
            let admitted = Arc::new(AtomicU64::new(0));
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let cell = cell.clone();
                    let admitted = admitted.clone();
                    thread::spawn(move || {
                        for _ in 0..2 {
                            if algo.try_charge(&cell, 0, 1).is_ok() {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(admitted.load(Ordering::Relaxed), 2);
        });
    }

    /// A charge rolled back while another thread charges the same bucket (the clock frozen,
    /// as within one check): whatever the interleaving, exactly the other charge remains.
    #[test]
    fn loom_gcra_rollback_keeps_the_other_charge() {
        loom::model(|| {
            let algo = Algo::Gcra(GcraParams::new(1, 1_000, 2).unwrap());
            let cell = Arc::new(AtomicU64::new(0));
            let c2 = cell.clone();
            let t = thread::spawn(move || {
                if let Outcome::Ok(w) = algo.try_charge(&c2, 0, 1) {
                    algo.rollback(&c2, 1, 0, Some(w), || 0);
                }
            });
            assert!(algo.try_charge(&cell, 0, 1).is_ok());
            t.join().unwrap();
            assert_eq!(cell.load(Ordering::Relaxed), 1_000);
        });
    }

    #[test]
    fn loom_concurrency_slots_and_rollback() {
        loom::model(|| {
            let algo = Algo::Concurrency(1);
            let cell = Arc::new(AtomicU64::new(0));
            let c2 = cell.clone();
            let t = thread::spawn(move || {
                if algo.try_charge(&c2, 0, 1).is_ok() {
                    algo.rollback(&c2, 1, 0, None, || 0);
                    1
                } else {
                    0
                }
            });
            let mine = if algo.try_charge(&cell, 0, 1).is_ok() {
                algo.rollback(&cell, 1, 0, None, || 0);
                1
            } else {
                0
            };
            let theirs = t.join().unwrap();
            assert!(mine + theirs >= 1);
            assert_eq!(cell.load(Ordering::Relaxed), 0);
        });
    }
}
