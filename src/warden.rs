//! The engine: `check` across subjects (all-or-nothing), permits, policy swaps, maintenance.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::behavior::{Engine, Level, Pending, Slot as BehaviorSlot, Verdict};
use crate::clock::{Clock, SystemClock};
use crate::decision::{Candidate, Decision, Denial, InlineStr, Permit, PermitInner, RateLimitInfo};
use crate::decision::{Handle, Handles};
use crate::hooks::EscalationHook;
use crate::limit::{Outcome, Unit};
use crate::policy::{compile, Compiled, ConfigError, LimitRt, LimitSet, Policy};
use crate::request::Request;
use crate::stats::{Counter, Counters, WardenStats};
use crate::subject::{IpCluster, SubjectKind};
use crate::table::{Entry, Id, Namer, PassThrough, ShardRead, Slot, Table};

/// Builds a [`Warden`].
///
/// # Examples
///
/// ```
/// use ratewarden::{ManualClock, Policy, Warden};
/// let warden = Warden::builder()
///     .policy(Policy::llm_api())
///     .clock(ManualClock::new())
///     .build()
///     .expect("valid policy");
/// # let _ = warden;
/// ```
#[derive(Debug, Default)]
pub struct WardenBuilder {
    policy: Option<Policy>,
    clock: Option<Arc<dyn Clock>>,
    hooks: Vec<Box<dyn EscalationHook>>,
    event_capacity: Option<usize>,
    seed: Option<u64>,
}

impl std::fmt::Debug for dyn EscalationHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EscalationHook")
    }
}

impl WardenBuilder {
    /// The policy (default: [`Policy::llm_api`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The clock (default: [`SystemClock`]). Tests and replay pass a [`ManualClock`](crate::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Adds a hook called on every escalation level change (see [`EscalationHook`]). Hooks run
    /// in the order added, outside every lock, inside `catch_unwind`.
    pub fn hook(mut self, hook: impl EscalationHook) -> Self {
        self.hooks.push(Box::new(hook));
        self
    }

    /// Capacity of the event queue that [`Warden::drain_events`] empties (default 1,024).
    /// When it is full, new events are dropped and counted, never blocking a check.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = Some(capacity);
        self
    }

    /// Fixes the warden's hashing seed (subject ids, behavioural sketches, the cross-subject
    /// index) instead of drawing a random one, so that a replay with the behavioural layer on
    /// gives the same decisions every time.
    ///
    /// For replays, simulations and tests only: with a known seed, a client could choose
    /// names that collide or that crowd one sketch bucket. Serving wardens should keep the
    /// default, a random seed per warden.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{ManualClock, Warden};
    /// let w = Warden::builder().clock(ManualClock::new()).seed(42).build().unwrap();
    /// # let _ = w;
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates the policy and builds the warden.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid field.
    pub fn build(self) -> Result<Warden, ConfigError> {
        let policy = self.policy.unwrap_or_else(Policy::llm_api);
        let seed = self
            .seed
            .unwrap_or_else(|| ahash::RandomState::new().hash_one(0x5EED_u64));
        let namer = Namer::new(self.seed);
        let mut compiled = compile(&policy, 1, seed, None)?;
        compiled.index_ids(&namer);
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock::new()));
        let now = clock.now_nanos();
        let overflow = |k: SubjectKind| Entry::new(compiled.defaults[k.index()].clone(), now, None);
        let (max, idle) = (compiled.max_subjects, compiled.idle_ns);
        let behavior = Engine::new(self.hooks, self.event_capacity.unwrap_or(1024));
        Ok(Warden {
            keys: Table::new(max, idle, overflow(SubjectKind::ApiKey), PassThrough),
            orgs: Table::new(max, idle, overflow(SubjectKind::Org), PassThrough),
            clusters: Table::new(max, idle, overflow(SubjectKind::IpCluster), PassThrough),
            namer,
            fast: AtomicU64::new(FastPolicy::of(&compiled).encode()),
            policy: ArcSwap::from_pointee(compiled),
            policy_lock: Mutex::new(()),
            clock,
            counters: Counters::default(),
            behavior,
            seed,
        })
    }
}

