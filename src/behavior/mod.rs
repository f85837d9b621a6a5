//! Placeholder until the behavioural layer lands.
use serde::{Deserialize, Serialize};

/// Behavioural limits configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BehaviorPolicy {
    /// On or off.
    pub enabled: bool,
    /// Compute, never deny.
    pub shadow: bool,
}

impl Default for BehaviorPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            shadow: false,
        }
    }
}

impl BehaviorPolicy {
    pub(crate) fn validate(&self, _path: &str) -> Result<(), crate::ConfigError> {
        Ok(())
    }
}

/// Escalation level.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Level {
    /// Normal.
    #[default]
    Normal,
    /// Watch.
    Watch,
    /// Throttle.
    Throttle,
    /// Challenge.
    Challenge,
    /// Block.
    Block,
}

impl Level {
    /// Name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Watch => "watch",
            Level::Throttle => "throttle",
            Level::Challenge => "challenge",
            Level::Block => "block",
        }
    }
}

use crate::request::Request;
use crate::subject::{IpCluster, SubjectKind};
use crate::table::Entry;
use std::sync::Arc;

/// Per-entry behavioural state.
#[derive(Debug)]
pub(crate) struct Slot {}

impl Slot {
    pub(crate) fn new(_kind: SubjectKind, _now: u64, _exempt: bool) -> Self {
        Slot {}
    }
    pub(crate) fn clone_state(&self) -> Self {
        Slot {}
    }
    pub(crate) fn evictable(&self, _now: u64) -> bool {
        true
    }
}

/// Engine.
#[derive(Debug)]
pub(crate) struct Engine {}

impl Engine {
    pub(crate) fn new(
        _p: &BehaviorPolicy,
        _hooks: Vec<Arc<dyn crate::hooks::EscalationHook>>,
        _cap: Option<usize>,
    ) -> Self {
        Engine {}
    }
    pub(crate) fn levels(
        &self,
        _s: &[Option<&Entry>; 3],
        _now: u64,
        _p: &BehaviorPolicy,
    ) -> [Level; 3] {
        [Level::Normal; 3]
    }
    pub(crate) fn multiplier(&self, _l: Level, _p: &BehaviorPolicy) -> u64 {
        1
    }
    pub(crate) fn denying(&self, _l: &[Level; 3], _p: &BehaviorPolicy) -> Option<(usize, Level)> {
        None
    }
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn observe(
        &self,
        _s: &[Option<&Entry>; 3],
        _req: &Request<'_>,
        _c: Option<IpCluster>,
        _now: u64,
        _p: &BehaviorPolicy,
        _pressure: [f32; 3],
        _denied: bool,
    ) {
    }
    pub(crate) fn dispatch(&self) {}
    pub(crate) fn wants_cluster(&self) -> bool {
        false
    }
    pub(crate) fn events_dropped(&self) -> u64 {
        0
    }
    pub(crate) fn hooks_panicked(&self) -> u64 {
        0
    }
    pub(crate) fn reconfigure(&self, _p: &BehaviorPolicy) {}
}

impl crate::warden::Warden {
    pub(crate) fn behavior_settle(&self, _k: SubjectKind, _b: &Slot, _actual: u64, _now: u64) {}
}
