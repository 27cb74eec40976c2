//! The uncapped export reads, on SQLite and, when reachable, PostgreSQL (in a throwaway schema).

mod common;

use safeguard_store::{
    AuditState, DecisionRecord, ExportCursor, ExportPage, ExportRange, NewReview, ReviewDecision, ReviewRecord, Store,
    StoreError,
};

/// Every page of one export read, until the store says it was the last; and where the read ended.
async fn read_all<T, F>(range: &ExportRange, mut page: F) -> (Vec<T>, Option<ExportCursor>)
where
    F: AsyncFnMut(&ExportRange, Option<&ExportCursor>) -> Result<ExportPage<T>, StoreError>,
{
    let (mut rows, mut after) = (Vec::new(), None);
    loop {
        let next = page(range, after.as_ref()).await.unwrap();
        rows.extend(next.rows);
        after = next.end.or(after);
        if next.last {
            return (rows, after);
        }
    }
}

async fn decisions(store: &Store, range: &ExportRange) -> Vec<DecisionRecord> {
    read_all(range, async |range, after| store.decisions_page(range, after).await).await.0
}

async fn reviews(store: &Store, range: &ExportRange) -> Vec<(ReviewRecord, DecisionRecord)> {
    read_all(range, async |range, after| store.decided_reviews_page(range, after).await).await.0
}

fn since(at: i64) -> ExportRange {
    ExportRange { since: Some(at), through: None }
}

#[tokio::test]
async fn decided_reviews_come_with_their_decisions_and_respect_since() {
    for (store, label, _dir, pg) in common::stores("export").await {
        // Created out of order, so that the ordering is the query's doing.
        for (id, at) in [("c", 3_000), ("a", 1_000), ("b", 2_000)] {
            store.insert_decision(&common::decision(id, at), None).await.unwrap();
        }
        let pending = store.enqueue_review("a", 1).await.unwrap();
        let decided_b = store.enqueue_review("b", 1).await.unwrap();
        let decided_c = store.enqueue_review("c", 1).await.unwrap();
        for (review, outcome) in [(&decided_c, "violation"), (&decided_b, "allow")] {
            let decision = ReviewDecision {
                reviewer: "ana".into(),
                outcome: outcome.into(),
                rationale: "checked".into(),
                rule_id: "SP1".into(),
                policy_hash: Some("sha256:spam".into()),
                overrides_model: Some(outcome == "violation"),
            };
            assert!(store.decide_review(review, &decision).await.unwrap().is_some(), "{label}");
        }

        let all = reviews(&store, &ExportRange::default()).await;
        let mut pairs: Vec<(&str, &str, Option<&str>)> =
            all.iter().map(|(r, d)| (r.id.as_str(), d.id.as_str(), r.outcome.as_deref())).collect();
        assert!(all.windows(2).all(|w| (w[0].0.decided_at, &w[0].0.id) < (w[1].0.decided_at, &w[1].0.id)), "{label}");
        pairs.sort_by_key(|(_, decision, _)| *decision);
        assert_eq!(
            pairs,
            [(decided_b.as_str(), "b", Some("allow")), (decided_c.as_str(), "c", Some("violation"))],
            "{label}: the pending review {pending} stays out"
        );
        assert_eq!(all.iter().find(|(_, d)| d.id == "c").unwrap().1.content["text"], "text of c", "{label}");
        // Decision b is older than 2,500 but its correction was made now: an incremental export holds both.
        let mut recent: Vec<String> = reviews(&store, &since(2_500)).await.into_iter().map(|(_, d)| d.id).collect();
        recent.sort();
        assert_eq!(recent, ["b", "c"], "{label}");
        let later = safeguard_store::now_ms() + 3_600_000;
        assert!(reviews(&store, &since(later)).await.is_empty(), "{label}");

        let ids: Vec<String> = decisions(&store, &ExportRange::default()).await.into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["a", "b", "c"], "{label}");
        let ids: Vec<String> = decisions(&store, &since(2_000)).await.into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["b", "c"], "{label}");

        common::clean_up((store, label, _dir, pg)).await;
    }
}