/// The rate limiter a gateway calls on every request.
///
/// One `Warden` serves all threads: share it by reference or in an `Arc`. It needs no async
/// runtime and spawns no threads.
///
/// # Examples
///
/// ```
/// use ratewarden::{Decision, ManualClock, Policy, Request, Warden};
///
/// let warden = Warden::builder().policy(Policy::llm_api()).clock(ManualClock::new()).build()?;
/// let req = Request::new("sk-proj-abc", "org-acme", "198.51.100.23".parse().unwrap())
///     .input_tokens(400)
///     .expected_output_tokens(800);
/// match warden.check(&req) {
///     Decision::Allow(permit) => {
///         assert!(!permit.headers().is_empty());
///         permit.settle(640);
///     }
///     Decision::Deny(denial) => unreachable!("{}", denial.reason()),
/// }
/// # Ok::<(), ratewarden::ConfigError>(())
/// ```
#[derive(Debug)]
pub struct Warden {
    keys: Table<Id, PassThrough>,
    orgs: Table<Id, PassThrough>,
    clusters: Table<Id, PassThrough>,
    namer: Namer,
    policy: ArcSwap<Compiled>,
    /// The few policy scalars every check needs, packed in one word (see [`FastPolicy`]), so
    /// the hot path never touches the shared policy pointer.
    fast: AtomicU64,
    policy_lock: Mutex<()>,
    clock: Arc<dyn Clock>,
    counters: Counters,
    pub(crate) behavior: Engine,
    /// Keys the behavioural sketches; kept across policy swaps.
    seed: u64,
}

/// The entries of a check's three subjects (api key, org, ip cluster), `None` when untracked.
type Subjects<'a> = [Option<&'a Entry>; 3];

impl Warden {
    /// A builder with the `llm_api` preset and the system clock.
    pub fn builder() -> WardenBuilder {
        WardenBuilder::default()
    }

