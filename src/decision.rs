//! What a check returns: an allow with a [`Permit`], or a [`Denial`]; and the response headers
//! a gateway sends for either.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::behavior::Level;
use crate::limit::Algo;
use crate::subject::SubjectKind;
use crate::table::Id;
use crate::warden::Warden;

/// A denial reason: a `&'static str` (limit names are interned when a policy is compiled), so
/// decisions carry it without allocating or touching shared reference counts.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct InlineStr(&'static str);

impl InlineStr {
    /// Interns the concatenation of `parts` (slow path: takes a global lock).
    #[cfg(all(test, feature = "tower"))]
    pub(crate) fn new(parts: &[&str]) -> Self {
        Self(crate::policy::intern_name(&parts.concat()))
    }

    pub(crate) const fn from_static(s: &'static str) -> Self {
        Self(s)
    }

    pub(crate) fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Debug for InlineStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

/// The state of one limit, for response headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    /// The quota: burst of a token bucket, limit of a window, token capacity.
    pub limit: u64,
    /// How much is left now.
    pub remaining: u64,
    /// Time until the limit is back to its full quota (end of the window for a sliding window).
    pub reset: Duration,
    /// The window the quota refers to (`burst / rate` for a bucket).
    pub window: Duration,
    name: &'static str,
}

impl LimitStatus {
    /// The limit's name, as in the policy (`requests_per_minute`).
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The most constrained request limit and token limit of a decision.
///
/// "Most constrained" is the limit with the smallest share of its quota left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// The tightest limit counted in requests (token bucket or sliding window).
    pub requests: Option<LimitStatus>,
    /// The tightest limit counted in tokens.
    pub tokens: Option<LimitStatus>,
}

/// A limit and the state it had, kept until headers are asked for (no division on the hot
/// path).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub(crate) algo: Algo,
    pub(crate) state: u64,
    pub(crate) name: &'static str,
}

impl Candidate {
    fn status(&self, now: u64) -> LimitStatus {
        let cell = crate::limit::AtomicU64::new(self.state);
        let (remaining, reset) = self.algo.remaining(&cell, now);
        LimitStatus {
            limit: self.algo.quota(),
            remaining,
            reset: Duration::from_nanos(reset),
            window: Duration::from_nanos(self.algo.window_ns()),
            name: self.name,
        }
    }
}

pub(crate) fn info(now: u64, req: &Option<Candidate>, tok: &Option<Candidate>) -> RateLimitInfo {
    RateLimitInfo {
        requests: req.map(|c| c.status(now)),
        tokens: tok.map(|c| c.status(now)),
    }
}

/// The outcome of [`Warden::check`].
#[derive(Debug)]
#[must_use = "a Permit must be kept until the response is done, then settled or dropped"]
pub enum Decision<'a> {
    /// Serve the request; keep the permit until the response is done.
    Allow(Permit<'a>),
    /// Refuse the request.
    Deny(Denial),
}

impl Decision<'_> {
    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// The response headers for this decision (see [`Permit::headers`] and [`Denial::headers`]).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Decision::Allow(p) => p.headers(),
            Decision::Deny(d) => d.headers(),
        }
    }

    /// The highest escalation level among the request's subjects at decision time.
    pub fn level(&self) -> Level {
        match self {
            Decision::Allow(p) => p.inner.level,
            Decision::Deny(d) => d.level,
        }
    }
}

/// Why a request was refused, and when to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub(crate) kind: SubjectKind,
    pub(crate) reason: InlineStr,
    pub(crate) behavior: Option<Level>,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) level: Level,
    pub(crate) info: RateLimitInfo,
}

impl Denial {
    /// The kind of subject that refused (for a behavioural denial, the subject at that level).
    pub fn subject_kind(&self) -> SubjectKind {
        self.kind
    }

    /// `kind:limit` for a classic limit (`api_key:requests_per_minute`), or
    /// `behavior:challenge` / `behavior:block`.
    pub fn reason(&self) -> &str {
        self.reason.as_str()
    }

    /// The limit's name (`requests_per_minute`), or `challenge` / `block`.
    pub fn limit(&self) -> &str {
        let r = self.reason.as_str();
        r.split_once(':').map_or(r, |(_, l)| l)
    }

    /// The escalation level behind a behavioural denial (`Challenge` or `Block`), `None` for a
    /// classic limit.
    pub fn behavior(&self) -> Option<Level> {
        self.behavior
    }

    /// When the same request could conform, assuming no other traffic. `None` when it never
    /// can under the current limits (its cost exceeds the limit's capacity) or the subject is
    /// blocked or challenged.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The highest escalation level among the request's subjects.
    pub fn level(&self) -> Level {
        self.level
    }

    /// State of the most constrained limits (the refusing one among them).
    pub fn rate_limit(&self) -> RateLimitInfo {
        self.info
    }

