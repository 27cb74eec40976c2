//! Listing one policy's decisions (`Store::list_decisions` with a policy), page by page, on SQLite and, when
//! reachable, PostgreSQL (in a throwaway schema): the pages are what filtering every decision gives, in order,
//! with nothing twice and nothing skipped.

mod common;

use safeguard_store::{DecisionFilter, DecisionRecord, Store, StoreOptions};
use sqlx::Row;

/// Decision `i`: made in one of a few shared milliseconds, its id out of step with its time, under version 1 or
/// 2 of "spam", both at once, or "other" (with "spam" version 2 beside it on some).
fn decision(i: usize) -> DecisionRecord {
    let (hashes, names): (&[&str], &[&str]) = match i % 8 {
        0 | 4 => (&["sha256:spam1"], &["spam"]),
        1 | 5 => (&["sha256:spam2"], &["spam"]),
        2 | 6 => (&["sha256:spam1", "sha256:spam2"], &["spam", "spam"]),
        3 => (&["sha256:other", "sha256:spam2"], &["other", "spam"]),
        _ => (&["sha256:other"], &["other"]),
    };
    DecisionRecord {
        policy_hashes: hashes.iter().map(|h| h.to_string()).collect(),
        policy_names: names.iter().map(|n| n.to_string()).collect(),
        outcome: if i.is_multiple_of(3) { "block" } else { "allow" }.into(),
        ..common::decision(&format!("dl{:03}", (i * 37) % 100), 1_000 + (i as i64) / 3)
    }
}

/// What the listing must give: every decision that names `filter.policy` (by name or hash) and passes the other
/// filters, newest first, ties by id.
fn reference(all: &[DecisionRecord], filter: &DecisionFilter) -> Vec<String> {
    let mut matching: Vec<&DecisionRecord> = all
        .iter()
        .filter(|d| {
            filter.policy.as_ref().is_none_or(|p| d.policy_hashes.contains(p) || d.policy_names.contains(p))
                && filter.outcome.as_ref().is_none_or(|o| &d.outcome == o)
                && filter.since.is_none_or(|since| d.created_at >= since)
                && filter.before.is_none_or(|before| d.created_at < before)
        })
        .collect();
    matching.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    matching.into_iter().map(|d| d.id.clone()).collect()
}

/// Every page of `filter`'s listing, each starting after the last decision of the one before.
async fn pages(store: &Store, filter: &DecisionFilter) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut cursor = DecisionFilter { before: None, before_id: None, ..filter.clone() };
    loop {
        let page = store.list_decisions(&cursor).await.unwrap();
        let Some(last) = page.last() else { break };
        (cursor.before, cursor.before_id) = (Some(last.created_at), Some(last.id.clone()));
        let full = page.len() as i64 == filter.limit;
        out.push(page.into_iter().map(|d| d.id).collect());
        if !full {
            break;
        }
    }
    out
}

/// The same database opened again: migrations not yet recorded as applied run on it.
async fn reopen(db: &common::TestDb, name: &str) -> Store {
    match db {
        (_, _, Some(dir), _) => Store::open_sqlite(&dir.path().join(format!("{name}.db"))).await.unwrap(),
        (_, _, None, Some((url, schema))) => {
            let options = StoreOptions { schema: Some(schema.clone()), max_connections: 2, ..Default::default() };
            Store::connect(url, options).await.unwrap()
        }
        (_, _, None, None) => unreachable!("a test store is a file or a schema"),
    }
}

/// Links whose time is not their decision's, and all links.
async fn link_times(store: &Store) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT SUM(CASE WHEN dp.created_at = d.created_at THEN 0 ELSE 1 END) AS wrong, COUNT(*) AS links \
         FROM decision_policies dp JOIN decisions d ON d.id = dp.decision_id",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    (row.get("wrong"), row.get("links"))
}

