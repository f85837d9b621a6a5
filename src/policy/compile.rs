//! Validation of a [`Policy`] into the runtime form the hot path reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::config::{LimitConfig, Policy};
use super::ConfigError;
use crate::limit::gcra::GcraParams;
use crate::limit::window::{WindowParams, MAX_WINDOW_LIMIT};
use crate::limit::{Algo, Unit};
use crate::subject::{parse_cidr, SubjectKind};

/// One validated limit.
#[derive(Debug)]
pub(crate) struct LimitRt {
    pub(crate) name: &'static str,
    /// `kind:name`, the denial reason.
    pub(crate) reason: &'static str,
    pub(crate) algo: Algo,
}

/// The limits of one subject (the kind's defaults, or an override).
#[derive(Debug)]
pub(crate) struct LimitSet {
    pub(crate) kind: SubjectKind,
    /// Generation of the policy this set was compiled for: an entry laid out for it is
    /// current while the warden's generation is not newer (entries carry no generation of
    /// their own, which keeps a table bucket at 56 bytes).
    pub(crate) generation: u64,
    pub(crate) limits: Box<[LimitRt]>,
    /// Exempt from behavioural escalation.
    pub(crate) exempt: bool,
    /// Some limit needs the permit to come back (tokens to settle, a slot to release).
    pub(crate) needs_handle: bool,
    /// Some limit is a concurrency limit: permits release it when dropped.
    pub(crate) holds_slots: bool,
    /// The behavioural settings of the policy this set belongs to, reachable from any entry
    /// without touching the shared policy pointer.
    pub(crate) behavior: Arc<crate::behavior::BehaviorRt>,
}

impl LimitSet {
    /// For each of `self`'s limits, the index of the limit in `old` whose state it keeps: an
    /// identical limit (same name and parameters). A concurrency limit keeps the count of
    /// one in `old` whatever its maximum or name (the one of its name, else any): its state
    /// is the subject's requests in flight, every one of which holds a slot of each of its
    /// concurrency limits and releases them all when it ends, so a limit that a swap adds
    /// or renames counts the requests already in flight, and their releases balance it.
    pub(crate) fn carry_from(&self, old: &LimitSet) -> Vec<Option<usize>> {
        let in_flight = |a: &Algo| matches!(a, Algo::Concurrency(_));
        self.limits
            .iter()
            .map(|l| {
                let same = old.limits.iter().position(|o| {
                    o.name == l.name
                        && (o.algo == l.algo || (in_flight(&o.algo) && in_flight(&l.algo)))
                });
                same.or_else(|| {
                    in_flight(&l.algo)
                        .then(|| old.limits.iter().position(|o| in_flight(&o.algo)))
                        .flatten()
                })
            })
            .collect()
    }
}

/// The validated, runtime form of a policy.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) generation: u64,
    pub(crate) v4_prefix: u8,
    pub(crate) v6_prefix: u8,
    pub(crate) defaults: [Arc<LimitSet>; 3],
    pub(crate) anonymous: Arc<LimitSet>,
    pub(crate) by_name: [HashMap<String, Arc<LimitSet>>; 2],
    /// `by_name` keyed by subject id (see [`Compiled::index_ids`]), for paths that know a
    /// subject only by its id: a permit settling into a subject that was evicted or laid out
    /// by an older policy meanwhile.
    pub(crate) by_id: [HashMap<u64, Arc<LimitSet>>; 2],
    pub(crate) by_cluster: HashMap<u128, Arc<LimitSet>>,
    /// Whether a kind needs tracking at all: it has limits (defaults or overrides) or the
    /// behavioural layer is on. An inactive kind costs nothing per check.
    pub(crate) active: [bool; 3],
    pub(crate) max_subjects: usize,
    pub(crate) idle_ns: u64,
    pub(crate) behavior: crate::behavior::BehaviorPolicy,
    pub(crate) behavior_rt: Arc<crate::behavior::BehaviorRt>,
    pub(crate) source: Policy,
}

impl Compiled {
    /// The limit set of a named (key or org) subject.
    pub(crate) fn set_for_name(&self, kind: SubjectKind, id: &str) -> &Arc<LimitSet> {
        let i = kind.index();
        if i < 2 {
            if let Some(s) = self.by_name[i].get(id) {
                return s;
            }
        }
        &self.defaults[i]
    }

    /// The limit set of a key or org known by its id only.
    pub(crate) fn set_for_id(&self, kind: SubjectKind, id: crate::table::Id) -> &Arc<LimitSet> {
        let i = kind.index();
        if i < 2 {
            if let Some(s) = self.by_id[i].get(&id.0) {
                return s;
            }
        }
        &self.defaults[i]
    }