    /// Response headers: the rate-limit set of [`Permit::headers`] plus `Retry-After` in whole
    /// seconds, rounded up and never 0.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        self.visit_headers(&mut String::new(), &mut |n, v| h.push((n, v.to_owned())));
        h
    }

    /// [`headers`](Self::headers), one at a time, formatted into `buf`.
    pub(crate) fn visit_headers(&self, buf: &mut String, f: &mut impl FnMut(&'static str, &str)) {
        crate::headers::visit_rate_limit_headers(&self.info, buf, f);
        crate::headers::visit_retry_after(self.retry_after, buf, f);
    }
}

/// How a permit finds a subject again: by id (never by a pointer, so eviction and policy
/// swaps cannot leave it dangling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Handle {
    Name(Id),
    /// The anonymous key of an IP cluster (requests without an API key).
    Anonymous(Id),
    /// An IP cluster by its prefix bits (as two words: no 16-byte alignment in permits).
    Cluster([u64; 2]),
    Overflow,
}

/// The handles of a check's three subjects, packed: ids, the cluster's prefix bits, and two
/// bit masks (which subjects are kept, which are the shared overflow entry).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Handles {
    ids: [u64; 3],
    cluster: [u64; 2],
    present: u8,
    overflow: u8,
    /// The key subject is its cluster's anonymous key.
    anonymous: bool,
}

impl Handles {
    #[inline]
    pub(crate) fn set(&mut self, i: usize, id: Id) {
        self.ids[i] = id.0;
        self.present |= 1 << i;
    }

    #[inline]
    pub(crate) fn set_anonymous(&mut self, id: Id) {
        self.set(0, id);
        self.anonymous = true;
    }

    #[inline]
    pub(crate) fn set_cluster(&mut self, id: Id, bits: [u64; 2]) {
        self.set(2, id);
        self.cluster = bits;
    }

    #[inline]
    pub(crate) fn mark_overflow(&mut self, i: usize) {
        self.overflow |= 1 << i;
    }

    /// The same handles, restricted to the subjects in `mask`.
    #[inline]
    pub(crate) fn only(mut self, mask: u8) -> Self {
        self.present &= mask;
        self
    }

    /// The id each subject was found under (0 when absent), for the behavioural sketches.
    #[inline]
    pub(crate) fn ids(&self) -> [u64; 3] {
        self.ids
    }

    /// Subject `i`'s id, if it has one.
    #[inline]
    pub(crate) fn id(&self, i: usize) -> Option<Id> {
        (self.present & (1 << i) != 0).then_some(Id(self.ids[i]))
    }

    /// Subject `i`'s id in its table: [`id`](Self::id), unless the subject was charged to its
    /// table's overflow entry. (A cluster's id is the one `set_cluster` stored, so it need not
    /// be hashed again from the cluster's bits.)
    #[inline]
    pub(crate) fn table_id(&self, i: usize) -> Option<Id> {
        self.id(i).filter(|_| self.overflow & (1 << i) == 0)
    }

    /// The key subject is its cluster's anonymous key.
    #[inline]
    pub(crate) fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Subject `i`'s handle, if it has one.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<Handle> {
        if self.present & (1 << i) == 0 {
            None
        } else if self.overflow & (1 << i) != 0 {
            Some(Handle::Overflow)
        } else if i == 2 {
            Some(Handle::Cluster(self.cluster))
        } else if i == 0 && self.anonymous {
            Some(Handle::Anonymous(Id(self.ids[0])))
        } else {
            Some(Handle::Name(Id(self.ids[i])))
        }
    }
}

/// What a permit keeps about the subjects it charged.
#[derive(Debug, Default)]
pub(crate) struct PermitInner {
    pub(crate) now: u64,
    pub(crate) handles: Handles,
    /// Cost multiplier applied per subject (throttle).
    pub(crate) mult: [u64; 3],
    pub(crate) input_tokens: u64,
    pub(crate) expected_output: u64,
    pub(crate) level: Level,
    pub(crate) req: Option<Candidate>,
    pub(crate) tok: Option<Candidate>,
    /// Some subject has a concurrency limit: dropping must release it.
    pub(crate) holds_slots: bool,
    pub(crate) done: bool,
}

impl PermitInner {
    pub(crate) fn settle(&mut self, warden: &Warden, actual_output: u64) {
        if self.done {
            return;
        }
        let now = warden.now();
        let charged = self.input_tokens.saturating_add(self.expected_output);
        let actual = self.input_tokens.saturating_add(actual_output);
        let mult = self.mult;
        let amounts = |i: usize| {
            let m = mult[i].max(1);
            if actual >= charged {
                ((actual - charged).saturating_mul(m), 0)
            } else {
                (0, (charged - actual).saturating_mul(m))
            }
        };
        let charged_at = self.now;
        // A debt is charged even if the subject was evicted meanwhile (it comes back).
        let create = [0, 1, 2].map(|i| amounts(i).0 > 0);
        warden.with_subjects(&self.handles, now, create, |i, e| {
            let (extra, refund) = amounts(i);
            let units = charged.saturating_mul(mult[i].max(1));
            for (l, c) in e.set.limits.iter().zip(e.cells()) {
                l.algo.settle(c, now, extra, refund, units, charged_at);
            }
            if let Some(b) = &e.behavior {
                crate::behavior::Engine::settle(b, actual_output, now);
            }
        });
        self.release(warden, now);
    }