#[tokio::test]
async fn a_policys_decisions_page_as_filtering_them_all_would() {
    let mut all: Vec<DecisionRecord> = (0..48).map(decision).collect();
    // A policy named like another's version: found by name and by hash, it is still listed once.
    all.push(DecisionRecord {
        policy_hashes: vec!["sha256:spam1".into(), "sha256:named".into()],
        policy_names: vec!["spam".into(), "sha256:spam1".into()],
        ..common::decision("dl999", 1_005)
    });
    for db in common::stores("listing").await {
        let (store, label) = (&db.0, db.1);
        // Through each way of storing: alone (group commit) and several in one transaction.
        let (alone, together) = all.split_at(all.len() / 2);
        for record in alone {
            store.insert_decision(record, None).await.unwrap();
        }
        let rows: Vec<_> = together.iter().map(|record| (record, None, None)).collect();
        store.insert_decisions_together(&rows).await.unwrap();
        let (wrong, links) = link_times(store).await;
        assert_eq!((wrong, links), (0, 68), "{label}: every link carries its decision's time");

        let mut checked = 0;
        for policy in ["spam", "sha256:spam1", "sha256:spam2", "other", "sha256:other", "sha256:named", "none"] {
            for outcome in [None, Some("block")] {
                for since in [None, Some(1_006)] {
                    for limit in [1, 4, 7, 100] {
                        let filter = DecisionFilter {
                            policy: Some(policy.into()),
                            outcome: outcome.map(str::to_string),
                            since,
                            limit,
                            ..DecisionFilter::default()
                        };
                        let expected = reference(&all, &filter);
                        let pages = pages(store, &filter).await;
                        let what = format!("{label}: {filter:?}");
                        for (index, page) in pages.iter().enumerate() {
                            let end = ((index + 1) * limit as usize).min(expected.len());
                            let start = (index * limit as usize).min(end);
                            assert_eq!(page[..], expected[start..end], "{what}: page {index}");
                        }
                        assert_eq!(pages.concat(), expected, "{what}");
                        checked += usize::from(!expected.is_empty());

                        // Paged by time alone, from within a shared millisecond.
                        let before = DecisionFilter { before: Some(1_010), ..filter.clone() };
                        let ids: Vec<String> =
                            store.list_decisions(&before).await.unwrap().into_iter().map(|d| d.id).collect();
                        let expected = reference(&all, &before);
                        assert_eq!(ids, expected[..expected.len().min(limit as usize)], "{label}: {before:?}");
                    }
                }
            }
        }
        assert!(checked >= 80, "{label}: most filters match something ({checked})");
        common::clean_up(db).await;
    }
}

/// A database from before links carried their decision's time (migration 9) has them filled in as it opens,
/// and lists by policy as a new one does.
#[tokio::test]
async fn the_link_time_migration_fills_in_the_links_already_stored() {
    let all: Vec<DecisionRecord> = (0..24).map(decision).collect();
    for db in common::stores("listing_migration").await {
        let (store, label) = (&db.0, db.1);
        for record in &all {
            store.insert_decision(record, None).await.unwrap();
        }
        // Back to the schema before migration 9 (and 11, which depends on it).
        let drop_trigger = match label {
            "sqlite" => "DROP TRIGGER decision_policies_take_decision_time",
            _ => "DROP TRIGGER decision_policies_take_decision_time ON decision_policies",
        };
        for statement in [
            drop_trigger,
            "DELETE FROM safeguard_migrations WHERE version = 11",
            "DROP INDEX decision_policies_by_name_time",
            "DROP INDEX decision_policies_by_hash_time",
            "ALTER TABLE decision_policies DROP COLUMN created_at",
            "CREATE INDEX decision_policies_by_name ON decision_policies (policy_name)",
            "CREATE INDEX decision_policies_by_hash ON decision_policies (policy_hash)",
            "DELETE FROM safeguard_migrations WHERE version = 9",
        ] {
            sqlx::query(statement).execute(store.pool()).await.unwrap();
        }

        let reopened = reopen(&db, "listing_migration").await;
        assert_eq!(link_times(&reopened).await, (0, 33), "{label}: every link has its decision's time");
        let filter = DecisionFilter { policy: Some("spam".into()), limit: 5, ..DecisionFilter::default() };
        assert_eq!(pages(&reopened, &filter).await.concat(), reference(&all, &filter), "{label}");
        reopened.close().await;
        common::clean_up(db).await;
    }
}

/// A server from before the link time (still running beside upgraded ones in a rolling upgrade) writes links
/// without it; the database gives them their decision's time, so its decisions are listed where they belong.
#[tokio::test]
async fn a_link_written_without_its_time_takes_its_decisions() {
    for db in common::stores("listing_old_writer").await {
        let (store, label) = (&db.0, db.1);
        let all: Vec<DecisionRecord> = (0..16).map(decision).collect();
        for record in &all {
            store.insert_decision(record, None).await.unwrap();
        }
        // As the old insert was: three columns.
        let late = DecisionRecord {
            policy_hashes: vec!["sha256:spam9".into()],
            policy_names: vec!["spam".into()],
            ..decision(99)
        };
        let mut decision_only = late.clone();
        decision_only.policy_hashes.clear();
        decision_only.policy_names.clear();
        store.insert_decision(&decision_only, None).await.unwrap();
        sqlx::query("INSERT INTO decision_policies (decision_id, policy_hash, policy_name) VALUES ($1, $2, $3)")
            .bind(&late.id)
            .bind("sha256:spam9")
            .bind("spam")
            .execute(store.pool())
            .await
            .unwrap();
        assert_eq!(link_times(store).await.0, 0, "{label}: every link has its decision's time");
        let mut listed_all = all.clone();
        listed_all.push(late);
        let filter = DecisionFilter { policy: Some("spam".into()), limit: 3, ..DecisionFilter::default() };
        assert_eq!(pages(store, &filter).await.concat(), reference(&listed_all, &filter), "{label}");
        common::clean_up(db).await;
    }
}

