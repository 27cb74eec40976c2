//! The uncapped export reads, on SQLite and, when reachable, PostgreSQL (in a throwaway schema).

mod common;

use safeguard_store::{DecisionRecord, ReviewDecision};

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

        let all = store.decided_reviews_with_decisions(None).await.unwrap();
        let pairs: Vec<(&str, &str, Option<&str>)> =
            all.iter().map(|(r, d)| (r.id.as_str(), d.id.as_str(), r.outcome.as_deref())).collect();
        assert_eq!(
            pairs,
            [(decided_b.as_str(), "b", Some("allow")), (decided_c.as_str(), "c", Some("violation"))],
            "{label}: the pending review {pending} stays out, oldest decision first"
        );
        assert_eq!(all[1].1.content["text"], "text of c", "{label}");
        // Decision b is older than 2,500 but its correction was made now: an incremental export holds both.
        let recent = store.decided_reviews_with_decisions(Some(2_500)).await.unwrap();
        assert_eq!(recent.iter().map(|(_, d)| d.id.as_str()).collect::<Vec<_>>(), ["b", "c"], "{label}");
        let later = safeguard_store::now_ms() + 3_600_000;
        assert!(store.decided_reviews_with_decisions(Some(later)).await.unwrap().is_empty(), "{label}");

        let ids: Vec<String> = store.decisions_since(None).await.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["a", "b", "c"], "{label}");
        let ids: Vec<String> = store.decisions_since(Some(2_000)).await.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["b", "c"], "{label}");

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
        let ids: Vec<String> = store.decisions_since(None).await.unwrap().into_iter().map(|d| d.id).collect();
        let expected: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, expected, "{label}");
        let recent = store.decisions_since(Some(10_002)).await.unwrap();
        assert_eq!(recent.len(), 1_150, "{label}");
        assert!(recent.iter().all(|d| d.created_at >= 10_002), "{label}");
        common::clean_up((store, label, _dir, pg)).await;
    }
}
