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

/// Names that keep series of their own whatever was seen first: the names an operator pinned (active policies).
/// A client sending inline policies under made-up names fills [`SEEN`] at each start, and a real policy first
/// used after that would show only as [`OTHER_POLICIES`], so that an alert on its violation rate went blind.
static RESERVED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// The most names [`reserve_policy_label`] keeps: pinning is an operator's act, but a bound keeps a scripted
/// mistake from growing `/metrics` without end.
pub const MAX_RESERVED_POLICY_LABELS: usize = 4096;

/// Gives `name` a series of its own from now on, outside [`MAX_POLICY_LABELS`]: for a policy name an operator
/// pinned. Past [`MAX_RESERVED_POLICY_LABELS`] it is labelled as any other name.
pub fn reserve_policy_label(name: &str) {
    let name = shortened(name);
    let mut reserved = RESERVED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if reserved.len() < MAX_RESERVED_POLICY_LABELS {
        reserved.insert(name.into_owned());
    }
}

/// Longest label kept, in bytes: a name can be as long as a policy, and every series repeats its labels on every
/// `/metrics` scrape. Longer names are cut (at a character boundary) and marked with `…`.
pub const MAX_POLICY_LABEL_BYTES: usize = 64;

/// The metric label for a policy name (or a `+`-joined set of them): the name itself (cut to
/// [`MAX_POLICY_LABEL_BYTES`]) while fewer than [`MAX_POLICY_LABELS`] labels have been seen in this process, else
/// [`OTHER_POLICIES`]. Names given to [`reserve_policy_label`] always keep theirs.
pub fn policy_label(name: &str) -> String {
    let name = &*shortened(name);
    if RESERVED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(name) {
        return name.to_string();
    }
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

fn shortened(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= MAX_POLICY_LABEL_BYTES {
        return name.into();
    }
    let mut end = MAX_POLICY_LABEL_BYTES - '…'.len_utf8();
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end]).into()
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
        // A name an operator pins keeps a series of its own, however many names came first.
        reserve_policy_label("self-harm");
        assert_eq!(policy_label("self-harm"), "self-harm");
        assert_eq!(policy_label("yet-another"), OTHER_POLICIES);
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary() {
        assert_eq!(shortened("spam"), "spam");
        for name in ["x".repeat(1 << 20), "é".repeat(100), format!("a{}", "€".repeat(40))] {
            let label = shortened(&name);
            assert!(label.len() <= MAX_POLICY_LABEL_BYTES, "{} bytes", label.len());
            assert!(label.ends_with('…') && name.starts_with(label.trim_end_matches('…')), "{label}");
        }
        let exact = "y".repeat(MAX_POLICY_LABEL_BYTES);
        assert_eq!(shortened(&exact), exact);
    }
}
