//! Servers starting together: the admin key they install, and the PostgreSQL schema they create. Each test runs
//! against SQLite and, when reachable, PostgreSQL (in a throwaway schema).

use std::time::Duration;

use safeguard_store::{KeyInstall, Store, StoreOptions};

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The old three-statement install left no live key, or undid the rotation, within the first few rounds here.
const ROUNDS: usize = 60;

fn pg_url() -> String {
    std::env::var("SAFEGUARD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

fn fresh_schema(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("sgtest_{tag}_{}_{nanos}", std::process::id())
}

async fn connect_pg(url: &str, schema: &str) -> Result<Store, String> {
    let options = StoreOptions { schema: Some(schema.to_string()), max_connections: 4, ..Default::default() };
    match tokio::time::timeout(Duration::from_secs(10), Store::connect(url, options)).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("timed out".to_string()),
    }
}

/// Two stores on one database, as two replicas have: (label, first, second, PostgreSQL schema to drop).
async fn replica_pairs(dir: &tempfile::TempDir) -> Vec<(&'static str, Store, Store, Option<String>)> {
    let path = dir.path().join("keys.db");
    let first = Store::open_sqlite(&path).await.unwrap();
    let second = Store::open_sqlite(&path).await.unwrap();
    let mut out = vec![("sqlite", first, second, None)];
    let url = pg_url();
    let schema = fresh_schema("keys");
    match connect_pg(&url, &schema).await {
        Ok(first) => {
            let second = connect_pg(&url, &schema).await.unwrap();
            out.push(("postgres", first, second, Some(schema)));
        }
        Err(err) => eprintln!("SKIPPING PostgreSQL half of this test: {url}: {err}"),
    }
    out
}

async fn live_keys(store: &Store, name: &str) -> Vec<String> {
    store
        .list_api_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|key| key.name == name && key.revoked_at.is_none())
        .map(|key| key.id)
        .collect()
}

fn admin() -> Vec<String> {
    vec!["admin".to_string()]
}

/// An old replica (the current value) and a new one (a new value) start at the same moment: the new value is
/// the one live key afterwards, every time. Two new values at once: one of them is, never both, never none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_installing_different_admin_keys_together_leave_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    for (label, old_pod, new_pod, schema) in replica_pairs(&dir).await {
        for round in 0..ROUNDS {
            // A rolling update: the old value is installed already.
            let name = format!("admin-rollout-{round}");
            let (old, new) = (format!("old-{round}"), format!("new-{round}"));
            let before = old_pod.install_named_key(&name, &admin(), &old).await.unwrap();
            assert!(matches!(before, KeyInstall::Current { .. }), "{label}: {before:?}");
            let (from_old, from_new) = tokio::join!(
                tokio::spawn({
                    let (store, name, old) = (old_pod.clone(), name.clone(), old.clone());
                    async move { store.install_named_key(&name, &admin(), &old).await }
                }),
                tokio::spawn({
                    let (store, name, new) = (new_pod.clone(), name.clone(), new.clone());
                    async move { store.install_named_key(&name, &admin(), &new).await }
                }),
            );
            let (from_old, from_new) = (from_old.unwrap().unwrap(), from_new.unwrap().unwrap());
            let live = live_keys(&old_pod, &name).await;
            assert_eq!(live.len(), 1, "{label} round {round}: live keys {live:?} after {from_old:?} and {from_new:?}");
            assert!(matches!(from_new, KeyInstall::Current { .. }), "{label} round {round}: {from_new:?}");
            let current = old_pod.authenticate(&new).await.unwrap();
            assert_eq!(current.map(|key| key.id), live.first().cloned(), "{label} round {round}: the new value won");

            // Two new values set at once (a botched rollout): whichever wins, exactly one.
            let name = format!("admin-fresh-{round}");
            let (a, b) = tokio::join!(
                tokio::spawn({
                    let (store, name) = (old_pod.clone(), name.clone());
                    async move { store.install_named_key(&name, &admin(), &format!("a-{round}")).await }
                }),
                tokio::spawn({
                    let (store, name) = (new_pod.clone(), name.clone());
                    async move { store.install_named_key(&name, &admin(), &format!("b-{round}")).await }
                }),
            );
            let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
            let live = live_keys(&old_pod, &name).await;
            assert_eq!(live.len(), 1, "{label} round {round}: live keys {live:?} after {a:?} and {b:?}");
        }
        old_pod.close().await;
        new_pod.close().await;
        if let Some(schema) = schema {
            Store::drop_schema(&pg_url(), &schema).await.unwrap();
        }
    }
}

