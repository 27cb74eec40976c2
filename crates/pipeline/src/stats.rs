//! Running tallies of where the cascade settles items: the skip rate (items triage settled on its own) and,
//! per stage, how often a policy that entered it had to go on to the next. Prometheus counters carry the
//! same numbers for rates over time; these tallies give the shares since start without a query language.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::cascade::{CascadeDecision, Stage};

const STAGES: [Stage; 5] =
    [Stage::Triage, Stage::ReasoningLow, Stage::ReasoningMedium, Stage::ReasoningHigh, Stage::HumanReview];

/// Position in `STAGES`, which lists the stages in their declared (cascade) order.
fn index(stage: Stage) -> usize {
    stage as usize
}

#[derive(Debug, Default)]
pub struct CascadeStats {
    items: AtomicU64,
    /// Items no policy of which needed the model or a person.
    skipped: AtomicU64,
    /// Per stage: policies that reached it, and of those, policies that left it for a later stage.
    entered: [AtomicU64; 5],
    escalated: [AtomicU64; 5],
}

/// A point-in-time view of [`CascadeStats`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    pub items: u64,
    pub skipped: u64,
    /// Per stage that any policy reached: (stage, entered, escalated).
    pub stages: Vec<(Stage, u64, u64)>,
}

impl StatsSnapshot {
    /// Share of items triage settled without the model; `None` before the first item.
    pub fn skip_rate(&self) -> Option<f64> {
        (self.items > 0).then(|| self.skipped as f64 / self.items as f64)
    }

    /// Share of the policies that reached `stage` and had to go further; `None` if none reached it.
    pub fn escalation_rate(&self, stage: Stage) -> Option<f64> {
        self.stages
            .iter()
            .find(|(s, entered, _)| *s == stage && *entered > 0)
            .map(|(_, entered, escalated)| *escalated as f64 / *entered as f64)
    }
}

/// The stages one policy of a decision passed through, in cascade order.
pub fn stages_visited(decision: &CascadeDecision, policy_index: usize) -> Vec<Stage> {
    let Some(route) = decision.policies.get(policy_index) else { return Vec::new() };
    let mut visited = Vec::new();
    if route.triage.is_some() {
        visited.push(Stage::Triage);
    }
    for record in decision.stages.iter().filter(|r| r.stage != Stage::Triage) {
        // By version where the record has them: two versions of one policy name can share a request.
        let held = match record.policy_hashes.is_empty() {
            true => record.policies.contains(&route.policy),
            false => record.policy_hashes.contains(&route.policy_hash),
        };
        if held && !visited.contains(&record.stage) {
            visited.push(record.stage);
        }
    }
    if route.decided_by == Stage::HumanReview {
        visited.push(Stage::HumanReview);
    }
    visited
}

