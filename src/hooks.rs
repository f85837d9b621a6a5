//! Escalation events: the hook trait, a bounded queue the host can drain, and the runner that
//! calls hooks without ever letting one take the warden down.
//!
//! Events are produced only when a subject's level changes (or a host sets one by hand),
//! never per request. The warden calls hooks outside any map or subject lock.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::behavior::Level;
use crate::subject::SubjectKind;

/// One piece of evidence behind a level change.
///
/// # Examples
///
/// ```
/// use ratewarden::Reason;
/// let r: Reason = serde_json::from_str(
///     r#"{"detector":"template_spread","value":40.0,"threshold":16.0,"contribution":1.0}"#,
/// ).unwrap();
/// assert_eq!(r.detector, "template_spread");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reason {
    /// Stable detector name: `output_volume`, `logprob_harvest`, `template_sweep`,
    /// `prompt_diversity`, `ip_spread`, `template_spread`, `key_fanout`, `key_churn`,
    /// `regular_timing`, `pinned` or `propagation`.
    pub detector: Cow<'static, str>,
    /// What the detector measured, in its natural unit (tokens per minute, distinct orgs, a
    /// share, a coefficient of variation, …).
    pub value: f64,
    /// The value at which the detector reaches full strength (for `regular_timing`, the CV at
    /// or below which it does).
    pub threshold: f64,
    /// What this reason added to the score: weight × strength (strength is 0–1, up to 2 for
    /// the volume detectors).
    pub contribution: f64,
}

/// A change of a subject's escalation level.
///
/// # Examples
///
/// ```
/// use ratewarden::{EscalationEvent, Level};
/// let json = r#"{"subject_kind":"api_key","subject":"k-17","from":"watch","to":"throttle",
///   "score":1.8,"reasons":[],"at_ms":120000,"shadow":false,"manual":false}"#;
/// let e: EscalationEvent = serde_json::from_str(json).unwrap();
/// assert_eq!(e.to, Level::Throttle);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EscalationEvent {
    /// Kind of the subject.
    pub subject_kind: SubjectKind,
    /// The subject's id (API key, org, or IP cluster in prefix form).
    pub subject: String,
    /// Level before.
    pub from: Level,
    /// Level after.
    pub to: Level,
    /// Score at the change (0 for manual changes).
    pub score: f32,
    /// Evidence, strongest first (empty for manual changes).
    pub reasons: Vec<Reason>,
    /// Warden clock time of the change, in milliseconds.
    pub at_ms: u64,
    /// Whether the change is only reported (shadow mode) and not enforced.
    pub shadow: bool,
    /// Whether a host set the level by hand.
    pub manual: bool,
}

/// Receives escalation events. The default does nothing.
///
/// Hooks run on the thread whose request caused the change, outside every lock of the
/// warden, inside `catch_unwind`: a hook that panics is disabled for good and counted, and
/// the panic goes no further. Keep hooks short; send anything slow to a channel or use the
/// [`EventQueue`].
///
/// # Examples
///
/// ```
/// use ratewarden::{EscalationEvent, EscalationHook};
/// struct Log;
/// impl EscalationHook for Log {
///     fn on_escalation(&self, event: &EscalationEvent) {
///         eprintln!("{} {} -> {}", event.subject, event.from, event.to);
///     }
/// }
/// // Closures are hooks too.
/// fn takes_hook(_: impl EscalationHook) {}
/// takes_hook(|e: &EscalationEvent| eprintln!("{}", e.to));
/// takes_hook(Log);
/// ```
pub trait EscalationHook: Send + Sync + 'static {
    /// Called once per level change.
    fn on_escalation(&self, event: &EscalationEvent) {
        let _ = event;
    }
}

impl<F> EscalationHook for F
where
    F: Fn(&EscalationEvent) + Send + Sync + 'static,
{
    fn on_escalation(&self, event: &EscalationEvent) {
        self(event);
    }
}

/// A hook that does nothing.
///
/// # Examples
///
/// ```
/// use ratewarden::{EscalationHook, NoopHook};
/// fn takes_hook(_: impl EscalationHook) {}
/// takes_hook(NoopHook);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoopHook;

