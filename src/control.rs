//! What a host or a trust-and-safety analyst does by hand: set, clear and inspect a subject's
//! escalation level, exempt a subject, and drain the event queue.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::behavior::Level;
use crate::decision::Handle;
use crate::hooks::{EscalationEvent, Reason};
use crate::subject::{parse_cidr, SubjectId, SubjectKind};
use crate::warden::Warden;

/// A manual control that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The policy has the behavioural layer off (`behavior.enabled = false`); levels live in
    /// its per-subject state. Shadow mode is fine.
    #[error("the behavioural layer is disabled in the policy; enable it (shadow mode is fine) to set levels")]
    BehaviorDisabled,
    /// An IP cluster id that is not a network in CIDR form with the configured prefix.
    #[error("`{0}` is not an IP cluster: use the network in CIDR form with the configured prefix, such as 198.51.100.0/24")]
    BadCluster(String),
    /// The subject is not tracked and its kind's table is full (`table.max_subjects`), so
    /// there is no state to hold the level or exemption: nothing was set. Raise the cap,
    /// call [`Warden::maintain`] to evict idle subjects, or put the subject in the policy
    /// (an override with its own limits, or `exempt_behavior`).
    #[error("`{0}` is not tracked and its table is full (table.max_subjects): nothing was set")]
    TableFull(String),
}

/// A subject's behavioural state, from [`Warden::inspect`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SubjectReport {
    /// The subject.
    pub subject: SubjectId,
    /// The level that acts (manual level, else computed without shadow detectors).
    pub level: Level,
    /// The computed level including shadow detectors.
    pub reported_level: Level,
    /// The last enforced and reported scores.
    pub score: f32,
    /// Reported score (shadow detectors included).
    pub reported_score: f32,
    /// A live manual level, if any.
    pub manual: Option<Level>,
    /// Whether the subject is exempt from behavioural enforcement.
    pub exempt: bool,
    /// The evidence it would be scored on now, strongest first.
    pub reasons: Vec<Reason>,
}

impl Warden {
    fn handle_of(&self, subject: &SubjectId) -> Result<Handle, ControlError> {
        // A cluster written at the policy's prefix length.
        let cluster = |text: &str| {
            let pol = self.policy();
            parse_cidr(text).filter(|c| {
                c.prefix()
                    == if c.is_ipv4() {
                        pol.cluster.v4_prefix
                    } else {
                        pol.cluster.v6_prefix
                    }
            })
        };
        match subject.kind {
            SubjectKind::IpCluster => cluster(&subject.id)
                .map(|c| Handle::Cluster(crate::warden::split(c.bits())))
                .ok_or_else(|| ControlError::BadCluster(subject.id.clone())),
            // The anonymous key of a cluster, as events name it.
            SubjectKind::ApiKey => match subject.id.strip_prefix("anon:").and_then(cluster) {
                Some(c) => Ok(Handle::Anonymous(self.namer().anonymous(c.bits()))),
                None => Ok(Handle::Name(self.namer().id(&subject.id))),
            },
            SubjectKind::Org => Ok(Handle::Name(self.namer().id(&subject.id))),
        }
    }

    /// Runs `f` on the subject's behavioural slot, creating the subject if it is not tracked.
    fn with_slot<R>(
        &self,
        subject: &SubjectId,
        create: bool,
        f: impl FnOnce(&crate::behavior::Slot, u64) -> R,
    ) -> Result<Option<R>, ControlError> {
        if !self.policy().behavior.enabled {
            return Err(ControlError::BehaviorDisabled);
        }
        let h = self.handle_of(subject)?;
        let now = self.now();
        let mut out = None;
        self.with_subject(subject.kind, h, now, create, |e| {
            if let Some(b) = &e.behavior {
                out = Some(f(b, now));
            }
        });
        Ok(out)
    }

    /// The error for a control whose subject has no behavioural state even though it was
    /// asked to be created: a policy swap turned the layer off meanwhile, or the subject is
    /// not tracked and its table is full.
    fn not_applied(&self, subject: &SubjectId) -> ControlError {
        if self.policy().behavior.enabled {
            ControlError::TableFull(subject.id.clone())
        } else {
            ControlError::BehaviorDisabled
        }
    }

    fn manual_event(&self, subject: &SubjectId, from: Level, to: Level, now: u64) {
        if from != to {
            self.behavior.emit(EscalationEvent {
                subject_kind: subject.kind,
                subject: subject.id.clone(),
                from,
                to,
                score: 0.0,
                reasons: Vec::new(),
                at_ms: now / 1_000_000,
                shadow: false,
                manual: true,
            });
        }
    }

