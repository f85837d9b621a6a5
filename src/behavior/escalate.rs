//! Score → level: hysteresis, cool-down, manual overrides with a TTL, exemption and shadow.
//!
//! Each subject runs two copies of the same state machine: the *reported* one sees every
//! enabled detector, the *enforced* one leaves out detectors in shadow mode (and is held at
//! `normal` in global shadow mode). Going up is immediate, to the highest level whose `up`
//! threshold the score reaches; levels above `watch` also need evidence from
//! `min_evidence_classes` independent classes, and a subject that is still scored at throttle
//! strength `levels.promote_after_s` after it was throttled goes on to `challenge`. Going down
//! is one level at a time, only once the score is below that level's `down` threshold *and*
//! the subject has spent the level's cool-down there. When a subject was idle for a long time, several steps can happen in one
//! evaluation: each step is dated at the earliest time it could have happened.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::BehaviorParams;
use crate::hooks::{EscalationEvent, Reason};
use crate::subject::SubjectKind;

/// Escalation level of a subject, from harmless to denied.
///
/// `watch` only reports; `throttle` scales the subject's classic limits by the policy's
/// `throttle_factor`; `challenge` denies with a reason the host can clear after
/// re-verification; `block` denies.
///
/// # Examples
///
/// ```
/// use ratewarden::Level;
/// assert!(Level::Throttle > Level::Watch);
/// assert_eq!(Level::from_u8(3), Some(Level::Challenge));
/// assert_eq!(Level::Block.as_str(), "block");
/// assert_eq!(serde_json::to_string(&Level::Watch).unwrap(), "\"watch\"");
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Level {
    /// Nothing unusual.
    #[default]
    Normal = 0,
    /// Suspicious; reported only.
    Watch = 1,
    /// Limits scaled down by `throttle_factor`.
    Throttle = 2,
    /// Denied until the host clears the challenge after re-verification.
    Challenge = 3,
    /// Denied.
    Block = 4,
}

impl Level {
    /// All levels, lowest first.
    pub const ALL: [Level; 5] = [
        Level::Normal,
        Level::Watch,
        Level::Throttle,
        Level::Challenge,
        Level::Block,
    ];

    /// The lowercase name used in traces, events and headers.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ratewarden::Level::Throttle.as_str(), "throttle");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Watch => "watch",
            Level::Throttle => "throttle",
            Level::Challenge => "challenge",
            Level::Block => "block",
        }
    }

    /// The level with this discriminant (`0` normal … `4` block), or `None`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::Level;
    /// assert_eq!(Level::from_u8(Level::Block as u8), Some(Level::Block));
    /// assert_eq!(Level::from_u8(9), None);
    /// ```
    pub const fn from_u8(v: u8) -> Option<Level> {
        match v {
            0 => Some(Level::Normal),
            1 => Some(Level::Watch),
            2 => Some(Level::Throttle),
            3 => Some(Level::Challenge),
            4 => Some(Level::Block),
            _ => None,
        }
    }

    /// Whether a request of a subject at this level is denied (`challenge` and `block`).
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::Level;
    /// assert!(!Level::Throttle.denies() && Level::Challenge.denies());
    /// ```
    pub const fn denies(self) -> bool {
        matches!(self, Level::Challenge | Level::Block)
    }

    /// One level lower (`normal` stays `normal`).
    pub(crate) const fn below(self) -> Level {
        match self {
            Level::Normal | Level::Watch => Level::Normal,
            Level::Throttle => Level::Watch,
            Level::Challenge => Level::Throttle,
            Level::Block => Level::Challenge,
        }
    }

    pub(crate) const fn idx(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one evaluation feeds into a level machine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepInput {
    /// Weighted sum of detector strengths.
    pub(crate) score: f32,
    /// Enough independent evidence classes fired for levels above `watch`.
    pub(crate) gate: bool,
    /// Lowest level allowed (propagation from escalated keys).
    pub(crate) floor: Level,
    /// Highest level allowed (grace after a cleared challenge).
    pub(crate) cap: Level,
}

/// One level state machine: the level, when it was entered, and the last score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LevelMachine {
    level: Level,
    since_ns: u64,
    score: f32,
}

