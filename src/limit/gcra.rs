//! Token bucket as GCRA (generic cell rate algorithm): the whole state is one timestamp, the
//! theoretical arrival time (TAT) of the next unit, in nanoseconds.
//!
//! A cost of `n` conforms at `now` when `max(tat, now) + n·T − now ≤ burst·T`, where `T` is
//! the emission interval (period / rate). `T` is rounded *up* when the period does not divide
//! evenly, so rounding never admits more than the configured rate.

/// Precomputed parameters: no division on the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GcraParams {
    /// Emission interval in nanoseconds per unit (≥ 1).
    pub(crate) t: u64,
    /// Burst capacity in units (≥ 1).
    pub(crate) burst: u64,
    /// `burst · t`: how far the TAT may run ahead of now.
    pub(crate) tau: u64,
}

impl GcraParams {
    /// `rate` units per `period_ns`, with `burst` units of capacity. Returns `None` when the
    /// rate is finer than one unit per nanosecond or `burst · T` overflows.
    pub(crate) fn new(rate: u64, period_ns: u64, burst: u64) -> Option<Self> {
        if rate == 0 || period_ns == 0 || burst == 0 {
            return None;
        }
        let t = period_ns.div_ceil(rate);
        if t == 0 || period_ns / rate == 0 {
            return None;
        }
        let tau = burst.checked_mul(t)?;
        Some(Self { t, burst, tau })
    }
}

/// The outcome of one GCRA step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Conforms; store this new TAT.
    Conform(u64),
    /// Does not conform now; it will in this many nanoseconds.
    Wait(u64),
    /// Can never conform: the cost exceeds the burst or overflows.
    Never,
}

/// One pure GCRA step. A cost of zero conforms and leaves the state unchanged.
#[inline]
pub(crate) fn step(tat: u64, now: u64, cost: u64, p: &GcraParams) -> Step {
    if cost == 0 {
        return Step::Conform(tat);
    }
    let inc = match cost.checked_mul(p.t) {
        Some(inc) if inc <= p.tau => inc,
        _ => return Step::Never,
    };
    let base = tat.max(now);
    let Some(new_tat) = base.checked_add(inc) else {
        return Step::Never;
    };
    let ahead = new_tat - now;
    if ahead <= p.tau {
        Step::Conform(new_tat)
    } else {
        Step::Wait(ahead - p.tau)
    }
}

/// Units left and nanoseconds until the bucket is full again, for headers.
#[inline]
pub(crate) fn remaining(tat: u64, now: u64, p: &GcraParams) -> (u64, u64) {
    let ahead = tat.saturating_sub(now);
    let left = p.tau.saturating_sub(ahead) / p.t;
    (left.min(p.burst), ahead)
}

/// State after settling: `extra` more units charged (debt is allowed and carries forward) or
/// `refund` units given back. Never moves the TAT below zero.
#[inline]
pub(crate) fn adjust(tat: u64, now: u64, extra: u64, refund: u64, p: &GcraParams) -> u64 {
    if extra > 0 {
        tat.max(now).saturating_add(extra.saturating_mul(p.t))
    } else {
        tat.saturating_sub(refund.saturating_mul(p.t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        // 120 per minute, burst 20: T = 0.5 s.
        let p = GcraParams::new(120, 60 * SEC, 20).unwrap();
        assert_eq!(p.t, SEC / 2);
        let mut tat = 0;
        for _ in 0..20 {
            match step(tat, 0, 1, &p) {
                Step::Conform(t) => tat = t,
                other => panic!("expected conform, got {other:?}"),
            }
        }
        assert_eq!(step(tat, 0, 1, &p), Step::Wait(SEC / 2));
        assert!(matches!(step(tat, SEC / 2, 1, &p), Step::Conform(_)));
    }

    #[test]
    fn cost_over_burst_never_conforms_and_max_cost_does_not_overflow() {
        let p = GcraParams::new(10, SEC, 5).unwrap();
        assert_eq!(step(0, 0, 6, &p), Step::Never);
        assert_eq!(step(0, 0, u64::MAX, &p), Step::Never);
        assert_eq!(step(u64::MAX - 1, u64::MAX, 1, &p), Step::Never);
    }

    #[test]
    fn clock_backwards_never_refunds() {
        let p = GcraParams::new(1, SEC, 1).unwrap();
        let Step::Conform(tat) = step(0, 10 * SEC, 1, &p) else {
            panic!()
        };
        // Earlier "now": the TAT does not move back, so nothing is refunded.
        assert_eq!(step(tat, 5 * SEC, 1, &p), Step::Wait(6 * SEC));
    }

    #[test]
    fn rounding_never_over_admits() {
        // 3 per second does not divide 1e9 evenly: T rounds up.
        let p = GcraParams::new(3, SEC, 1).unwrap();
        assert_eq!(p.t, 333_333_334);
        assert!(GcraParams::new(2, 1, 1).is_none());
        assert!(GcraParams::new(0, 1, 1).is_none());
    }

    #[test]
    fn remaining_and_adjust() {
        let p = GcraParams::new(10, SEC, 10).unwrap();
        let Step::Conform(tat) = step(0, 0, 4, &p) else {
            panic!()
        };
        assert_eq!(remaining(tat, 0, &p), (6, 4 * SEC / 10));
        let debt = adjust(tat, 0, 20, 0, &p);
        assert_eq!(remaining(debt, 0, &p), (0, 24 * SEC / 10));
        let back = adjust(debt, 0, 0, 20, &p);
        assert_eq!(back, tat);
    }
}
