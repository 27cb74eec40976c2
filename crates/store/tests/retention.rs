//! Retention (`Store::prune`) on SQLite and, when reachable, PostgreSQL (in a throwaway schema): what goes, and
//! everything that must stay however old it is.

mod common;

use safeguard_store::{
    DecisionRecord, NewDelivery, NewJob, NewReview, Pruned, Retention, ReviewDecision, Store, StoreError, now_ms,
};
use serde_json::json;
use sqlx::Executor;

/// A decision that needs review, under the version `sha256:used` (which the decisions kept keep stored).
fn decision(id: &str, created_at: i64) -> DecisionRecord {
    DecisionRecord {
        policy_hashes: vec!["sha256:used".into()],
        verdicts: json!([{"policy": "spam", "outcome": "needs_review"}]),
        outcome: "needs_review".into(),
        ..common::decision(id, created_at)
    }
}

fn review_of(decision_id: &str, kind: &str) -> NewReview {
    NewReview {
        decision_id: decision_id.into(),
        kind: kind.into(),
        priority: 0,
        reason: None,
        sla_ms: None,
        policy_hash: None,
    }
}

/// A job finished with `decision`, its webhook delivery left `delivery_status`.
async fn finished_job(store: &Store, key: &str, decision_id: &str, delivery_status: &str) -> String {
    let new = NewJob {
        request: json!({"text": "hi", "policies": ["spam"]}),
        idempotency_key: Some(key.into()),
        webhook_url: Some("http://127.0.0.1:9/hook".into()),
        submitted_by: None,
    };
    let (job, _) = store.enqueue_job(&new).await.unwrap();
    let claimed = store.claim_job(60_000).await.unwrap().unwrap();
    assert_eq!(claimed.id, job.id);
    let mut d = decision(decision_id, 1_000);
    d.job_id = Some(job.id.clone());
    let hook = NewDelivery { job_id: job.id.clone(), url: "http://127.0.0.1:9/hook".into(), body: "{}".into() };
    assert!(
        store.finish_job(&job.id, claimed.lease_token.as_deref().unwrap(), &d, None, None, Some(&hook)).await.unwrap()
    );
    store
        .pool()
        .execute(
            sqlx::query("UPDATE webhook_deliveries SET status = $1 WHERE job_id = $2")
                .bind(delivery_status)
                .bind(job.id.clone()),
        )
        .await
        .unwrap();
    job.id
}