    /// Fills `by_id` from `by_name` with the warden's ids.
    pub(crate) fn index_ids(&mut self, namer: &crate::table::Namer) {
        for (by_id, by_name) in self.by_id.iter_mut().zip(&self.by_name) {
            *by_id = by_name
                .iter()
                .map(|(name, set)| (namer.id(name).0, set.clone()))
                .collect();
        }
    }

    /// The limit set of a cluster.
    pub(crate) fn set_for_cluster(&self, bits: u128) -> &Arc<LimitSet> {
        self.by_cluster
            .get(&bits)
            .unwrap_or(&self.defaults[SubjectKind::IpCluster.index()])
    }
}

fn nonzero(v: u64, path: impl FnOnce() -> String) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(ConfigError::Zero { path: path() })
    } else {
        Ok(v)
    }
}

fn nanos(d: std::time::Duration, path: &str) -> Result<u64, ConfigError> {
    let n = u64::try_from(d.as_nanos()).map_err(|_| ConfigError::Invalid {
        path: path.to_string(),
        reason: "duration is too long (at most about 584 years)".into(),
    })?;
    nonzero(n, || path.to_string())
}

fn compile_limit(cfg: &LimitConfig, path: &str) -> Result<Algo, ConfigError> {
    let p = |f: &str| format!("{path}.{f}");
    let too_fine = |f: &str| {
        ConfigError::Invalid {
        path: p(f),
        reason: "rate is finer than one unit per nanosecond, or rate × burst overflows; use a longer period".into(),
    }
    };
    Ok(match cfg {
        LimitConfig::Gcra {
            rate,
            period,
            burst,
        } => {
            let rate = nonzero(*rate, || p("rate"))?;
            let burst = nonzero(*burst, || p("burst"))?;
            let period = nanos(period.0, &p("period"))?;
            Algo::Gcra(GcraParams::new(rate, period, burst).ok_or_else(|| too_fine("rate"))?)
        }
        LimitConfig::SlidingWindow { limit, window } => {
            let limit = nonzero(*limit, || p("limit"))?;
            if limit > MAX_WINDOW_LIMIT {
                return Err(ConfigError::Invalid {
                    path: p("limit"),
                    reason: format!(
                        "at most {MAX_WINDOW_LIMIT} per window; use a gcra limit for larger counts"
                    ),
                });
            }
            Algo::Window(WindowParams {
                window: nanos(window.0, &p("window"))?,
                limit,
            })
        }
        LimitConfig::Concurrency { max } => Algo::Concurrency(nonzero(*max, || p("max"))?),
        LimitConfig::Tokens {
            tokens,
            period,
            burst,
        } => {
            let tokens = nonzero(*tokens, || p("tokens"))?;
            let burst = match burst {
                Some(b) => nonzero(*b, || p("burst"))?,
                None => tokens,
            };
            let period = nanos(period.0, &p("period"))?;
            Algo::Tokens(GcraParams::new(tokens, period, burst).ok_or_else(|| too_fine("tokens"))?)
        }
    })
}

fn compile_set(
    kind: SubjectKind,
    limits: &BTreeMap<String, LimitConfig>,
    path: &str,
    exempt: bool,
    generation: u64,
    behavior: &Arc<crate::behavior::BehaviorRt>,
) -> Result<LimitSet, ConfigError> {
    let mut out = Vec::with_capacity(limits.len());
    for (name, cfg) in limits {
        let lpath = format!("{path}.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::Invalid {
                path: lpath,
                reason: "limit names use only ASCII letters, digits, '_' and '-'".into(),
            });
        }
        let algo = compile_limit(cfg, &lpath)?;
        out.push(LimitRt {
            name: intern(name),
            reason: intern(&format!("{}:{name}", kind.as_str())),
            algo,
        });
    }
    // Evaluate request limits first, then tokens, then concurrency: the cheap, most often
    // refusing checks come first and concurrency slots are taken last.
    out.sort_by_key(|l| match l.algo.unit() {
        Unit::Requests => 0,
        Unit::Tokens => 1,
        Unit::InFlight => 2,
    });
    let needs_handle = out.iter().any(|l| l.algo.unit() != Unit::Requests);
    let holds_slots = out.iter().any(|l| l.algo.unit() == Unit::InFlight);
    Ok(LimitSet {
        kind,
        generation,
        limits: out.into_boxed_slice(),
        exempt,
        needs_handle,
        holds_slots,
        behavior: behavior.clone(),
    })
}

