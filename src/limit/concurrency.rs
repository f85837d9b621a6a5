//! Concurrency: the cell counts requests in flight; a slot is released when its permit drops.

use super::gcra::Step;

/// Takes `cost` slots if `in_flight + cost ≤ max`.
#[inline]
pub(crate) fn step(in_flight: u64, cost: u64, max: u64) -> Step {
    if cost == 0 {
        return Step::Conform(in_flight);
    }
    if cost > max {
        return Step::Never;
    }
    match in_flight.checked_add(cost) {
        Some(n) if n <= max => Step::Conform(n),
        // The wait depends on when other requests finish; report a nominal 1 s.
        _ => Step::Wait(1_000_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots() {
        assert_eq!(step(0, 1, 2), Step::Conform(1));
        assert_eq!(step(1, 1, 2), Step::Conform(2));
        assert!(matches!(step(2, 1, 2), Step::Wait(_)));
        assert_eq!(step(0, 3, 2), Step::Never);
        assert_eq!(step(u64::MAX, 1, u64::MAX), Step::Wait(1_000_000_000));
    }
}