/// `triage audit` reads audits only: those a person answered, bounded by `since` as the export's reviews are,
/// and those an appeal of their item superseded, whatever `since` says (the appeal's answer may be newer).
#[tokio::test]
async fn audits_are_read_apart_from_other_reviews() {
    for (store, label, _dir, pg) in common::stores("export").await {
        for (id, at) in [("sampled", 1_000), ("answered", 2_000), ("waiting", 3_000), ("appealed", 4_000)] {
            store.insert_decision(&common::decision(id, at), None).await.unwrap();
        }
        let queue = async |decision: &str, kind: &str| {
            let review = NewReview {
                decision_id: decision.into(),
                kind: kind.into(),
                priority: 0,
                reason: None,
                sla_ms: None,
                policy_hash: Some("sha256:spam".into()),
            };
            store.queue_review(&review).await.unwrap().review.id
        };
        let answer = ReviewDecision {
            reviewer: "ana".into(),
            outcome: "allow".into(),
            rationale: "checked".into(),
            rule_id: "SP1".into(),
            policy_hash: Some("sha256:spam".into()),
            overrides_model: Some(false),
        };
        for (decision, kind) in [("sampled", "sample"), ("answered", "audit")] {
            let id = queue(decision, kind).await;
            assert!(store.decide_review(&id, &answer).await.unwrap().is_some(), "{label}");
        }
        queue("waiting", "audit").await;
        let superseded = queue("appealed", "audit").await;
        let mut appeal = common::decision("appeal", 5_000);
        appeal.source = "appeal".into();
        appeal.replay_of = Some("appealed".into());
        let appeal_review = NewReview {
            decision_id: "appeal".into(),
            kind: "appeal".into(),
            priority: 10,
            reason: None,
            sla_ms: None,
            policy_hash: None,
        };
        store.insert_appeal(&appeal, None, &appeal_review).await.unwrap();

        let read = async |state: AuditState, range: &ExportRange| -> Vec<(String, String)> {
            let (rows, _) = read_all(range, async |range, after| store.audits_page(state, range, after).await).await;
            rows.into_iter().map(|(review, decision)| (review.id, decision.id)).collect()
        };
        let decided = read(AuditState::Decided, &ExportRange::default()).await;
        assert_eq!(decided.iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>(), ["answered"], "{label}");
        let later = since(safeguard_store::now_ms() + 3_600_000);
        assert!(read(AuditState::Decided, &later).await.is_empty(), "{label}");
        let appealed = read(AuditState::Superseded, &later).await;
        assert_eq!(appealed, [(superseded, "appealed".to_string())], "{label}");
        common::clean_up((store, label, _dir, pg)).await;
    }
}

/// The decisions are read a page at a time, each page after the last one's (created_at, id): pages that end
/// inside a run of decisions made in one millisecond neither skip nor repeat any of them.
#[tokio::test]
async fn decisions_are_exported_whole_across_pages_of_one_millisecond() {
    for (store, label, _dir, pg) in common::stores("export").await {
        // 2,150 decisions in five milliseconds of 500 (the last of 150): page ends fall inside each run.
        let all: Vec<DecisionRecord> =
            (0..2_150).map(|i| common::decision(&format!("p{i:05}"), 10_000 + i / 500)).collect();
        for chunk in all.chunks(100) {
            let rows: Vec<_> = chunk.iter().map(|d| (d, None, None)).collect();
            store.insert_decisions_together(&rows).await.unwrap();
        }
        let ids: Vec<String> = decisions(&store, &ExportRange::default()).await.into_iter().map(|d| d.id).collect();
        let expected: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, expected, "{label}");
        let recent = decisions(&store, &since(10_002)).await;
        assert_eq!(recent.len(), 1_150, "{label}");
        assert!(recent.iter().all(|d| d.created_at >= 10_002), "{label}");
        common::clean_up((store, label, _dir, pg)).await;
    }
}