impl EscalationHook for NoopHook {}

/// A bounded queue of escalation events for hosts that poll instead of (or as well as) using
/// hooks. A full queue drops the *new* event and counts it.
///
/// **Concurrency:** `push` and `drain` take one short mutex; `push` never allocates once the
/// queue has grown to its capacity, and never blocks beyond that critical section.
///
/// # Examples
///
/// ```
/// use ratewarden::EventQueue;
/// let q = EventQueue::new(2);
/// assert!(q.is_empty());
/// assert_eq!(q.capacity(), 2);
/// assert!(q.drain().is_empty());
/// assert_eq!(q.dropped(), 0);
/// ```
pub struct EventQueue {
    inner: Mutex<VecDeque<EscalationEvent>>,
    capacity: usize,
    dropped: AtomicU64,
}

impl fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventQueue")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl EventQueue {
    /// A queue holding at most `capacity` events (`0` drops everything).
    ///
    /// # Examples
    ///
    /// ```
    /// let q = ratewarden::EventQueue::new(1024);
    /// assert_eq!(q.len(), 0);
    /// ```
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(VecDeque::with_capacity(capacity.min(256))),
            capacity,
            dropped: AtomicU64::new(0),
        }
    }

    /// Appends an event; returns `false` (and counts it in [`dropped`](Self::dropped)) when
    /// the queue is full.
    ///
    /// # Examples
    ///
    /// ```
    /// # use ratewarden::{EventQueue, EscalationEvent};
    /// # let e: EscalationEvent = serde_json::from_str(r#"{"subject_kind":"org","subject":"o",
    /// #   "from":"normal","to":"watch","score":1.0,"reasons":[],"at_ms":0,"shadow":false,
    /// #   "manual":false}"#).unwrap();
    /// let q = EventQueue::new(1);
    /// assert!(q.push(e.clone()));
    /// assert!(!q.push(e));
    /// assert_eq!(q.dropped(), 1);
    /// ```
    pub fn push(&self, event: EscalationEvent) -> bool {
        let mut q = self.inner.lock();
        if q.len() >= self.capacity {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push_back(event);
        true
    }

    /// Takes every queued event, oldest first.
    ///
    /// # Examples
    ///
    /// ```
    /// let q = ratewarden::EventQueue::new(8);
    /// assert!(q.drain().is_empty());
    /// ```
    pub fn drain(&self) -> Vec<EscalationEvent> {
        let mut q = self.inner.lock();
        q.drain(..).collect()
    }

    /// Events dropped because the queue was full, since creation.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ratewarden::EventQueue::new(8).dropped(), 0);
    /// ```
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events waiting.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ratewarden::EventQueue::new(8).len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Whether no event is waiting.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(ratewarden::EventQueue::new(8).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most events held at once.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ratewarden::EventQueue::new(8).capacity(), 8);
    /// ```
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

struct HookSlot {
    hook: Box<dyn EscalationHook>,
    disabled: AtomicBool,
}

/// Calls a fixed list of hooks, each inside `catch_unwind`. A hook that panics is disabled
/// permanently and counted; the panic never reaches the caller.
///
/// **Concurrency:** `&self` only, lock-free; hooks may run on many threads at once.
pub(crate) struct HookRunner {
    hooks: Vec<HookSlot>,
    panicked: AtomicU64,
}

impl fmt::Debug for HookRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookRunner")
            .field("hooks", &self.hooks.len())
            .field("panicked", &self.panicked_hooks())
            .finish()
    }
}

impl Default for HookRunner {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl HookRunner {
    /// A runner for these hooks, called in order.
    pub(crate) fn new(hooks: Vec<Box<dyn EscalationHook>>) -> Self {
        Self {
            hooks: hooks
                .into_iter()
                .map(|hook| HookSlot {
                    hook,
                    disabled: AtomicBool::new(false),
                })
                .collect(),
            panicked: AtomicU64::new(0),
        }
    }