    /// The warden's clock, read once.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_nanos()
    }

    fn new_entry(&self, set: &Arc<LimitSet>, pol: &Compiled, now: u64, kind: SubjectKind) -> Entry {
        let b = if pol.behavior.enabled {
            Some(Box::new(BehaviorSlot::new(kind, now, set.exempt)))
        } else {
            None
        };
        Entry::new(set.clone(), now, b)
    }

    /// Decides one request: evaluates every limit of every subject of the request (api key,
    /// org, ip cluster), and the behavioural levels. If anything refuses, nothing is charged.
    ///
    /// Concurrency: lock-free on the limit cells (CAS loops); one shard read lock per subject,
    /// held only during the call (all taken before any look-up); a shard write lock the first
    /// time a subject is seen. A check with a subject that is new, laid out by an older policy
    /// or in a full table releases those locks and takes each subject's again, one at a time.
    /// Hooks run after every lock is released.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{Decision, ManualClock, Policy, Request, Warden};
    /// let w = Warden::builder().policy(Policy::llm_api()).clock(ManualClock::new()).build().unwrap();
    /// let ip = "192.0.2.7".parse().unwrap();
    /// let mut allowed = 0;
    /// for _ in 0..25 {
    ///     if w.check(&Request::new("k", "o", ip)).is_allowed() {
    ///         allowed += 1;
    ///     }
    /// }
    /// assert_eq!(allowed, 20); // the api key's burst
    /// ```
    pub fn check(&self, req: &Request<'_>) -> Decision<'_> {
        let now = self.clock.now_nanos();
        let fast = FastPolicy::decode(self.fast.load(Ordering::Acquire));
        let need_cluster = fast.active[2] || req.api_key.is_none();
        let cluster = if need_cluster {
            Some(IpCluster::new(req.ip, fast.v4_prefix, fast.v6_prefix))
        } else {
            None
        };
        // The id of every tracked subject first (hashing its name).
        let mut handles = Handles::default();
        let key = if fast.active[0] {
            Some(match (req.api_key, cluster) {
                (Some(k), _) => {
                    let id = self.namer.id(k);
                    handles.set(0, id);
                    id
                }
                (None, c) => {
                    let id = self
                        .namer
                        .anonymous(c.expect("computed for anonymous").bits());
                    handles.set_anonymous(id);
                    id
                }
            })
        } else {
            None
        };
        let org = match (req.org, fast.active[1]) {
            (Some(o), true) => {
                let id = self.namer.id(o);
                handles.set(1, id);
                Some(id)
            }
            _ => None,
        };
        let cl = match (cluster, fast.active[2]) {
            (Some(c), true) => {
                let bits = c.bits();
                let id = self.namer.cluster(bits);
                handles.set_cluster(id, split(bits));
                Some(id)
            }
            _ => None,
        };
        // Then every shard's read lock, then every look-up: no locked instruction sits between
        // two look-ups, so their cache misses overlap (see `Table::read_shard`).
        let key_shard = key.map(|id| self.keys.read_shard(id));
        let org_shard = org.map(|id| self.orgs.read_shard(id));
        let cl_shard = cl.map(|id| self.clusters.read_shard(id));
        let subjects: Subjects<'_> = [
            found(&key_shard, fast, now),
            found(&org_shard, fast, now),
            found(&cl_shard, fast, now),
        ];
        if subjects[0].is_some() != key.is_some()
            || subjects[1].is_some() != org.is_some()
            || subjects[2].is_some() != cl.is_some()
        {
            // A subject seen for the first time, laid out by an older policy, or left out of a
            // full table (the overflow entry).
            drop((key_shard, org_shard, cl_shard));
            return self.check_slow(req, now, fast, handles, cluster);
        }
        if !fast.behave {
            return self.check_limits(req, &subjects, &handles, now);
        }
        let (decision, pending) = self.check_behavior(req, now, &subjects, handles);
        drop((key_shard, org_shard, cl_shard));
        self.dispatch(pending, req, cluster, now);
        decision
    }

    /// [`check`](Self::check) when a subject is not in its table yet, or was laid out by an
    /// older policy, or its table is full: each subject is found, migrated or inserted in
    /// turn (taking a shard's write lock where needed), or is the table's overflow entry.
    #[cold]
    #[inline(never)]
    fn check_slow(
        &self,
        req: &Request<'_>,
        now: u64,
        fast: FastPolicy,
        mut handles: Handles,
        cluster: Option<IpCluster>,
    ) -> Decision<'_> {
        let generation = fast.generation;
        let key_slot = handles.id(0).map(|id| {
            let name = req.api_key.filter(|_| !handles.is_anonymous());
            self.keys.get_or_insert(
                id,
                now,
                generation,
                |pol| {
                    let set = match name {
                        Some(k) => pol.set_for_name(SubjectKind::ApiKey, k),
                        None => &pol.anonymous,
                    };
                    self.new_entry(set, pol, now, SubjectKind::ApiKey)
                },
                &self.policy,
            )
        });
        let org_slot = handles.id(1).zip(req.org).map(|(id, o)| {
            self.orgs.get_or_insert(
                id,
                now,
                generation,
                |pol| {
                    self.new_entry(
                        pol.set_for_name(SubjectKind::Org, o),
                        pol,
                        now,
                        SubjectKind::Org,
                    )
                },
                &self.policy,
            )
        });
        let cl_slot = handles.id(2).zip(cluster).map(|(id, c)| {
            let bits = c.bits();
            self.clusters.get_or_insert(
                id,
                now,
                generation,
                |pol| self.new_entry(pol.set_for_cluster(bits), pol, now, SubjectKind::IpCluster),
                &self.policy,
            )
        });
        for (i, slot) in [&key_slot, &org_slot, &cl_slot].into_iter().enumerate() {
            if slot.as_ref().is_some_and(Slot::is_overflow) {
                handles.mark_overflow(i);
            }
        }
        let subjects: Subjects<'_> = [key_slot.as_deref(), org_slot.as_deref(), cl_slot.as_deref()];
        if !fast.behave {
            return self.check_limits(req, &subjects, &handles, now);
        }
        subjects.iter().flatten().for_each(|e| prefetch_behavior(e));
        let (decision, pending) = self.check_behavior(req, now, &subjects, handles);
        drop((key_slot, org_slot, cl_slot));
        self.dispatch(pending, req, cluster, now);
        decision
    }

    /// The rest of [`check`](Self::check) when the behavioural layer is on: levels first
    /// (challenge and block deny before any charge, throttle multiplies costs), then the
    /// limits, then the signals. Returns the level changes, for the caller to dispatch to
    /// the hooks once it has released every lock.
    #[inline(never)]
    fn check_behavior(
        &self,
        req: &Request<'_>,
        now: u64,
        subjects: &Subjects<'_>,
        handles: Handles,
    ) -> (Decision<'_>, Pending) {
        let Some(rt) = subjects
            .iter()
            .flatten()
            .next()
            .map(|e| &*e.set.behavior)
            .filter(|rt| rt.params.policy().enabled)
        else {
            // No kind is tracked, or the entries were laid out by a newer policy without the
            // layer (a swap during this check): classic limits only.
            return (
                self.check_limits(req, subjects, &handles, now),
                Pending::default(),
            );
        };
        // The enforced level acts, the reported one (shadow detectors included) is what the
        // decision shows.
        let levels = self.behavior.levels(subjects, now);
        let level = levels
            .iter()
            .map(|l| l.0.max(l.1))
            .max()
            .unwrap_or(Level::Normal);
        let mult = levels.map(|l| Engine::multiplier(l.0, rt));
        let hashes = handles.ids();
        let (decision, verdict) = if let Some((si, l)) = Engine::denying(&levels) {
            self.counters.bump(Counter::DeniedBehavior);
            let denial = Denial {
                kind: SubjectKind::ALL[si],
                reason: InlineStr::from_static(if l == Level::Block {
                    "behavior:block"
                } else {
                    "behavior:challenge"
                }),
                behavior: Some(l),
                retry_after: None,
                level,
                info: RateLimitInfo::default(),
            };
            (Decision::Deny(denial), Verdict::DeniedByBehavior)
        } else {
            match self.charge(req, subjects, now, &mult) {
                Ok(best) => (
                    self.admit(req, &handles, now, mult, level, best),
                    Verdict::Allowed,
                ),
                Err(refusal) => (
                    Decision::Deny(self.limit_denial(req, subjects, now, &mult, level, refusal)),
                    Verdict::DeniedByLimit,
                ),
            }
        };
        // Each subject's pressure against its own limits, as this request left them (a
        // behaviour denial consulted none: no pinned evidence for the subjects that did not
        // deny it).
        let pressure = pressures(subjects, now);
        let pending = self
            .behavior
            .observe(subjects, hashes, req, now, rt, pressure, verdict);
        (decision, pending)
    }

    /// Classic limits only (no levels, no signals): the lean path.
    #[inline(always)]
    fn check_limits(
        &self,
        req: &Request<'_>,
        subjects: &Subjects<'_>,
        handles: &Handles,
        now: u64,
    ) -> Decision<'_> {
        match self.charge(req, subjects, now, &[1; 3]) {
            Ok(best) => self.admit(req, handles, now, [1; 3], Level::Normal, best),
            Err(refusal) => Decision::Deny(self.limit_denial(
                req,
                subjects,
                now,
                &[1; 3],
                Level::Normal,
                refusal,
            )),
        }
    }

    /// One pass over every limit of every subject: charge each with a CAS that checks
    /// conformance; on a refusal, roll back what this check charged (so a denied request
    /// charges nothing anywhere) and return `(subject, limit, wait)`. On success, returns the
    /// most constrained request and token limits (for headers), picked on the way from the
    /// states the charges left and compared without dividing.
    #[inline(always)]
    fn charge<'s>(
        &self,
        req: &Request<'_>,
        subjects: &Subjects<'s>,
        now: u64,
        mult: &[u64; 3],
    ) -> Result<Charged<'s>, Refusal> {
        let mut best: [Option<(&LimitRt, u64)>; 2] = [None, None];
        let mut keep = 0u8;
        let mut holds_slots = false;
        // The states the first charges left, for an exact rollback (see `Algo::rollback`).
        let mut written = [0_u64; WRITTEN];
        let mut k = 0;
        for (si, e) in subjects.iter().enumerate() {
            let Some(e) = e else { continue };
            if e.set.needs_handle || e.behavior.is_some() {
                keep |= 1 << si;
                holds_slots |= e.set.holds_slots;
            }
            for (li, (l, c)) in e.set.limits.iter().zip(e.cells()).enumerate() {
                let unit = l.algo.unit();
                let out = match cost_of(req, unit, mult[si]) {
                    Some(cost) => l.algo.try_charge(c, now, cost),
                    None => Outcome::Refused(None),
                };
                match out {
                    Outcome::Ok(state) => {
                        if let Some(w) = written.get_mut(k) {
                            *w = state;
                        }
                        k += 1;
                        let slot = match unit {
                            Unit::Requests => 0,
                            Unit::Tokens => 1,
                            Unit::InFlight => continue,
                        };
                        let tighter = match best[slot] {
                            None => true,
                            Some((bl, bstate)) => {
                                let (n, d) = headroom(&bl.algo, bstate, now);
                                let (num, den) = headroom(&l.algo, state, now);
                                num * d < n * den
                            }
                        };
                        if tighter {
                            best[slot] = Some((l, state));
                        }
                    }
                    Outcome::Refused(w) => {
                        self.rollback(req, subjects, (si, li), mult, now, &written);
                        return Err(Refusal {
                            subject: si,
                            limit: li,
                            wait: w,
                        });
                    }
                }
            }
        }
        Ok(Charged {
            best,
            keep,
            holds_slots,
        })
    }

    /// The permit of an admitted request.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        req: &Request<'_>,
        handles: &Handles,
        now: u64,
        mult: [u64; 3],
        level: Level,
        charged: Charged<'_>,
    ) -> Decision<'_> {
        self.counters.bump(Counter::Allowed);
        let Charged {
            best,
            keep,
            holds_slots,
        } = charged;
        let cand = |b: Option<(&LimitRt, u64)>| {
            b.map(|(l, state)| Candidate {
                algo: l.algo,
                state,
                name: l.name,
            })
        };
        // Built in one expression, so it is written straight into the caller's slot.
        Decision::Allow(Permit {
            warden: self,
            inner: PermitInner {
                now,
                handles: handles.only(keep),
                mult,
                input_tokens: req.input_tokens,
                expected_output: req.expected_output_tokens,
                level,
                req: cand(best[0]),
                tok: cand(best[1]),
                holds_slots,
                done: false,
            },
        })
    }

    /// The denial for a refused limit, with a retry-after at which every limit would conform
    /// (the other limits are peeked, not charged).
    #[cold]
    #[inline(never)]
    fn limit_denial(
        &self,
        req: &Request<'_>,
        subjects: &Subjects<'_>,
        now: u64,
        mult: &[u64; 3],
        level: Level,
        refusal: Refusal,
    ) -> Denial {
        let Refusal {
            subject: si,
            limit: li,
            wait: first_wait,
        } = refusal;
        let mut wait = first_wait;
        for (sj, e) in subjects.iter().enumerate() {
            let Some(e) = e else { continue };
            for (lj, (l, c)) in e.set.limits.iter().zip(e.cells()).enumerate() {
                if (sj, lj) == (si, li) || wait.is_none() {
                    continue;
                }
                let out = match cost_of(req, l.algo.unit(), mult[sj]) {
                    Some(cost) => l.algo.peek(c, now, cost),
                    None => Outcome::Refused(None),
                };
                if let Outcome::Refused(w) = out {
                    wait = match (wait, w) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                }
            }
        }
        let e = subjects[si].expect("refusing subject exists");
        let l = &e.set.limits[li];
        self.counters.bump(match l.algo.unit() {
            Unit::Requests => Counter::DeniedRate,
            Unit::Tokens => Counter::DeniedTokens,
            Unit::InFlight => Counter::DeniedConcurrency,
        });
        let cand = Candidate {
            algo: l.algo,
            state: e.cells()[li].load(Ordering::Acquire),
            name: l.name,
        };
        let (req_c, tok_c) = match l.algo.unit() {
            Unit::Tokens => (None, Some(cand)),
            _ => (Some(cand), None),
        };
        Denial {
            kind: e.set.kind,
            reason: InlineStr::from_static(l.reason),
            behavior: None,
            retry_after: wait.map(std::time::Duration::from_nanos),
            level,
            info: crate::decision::info(now, &req_c, &tok_c),
        }
    }

    /// Hands level changes found during a check to the event queue and the hooks, with no
    /// lock held.
    fn dispatch(&self, pending: Pending, req: &Request<'_>, cluster: Option<IpCluster>, now: u64) {
        if pending.is_empty() {
            return;
        }
        let names = |i: usize| match i {
            0 => match (req.api_key, cluster) {
                (Some(k), _) => k.to_string(),
                (None, Some(c)) => format!("anon:{c}"),
                (None, None) => String::new(),
            },
            1 => req.org.unwrap_or_default().to_string(),
            _ => cluster.map(|c| c.to_string()).unwrap_or_default(),
        };
        self.behavior.dispatch(pending, names, now);
    }

    /// Undoes the charges of limits before `stop` (subject, limit), in commit order; the
    /// `k`-th of them left its cell at `written[k]` (known for the first `WRITTEN`).
    #[cold]
    fn rollback(
        &self,
        req: &Request<'_>,
        subjects: &Subjects<'_>,
        stop: (usize, usize),
        mult: &[u64; 3],
        now: u64,
        written: &[u64; WRITTEN],
    ) {
        let mut k = 0;
        for (si, e) in subjects.iter().enumerate() {
            let Some(e) = e else { continue };
            for (li, (l, c)) in e.set.limits.iter().zip(e.cells()).enumerate() {
                if (si, li) == stop {
                    return;
                }
                if let Some(cost) = cost_of(req, l.algo.unit(), mult[si]) {
                    l.algo
                        .rollback(c, cost, now, written.get(k).copied(), || self.now());
                }
                k += 1;
            }
        }
    }

    /// Counters and table sizes.
    ///
    /// # Examples
    ///
    /// ```
    /// let w = ratewarden::Warden::builder().build().unwrap();
    /// assert_eq!(w.stats().allowed, 0);
    /// ```
    pub fn stats(&self) -> WardenStats {
        WardenStats {
            allowed: self.counters.sum(Counter::Allowed),
            denied_rate: self.counters.sum(Counter::DeniedRate),
            denied_tokens: self.counters.sum(Counter::DeniedTokens),
            denied_concurrency: self.counters.sum(Counter::DeniedConcurrency),
            denied_behavior: self.counters.sum(Counter::DeniedBehavior),
            tracked: [
                self.keys.tracked(),
                self.orgs.tracked(),
                self.clusters.tracked(),
            ],
            evictions: [
                &self.keys.evictions,
                &self.orgs.evictions,
                &self.clusters.evictions,
            ]
            .iter()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>(),
            overflow_hits: [
                &self.keys.overflow_hits,
                &self.orgs.overflow_hits,
                &self.clusters.overflow_hits,
            ]
            .iter()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>(),
            events_dropped: self.behavior.events_dropped(),
            hooks_panicked: self.behavior.hooks_panicked(),
        }
    }

    /// Evicts idle subjects now: those untouched for the idle timeout whose limits are back
    /// to their initial state, that are not escalated and hold no outstanding permit. Returns
    /// how many were evicted. The warden also does this by itself, amortised on the threads
    /// that insert new subjects; call it from a timer if you prefer a fixed schedule.
    ///
    /// Concurrency: takes each shard's write lock in turn.
    ///
    /// # Examples
    ///
    /// ```
    /// let w = ratewarden::Warden::builder().build().unwrap();
    /// assert_eq!(w.maintain(), 0);
    /// ```
    pub fn maintain(&self) -> usize {
        let now = self.now();
        self.policy.load().behavior_rt.cross.maintain(now);
        self.keys.retain(now) + self.orgs.retain(now) + self.clusters.retain(now)
    }

    /// Replaces the policy. Limits whose name and parameters did not change keep their state;
    /// changed or new limits start fresh, except concurrency limits: a permit releases a slot
    /// of every concurrency limit its subject has when it ends, so each keeps (or, when a
    /// swap adds or renames it, takes from an old one) the count of requests in flight.
    /// Subjects are migrated lazily, on their next check; each table's shared overflow entry
    /// (see `TablePolicy::max_subjects`) is migrated at once, in the same way.
    ///
    /// Permits issued before the swap settle into the migrated state. Known gaps:
    /// - a concurrency limit that a swap removes, with no other concurrency limit left, and a
    ///   later swap adds again is released by permits from before the removal if they are
    ///   still live (up to that many requests over its maximum until they end);
    /// - a check that charges the overflow entry, or a permit that releases into it, while
    ///   `set_policy` migrates it may act on the entry being replaced, and that one charge or
    ///   release is then lost (a lost release keeps a slot of the overflow entry held).
    ///
    /// Behavioural state carries over. A subject seen while the layer was off starts its
    /// behavioural state on its first check after a policy that switches the layer on;
    /// switching the layer off frees each subject's state on its next check. A change to an
    /// override's `exempt_behavior` applies to the subject on its next check; a swap that
    /// leaves it alone keeps an exemption the host set with
    /// [`set_exempt`](Self::set_exempt).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid field; the old policy stays in force.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{Policy, Warden};
    /// let w = Warden::builder().build().unwrap();
    /// let mut p = Policy::llm_api();
    /// p.table.max_subjects = 0;
    /// assert!(w.set_policy(p).is_err());
    /// ```
    pub fn set_policy(&self, policy: Policy) -> Result<(), ConfigError> {
        let _g = self.policy_lock.lock();
        let generation = self.policy.load().generation + 1;
        let prev = self.policy.load_full();
        let mut compiled = compile(&policy, generation & 0xffff_ffff, self.seed, Some(&prev))?;
        compiled.index_ids(&self.namer);
        let now = self.now();
        let (max, idle) = (compiled.max_subjects, compiled.idle_ns);
        for (kind, table) in [
            (SubjectKind::ApiKey, &self.keys),
            (SubjectKind::Org, &self.orgs),
        ] {
            table.reconfigure(
                max,
                idle,
                Entry::new(compiled.defaults[kind.index()].clone(), now, None),
                now,
            );
        }
        self.clusters.reconfigure(
            max,
            idle,
            Entry::new(compiled.defaults[2].clone(), now, None),
            now,
        );
        let fast = FastPolicy::of(&compiled).encode();
        // Publish the policy before the generation: a check that sees the new generation
        // finds the new policy on its slow paths.
        self.policy.store(Arc::new(compiled));
        self.fast.store(fast, Ordering::Release);
        Ok(())
    }

    pub(crate) fn namer(&self) -> &Namer {
        &self.namer
    }

    pub(crate) fn behavior_rt(&self) -> Arc<crate::behavior::BehaviorRt> {
        self.policy.load().behavior_rt.clone()
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy.load().source.clone()
    }

    /// Runs `f` on each subject of `handles` (its index and entry), as
    /// [`with_subject`](Self::with_subject) does for one, but finds the tracked ones
    /// together: every shard's read lock first, then every look-up, then `f` on each, so that
    /// their cache misses overlap (a permit is settled after the response, when its subjects'
    /// entries have often left the cache). A subject not found that way (the overflow entry,
    /// or one evicted or laid out by an older policy meanwhile) goes through `with_subject`
    /// afterwards, with `create[i]`, once these locks are released.
    pub(crate) fn with_subjects(
        &self,
        handles: &Handles,
        now: u64,
        create: [bool; 3],
        mut f: impl FnMut(usize, &Entry),
    ) {
        let generation = FastPolicy::decode(self.fast.load(Ordering::Acquire)).generation;
        let key_shard = handles.table_id(0).map(|id| self.keys.read_shard(id));
        let org_shard = handles.table_id(1).map(|id| self.orgs.read_shard(id));
        let cl_shard = handles.table_id(2).map(|id| self.clusters.read_shard(id));
        // As `with_subject`: a subject that may be created is touched and must be current
        // (else it is migrated there); otherwise any tracked entry serves, untouched.
        fn look<'a>(
            s: &'a Option<ShardRead<'_, Id>>,
            create: bool,
            generation: u64,
            now: u64,
        ) -> Option<&'a Entry> {
            let s = s.as_ref()?;
            if create {
                s.find(generation, now)
            } else {
                s.get()
            }
        }
        let entries = [
            look(&key_shard, create[0], generation, now),
            look(&org_shard, create[1], generation, now),
            look(&cl_shard, create[2], generation, now),
        ];
        for (i, e) in entries.iter().enumerate() {
            if let Some(e) = e {
                f(i, e);
            }
        }
        let done = entries.map(|e| e.is_some());
        drop((key_shard, org_shard, cl_shard));
        for (i, done) in done.into_iter().enumerate() {
            if let (false, Some(h)) = (done, handles.get(i)) {
                self.with_subject(SubjectKind::ALL[i], h, now, create[i], |e| f(i, e));
            }
        }
    }

    /// Runs `f` on a subject found by its permit handle. With `create`, a subject that was
    /// evicted meanwhile is inserted afresh (so a settlement debt is never lost).
    pub(crate) fn with_subject(
        &self,
        kind: SubjectKind,
        h: Handle,
        now: u64,
        create: bool,
        f: impl FnOnce(&Entry),
    ) {
        let generation = FastPolicy::decode(self.fast.load(Ordering::Acquire)).generation;
        let make = |pol: &Compiled| {
            let set = match h {
                Handle::Cluster(bits) => pol.set_for_cluster(join(bits)),
                Handle::Anonymous(_) => &pol.anonymous,
                Handle::Name(id) => pol.set_for_id(kind, id),
                Handle::Overflow => &pol.defaults[kind.index()],
            };
            self.new_entry(set, pol, now, kind)
        };
        match (kind, h) {
            (_, Handle::Overflow) => {
                let e = match kind {
                    SubjectKind::ApiKey => self.keys.overflow(),
                    SubjectKind::Org => self.orgs.overflow(),
                    SubjectKind::IpCluster => self.clusters.overflow(),
                };
                f(&e);
            }
            (SubjectKind::IpCluster, Handle::Cluster(bits)) => {
                let id = self.namer.cluster(join(bits));
                if create {
                    f(&self
                        .clusters
                        .get_or_insert(id, now, generation, make, &self.policy));
                } else if let Some(r) = self.clusters.get(&id) {
                    f(&r);
                }
            }
            (kind, Handle::Name(id) | Handle::Anonymous(id)) => {
                let table = if kind == SubjectKind::Org {
                    &self.orgs
                } else {
                    &self.keys
                };
                if create {
                    f(&table.get_or_insert(id, now, generation, make, &self.policy));
                } else if let Some(r) = table.get(&id) {
                    f(&r);
                }
            }
            _ => {}
        }
    }
}

