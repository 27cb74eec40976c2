//! Metric labels named by callers. A policy's name comes from whoever sent the policy (inline policies carry
//! any name), and every distinct label value is a time series kept for the life of the process: an unbounded
//! set of names would grow `/metrics` and memory without end.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

/// How many distinct policy names get series of their own; later ones share [`OTHER_POLICIES`].
pub const MAX_POLICY_LABELS: usize = 256;

/// The label of every policy name beyond the first [`MAX_POLICY_LABELS`].
pub const OTHER_POLICIES: &str = "(other)";

static SEEN: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// The metric label for a policy name (or a `+`-joined set of them): the name itself while fewer than
/// [`MAX_POLICY_LABELS`] names have been seen in this process, else [`OTHER_POLICIES`].
pub fn policy_label(name: &str) -> String {
    let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if seen.contains(name) {
        return name.to_string();
    }
    if seen.len() < MAX_POLICY_LABELS {
        seen.insert(name.to_string());
        return name.to_string();
    }
    OTHER_POLICIES.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_beyond_the_cap_share_one_label() {
        let first = policy_label("spam");
        for i in 0..MAX_POLICY_LABELS * 2 {
            policy_label(&format!("inline-{i}"));
        }
        assert_eq!(first, "spam");
        assert_eq!(policy_label("spam"), "spam", "a name seen early keeps its label");
        assert_eq!(policy_label("yet-another"), OTHER_POLICIES);
        assert!(SEEN.lock().unwrap().len() <= MAX_POLICY_LABELS);
    }
}
