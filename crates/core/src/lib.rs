//! The decision path: policies + content -> reasoner -> validated verdicts and an outcome.