    fn release(&mut self, warden: &Warden, now: u64) {
        if self.done {
            return;
        }
        self.done = true;
        if !self.holds_slots {
            return;
        }
        let mult = self.mult;
        warden.with_subjects(&self.handles, now, [false; 3], |i, e| {
            let m = mult[i].max(1);
            for (l, c) in e.set.limits.iter().zip(e.cells()) {
                l.algo.release(c, m);
            }
        });
    }

    pub(crate) fn drop_release(&mut self, warden: &Warden) {
        if !self.done && self.holds_slots {
            self.release(warden, warden.now());
        }
    }
}

/// An admitted request. Keep it until the response is done: dropping it releases concurrency
/// slots, and [`settle`](Permit::settle) corrects the token charge to the actual output.
///
/// If a permit is dropped without settling, the up-front token estimate stays charged.
#[derive(Debug)]
pub struct Permit<'a> {
    pub(crate) warden: &'a Warden,
    pub(crate) inner: PermitInner,
}

impl Permit<'_> {
    /// Charges or refunds the difference between the expected and the actual output tokens,
    /// feeds the output size to the behavioural signals, and releases concurrency slots.
    ///
    /// A debt (more output than the estimate) is always charged, even past the limit: it
    /// delays later requests and is never lost.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::{Decision, ManualClock, Policy, Request, Warden};
    /// let w = Warden::builder().policy(Policy::llm_api()).clock(ManualClock::new()).build().unwrap();
    /// let req = Request::new("k", "o", "192.0.2.1".parse().unwrap()).input_tokens(10).expected_output_tokens(1000);
    /// let decision = w.check(&req);
    /// if let Decision::Allow(p) = decision {
    ///     p.settle(12);
    /// }
    /// ```
    pub fn settle(mut self, actual_output_tokens: u64) {
        self.inner.settle(self.warden, actual_output_tokens);
    }

    /// The most constrained request and token limits, for headers.
    pub fn rate_limit(&self) -> RateLimitInfo {
        info(self.inner.now, &self.inner.req, &self.inner.tok)
    }

    /// The highest escalation level among the request's subjects.
    pub fn level(&self) -> Level {
        self.inner.level
    }

    /// Response headers for an allowed request: `RateLimit-Policy` and `RateLimit` (IETF draft,
    /// Structured Fields syntax) and the OpenAI-style `x-ratelimit-*-requests` and
    /// `x-ratelimit-*-tokens` fields.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        crate::headers::rate_limit_headers(&self.rate_limit())
    }

    /// Detaches the permit from the borrow of the warden, for hosts that keep it across an
    /// `await` or inside a response body. `warden` must be the warden that issued it.
    pub fn into_owned(mut self, warden: Arc<Warden>) -> OwnedPermit {
        debug_assert!(std::ptr::eq(Arc::as_ptr(&warden), self.warden));
        let inner = std::mem::take(&mut self.inner);
        self.inner.done = true;
        OwnedPermit { warden, inner }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.inner.drop_release(self.warden);
    }
}

/// A [`Permit`] that owns a handle on its warden (`'static`), from [`Permit::into_owned`].
#[derive(Debug)]
pub struct OwnedPermit {
    warden: Arc<Warden>,
    inner: PermitInner,
}

impl OwnedPermit {
    /// As [`Permit::settle`].
    pub fn settle(mut self, actual_output_tokens: u64) {
        self.inner.settle(&self.warden, actual_output_tokens);
    }

    /// As [`Permit::rate_limit`].
    pub fn rate_limit(&self) -> RateLimitInfo {
        info(self.inner.now, &self.inner.req, &self.inner.tok)
    }

    /// As [`Permit::headers`].
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        crate::headers::rate_limit_headers(&self.rate_limit())
    }

    /// [`headers`](Self::headers), one at a time, formatted into `buf`.
    #[cfg(feature = "tower")]
    pub(crate) fn visit_headers(&self, buf: &mut String, f: &mut impl FnMut(&'static str, &str)) {
        crate::headers::visit_rate_limit_headers(&self.rate_limit(), buf, f);
    }

    /// As [`Permit::level`].
    pub fn level(&self) -> Level {
        self.inner.level
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        self.inner.drop_release(&self.warden);
    }
}