impl CascadeStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one decided item, here and as Prometheus counters.
    pub fn observe(&self, decision: &CascadeDecision) {
        self.items.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("safeguard_pipeline_items_total").increment(1);
        if decision.decided_by == Stage::Triage {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("safeguard_pipeline_items_skipped_total").increment(1);
        }
        for i in 0..decision.policies.len() {
            let visited = stages_visited(decision, i);
            for (n, stage) in visited.iter().enumerate() {
                self.entered[index(*stage)].fetch_add(1, Ordering::Relaxed);
                metrics::counter!("safeguard_pipeline_stage_entered_total", "stage" => stage.as_str()).increment(1);
                if n + 1 < visited.len() {
                    self.escalated[index(*stage)].fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("safeguard_pipeline_stage_escalated_total", "stage" => stage.as_str())
                        .increment(1);
                }
            }
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            items: self.items.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            stages: STAGES
                .iter()
                .map(|s| {
                    (
                        *s,
                        self.entered[index(*s)].load(Ordering::Relaxed),
                        self.escalated[index(*s)].load(Ordering::Relaxed),
                    )
                })
                .filter(|(_, entered, _)| *entered > 0)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use safeguard_core::Usage;
    use safeguard_triage::{Band, TriageResult};
    use safeguard_verdict::Outcome;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn stages_are_indexed_and_ordered_as_an_item_passes_them() {
        for (position, stage) in STAGES.iter().enumerate() {
            assert_eq!(index(*stage), position, "{stage:?}");
        }
        assert!(STAGES.windows(2).all(|pair| pair[0] < pair[1]));
    }
    use crate::cascade::{PolicyRoute, StageRecord};

    fn route(name: &str, decided_by: Stage, triage: bool) -> PolicyRoute {
        PolicyRoute {
            policy: name.into(),
            policy_hash: format!("sha256:{name}"),
            outcome: if decided_by == Stage::HumanReview { Outcome::NeedsReview } else { Outcome::Allow },
            decided_by,
            triage: triage.then_some(TriageResult {
                score: None,
                calibrated_probability: None,
                band: Band::Uncertain,
                rule_match: None,
                embedding: None,
                model: None,
            }),
            verdict: None,
            engine_confidence: None,
            escalations: Vec::new(),
        }
    }

    fn record(stage: Stage, policies: &[&str]) -> StageRecord {
        StageRecord {
            stage,
            policies: policies.iter().map(|p| p.to_string()).collect(),
            policy_hashes: policies.iter().map(|p| format!("sha256:{p}")).collect(),
            elapsed_ms: 1.0,
            decision_id: None,
        }
    }

    fn decision(policies: Vec<PolicyRoute>, stages: Vec<StageRecord>) -> CascadeDecision {
        let decided_by = policies.iter().map(|p| p.decided_by).max().unwrap();
        CascadeDecision {
            id: Uuid::now_v7(),
            outcome: Outcome::Allow,
            decided_by,
            policies,
            stages,
            reasoning: Vec::new(),
            usage: Usage::default(),
            total_ms: 1.0,
        }
    }

    #[test]
    fn skip_and_escalation_rates_follow_the_routes() {
        let stats = CascadeStats::new();
        assert_eq!(stats.snapshot().skip_rate(), None);
        // Settled by triage.
        stats.observe(&decision(vec![route("a", Stage::Triage, true)], vec![record(Stage::Triage, &["a"])]));
        // Triage unsure, low settles it.
        stats.observe(&decision(
            vec![route("a", Stage::ReasoningLow, true)],
            vec![record(Stage::Triage, &["a"]), record(Stage::ReasoningLow, &["a"])],
        ));
        // Triage unsure, low unsure, high unsure: a person.
        stats.observe(&decision(
            vec![route("a", Stage::HumanReview, true)],
            vec![
                record(Stage::Triage, &["a"]),
                record(Stage::ReasoningLow, &["a"]),
                record(Stage::ReasoningHigh, &["a"]),
            ],
        ));
        // No triage; two policies, one settled low, the other escalated to high.
        stats.observe(&decision(
            vec![route("b", Stage::ReasoningLow, false), route("c", Stage::ReasoningHigh, false)],
            vec![record(Stage::ReasoningLow, &["b", "c"]), record(Stage::ReasoningHigh, &["c"])],
        ));
        let snap = stats.snapshot();
        assert_eq!((snap.items, snap.skipped), (4, 1));
        assert_eq!(snap.skip_rate(), Some(0.25));
        assert_eq!(snap.escalation_rate(Stage::Triage), Some(2.0 / 3.0));
        assert_eq!(snap.escalation_rate(Stage::ReasoningLow), Some(2.0 / 4.0));
        assert_eq!(snap.escalation_rate(Stage::ReasoningHigh), Some(1.0 / 2.0));
        assert_eq!(snap.escalation_rate(Stage::HumanReview), Some(0.0), "the end of the line");
        assert_eq!(snap.escalation_rate(Stage::ReasoningMedium), None, "never reached");
    }

    /// A request can hold two versions of one policy: a stage that held one version did not hold the other.
    #[test]
    fn stages_are_told_apart_per_policy_version() {
        let mut settled = route("a", Stage::Triage, true);
        settled.policy_hash = "sha256:a-v2".into();
        let mut reasoned = record(Stage::ReasoningLow, &["a"]);
        reasoned.policy_hashes = vec!["sha256:a".into()];
        let decision = decision(
            vec![route("a", Stage::ReasoningLow, true), settled],
            vec![record(Stage::Triage, &["a", "a"]), reasoned.clone()],
        );
        assert_eq!(stages_visited(&decision, 0), [Stage::Triage, Stage::ReasoningLow]);
        assert_eq!(stages_visited(&decision, 1), [Stage::Triage], "version 2 was settled by triage alone");
        // A record stored before versions were kept matches by name, as it always did.
        reasoned.policy_hashes.clear();
        let decision = decision_with_stages(&decision, vec![reasoned]);
        assert_eq!(stages_visited(&decision, 1), [Stage::Triage, Stage::ReasoningLow]);
    }

    fn decision_with_stages(decision: &CascadeDecision, stages: Vec<StageRecord>) -> CascadeDecision {
        CascadeDecision { stages, ..decision.clone() }
    }
}