impl LevelMachine {
    pub(crate) const fn new(now_ns: u64) -> Self {
        Self {
            level: Level::Normal,
            since_ns: now_ns,
            score: 0.0,
        }
    }

    pub(crate) const fn level(&self) -> Level {
        self.level
    }

    pub(crate) const fn score(&self) -> f32 {
        self.score
    }

    /// Sets the level directly, restarting its cool-down.
    pub(crate) fn force(&mut self, level: Level, now_ns: u64) {
        if self.level != level {
            self.level = level;
            self.since_ns = now_ns;
        }
    }

    /// Applies one evaluation. Returns the previous level if the level changed.
    pub(crate) fn step(
        &mut self,
        input: StepInput,
        now_ns: u64,
        p: &BehaviorParams,
    ) -> Option<Level> {
        let score = if input.score.is_finite() {
            input.score
        } else {
            0.0
        };
        self.score = score;
        let from = self.level;
        // A clock that went backwards re-anchors the cool-down (no time passed).
        self.since_ns = self.since_ns.min(now_ns);

        let mut target = Level::Normal;
        for level in [
            Level::Block,
            Level::Challenge,
            Level::Throttle,
            Level::Watch,
        ] {
            if score >= p.up[level.idx()] {
                target = level;
                break;
            }
        }
        if !input.gate && target > Level::Watch {
            target = Level::Watch;
        }
        // Promotion: a subject still scoring at throttle strength after `promote_after_s` at
        // throttle did not change its behaviour under the throttle (which does not slow a
        // subject far below its limits at all): challenge it.
        if self.level == Level::Throttle
            && target == Level::Throttle
            && p.promote_ns > 0
            && now_ns.saturating_sub(self.since_ns) >= p.promote_ns
        {
            target = Level::Challenge;
        }
        let target = target.max(input.floor).min(input.cap);
        if target > self.level {
            self.level = target;
            self.since_ns = now_ns;
            return Some(from);
        }

        // Step down, one level per cool-down, dating each step at the earliest time it was due.
        let floor = input.floor.min(input.cap);
        while self.level > floor {
            let level = self.level;
            let due = self.since_ns.saturating_add(p.cooldown_ns[level.idx()]);
            if now_ns < due || score >= p.down[level.idx()] {
                break;
            }
            self.level = level.below();
            self.since_ns = due;
        }
        // A cap lower than the current level (grace after a cleared challenge) applies at once.
        if self.level > input.cap {
            self.level = input.cap;
            self.since_ns = now_ns;
        }
        (self.level != from).then_some(from)
    }
}

/// Sentinel for "no manual level".
const NO_MANUAL: u8 = u8::MAX;

/// What the host set on a subject: a manual level with its expiry, the grace after a cleared
/// challenge, and the exemption. Boxed on first use (see [`Escalation`]).
#[derive(Clone, Debug, PartialEq)]
struct HostSet {
    manual_until_ns: u64,
    grace_until_ns: u64,
    manual: u8,
    exempt: bool,
}

impl HostSet {
    const NONE: Self = Self {
        manual_until_ns: 0,
        grace_until_ns: 0,
        manual: NO_MANUAL,
        exempt: false,
    };
}

/// Per-subject escalation state: both level machines, and what the host set (a manual level,
/// a grace period or an exemption). Few subjects ever have the latter, so it is boxed on first
/// use and costs the others one pointer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Escalation {
    pub(crate) enforced: LevelMachine,
    pub(crate) reported: LevelMachine,
    host: Option<Box<HostSet>>,
}

impl Escalation {
    pub(crate) const fn new(now_ns: u64) -> Self {
        Self {
            enforced: LevelMachine::new(now_ns),
            reported: LevelMachine::new(now_ns),
            host: None,
        }
    }