/// Installs one after another: a rotation revokes the older value, setting that value again changes nothing
/// and says so, and two live keys of one name left from before (the old race, a key created by hand under the
/// name) converge on the newer one.
#[tokio::test]
async fn rotation_keeps_the_newest_live_key() {
    let dir = tempfile::tempdir().unwrap();
    for (label, store, other, schema) in replica_pairs(&dir).await {
        let name = "admin";
        let first = store.install_named_key(name, &admin(), "first").await.unwrap();
        assert!(matches!(first, KeyInstall::Current { retired: 0, .. }), "{label}: {first:?}");
        let second = other.install_named_key(name, &admin(), "second").await.unwrap();
        assert!(matches!(second, KeyInstall::Current { retired: 1, .. }), "{label}: {second:?}");
        let again = store.install_named_key(name, &admin(), "first").await.unwrap();
        let KeyInstall::Superseded { key } = again else {
            panic!("{label}: a rotated-away value came back: {again:?}")
        };
        assert!(key.revoked_at.is_some(), "{label}");
        assert!(store.authenticate("second").await.unwrap().is_some(), "{label}: the current key survives");
        let same = other.install_named_key(name, &admin(), "second").await.unwrap();
        assert!(matches!(same, KeyInstall::Current { retired: 0, .. }), "{label}: a restart is a no-op: {same:?}");

        // Two live keys of the name (made outside installs): installing the older one keeps the newer.
        let name = "admin-legacy";
        let older = store.insert_api_key(name, &admin(), "legacy-older").await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let newer = store.insert_api_key(name, &admin(), "legacy-newer").await.unwrap();
        let outcome = store.install_named_key(name, &admin(), "legacy-older").await.unwrap();
        assert!(matches!(&outcome, KeyInstall::Superseded { key } if key.id == older.id), "{label}: {outcome:?}");
        assert_eq!(live_keys(&store, name).await, vec![newer.id.clone()], "{label}");

        // A client's key set as the admin key changes nothing: neither that key nor the admin keys are revoked.
        let client = store.insert_api_key("client", &["classify".to_string()], "client-secret").await.unwrap();
        let taken = store.install_named_key("admin", &admin(), "client-secret").await.unwrap();
        assert!(matches!(&taken, KeyInstall::OtherName { name } if name == "client"), "{label}: {taken:?}");
        assert_eq!(live_keys(&store, "client").await, vec![client.id.clone()], "{label}");
        assert!(store.authenticate("second").await.unwrap().is_some(), "{label}: the admin key survives");

        store.close().await;
        other.close().await;
        if let Some(schema) = schema {
            Store::drop_schema(&pg_url(), &schema).await.unwrap();
        }
    }
}

/// Replicas starting together on a new PostgreSQL schema both create it: neither fails on the other's
/// `CREATE SCHEMA IF NOT EXISTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_opening_one_new_postgres_schema_together_all_start() {
    let url = pg_url();
    let probe = fresh_schema("probe");
    match connect_pg(&url, &probe).await {
        Ok(store) => {
            store.close().await;
            Store::drop_schema(&url, &probe).await.unwrap();
        }
        Err(err) => {
            eprintln!("SKIPPING: PostgreSQL at {url}: {err}");
            return;
        }
    }
    for round in 0..ROUNDS / 2 {
        let schema = fresh_schema("schema");
        let opened = join_all((0..3).map(|_| {
            let (url, schema) = (url.clone(), schema.clone());
            tokio::spawn(async move { connect_pg(&url, &schema).await })
        }))
        .await;
        let mut failures = Vec::new();
        for store in opened {
            match store.unwrap() {
                Ok(store) => store.close().await,
                Err(err) => failures.push(err),
            }
        }
        Store::drop_schema(&url, &schema).await.unwrap();
        assert!(failures.is_empty(), "round {round}: {failures:?}");
    }
}

/// Awaits every handle, in order (the crate has no `futures` dependency for `join_all`).
async fn join_all<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await);
    }
    out
}
