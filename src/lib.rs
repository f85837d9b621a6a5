#![doc = include_str!("../README.md")]

mod behavior;
mod clock;
mod control;
mod decision;
mod headers;
mod hooks;
mod limit;
mod policy;
mod prefetch;
mod request;
mod stats;
mod subject;
mod table;
#[cfg(feature = "tower")]
mod tower;
mod warden;

pub use behavior::{
    BehaviorPolicy, CrossPolicy, DetectorsPolicy, IpSpreadPolicy, KeyChurnPolicy, KeyFanoutPolicy,
    Level, LevelRule, LevelsPolicy, LogprobHarvestPolicy, OutputVolumePolicy, PinnedPolicy,
    PromptDiversityPolicy, PropagationPolicy, PropagationRule, RegularTimingPolicy,
    TemplateSpreadPolicy, TemplateSweepPolicy,
};
pub use clock::{Clock, InstantClock, ManualClock, SystemClock};
pub use control::{ControlError, SubjectReport};
pub use decision::{Decision, Denial, LimitStatus, OwnedPermit, Permit, RateLimitInfo};
pub use headers::{rate_limit_headers, retry_after_secs};
pub use hooks::{EscalationEvent, EscalationHook, EventQueue, NoopHook, Reason};
pub use policy::{ClusterConfig, ConfigError, LimitConfig, Override, Period, Policy, TableConfig};
pub use request::Request;
pub use stats::WardenStats;
pub use subject::{IpCluster, ParseSubjectError, SubjectId, SubjectKind};
#[cfg(feature = "tower")]
pub use tower::{
    InvalidCidr, OrgId, PeerAddr, PromptFeatures, Usage, WardenBody, WardenFuture, WardenLayer,
    WardenService,
};
pub use warden::{Warden, WardenBuilder};