    fn host_mut(&mut self) -> &mut HostSet {
        self.host.get_or_insert_with(|| Box::new(HostSet::NONE))
    }

    /// The manual level, if one is set and has not expired.
    #[inline]
    pub(crate) fn manual(&self, now_ns: u64) -> Option<Level> {
        let h = self.host.as_deref()?;
        if now_ns >= h.manual_until_ns {
            return None;
        }
        Level::from_u8(h.manual)
    }

    /// When the live manual level expires, if it has an expiry.
    pub(crate) fn manual_until(&self, now_ns: u64) -> Option<u64> {
        self.manual(now_ns)?;
        let until = self.host.as_deref()?.manual_until_ns;
        (until != u64::MAX).then_some(until)
    }

    pub(crate) fn set_manual(&mut self, level: Level, until_ns: Option<u64>) {
        let h = self.host_mut();
        h.manual = level as u8;
        h.manual_until_ns = until_ns.unwrap_or(u64::MAX);
    }

    pub(crate) fn clear_manual(&mut self) {
        if let Some(h) = self.host.as_deref_mut() {
            h.manual = NO_MANUAL;
            h.manual_until_ns = 0;
        }
    }

    pub(crate) fn is_exempt(&self) -> bool {
        self.host.as_deref().is_some_and(|h| h.exempt)
    }

    pub(crate) fn set_exempt(&mut self, exempt: bool) {
        if exempt || self.host.is_some() {
            self.host_mut().exempt = exempt;
        }
    }

    /// Enforced level: manual, else `normal` if exempt, else the enforced machine.
    #[inline]
    pub(crate) fn level(&self, now_ns: u64) -> Level {
        if self.host.is_some() {
            if let Some(level) = self.manual(now_ns) {
                return level;
            }
            if self.is_exempt() {
                return Level::Normal;
            }
        }
        self.enforced.level()
    }

    /// Reported level: manual, else the reported machine (exemption does not hide it).
    pub(crate) fn reported_level(&self, now_ns: u64) -> Level {
        self.manual(now_ns).unwrap_or(self.reported.level())
    }

    /// Highest level the machines may reach now.
    pub(crate) fn cap(&self, now_ns: u64) -> Level {
        if self
            .host
            .as_deref()
            .is_some_and(|h| now_ns < h.grace_until_ns)
        {
            Level::Throttle
        } else {
            Level::Block
        }
    }

    /// Host re-verified the subject: computed challenge/block drop to `watch` with a fresh
    /// cool-down, a manual challenge is cleared, and the level is capped at `throttle` for the
    /// grace period. Returns whether anything changed.
    pub(crate) fn clear_challenge(&mut self, now_ns: u64, grace_ns: u64) -> bool {
        let mut changed = false;
        if self.manual(now_ns).is_some_and(Level::denies) {
            self.clear_manual();
            changed = true;
        }
        for m in [&mut self.enforced, &mut self.reported] {
            if m.level().denies() {
                m.force(Level::Watch, now_ns);
                changed = true;
            }
        }
        if changed {
            self.host_mut().grace_until_ns = now_ns.saturating_add(grace_ns);
        }
        changed
    }
}

/// A change of a subject's computed level, returned by `SubjectBehavior::evaluate`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Transition {
    /// Level before.
    pub(crate) from: Level,
    /// Level after.
    pub(crate) to: Level,
    /// Score at the change.
    pub(crate) score: f32,
    /// Detectors that contributed, strongest first.
    pub(crate) reasons: Vec<Reason>,
    /// `true` when only the reported (shadow) level changed; nothing is enforced.
    pub(crate) shadow: bool,
}

