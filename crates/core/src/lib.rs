//! The decision path: policies + content -> reasoner -> validated verdicts and an outcome.
//!
//! - [`Reasoner`] is the seam to a model: [`EmbeddedReasoner`] runs an in-process [`safeguard_engine::Engine`];
//!   remote backends implement the same trait elsewhere.
//! - [`Classifier`] turns policies and content into prompts, asks the reasoner, validates the answers with
//!   `safeguard-verdict` and folds them into one [`Decision`]. A failed reasoning step is `needs_review`,
//!   never an allow.
//! - [`input`] reads items to classify from JSONL, one error per bad line.
//! - [`golden`] runs the golden cases kept beside a policy file.
//! - [`deadline`] bounds a reasoning step in time and lets the backends below it see the bound.

pub mod classifier;
pub mod deadline;
pub mod embedded;
pub mod golden;
pub mod input;
pub mod labels;
pub mod reasoner;

pub use classifier::{
    Classifier, ClassifyOptions, ContextOverflow, Decision, FAILED_STEP_RATIONALE, Mode, PromptObserver, PromptTrace,
};
pub use embedded::{EmbeddedConfig, EmbeddedReasoner, TokenBudgets};
pub use input::{InputLimits, InputLine, Item, ItemError, ItemReader};
pub use labels::{policy_label, reserve_policy_label};
pub use reasoner::{
    DeltaSender, EndpointHealth, ReasonDelta, ReasonError, ReasonOutput, ReasonRequest, Reasoner, Timings,
    USE_EFFORT_BUDGET, Usage, answer_confidence,
};