#[tokio::test]
async fn old_rows_go_and_whatever_is_still_needed_stays() {
    for (store, label, _dir, pg) in common::stores("retain").await {
        let s = &store;
        // Everything "old" was created at 1 000 ms; "recent" rows an hour from now, after any cutoff used here.
        let recent = now_ms() + 3_600_000;
        s.insert_decision(&decision("old-plain", 1_000), Some(&["why".to_string()])).await.unwrap();
        s.insert_decision(&decision("old-pending", 1_000), None).await.unwrap();
        let pending = s.enqueue_review("old-pending", 1).await.unwrap();
        s.insert_decision(&decision("old-reviewed", 1_000), None).await.unwrap();
        let reviewed = s.enqueue_review("old-reviewed", 1).await.unwrap();
        let answer = ReviewDecision {
            reviewer: "ana".into(),
            outcome: "allow".into(),
            rationale: "fine".into(),
            rule_id: "SP0".into(),
            policy_hash: Some("sha256:used".into()),
            overrides_model: Some(true),
        };
        s.decide_review(&reviewed, &answer).await.unwrap().unwrap();
        s.mark_review_announced(&reviewed).await.unwrap();
        s.insert_decision(&decision("old-unannounced", 1_000), None).await.unwrap();
        let unannounced = s.enqueue_review("old-unannounced", 1).await.unwrap();
        s.decide_review(&unannounced, &answer).await.unwrap().unwrap();
        // Whether a decided review counts as announced at once depends on where its item came from; make sure
        // this one is a person's answer nobody has heard yet.
        s.pool()
            .execute(sqlx::query("UPDATE reviews SET announced_at = NULL WHERE id = $1").bind(unannounced.clone()))
            .await
            .unwrap();
        // Answered (and announced) within the period: the correction is new, whatever the decision's age.
        s.insert_decision(&decision("old-answered-lately", 1_000), None).await.unwrap();
        let lately = s.enqueue_review("old-answered-lately", 1).await.unwrap();
        s.decide_review(&lately, &answer).await.unwrap().unwrap();
        s.mark_review_announced(&lately).await.unwrap();
        s.pool()
            .execute(sqlx::query("UPDATE reviews SET decided_at = $1 WHERE id = $2").bind(recent).bind(lately.clone()))
            .await
            .unwrap();
        s.insert_decision(&decision("old-appealed", 1_000), None).await.unwrap();
        let mut appeal = decision("recent-appeal", recent);
        (appeal.source, appeal.replay_of) = ("appeal".into(), Some("old-appealed".into()));
        s.insert_appeal(&appeal, None, &review_of("recent-appeal", "appeal")).await.unwrap();
        s.insert_decision(&decision("recent", recent), None).await.unwrap();

        // Old appeals: one still waiting for a person keeps itself and what it appeals; one answered and announced
        // goes, and what it appealed goes on the next run.
        for (original, appeal_id) in
            [("old-appealed-waiting", "old-appeal-waiting"), ("old-appealed-done", "old-appeal-done")]
        {
            s.insert_decision(&decision(original, 1_000), None).await.unwrap();
            let mut appeal = decision(appeal_id, 2_000);
            (appeal.source, appeal.replay_of) = ("appeal".into(), Some(original.into()));
            s.insert_appeal(&appeal, None, &review_of(appeal_id, "appeal")).await.unwrap();
        }
        let done = s.appeal_of("old-appealed-done").await.unwrap().unwrap();
        s.decide_review(&done.id, &answer).await.unwrap().unwrap();
        s.mark_review_announced(&done.id).await.unwrap();

        let delivered = finished_job(s, "k-delivered", "old-job-decision", "delivered").await;
        let sending = finished_job(s, "k-sending", "old-sending-decision", "pending").await;
        // A webhook given up on within the period keeps its job for `safeguard webhooks retry`.
        let failed_lately = finished_job(s, "k-failed", "old-failed-decision", "failed").await;
        s.pool()
            .execute(
                sqlx::query("UPDATE webhook_deliveries SET updated_at = $1 WHERE job_id = $2")
                    .bind(recent)
                    .bind(failed_lately.clone()),
            )
            .await
            .unwrap();
        let (unfinished, _) = s
            .enqueue_job(&NewJob {
                // A NUL in the content, which PostgreSQL refuses to read as JSON, and a backslash before "u0000".
                request: json!({"text": "hi\u{0}there \\u0000", "policy_hashes": ["sha256:queued"]}),
                idempotency_key: Some("k-pending".into()),
                webhook_url: None,
                submitted_by: None,
            })
            .await
            .unwrap();

        let meta = json!({"meta": {}});
        for hash in ["sha256:used", "sha256:orphan", "sha256:queued", "sha256:in-use"] {
            s.put_policy(hash, "spam", &format!("body of {hash}"), &meta, false).await.unwrap();
        }
        s.put_policy("sha256:pinned", "pinned", "body", &meta, true).await.unwrap();
        // A server read "in-use" to decide with (recorded as after the cutoff used below).
        s.touch_policy("sha256:in-use").await.unwrap();
        let used_at: Option<i64> = sqlx::query_scalar("SELECT used_at FROM policies WHERE hash = 'sha256:in-use'")
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert!(used_at.is_some_and(|at| (at - now_ms()).abs() < 60_000), "{label}: {used_at:?}");
        s.pool()
            .execute(sqlx::query("UPDATE policies SET used_at = $1 WHERE hash = 'sha256:in-use'").bind(recent))
            .await
            .unwrap();

        let cutoff = now_ms() + 10_000;
        let retention = Retention { policies: true, ..Retention::before(cutoff) };
        let counted = s.count_prunable(&retention).await.unwrap();
        let pruned = s.prune(&Retention { batch: 2, ..retention.clone() }).await.unwrap();
        // Decisions: old-plain, old-reviewed, old-appeal-done, and old-job-decision once its job went.
        let expected = Pruned { decisions: 4, jobs: 1, webhook_deliveries: 1, policies: 1 };
        assert_eq!(pruned, expected, "{label}");
        // The job's decision is counted once its job has gone, so counting first sees one decision fewer.
        assert_eq!(counted, Pruned { decisions: 3, ..expected }, "{label}");

        for gone in ["old-plain", "old-reviewed", "old-job-decision", "old-appeal-done"] {
            assert!(s.get_decision(gone).await.unwrap().is_none(), "{gone} must go ({label})");
        }
        assert!(s.get_reasoning("old-plain").await.unwrap().is_none(), "its reasoning went with it ({label})");
        assert!(s.get_review(&reviewed).await.unwrap().is_none(), "and its review ({label})");
        // An appeal or a replay reasoned while what it names was pruned is refused, never stored pointing nowhere.
        for (id, kind) in [("late-appeal", "appeal"), ("late-replay", "replay")] {
            let mut late = decision(id, recent);
            (late.source, late.replay_of) = (kind.into(), Some("old-plain".into()));
            let stored = match kind {
                "appeal" => s.insert_appeal(&late, None, &review_of(id, "appeal")).await.map(|_| ()),
                _ => s.insert_replay(&late, None).await,
            };
            assert!(matches!(stored, Err(StoreError::DecisionNotFound(_))), "{label}: {kind}: {stored:?}");
            assert!(s.get_decision(id).await.unwrap().is_none(), "{label}: {kind}");
        }
        let mut replay = decision("recent-replay", recent);
        (replay.source, replay.replay_of) = ("replay".into(), Some("recent".into()));
        s.insert_replay(&replay, Some(&["again".to_string()])).await.unwrap();
        assert_eq!(s.get_decision("recent-replay").await.unwrap().unwrap().replay_of.as_deref(), Some("recent"));
        for kept in [
            "old-pending",
            "old-unannounced",
            "old-answered-lately",
            "old-appealed",
            "recent-appeal",
            "recent",
            "old-sending-decision",
            "old-failed-decision",
            "old-appealed-waiting",
            "old-appeal-waiting",
            "old-appealed-done",
        ] {
            assert!(s.get_decision(kept).await.unwrap().is_some(), "{kept} must stay ({label})");
        }
        assert!(s.get_job(&delivered).await.unwrap().is_none(), "{label}");
        assert!(s.deliveries_for_job(&delivered).await.unwrap().is_empty(), "{label}");
        assert!(s.get_job(&sending).await.unwrap().is_some(), "a webhook still being sent keeps its job ({label})");
        assert!(s.get_job(&failed_lately).await.unwrap().is_some(), "{label}");
        assert!(s.get_job(&unfinished.id).await.unwrap().is_some(), "{label}");
        assert!(s.get_policy("sha256:orphan").await.unwrap().is_none(), "{label}");
        for kept in ["sha256:used", "sha256:queued", "sha256:pinned", "sha256:in-use"] {
            assert!(s.get_policy(kept).await.unwrap().is_some(), "{kept} must stay ({label})");
        }

        // The next run takes what the answered appeal appealed; then nothing more goes.
        assert_eq!(s.prune(&retention).await.unwrap(), Pruned { decisions: 1, ..Pruned::default() }, "{label}");
        assert!(s.get_decision("old-appealed-done").await.unwrap().is_none(), "{label}");
        assert_eq!(s.prune(&retention).await.unwrap(), Pruned::default(), "{label}");
        // Keeping reviewed decisions keeps them.
        s.decide_review(&pending, &answer).await.unwrap().unwrap();
        s.mark_review_announced(&pending).await.unwrap();
        let keeping = Retention { keep_reviewed: true, ..Retention::before(cutoff) };
        assert_eq!(s.count_prunable(&keeping).await.unwrap().policies, 0, "policies only when asked ({label})");
        assert_eq!(s.prune(&keeping).await.unwrap().decisions, 0, "{label}");
        assert_eq!(s.prune(&Retention::before(cutoff)).await.unwrap().decisions, 1, "{label}");
        assert!(s.get_decision("old-pending").await.unwrap().is_none(), "{label}");

        common::clean_up((store, label, _dir, pg)).await;
    }
}

