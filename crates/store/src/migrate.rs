//! A tiny migration runner: SQL files applied in order, recorded in `safeguard_migrations`; portable SQL where the
//! backends share it, one file per backend where they do not.
//! (sqlx's migrator checksums whole files per driver; one portable file set is simpler to keep identical.)

use sqlx::{Acquire, Executor, Row};

use crate::{Backend, Result, Store, StoreError, now_ms};

/// One migration: SQL both backends run (a file of `;`-ended statements), or statements that differ by backend
/// (a trigger: SQLite's and PostgreSQL's share no syntax), each file one statement run whole (a trigger's body
/// holds `;`s).
enum Migration {
    Portable(&'static str),
    PerBackend { sqlite: &'static [&'static str], postgres: &'static [&'static str] },
}

use Migration::{PerBackend, Portable};

impl Migration {
    fn statements(&self, backend: Backend) -> Vec<String> {
        match (self, backend) {
            (Portable(sql), _) => split_statements(sql),
            (PerBackend { sqlite, .. }, Backend::Sqlite) => sqlite.iter().map(|s| s.to_string()).collect(),
            (PerBackend { postgres, .. }, Backend::Postgres) => postgres.iter().map(|s| s.to_string()).collect(),
        }
    }
}

const MIGRATIONS: &[(i64, Migration)] = &[
    (1, Portable(include_str!("../migrations/0001_init.sql"))),
    (2, Portable(include_str!("../migrations/0002_reviews.sql"))),
    (3, Portable(include_str!("../migrations/0003_review_announcements.sql"))),
    (4, Portable(include_str!("../migrations/0004_one_review_per_decision_kind.sql"))),
    (5, Portable(include_str!("../migrations/0005_submitted_by.sql"))),
    (6, Portable(include_str!("../migrations/0006_clock_free_claims_and_announcements.sql"))),
    (7, Portable(include_str!("../migrations/0007_retention_indexes.sql"))),
    (8, Portable(include_str!("../migrations/0008_policy_used_at.sql"))),
    (9, Portable(include_str!("../migrations/0009_policy_links_by_time.sql"))),
    (10, Portable(include_str!("../migrations/0010_reviews_in_decided_order.sql"))),
    (
        11,
        PerBackend {
            sqlite: &[include_str!("../migrations/0011_link_time_sqlite.sql")],
            postgres: &[
                include_str!("../migrations/0011_link_time_postgres_function.sql"),
                include_str!("../migrations/0011_link_time_postgres_trigger.sql"),
            ],
        },
    ),
    (12, Portable(include_str!("../migrations/0012_review_claims.sql"))),
    (13, Portable(include_str!("../migrations/0013_repair_link_times.sql"))),
];

/// Arbitrary constant so that concurrent servers starting on one PostgreSQL database migrate one at a time.
pub(crate) const PG_MIGRATION_LOCK: i64 = 0x5afe_6a4d;

pub(crate) async fn run(store: &Store) -> Result<()> {
    let mut conn = store.pool.acquire().await?;
    if store.backend == Backend::Postgres {
        conn.execute(sqlx::AssertSqlSafe(format!("SELECT pg_advisory_lock({PG_MIGRATION_LOCK})"))).await?;
    }
    let outcome = apply_pending(&mut conn, store.backend).await;
    if store.backend == Backend::Postgres {
        conn.execute(sqlx::AssertSqlSafe(format!("SELECT pg_advisory_unlock({PG_MIGRATION_LOCK})"))).await?;
    }
    outcome
}

/// Refuses a store that lacks a migration this version knows. A store with migrations newer than this version's
/// passes: servers of two versions share a database during a rolling upgrade, and every migration only adds.
pub(crate) async fn require_applied(store: &Store) -> Result<()> {
    let mut conn = store.pool.acquire().await?;
    let applied = match applied_versions(&mut conn).await {
        Ok(applied) => applied,
        Err(StoreError::Db(sqlx::Error::Database(_))) if !has_migrations_table(&mut conn, store.backend).await? => {
            return Err(StoreError::NoStore);
        }
        Err(e) => return Err(e),
    };
    let versions: Vec<i64> =
        MIGRATIONS.iter().map(|(version, _)| *version).filter(|version| !applied.contains(version)).collect();
    if versions.is_empty() { Ok(()) } else { Err(StoreError::PendingMigrations { versions }) }
}

async fn has_migrations_table(conn: &mut sqlx::AnyConnection, backend: Backend) -> Result<bool> {
    let query = match backend {
        Backend::Sqlite => "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'safeguard_migrations'",
        // The search path names the store's schema when one was given.
        Backend::Postgres => {
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'safeguard_migrations' \
             AND table_schema = current_schema()"
        }
    };
    Ok(sqlx::query(query).fetch_optional(&mut *conn).await?.is_some())
}

async fn applied_versions(conn: &mut sqlx::AnyConnection) -> Result<Vec<i64>> {
    Ok(sqlx::query("SELECT version FROM safeguard_migrations")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get::<i64, _>(0))
        .collect::<Result<_, _>>()?)
}

async fn apply_pending(conn: &mut sqlx::AnyConnection, backend: Backend) -> Result<()> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS safeguard_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let applied = applied_versions(conn).await?;
    for (version, migration) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        // Two processes opening a new SQLite file both see nothing applied; a write lock taken up front, and the
        // list read again under it, lets the second find the first's work instead of failing on it.
        // (PostgreSQL is serialised by the advisory lock.)
        let mut tx = match backend {
            Backend::Sqlite => sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?,
            Backend::Postgres => conn.begin().await?,
        };
        let done = sqlx::query("SELECT version FROM safeguard_migrations WHERE version = $1")
            .bind(*version)
            .fetch_optional(&mut *tx)
            .await?;
        if done.is_some() {
            tx.rollback().await?;
            continue;
        }
        tracing::info!(version, "applying migration");
        for statement in migration.statements(backend) {
            tx.execute(sqlx::AssertSqlSafe(statement.clone()))
                .await
                .map_err(|source| StoreError::Migration { version: *version, source })?;
        }
        sqlx::query("INSERT INTO safeguard_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(*version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Splits on `;` at line ends, dropping `--` comment lines; our migration files contain no string literals with `;`.
fn split_statements(sql: &str) -> Vec<String> {
    let without_comments: String =
        sql.lines().filter(|line| !line.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
    without_comments.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}
