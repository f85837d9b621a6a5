//! Sliding window counter: two fixed windows packed into one `u64`, with the previous
//! window's count weighted by how much of it still overlaps the sliding window.
//!
//! # Error bound
//!
//! The estimate assumes the previous window's requests were spread evenly. The limit is exact
//! for every aligned window (at most `limit` in any `[kW, (k+1)W)`), and any interval of one
//! window length `W` admits **at most `2·limit`**: it overlaps at most two aligned windows.
//! The worst case needs the previous window's whole quota to land at its very end; with
//! evenly spread traffic the sliding count is exact. Over an interval of length `L` at most
//! `limit · (⌈L/W⌉ + 1)` are admitted.
//!
//! # Packing
//!
//! `seq` (24 bits, the window index modulo 2^24) | `cur` (20 bits) | `prev` (20 bits). Limits
//! are therefore at most 1,048,575 per window (checked at build time). A clock that goes back
//! by at most 2^16 windows keeps the stored counts (no refund); one that goes back further is
//! taken as a forward jump, and the counts are dropped. The index wraps after 2^24 windows
//! (4.7 hours of 1 ms windows, 194 days of 1 s ones): a subject left untouched for a multiple
//! of that, or up to 2^16 windows short of one, is read as current or as a clock gone back,
//! and keeps its old counts for at most 2^16 windows. Idle subjects are evicted long before.

pub(crate) const MAX_WINDOW_LIMIT: u64 = (1 << 20) - 1;
/// How far back (in windows) a clock may go and still be taken as going back (see `view`).
const BACKWARDS_WINDOWS: u64 = 1 << 16;
const SEQ_MASK: u64 = (1 << 24) - 1;
const CNT_MASK: u64 = (1 << 20) - 1;

/// Window length and limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WindowParams {
    pub(crate) window: u64,
    pub(crate) limit: u64,
}

#[inline]
fn unpack(s: u64) -> (u64, u64, u64) {
    (s >> 40, (s >> 20) & CNT_MASK, s & CNT_MASK)
}

#[inline]
fn pack(seq: u64, cur: u64, prev: u64) -> u64 {
    ((seq & SEQ_MASK) << 40) | ((cur & CNT_MASK) << 20) | (prev & CNT_MASK)
}

/// The counts as seen from `now`: (seq, cur, prev, elapsed in the current window).
#[inline]
fn view(state: u64, now: u64, p: &WindowParams) -> (u64, u64, u64, u64) {
    let idx = now / p.window;
    let elapsed = now - idx * p.window;
    let seq = idx & SEQ_MASK;
    let (s_seq, cur, prev) = unpack(state);
    if state == 0 {
        (seq, 0, 0, elapsed)
    } else if s_seq == seq {
        (seq, cur, prev, elapsed)
    } else if (s_seq + 1) & SEQ_MASK == seq {
        (seq, 0, cur, elapsed)
    } else {
        // Older than one window, or the clock went back past the stored window: then the
        // stored counts stay current, so a backwards clock never refunds. Only a stored
        // window at most `BACKWARDS_WINDOWS` ahead counts as a clock gone back; anything
        // else is a forward gap, so that a subject idle for between 2^23 and 2^24 windows
        // (2.3 to 4.7 hours of 1 ms windows) is not read as "ahead" and refused until the
        // index wraps.
        if s_seq.wrapping_sub(seq) & SEQ_MASK <= BACKWARDS_WINDOWS {
            (s_seq, cur, prev, elapsed)
        } else {
            (seq, 0, 0, elapsed)
        }
    }
}

/// Weighted count of the previous window, rounded up.
#[inline]
fn weighted(prev: u64, elapsed: u64, p: &WindowParams) -> u64 {
    let num = u128::from(prev) * u128::from(p.window - elapsed);
    num.div_ceil(u128::from(p.window)) as u64
}

/// Outcome of a window step, as for GCRA.
pub(crate) use super::gcra::Step;

/// One pure step.
#[inline]
pub(crate) fn step(state: u64, now: u64, cost: u64, p: &WindowParams) -> Step {
    if cost == 0 {
        return Step::Conform(state);
    }
    if cost > p.limit {
        return Step::Never;
    }
    let (seq, cur, prev, elapsed) = view(state, now, p);
    let est = weighted(prev, elapsed, p) + cur;
    if est + cost <= p.limit {
        return Step::Conform(pack(seq, cur + cost, prev));
    }
    Step::Wait(wait(cur, prev, elapsed, cost, p))
}

/// Nanoseconds until `cost` conforms, assuming no other traffic.
fn wait(cur: u64, prev: u64, elapsed: u64, cost: u64, p: &WindowParams) -> u64 {
    let w = u128::from(p.window);
    // Smallest e with ceil(n·(W−e)/W) ≤ room, i.e. n·(W−e) ≤ room·W.
    let need = |n: u64, room: u64| -> u64 {
        if n == 0 {
            return 0;
        }
        let keep = (u128::from(room) * w) / u128::from(n); // largest W−e allowed
        (w - keep.min(w)) as u64
    };
    if cur + cost <= p.limit {
        let e = need(prev, p.limit - cur - cost);
        e.saturating_sub(elapsed).max(1)
    } else {
        // The current window's count becomes the previous one at the next boundary.
        let to_boundary = p.window - elapsed;
        to_boundary + need(cur, p.limit - cost)
    }
}