/// What a successful charge pass found: the most constrained request and token limits (for
/// headers) with the states their charges left, and which subjects the permit must keep.
struct Charged<'s> {
    best: [Option<(&'s LimitRt, u64)>; 2],
    /// Subjects that settle, release or the behavioural layer will find again.
    keep: u8,
    /// Some kept subject has a concurrency limit.
    holds_slots: bool,
}

/// A refused limit: `(subject index, limit index, wait)`.
#[derive(Clone, Copy, Debug)]
struct Refusal {
    subject: usize,
    limit: usize,
    wait: Option<u64>,
}

/// How many of a check's charges keep the state they left, for an exact rollback: two
/// limits for each of three subjects, and two more.
const WRITTEN: usize = 8;

/// What a limit of `unit` charges for `req`, times the subject's throttle multiplier; `None`
/// when that overflows (the request can never conform).
#[inline(always)]
fn cost_of(req: &Request<'_>, unit: Unit, m: u64) -> Option<u64> {
    match unit {
        Unit::Requests => req.requests.checked_mul(m),
        Unit::Tokens => req.token_cost().and_then(|t| t.checked_mul(m)),
        Unit::InFlight => Some(m),
    }
}

/// An IP cluster's prefix bits as two words (see [`Handle::Cluster`]).
#[inline]
pub(crate) fn split(bits: u128) -> [u64; 2] {
    [(bits >> 64) as u64, bits as u64]
}

/// The inverse of [`split`].
#[inline]
pub(crate) fn join(w: [u64; 2]) -> u128 {
    (u128::from(w[0]) << 64) | u128::from(w[1])
}

/// The policy scalars read on every check.
#[derive(Clone, Copy, Debug)]
struct FastPolicy {
    generation: u64,
    v4_prefix: u8,
    v6_prefix: u8,
    active: [bool; 3],
    /// The behavioural layer is on.
    behave: bool,
}

impl FastPolicy {
    fn of(c: &Compiled) -> Self {
        Self {
            generation: c.generation,
            v4_prefix: c.v4_prefix,
            v6_prefix: c.v6_prefix,
            active: c.active,
            behave: c.behavior.enabled,
        }
    }

    fn encode(self) -> u64 {
        let active = self
            .active
            .iter()
            .enumerate()
            .fold(0u64, |a, (i, &b)| a | (u64::from(b) << i));
        ((self.generation & 0xffff_ffff) << 32)
            | (u64::from(self.v4_prefix) << 16)
            | (u64::from(self.v6_prefix) << 8)
            | (u64::from(self.behave) << 3)
            | active
    }

    #[inline]
    fn decode(w: u64) -> Self {
        Self {
            generation: w >> 32,
            v4_prefix: (w >> 16) as u8,
            v6_prefix: (w >> 8) as u8,
            active: [w & 1 != 0, w & 2 != 0, w & 4 != 0],
            behave: w & 8 != 0,
        }
    }
}

/// Share of quota left as a fraction, compared without dividing.
#[inline]
fn headroom(algo: &crate::limit::Algo, state: u64, now: u64) -> (u128, u128) {
    use crate::limit::Algo;
    match algo {
        Algo::Gcra(p) | Algo::Tokens(p) => {
            let ahead = state.saturating_sub(now).min(p.tau);
            (u128::from(p.tau - ahead), u128::from(p.tau))
        }
        other => {
            let cell = crate::limit::AtomicU64::new(state);
            let (rem, _) = other.remaining(&cell, now);
            (u128::from(rem), u128::from(other.quota().max(1)))
        }
    }
}

/// Per subject, how close its most constrained request or token limit is to refusing (0..=1).
#[inline]
fn pressures(subjects: &Subjects<'_>, now: u64) -> [f32; 3] {
    let mut out = [0.0f32; 3];
    for (si, e) in subjects.iter().enumerate() {
        let Some(e) = e else { continue };
        if e.behavior.is_none() {
            continue;
        }
        let mut p = 0.0f32;
        for (l, c) in e.set.limits.iter().zip(e.cells()) {
            if l.algo.unit() == Unit::InFlight {
                continue;
            }
            let (num, den) = headroom(&l.algo, c.load(std::sync::atomic::Ordering::Relaxed), now);
            // Both fit in u64 (headroom is at most the quota); f32 is precise enough here.
            let used = 1.0 - (num as u64 as f32) / (den.max(1) as u64 as f32);
            p = p.max(used);
        }
        out[si] = p;
    }
    out
}

/// The entry in a read-locked shard, if current; with the behavioural layer on, its slot
/// starts loading at once (see [`BehaviorSlot::prefetch`]).
#[inline(always)]
fn found<'a>(
    shard: &'a Option<ShardRead<'_, Id>>,
    fast: FastPolicy,
    now: u64,
) -> Option<&'a Entry> {
    let e = shard.as_ref()?.find(fast.generation, now)?;
    if fast.behave {
        prefetch_behavior(e);
    }
    Some(e)
}

/// Starts loading a subject's behavioural slot, if it has one.
#[inline(always)]
fn prefetch_behavior(entry: &Entry) {
    if let Some(b) = entry.behavior.as_deref() {
        b.prefetch();
    }
}