    /// Whether there is no hook at all.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// Calls every enabled hook with `event`.
    pub(crate) fn run(&self, event: &EscalationEvent) {
        for slot in &self.hooks {
            if slot.disabled.load(Ordering::Acquire) {
                continue;
            }
            let result = catch_unwind(AssertUnwindSafe(|| slot.hook.on_escalation(event)));
            if result.is_err() && !slot.disabled.swap(true, Ordering::AcqRel) {
                self.panicked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Hooks disabled because they panicked.
    pub(crate) fn panicked_hooks(&self) -> u64 {
        self.panicked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    fn event() -> EscalationEvent {
        EscalationEvent {
            subject_kind: SubjectKind::ApiKey,
            subject: "k-17".into(),
            from: Level::Watch,
            to: Level::Challenge,
            score: 2.5,
            reasons: vec![Reason {
                detector: Cow::Borrowed("template_spread"),
                value: 40.0,
                threshold: 16.0,
                contribution: 1.0,
            }],
            at_ms: 1200,
            shadow: false,
            manual: false,
        }
    }

    #[test]
    fn event_serializes_as_documented() {
        let json = serde_json::to_value(event()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "subject_kind": "api_key",
                "subject": "k-17",
                "from": "watch",
                "to": "challenge",
                "score": 2.5,
                "reasons": [{
                    "detector": "template_spread",
                    "value": 40.0,
                    "threshold": 16.0,
                    "contribution": 1.0
                }],
                "at_ms": 1200,
                "shadow": false,
                "manual": false
            })
        );
        let back: EscalationEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event());
        let kinds = [SubjectKind::Org, SubjectKind::IpCluster];
        let names: Vec<_> = kinds
            .iter()
            .map(|k| serde_json::to_string(k).unwrap())
            .collect();
        assert_eq!(names, ["\"org\"", "\"ip_cluster\""]);
    }

    struct Counter(Arc<AtomicUsize>);
    impl EscalationHook for Counter {
        fn on_escalation(&self, _: &EscalationEvent) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Bomb(Arc<AtomicUsize>);
    impl EscalationHook for Bomb {
        fn on_escalation(&self, _: &EscalationEvent) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("hook bug");
        }
    }

    #[test]
    fn panicking_hook_is_disabled_and_others_still_run() {
        let before = Arc::new(AtomicUsize::new(0));
        let bomb = Arc::new(AtomicUsize::new(0));
        let after = Arc::new(AtomicUsize::new(0));
        let closure_calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&closure_calls);
        let runner = HookRunner::new(vec![
            Box::new(Counter(Arc::clone(&before))),
            Box::new(Bomb(Arc::clone(&bomb))),
            Box::new(Counter(Arc::clone(&after))),
            Box::new(NoopHook),
            Box::new(move |_: &EscalationEvent| {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        ]);
        assert!(!runner.is_empty());
        for _ in 0..3 {
            runner.run(&event());
        }
        assert_eq!(before.load(Ordering::SeqCst), 3);
        assert_eq!(after.load(Ordering::SeqCst), 3);
        assert_eq!(closure_calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            bomb.load(Ordering::SeqCst),
            1,
            "disabled after its first panic"
        );
        assert_eq!(runner.panicked_hooks(), 1);
        assert!(format!("{runner:?}").contains("panicked: 1"));
        assert!(HookRunner::default().is_empty());
    }

    #[test]
    fn full_queue_drops_new_events_and_counts_them() {
        let q = EventQueue::new(2);
        let mut e = event();
        for i in 0..5 {
            e.at_ms = i;
            q.push(e.clone());
        }
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 3);
        let got = q.drain();
        assert_eq!(got.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [0, 1]);
        assert!(q.is_empty());
        assert!(q.push(e));
        assert_eq!(q.dropped(), 3);
        let zero = EventQueue::new(0);
        assert!(!zero.push(event()));
        assert_eq!(zero.dropped(), 1);
        assert!(format!("{q:?}").contains("dropped: 3"));
    }

    #[test]
    fn queue_is_safe_across_threads() {
        let q = Arc::new(EventQueue::new(100));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let q = Arc::clone(&q);
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        q.push(event());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(q.len() as u64 + q.dropped(), 200);
        assert_eq!(q.len(), 100);
    }
}