/// Limit, remaining and nanoseconds to the end of the current window, for headers.
#[inline]
pub(crate) fn remaining(state: u64, now: u64, p: &WindowParams) -> (u64, u64) {
    let (_, cur, prev, elapsed) = view(state, now, p);
    let est = weighted(prev, elapsed, p) + cur;
    (p.limit.saturating_sub(est), p.window - elapsed)
}

/// Takes back `cost` charged at some earlier time in the same or the previous window.
#[inline]
pub(crate) fn rollback(state: u64, now: u64, cost: u64, charged_seq: u64, p: &WindowParams) -> u64 {
    let (seq, cur, prev, _) = view(state, now, p);
    if seq == charged_seq & SEQ_MASK {
        pack(seq, cur.saturating_sub(cost), prev)
    } else if (charged_seq + 1) & SEQ_MASK == seq {
        pack(seq, cur, prev.saturating_sub(cost))
    } else {
        state
    }
}

/// The window sequence number of `now` (for [`rollback`]).
#[inline]
pub(crate) fn seq_of(now: u64, p: &WindowParams) -> u64 {
    (now / p.window) & SEQ_MASK
}

/// Whether the state is indistinguishable from a fresh one at `now`.
#[inline]
pub(crate) fn is_fresh(state: u64, now: u64, p: &WindowParams) -> bool {
    let (_, cur, prev, elapsed) = view(state, now, p);
    cur == 0 && weighted(prev, elapsed, p) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// A subject idle for between 2^23 and 2^24 windows is not read as ahead of the clock
    /// (it used to be refused, and kept from eviction, until the window index wrapped), and
    /// a clock gone back a few windows still keeps the counts.
    #[test]
    fn a_long_idle_subject_is_not_read_as_ahead() {
        let p = WindowParams {
            window: 1_000_000,
            limit: 1,
        };
        let Step::Conform(s) = step(0, SEC, 1, &p) else {
            panic!("first request")
        };
        for gap in [(1 << 23) + 10, (1 << 24) - BACKWARDS_WINDOWS - 1] {
            let later = SEC + gap * p.window;
            assert!(matches!(step(s, later, 1, &p), Step::Conform(_)), "{gap}");
            assert!(is_fresh(s, later, &p), "{gap}");
        }
        let back = SEC - 5 * p.window;
        assert!(matches!(step(s, back, 1, &p), Step::Wait(_)));
        assert!(!is_fresh(s, back, &p));
    }

    fn run(p: &WindowParams, times: &[u64]) -> Vec<bool> {
        let mut s = 0;
        times
            .iter()
            .map(|&t| match step(s, t, 1, p) {
                Step::Conform(n) => {
                    s = n;
                    true
                }
                _ => false,
            })
            .collect()
    }

    #[test]
    fn aligned_window_is_exact() {
        let p = WindowParams {
            window: SEC,
            limit: 3,
        };
        assert_eq!(run(&p, &[0, 1, 2, 3]), vec![true, true, true, false]);
    }

    #[test]
    fn previous_window_is_weighted() {
        let p = WindowParams {
            window: 10 * SEC,
            limit: 10,
        };
        let mut s = 0;
        for _ in 0..10 {
            let Step::Conform(n) = step(s, 0, 1, &p) else {
                panic!()
            };
            s = n;
        }
        // At 15 s: half of the previous 10 still count, so 5 more fit.
        let mut admitted = 0;
        for _ in 0..10 {
            if let Step::Conform(n) = step(s, 15 * SEC, 1, &p) {
                s = n;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
        // The wait reported for the next one is honoured.
        let Step::Wait(w) = step(s, 15 * SEC, 1, &p) else {
            panic!()
        };
        assert!(matches!(step(s, 15 * SEC + w, 1, &p), Step::Conform(_)));
        assert!(!matches!(step(s, 15 * SEC + w - 1, 1, &p), Step::Conform(_)) || w == 1);
    }

    #[test]
    fn old_state_resets_and_backwards_clock_keeps_counts() {
        let p = WindowParams {
            window: SEC,
            limit: 1,
        };
        let Step::Conform(s) = step(0, 5 * SEC, 1, &p) else {
            panic!()
        };
        assert!(matches!(step(s, 5 * SEC, 1, &p), Step::Wait(_)));
        assert!(matches!(step(s, 7 * SEC, 1, &p), Step::Conform(_)));
        // Going back in time does not forget the charge.
        assert!(matches!(step(s, 2 * SEC, 1, &p), Step::Wait(_)));
    }

    #[test]
    fn rollback_undoes_a_charge() {
        let p = WindowParams {
            window: SEC,
            limit: 2,
        };
        let Step::Conform(s) = step(0, 10, 2, &p) else {
            panic!()
        };
        let seq = seq_of(10, &p);
        let r = rollback(s, 20, 2, seq, &p);
        assert!(is_fresh(r, 20, &p));
        assert_eq!(step(0, 5, 3, &p), Step::Never);
    }
}
