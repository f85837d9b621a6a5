//! Time sources. A warden reads its clock exactly once per decision.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A monotonic time source, in nanoseconds since an arbitrary origin.
///
/// Implement it to drive a warden from your own time base (a replayed log, a simulation).
/// The warden tolerates a clock that goes backwards: elapsed time saturates to zero, so a
/// backwards step never refunds capacity.
///
/// # Examples
///
/// ```
/// use ratewarden::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// clock.advance(Duration::from_millis(5));
/// assert_eq!(clock.now_nanos(), 5_000_000);
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Nanoseconds since this clock's origin.
    fn now_nanos(&self) -> u64;
}

/// The default wall-independent clock: monotonic time from `quanta`.
///
/// `quanta` reads the CPU's time-stamp counter where it is stable and falls back to the OS
/// monotonic clock elsewhere; the `clock` benchmark group compares it with `Instant` (see
/// `benches/README.md`).
#[derive(Debug, Clone)]
pub struct SystemClock {
    clock: quanta::Clock,
    origin: u64,
}

impl SystemClock {
    /// Creates a clock whose origin is now.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{Clock, SystemClock};
    /// let c = SystemClock::new();
    /// let a = c.now_nanos();
    /// assert!(c.now_nanos() >= a);
    /// ```
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let origin = clock.raw();
        Self { clock, origin }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.clock.delta_as_nanos(self.origin, self.clock.raw())
    }
}

/// A clock based on [`std::time::Instant`]; kept for comparison and for hosts that prefer it.
#[derive(Debug, Clone, Copy)]
pub struct InstantClock {
    origin: std::time::Instant,
}

impl InstantClock {
    /// Creates a clock whose origin is now.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{Clock, InstantClock};
    /// assert!(InstantClock::new().now_nanos() < 1_000_000_000);
    /// ```
    pub fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl Default for InstantClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for InstantClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// Use it in tests and in replay: inject it with [`WardenBuilder::clock`](crate::WardenBuilder::clock)
/// and advance it by hand.
///
/// # Examples
///
/// ```
/// use ratewarden::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let handle = clock.clone();
/// handle.advance(Duration::from_secs(1));
/// assert_eq!(clock.now_nanos(), 1_000_000_000);
/// clock.set_nanos(10); // going backwards is allowed; the warden never refunds for it
/// assert_eq!(handle.now_nanos(), 10);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// Creates a clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            });
    }

    /// Sets the absolute time in nanoseconds. It may go backwards.
    pub fn set_nanos(&self, nanos: u64) {
        self.now.store(nanos, Ordering::Release);
    }

    /// Sets the absolute time in milliseconds (saturating).
    pub fn set_millis(&self, millis: u64) {
        self.set_nanos(millis.saturating_mul(1_000_000));
    }
}

impl Clock for ManualClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }
}