/// Links an old server wrote with time 0 before the trigger of 0011 existed are repaired by migration 13 when a
/// server of this version opens the store.
#[tokio::test]
async fn links_left_at_time_zero_take_their_decisions_time_at_the_upgrade() {
    for db in common::stores("listing_repair").await {
        let (store, label) = (&db.0, db.1);
        let all: Vec<DecisionRecord> = (0..6).map(decision).collect();
        for record in &all {
            store.insert_decision(record, None).await.unwrap();
        }
        // As they were left: the trigger fires on insert only.
        sqlx::query("UPDATE decision_policies SET created_at = 0").execute(store.pool()).await.unwrap();
        sqlx::query("DELETE FROM safeguard_migrations WHERE version = 13").execute(store.pool()).await.unwrap();
        let (wrong, links) = link_times(store).await;
        assert!(links >= 6 && wrong == links, "{label}: {wrong} of {links}");
        let reopened = match (&db.2, &db.3) {
            (Some(dir), _) => Store::open_sqlite(&dir.path().join("listing_repair.db")).await.unwrap(),
            (None, Some((url, schema))) => {
                let options = StoreOptions { schema: Some(schema.clone()), max_connections: 2, ..Default::default() };
                Store::connect(url, options).await.unwrap()
            }
            (None, None) => unreachable!("a store is SQLite or PostgreSQL"),
        };
        assert_eq!(link_times(&reopened).await, (0, links), "{label}: every link has its decision's time");
        let filter = DecisionFilter { policy: Some("spam".into()), limit: 4, ..DecisionFilter::default() };
        assert_eq!(pages(&reopened, &filter).await.concat(), reference(&all, &filter), "{label}");
        reopened.close().await;
        common::clean_up(db).await;
    }
}

/// Decided and superseded reviews page latest first by (decided_at, id), with answers sharing a millisecond
/// split across pages: every one listed once, in order, whatever the page size.
#[tokio::test]
async fn answered_reviews_page_latest_first_with_nothing_lost_in_a_shared_millisecond() {
    use safeguard_store::ReviewDecision;
    let answer = ReviewDecision {
        reviewer: "ana".into(),
        outcome: "allow".into(),
        rationale: "fine".into(),
        rule_id: "SP0".into(),
        policy_hash: None,
        overrides_model: Some(false),
    };
    for db in common::stores("settled").await {
        let (store, label) = (&db.0, db.1);
        let mut expected = Vec::new();
        for i in 0..11_i64 {
            let id = format!("rv{:02}", (i * 7) % 11);
            store.insert_decision(&common::decision(&id, 1_000), None).await.unwrap();
            let review = store.enqueue_review(&id, 0).await.unwrap();
            // Three answers per millisecond, their review ids (random) out of step with their order.
            let decided_at = 5_000 + i / 3;
            store.decide_review_and_deliver(&review, &answer, decided_at, None, None).await.unwrap().unwrap();
            expected.push((decided_at, review));
        }
        store.insert_decision(&common::decision("rv-pending", 1_000), None).await.unwrap();
        store.enqueue_review("rv-pending", 0).await.unwrap();
        expected.sort_by(|a, b| b.cmp(a));
        let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
        for limit in [1, 2, 3, 4, 100] {
            let (mut listed, mut before): (Vec<String>, Option<(i64, String)>) = (Vec::new(), None);
            loop {
                let cursor = before.as_ref().map(|(at, id)| (*at, id.as_str()));
                let page = store.list_settled_reviews("decided", cursor, limit).await.unwrap();
                assert!(page.len() as i64 <= limit, "{label}");
                let Some(last) = page.last() else { break };
                before = Some((last.decided_at.unwrap(), last.id.clone()));
                listed.extend(page.iter().map(|r| r.id.clone()));
                assert!(listed.len() <= expected.len(), "{label}, {limit} a page: listed again: {listed:?}");
            }
            assert_eq!(listed, expected, "{label}, {limit} a page");
        }
        assert!(store.list_settled_reviews("superseded", None, 10).await.unwrap().is_empty(), "{label}");
        common::clean_up(db).await;
    }
}
