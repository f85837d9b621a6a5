//! Escalation hooks (placeholder).

/// Receives escalation events.
pub trait EscalationHook: Send + Sync + std::fmt::Debug + 'static {}
