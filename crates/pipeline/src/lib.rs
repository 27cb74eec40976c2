//! The cascade: triage, then reasoning with effort chosen per item, then human review; budgets and the data flywheel.
//!
//! Reasoning on every item is slow and costly. [`Pipeline`] lets cheap triage settle the obvious, sends the
//! ambiguous and the risky to the reasoning model at an effort chosen per item, asks again harder when the
//! answer is shaky, and hands what remains to people. [`flywheel`] turns the decisions and the people's
//! corrections back into training data for triage.

pub mod budget;
pub mod cascade;
pub mod flywheel;
pub mod nats;
pub mod routing_section;
pub mod stats;
pub mod triage_config;

pub use budget::{Budgets, ReasoningBudget, UnpaidStep};
pub use cascade::{
    CascadeDecision, Deferred, Escalation, OnTriageViolation, Pipeline, PolicyPlan, PolicyRoute, RouteContext,
    RoutingConfig, Stage, StageRecord,
};
pub use flywheel::{ActiveLearning, Picked, SampleReason};
pub use routing_section::{RoutingSection, RoutingSectionError, routing_section};
pub use stats::{CascadeStats, StatsSnapshot};
pub use triage_config::{TriageLibrary, TriageSection, rules_from_policy, triage_on_violation, triage_section};