impl Transition {
    /// The hook event for this transition (`manual: false`).
    pub(crate) fn into_event(
        self,
        subject_kind: SubjectKind,
        subject: String,
        at_ms: u64,
    ) -> EscalationEvent {
        EscalationEvent {
            subject_kind,
            subject,
            from: self.from,
            to: self.to,
            score: self.score,
            reasons: self.reasons,
            at_ms,
            shadow: self.shadow,
            manual: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behavior::BehaviorPolicy;

    const S: u64 = 1_000_000_000;

    fn params() -> BehaviorParams {
        BehaviorParams::new(&BehaviorPolicy::default(), "behavior")
            .unwrap()
            .with_seed(1)
    }

    fn input(score: f32) -> StepInput {
        StepInput {
            score,
            gate: true,
            floor: Level::Normal,
            cap: Level::Block,
        }
    }

    #[test]
    fn level_basics() {
        for (i, l) in Level::ALL.iter().enumerate() {
            assert_eq!(Level::from_u8(i as u8), Some(*l));
            assert_eq!(*l as u8 as usize, i);
            let json = serde_json::to_string(l).unwrap();
            assert_eq!(json, format!("\"{}\"", l.as_str()));
            assert_eq!(serde_json::from_str::<Level>(&json).unwrap(), *l);
        }
        assert_eq!(Level::default(), Level::Normal);
        assert_eq!(Level::Block.to_string(), "block");
        assert_eq!(Level::Normal.below(), Level::Normal);
    }

    #[test]
    fn up_is_immediate_down_needs_score_and_cooldown() {
        let p = params();
        let mut m = LevelMachine::new(0);
        assert_eq!(m.step(input(2.4), S, &p), Some(Level::Normal));
        assert_eq!(m.level(), Level::Challenge);
        // Score between down and up: stays.
        assert_eq!(m.step(input(2.0), 2000 * S, &p), None);
        // Below down, but cool-down (900 s from t=1 s) not over.
        assert_eq!(m.step(input(0.0), 800 * S, &p), None);
        assert_eq!(m.level(), Level::Challenge);
        // Cool-down over: one step per cool-down, each dated when it was due.
        // Challenge due at 901 s; throttle due at 901 + 600 = 1501 s; watch at 1801 s.
        assert_eq!(m.step(input(0.0), 1600 * S, &p), Some(Level::Challenge));
        assert_eq!(m.level(), Level::Watch);
        assert_eq!(m.step(input(0.0), 1700 * S, &p), None);
        assert_eq!(m.step(input(0.0), 1801 * S, &p), Some(Level::Watch));
        assert_eq!(m.level(), Level::Normal);
    }

    #[test]
    fn hysteresis_holds_between_thresholds() {
        let p = params();
        let mut m = LevelMachine::new(0);
        m.step(input(1.6), 0, &p);
        assert_eq!(m.level(), Level::Throttle);
        // 1.2 is above throttle.down (1.0): no step down however long.
        assert_eq!(m.step(input(1.2), 100_000 * S, &p), None);
        assert_eq!(m.level(), Level::Throttle);
        // and below throttle.up: no re-entry needed either.
        assert_eq!(m.step(input(0.9), 100_001 * S, &p), Some(Level::Throttle));
        assert_eq!(m.level(), Level::Watch);
    }

    #[test]
    fn sustained_throttle_is_promoted_to_challenge() {
        let p = params();
        let mut m = LevelMachine::new(0);
        m.step(input(1.6), 0, &p);
        assert_eq!(m.level(), Level::Throttle);
        // Still at throttle strength, but not for promote_after_s (600 s) yet.
        assert_eq!(m.step(input(1.6), 599 * S, &p), None);
        // Score fell below throttle.up meanwhile: no promotion.
        assert_eq!(m.step(input(1.2), 700 * S, &p), None);
        assert_eq!(m.level(), Level::Throttle);
        // Back at throttle strength after 600 s at throttle: challenged.
        assert_eq!(m.step(input(1.6), 701 * S, &p), Some(Level::Throttle));
        assert_eq!(m.level(), Level::Challenge);
        // Without the evidence gate, no promotion; `0` disables it.
        let mut m = LevelMachine::new(0);
        m.step(input(1.6), 0, &p);
        let gated = StepInput {
            gate: false,
            ..input(1.6)
        };
        assert_eq!(m.step(gated, 1000 * S, &p), None);
        assert_eq!(m.level(), Level::Throttle);
        let mut policy = crate::behavior::BehaviorPolicy::default();
        policy.levels.promote_after_s = 0;
        let p0 = BehaviorParams::new(&policy, "behavior").unwrap();
        let mut m = LevelMachine::new(0);
        m.step(input(1.6), 0, &p0);
        assert_eq!(m.step(input(1.6), 100_000 * S, &p0), None);
        assert_eq!(m.level(), Level::Throttle);
    }

    #[test]
    fn gate_floor_and_cap() {
        let p = params();
        let mut m = LevelMachine::new(0);
        let gated = StepInput {
            gate: false,
            ..input(5.0)
        };
        m.step(gated, 0, &p);
        assert_eq!(m.level(), Level::Watch);
        let floored = StepInput {
            floor: Level::Throttle,
            ..input(0.0)
        };
        m.step(floored, S, &p);
        assert_eq!(m.level(), Level::Throttle);
        // Floor holds it however long.
        assert_eq!(m.step(floored, 100_000 * S, &p), None);
        let capped = StepInput {
            cap: Level::Throttle,
            ..input(9.0)
        };
        assert_eq!(m.step(capped, 100_001 * S, &p), None);
        assert_eq!(m.level(), Level::Throttle);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let p = params();
        let mut m = LevelMachine::new(1000 * S);
        m.step(input(4.0), 1000 * S, &p);
        assert_eq!(m.level(), Level::Block);
        assert_eq!(m.step(input(0.0), 0, &p), None);
        assert_eq!(m.level(), Level::Block);
        assert_eq!(m.step(input(f32::NAN), 10 * S, &p), None);
        // The cool-down restarted at the backwards reading: block steps down 1800 s later.
        assert_eq!(m.step(input(0.0), 1799 * S, &p), None);
        assert_eq!(m.step(input(0.0), 1800 * S, &p), Some(Level::Block));
    }

    #[test]
    fn host_settings_are_boxed_only_when_set() {
        let mut e = Escalation::new(0);
        e.set_exempt(false);
        e.clear_manual();
        assert!(e.host.is_none());
        assert_eq!(e.cap(0), Level::Block);
        assert_eq!(e.manual(0), None);
        e.set_manual(Level::Throttle, Some(100));
        assert!(e.host.is_some());
        assert_eq!(e.level(50), Level::Throttle);
        assert_eq!(e.manual_until(50), Some(100));
        assert_eq!(e.level(100), Level::Normal);
    }

    #[test]
    fn manual_exempt_and_clear_challenge() {
        let mut e = Escalation::new(0);
        e.enforced.force(Level::Challenge, 0);
        e.reported.force(Level::Block, 0);
        assert_eq!(e.level(5), Level::Challenge);
        assert_eq!(e.reported_level(5), Level::Block);
        e.set_exempt(true);
        assert!(e.is_exempt());
        assert_eq!(e.level(5), Level::Normal);
        assert_eq!(e.reported_level(5), Level::Block);
        e.set_manual(Level::Throttle, Some(100));
        assert_eq!(e.level(99), Level::Throttle);
        assert_eq!(e.reported_level(99), Level::Throttle);
        assert_eq!(e.level(100), Level::Normal);
        e.set_exempt(false);
        e.set_manual(Level::Challenge, None);
        assert_eq!(e.level(u64::MAX - 1), Level::Challenge);
        assert!(e.clear_challenge(200, 50));
        assert_eq!(e.manual(200), None);
        assert_eq!(e.level(200), Level::Watch);
        assert_eq!(e.reported_level(200), Level::Watch);
        assert_eq!(e.cap(249), Level::Throttle);
        assert_eq!(e.cap(250), Level::Block);
        assert!(!e.clear_challenge(300, 50));
        e.clear_manual();
        assert_eq!(e.manual(0), None);
    }
}