    /// Sets a subject's level by hand, for `ttl` (or until cleared). It overrides computed
    /// levels and exemption. A subject not seen yet is created, so a key can be blocked
    /// before its first request. Emits a `manual` event.
    ///
    /// # Errors
    ///
    /// [`ControlError::BehaviorDisabled`] when the policy has the behavioural layer off;
    /// [`ControlError::BadCluster`] for an IP cluster id that is not a configured network;
    /// [`ControlError::TableFull`] for a subject not tracked while its table is full, unless
    /// `level` is `normal` (an untracked subject is at `normal` already).
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{Decision, Level, ManualClock, Request, SubjectId, Warden};
    /// use std::time::Duration;
    /// let clock = ManualClock::new();
    /// let w = Warden::builder().clock(clock.clone()).build().unwrap();
    /// w.set_level(&SubjectId::api_key("sk-bad"), Level::Block, Some(Duration::from_secs(60))).unwrap();
    /// let req = Request::new("sk-bad", "org", "192.0.2.1".parse().unwrap());
    /// let Decision::Deny(d) = w.check(&req) else { panic!() };
    /// assert_eq!(d.reason(), "behavior:block");
    /// clock.advance(Duration::from_secs(61));
    /// assert!(w.check(&req).is_allowed());
    /// ```
    pub fn set_level(
        &self,
        subject: &SubjectId,
        level: Level,
        ttl: Option<Duration>,
    ) -> Result<(), ControlError> {
        let r = self.with_slot(subject, true, |b, now| {
            let until =
                ttl.map(|t| now.saturating_add(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)));
            let from = b.levels(now).0;
            b.with(now, |s| s.set_manual(level, until));
            (from, b.levels(now).0, now)
        })?;
        match r {
            Some((from, to, now)) => self.manual_event(subject, from, to, now),
            None if level == Level::Normal => {}
            None => return Err(self.not_applied(subject)),
        }
        Ok(())
    }

    /// Clears a manual level and a computed challenge or block (the host re-verified the
    /// subject): the computed level drops to `watch` and stays at most `throttle` for the
    /// policy's `levels.challenge_grace_s`. Returns whether the subject was tracked.
    ///
    /// # Errors
    ///
    /// As for [`Warden::set_level`].
    pub fn clear_level(&self, subject: &SubjectId) -> Result<bool, ControlError> {
        let r = self.with_slot(subject, false, |b, now| {
            let from = b.levels(now).0;
            let p = &self.behavior_rt().params;
            b.with(now, |s| {
                s.clear_manual();
                s.clear_challenge(now, p);
            });
            (from, b.levels(now).0, now)
        })?;
        if let Some((from, to, now)) = r {
            self.manual_event(subject, from, to, now);
        }
        Ok(r.is_some())
    }

    /// Exempts a subject (a contracted batch customer) from behavioural enforcement, or
    /// ends the exemption. Signals are still kept and reported; classic limits still apply.
    /// Exemptions that should survive restarts belong in the policy (`overrides` with
    /// `exempt_behavior = true`). A [`set_policy`](Warden::set_policy) that changes this
    /// subject's `exempt_behavior` overrides what was set here; one that leaves it alone
    /// keeps it.
    ///
    /// # Errors
    ///
    /// As for [`Warden::set_level`]; ending an exemption (`exempt: false`) of a subject that
    /// cannot be tracked is not an error.
    pub fn set_exempt(&self, subject: &SubjectId, exempt: bool) -> Result<(), ControlError> {
        let r = self.with_slot(subject, true, |b, now| {
            b.with(now, |s| s.set_exempt(exempt))
        })?;
        // Ending an exemption of a subject that is not tracked has nothing to do.
        if r.is_none() && exempt {
            return Err(self.not_applied(subject));
        }
        Ok(())
    }

    /// The behavioural state of a tracked subject, with the evidence it would be scored on
    /// now. `None` when the subject is not tracked or the behavioural layer is off.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{Level, Request, SubjectId, Warden};
    /// let w = Warden::builder().build().unwrap();
    /// let _ = w.check(&Request::new("sk-1", "org-1", "192.0.2.1".parse().unwrap()));
    /// let r = w.inspect(&SubjectId::api_key("sk-1")).unwrap();
    /// assert_eq!(r.level, Level::Normal);
    /// assert!(w.inspect(&SubjectId::api_key("never-seen")).is_none());
    /// ```
    pub fn inspect(&self, subject: &SubjectId) -> Option<SubjectReport> {
        let rt = self.behavior_rt();
        self.with_slot(subject, false, |b, now| {
            b.with(now, |s| {
                let (score, reported_score) = s.scores();
                SubjectReport {
                    subject: subject.clone(),
                    level: s.level(now),
                    reported_level: s.reported_level(now),
                    score,
                    reported_score,
                    manual: s.manual(now),
                    exempt: s.is_exempt(),
                    reasons: s.explain(now, &rt.params, &rt.cross),
                }
            })
        })
        .ok()
        .flatten()
    }

    /// Takes every queued escalation event, oldest first. The queue is bounded (see
    /// [`WardenBuilder::event_capacity`](crate::WardenBuilder::event_capacity)); events that
    /// did not fit are counted in [`WardenStats::events_dropped`](crate::WardenStats).
    pub fn drain_events(&self) -> Vec<EscalationEvent> {
        self.behavior.drain()
    }
}