/// Limit names and reasons live for the whole program: a name is leaked once, the first time a
/// policy uses it, so decisions can carry `&'static str` without allocating or touching shared
/// reference counts. The set of distinct names any program configures is small.
pub(crate) fn intern(s: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::OnceLock;
    static NAMES: OnceLock<parking_lot::Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock();
    if let Some(n) = names.get(s) {
        return n;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// Validates `p` and builds its runtime form.
/// `seed` keys the behavioural sketches; `prev` is the policy being replaced, whose cross
/// index carries over when its settings did not change.
pub(crate) fn compile(
    p: &Policy,
    generation: u64,
    seed: u64,
    prev: Option<&Compiled>,
) -> Result<Compiled, ConfigError> {
    let prefix_err = |path: &str, max: u8| ConfigError::Invalid {
        path: path.to_string(),
        reason: format!("prefix length must be between 1 and {max}"),
    };
    if p.cluster.v4_prefix == 0 || p.cluster.v4_prefix > 32 {
        return Err(prefix_err("cluster.v4_prefix", 32));
    }
    if p.cluster.v6_prefix == 0 || p.cluster.v6_prefix > 128 {
        return Err(prefix_err("cluster.v6_prefix", 128));
    }
    let bp = Arc::new(crate::behavior::BehaviorRt::new(
        &p.behavior,
        seed,
        prev.map(|c| &*c.behavior_rt),
    )?);
    let defaults = [
        Arc::new(compile_set(
            SubjectKind::ApiKey,
            &p.api_key,
            "api_key",
            false,
            generation,
            &bp,
        )?),
        Arc::new(compile_set(
            SubjectKind::Org,
            &p.org,
            "org",
            false,
            generation,
            &bp,
        )?),
        Arc::new(compile_set(
            SubjectKind::IpCluster,
            &p.ip_cluster,
            "ip_cluster",
            false,
            generation,
            &bp,
        )?),
    ];
    let anonymous = match &p.anonymous {
        Some(a) => Arc::new(compile_set(
            SubjectKind::ApiKey,
            a,
            "anonymous",
            false,
            generation,
            &bp,
        )?),
        None => defaults[0].clone(),
    };
    let mut by_name: [HashMap<String, Arc<LimitSet>>; 2] = Default::default();
    let mut by_cluster = HashMap::new();
    for (i, o) in p.overrides.iter().enumerate() {
        let opath = format!("overrides[{i}]");
        let base = match o.kind {
            SubjectKind::ApiKey => &p.api_key,
            SubjectKind::Org => &p.org,
            SubjectKind::IpCluster => &p.ip_cluster,
        };
        let mut merged = base.clone();
        merged.extend(o.limits.iter().map(|(k, v)| (k.clone(), v.clone())));
        let set = Arc::new(compile_set(
            o.kind,
            &merged,
            &format!("{opath}.limits"),
            o.exempt_behavior,
            generation,
            &bp,
        )?);
        let dup = || ConfigError::Invalid {
            path: format!("{opath}.id"),
            reason: format!("duplicate override for {} `{}`", o.kind, o.id),
        };
        match o.kind {
            SubjectKind::IpCluster => {
                let c = parse_cidr(&o.id)
                    .filter(|c| c.prefix() == if c.is_ipv4() { p.cluster.v4_prefix } else { p.cluster.v6_prefix })
                    .filter(|c| c.network() == o.id.split('/').next().and_then(|a| a.parse().ok()).unwrap_or(c.network()))
                    .ok_or_else(|| ConfigError::Invalid {
                        path: format!("{opath}.id"),
                        reason: format!(
                            "expected a network in CIDR form with the configured prefix (/{} for IPv4, /{} for IPv6), such as 198.51.100.0/24",
                            p.cluster.v4_prefix, p.cluster.v6_prefix
                        ),
                    })?;
                if by_cluster.insert(c.bits(), set).is_some() {
                    return Err(dup());
                }
            }
            kind => {
                if o.id.is_empty() {
                    return Err(ConfigError::Invalid {
                        path: format!("{opath}.id"),
                        reason: "must not be empty".into(),
                    });
                }
                if by_name[kind.index()].insert(o.id.clone(), set).is_some() {
                    return Err(dup());
                }
            }
        }
    }
    if p.table.max_subjects == 0 {
        return Err(ConfigError::Zero {
            path: "table.max_subjects".into(),
        });
    }
    let idle_ns = nanos(p.table.idle_timeout.0, "table.idle_timeout")?;
    let active = [
        p.behavior.enabled
            || !defaults[0].limits.is_empty()
            || !by_name[0].is_empty()
            || !anonymous.limits.is_empty(),
        p.behavior.enabled || !defaults[1].limits.is_empty() || !by_name[1].is_empty(),
        p.behavior.enabled || !defaults[2].limits.is_empty() || !by_cluster.is_empty(),
    ];
    Ok(Compiled {
        active,
        generation,
        v4_prefix: p.cluster.v4_prefix,
        v6_prefix: p.cluster.v6_prefix,
        defaults,
        anonymous,
        by_name,
        by_id: Default::default(),
        by_cluster,
        max_subjects: p.table.max_subjects,
        idle_ns,
        behavior: p.behavior.clone(),
        behavior_rt: bp,
        source: p.clone(),
    })
}