/// A version stored again (a policy published again, an inline policy sent again) is about to be named by its
/// caller: it counts as used, so the prune that would have deleted it a moment before keeps it.
#[tokio::test]
async fn a_version_stored_again_is_kept_by_the_next_prune() {
    const DAY: i64 = 86_400_000;
    for (store, label, dir, pg) in common::stores("restored").await {
        let meta = json!({"meta": {}});
        let (_, new) = store.put_policy("sha256:again", "spam", "body", &meta, false).await.unwrap();
        assert!(new, "{label}");
        // Stored two days ago and not read since.
        let stored_at = sqlx::query("UPDATE policies SET created_at = $1 WHERE hash = 'sha256:again'");
        store.pool().execute(stored_at.bind(now_ms() - 2 * DAY)).await.unwrap();
        let retention = Retention { policies: true, ..Retention::before(now_ms() - DAY) };
        assert_eq!(store.count_prunable(&retention).await.unwrap().policies, 1, "{label}");

        let (stored, new) = store.put_policy("sha256:again", "spam", "body", &meta, false).await.unwrap();
        assert!(!new && stored.hash == "sha256:again", "{label}");
        assert_eq!(store.prune(&retention).await.unwrap().policies, 0, "{label}");
        assert!(store.get_policy("sha256:again").await.unwrap().is_some(), "{label}");
        common::clean_up((store, label, dir, pg)).await;
    }
}