/// An export reads its rows twice (to choose, then to write): the second read, bounded by where the first ended,
/// sees the same rows in the same order although reviews were decided and decisions stored in between; and
/// reviews come a page at a time in the order they were decided, many in one millisecond, none skipped or
/// repeated.
#[tokio::test]
async fn a_second_read_up_to_the_first_ones_end_sees_the_same_rows() {
    for (store, label, _dir, pg) in common::stores("export").await {
        let all: Vec<DecisionRecord> = (0..640).map(|i| common::decision(&format!("r{i:04}"), 20_000 + i)).collect();
        for chunk in all.chunks(100) {
            let rows: Vec<_> = chunk.iter().map(|d| (d, None, None)).collect();
            store.insert_decisions_together(&rows).await.unwrap();
        }
        let mut queued = Vec::new();
        for decision in &all {
            queued.push(store.enqueue_review(&decision.id, 1).await.unwrap());
        }
        let decide = |outcome: &str| ReviewDecision {
            reviewer: "ana".into(),
            outcome: outcome.into(),
            rationale: "checked".into(),
            rule_id: "SP1".into(),
            policy_hash: Some("sha256:spam".into()),
            overrides_model: Some(false),
        };
        let (now, later) = queued.split_at(620);
        for review in now {
            assert!(store.decide_review(review, &decide("allow")).await.unwrap().is_some(), "{label}");
        }

        let whole = ExportRange::default();
        let (first, end) = read_all(&whole, async |range, after| store.decided_reviews_page(range, after).await).await;
        assert_eq!(first.len(), 620, "{label}: every decided review, across two pages");
        assert!(
            first.windows(2).all(|w| (w[0].0.decided_at, &w[0].0.id) < (w[1].0.decided_at, &w[1].0.id)),
            "{label}: in the order they were decided, none repeated"
        );
        assert!(first.iter().all(|(review, decision)| review.decision_id == decision.id), "{label}");
        let (stored, stored_end) =
            read_all(&whole, async |range, after| store.decisions_page(range, after).await).await;
        assert_eq!(stored.len(), 640, "{label}");

        // Meanwhile: more reviews decided, more decisions stored (one stamped inside the range already read).
        for review in later {
            store.decide_review(review, &decide("violation")).await.unwrap();
        }
        for (id, at) in [("late-1", 20_100), ("late-2", 99_000)] {
            store.insert_decision(&common::decision(id, at), None).await.unwrap();
        }
        let bounded = ExportRange { since: None, through: end };
        let again: Vec<String> = reviews(&store, &bounded).await.into_iter().map(|(r, _)| r.id).collect();
        let first: Vec<String> = first.into_iter().map(|(r, _)| r.id).collect();
        assert_eq!(again, first, "{label}: the same reviews, in the same order");
        assert_eq!(reviews(&store, &whole).await.len(), 640, "{label}: an open read sees the new ones");
        let bounded = ExportRange { since: None, through: stored_end };
        let again: Vec<String> = decisions(&store, &bounded).await.into_iter().map(|d| d.id).collect();
        let stored: Vec<String> = stored.into_iter().map(|d| d.id).collect();
        // "late-1" sorts inside the range: a second read includes it, and the export's first read never saw it,
        // so it is not written (LatestLabels keeps only what the first read noted).
        let with_late: Vec<&String> = again.iter().filter(|id| *id != "late-1").collect();
        assert_eq!(with_late, stored.iter().collect::<Vec<_>>(), "{label}");
        assert!(!again.contains(&"late-2".to_string()), "{label}: stored after the end is not read");
        common::clean_up((store, label, _dir, pg)).await;
    }
}