/// A version named only by decisions that go in the same prune goes too, and a dry run counts it.
#[tokio::test]
async fn a_dry_run_counts_versions_freed_by_the_decisions_it_deletes() {
    const DAY: i64 = 86_400_000;
    for (store, label, dir, pg) in common::stores("freed").await {
        let meta = json!({"meta": {}});
        for hash in ["sha256:retired", "sha256:current"] {
            store.put_policy(hash, "spam", &format!("body of {hash}"), &meta, false).await.unwrap();
        }
        let stored_at = sqlx::query("UPDATE policies SET created_at = $1");
        store.pool().execute(stored_at.bind(now_ms() - 3 * DAY)).await.unwrap();
        let old = DecisionRecord { policy_hashes: vec!["sha256:retired".into()], ..common::decision("old", 1_000) };
        store.insert_decision(&old, None).await.unwrap();
        // "current" is named by a decision the period keeps.
        let recent =
            DecisionRecord { policy_hashes: vec!["sha256:current".into()], ..common::decision("recent", now_ms()) };
        store.insert_decision(&recent, None).await.unwrap();

        let retention = Retention { policies: true, ..Retention::before(now_ms() - DAY) };
        let expected = Pruned { decisions: 1, policies: 1, ..Pruned::default() };
        assert_eq!(store.count_prunable(&retention).await.unwrap(), expected, "{label}");
        assert_eq!(store.prune(&retention).await.unwrap(), expected, "{label}");
        assert!(store.get_policy("sha256:retired").await.unwrap().is_none(), "{label}");
        assert!(store.get_policy("sha256:current").await.unwrap().is_some(), "{label}");
        common::clean_up((store, label, dir, pg)).await;
    }
}

/// A finished job whose item a person still has to decide stays: the answer goes to its webhook, and its client
/// reads it from the job. Once decided, both go.
#[tokio::test]
async fn a_job_whose_item_waits_for_a_person_is_kept() {
    for (store, label, dir, pg) in common::stores("job_review").await {
        let job = finished_job(&store, "waits", "waiting", "sent").await;
        let review = store.queue_review(&review_of("waiting", "review")).await.unwrap().review;
        let retention = Retention::before(now_ms() + 10_000);
        let pruned = store.prune(&retention).await.unwrap();
        assert_eq!((pruned.jobs, pruned.decisions), (0, 0), "{label}");
        assert!(store.get_job(&job).await.unwrap().is_some(), "{label}");

        let answer = ReviewDecision {
            reviewer: "ana".into(),
            outcome: "allow".into(),
            rationale: "checked".into(),
            rule_id: "SP0".into(),
            policy_hash: Some("sha256:used".into()),
            overrides_model: None,
        };
        store.decide_review(&review.id, &answer).await.unwrap().unwrap();
        let pruned = store.prune(&retention).await.unwrap();
        assert_eq!((pruned.jobs, pruned.decisions), (1, 1), "{label}");
        common::clean_up((store, label, dir, pg)).await;
    }
}
