//! Immutable policy versions keyed by body hash, plus a name -> active version pin.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::{Result, Store, StoreError, from_json, now_ms, to_json};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredPolicy {
    /// "sha256:<hex>" of the body; the version's identity.
    pub hash: String,
    pub name: String,
    pub body: String,
    pub meta: serde_json::Value,
    pub created_at: i64,
    /// Whether this version is the one `name` currently resolves to.
    pub active: bool,
}

/// A stored version without its body: what a listing shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySummary {
    pub hash: String,
    pub name: String,
    pub created_at: i64,
    pub active: bool,
    /// The front matter's `version`, if it has one.
    pub version: Option<serde_json::Value>,
}

/// How stale a version's recorded last use may be: a server reads the versions it caches again (and records the
/// use) at least this often, so a version any server holds was used within twice this. Retention periods are
/// whole days, far longer.
pub const POLICY_USE_RESOLUTION_MS: i64 = 3_600_000;

impl StoredPolicy {
    /// The version as a listing shows it.
    pub fn summary(&self) -> PolicySummary {
        PolicySummary {
            hash: self.hash.clone(),
            name: self.name.clone(),
            created_at: self.created_at,
            active: self.active,
            version: self.meta.get("meta").and_then(|meta| meta.get("version")).filter(|v| !v.is_null()).cloned(),
        }
    }
}

/// Which summaries [`Store::policy_summaries`] lists.
#[derive(Debug, Clone, Copy)]
pub struct PolicyListing<'a> {
    /// Only this name's versions.
    pub name: Option<&'a str>,
    /// Only the versions names resolve to.
    pub only_active: bool,
    /// At most this many (1 to [`MAX_POLICY_PAGE`]).
    pub limit: i64,
    /// Only those listed after this version (the hash of the last one of the previous page): a cursor, so that
    /// versions stored while a client pages neither shift a page nor repeat on the next.
    pub after: Option<&'a str>,
}

/// The most summaries one listing returns.
pub const MAX_POLICY_PAGE: i64 = 1000;

const COLUMNS: &str = "p.hash, p.name, p.body, p.meta, p.created_at, \
    CASE WHEN pin.hash IS NULL THEN 0 ELSE 1 END AS active";
const FROM: &str = "policies p LEFT JOIN policy_pins pin ON pin.name = p.name AND pin.hash = p.hash";

fn row_to_policy(row: &AnyRow) -> Result<StoredPolicy> {
    Ok(StoredPolicy {
        hash: row.try_get("hash")?,
        name: row.try_get("name")?,
        body: row.try_get("body")?,
        meta: from_json(&row.try_get::<String, _>("meta")?, "policies.meta")?,
        created_at: row.try_get("created_at")?,
        active: row.try_get::<i64, _>("active")? != 0,
    })
}

/// Pins `name` to `hash` if the name has no active version and the version is stored under that name with
/// exactly `meta`. One statement, so the front matter a caller compared is the front matter that gets the name:
/// a copy of the body stored earlier with other front matter (an inline policy) never captures it.
async fn pin_if_unpinned(
    tx: &mut Transaction<'static, Any>,
    hash: &str,
    name: &str,
    meta: &str,
    now: i64,
) -> Result<bool> {
    let pinned = sqlx::query(
        "INSERT INTO policy_pins (name, hash, updated_at) SELECT name, hash, $3 FROM policies \
         WHERE hash = $1 AND name = $2 AND meta = $4 ON CONFLICT (name) DO NOTHING",
    )
    .bind(hash)
    .bind(name)
    .bind(now)
    .bind(meta)
    .execute(&mut **tx)
    .await?;
    Ok(pinned.rows_affected() == 1)
}

impl Store {
    /// Stores a policy version. Returns the stored row and whether it was new. With `pin_first_version`, a name
    /// that has no active version yet gets this one, whether the row is new or was stored before unpinned with
    /// this very `meta`; once a name has one, later versions wait for `activate_policy`. (Inline policies sent
    /// with a single request are stored unpinned: they must not capture a name.) A row stored under another name,
    /// or with other meta, is never pinned: see [`Store::pin_first_version`] for a caller that compares front
    /// matter itself.
    #[tracing::instrument(skip(self, body, meta))]
    pub async fn put_policy(
        &self,
        hash: &str,
        name: &str,
        body: &str,
        meta: &serde_json::Value,
        pin_first_version: bool,
    ) -> Result<(StoredPolicy, bool)> {
        let now = now_ms();
        // The mark below must see a prune's delete once it is committed, not fail on it as a serialization error.
        let mut tx = self.begin_read_committed().await?;
        let mut attempts = 0;
        let inserted = loop {
            attempts += 1;
            let inserted = sqlx::query(
                "INSERT INTO policies (hash, name, body, meta, created_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (hash) DO NOTHING",
            )
            .bind(hash)
            .bind(name)
            .bind(body)
            .bind(to_json(meta))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if inserted {
                break true;
            }
            // Stored before: marked in use, so that a prune (which re-checks under its lock) does not delete it
            // from under the caller, who is about to name it. On PostgreSQL a prune can delete it between the two
            // statements; then nothing is marked, and it is stored anew.
            let marked = sqlx::query("UPDATE policies SET used_at = $1 WHERE hash = $2")
                .bind(now)
                .bind(hash)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            if marked || attempts == 3 {
                break false;
            }
        };
        if pin_first_version {
            pin_if_unpinned(&mut tx, hash, name, &to_json(meta), now).await?;
        }
        tx.commit().await?;
        let stored = self.get_policy(hash).await?.ok_or_else(|| StoreError::PolicyNotFound(hash.to_string()))?;
        Ok((stored, inserted))
    }

    /// Gives a version that was stored unpinned under `from_name` (an inline policy's fallback name) the name
    /// and front matter it is now published with, and pins that name if it has no active version yet. Returns
    /// `None`, changing nothing, when the version is not stored under `from_name` or `from_name` points at it:
    /// a published name is never taken away from a version.
    #[tracing::instrument(skip(self, meta))]
    pub async fn rename_unpinned_policy(
        &self,
        hash: &str,
        from_name: &str,
        name: &str,
        meta: &serde_json::Value,
    ) -> Result<Option<StoredPolicy>> {
        let now = now_ms();
        let mut tx = self.begin_read_committed().await?;
        let renamed = sqlx::query(
            "UPDATE policies SET name = $1, meta = $2 WHERE hash = $3 AND name = $4 \
             AND NOT EXISTS (SELECT 1 FROM policy_pins WHERE policy_pins.hash = $3 AND policy_pins.name = $4)",
        )
        .bind(name)
        .bind(to_json(meta))
        .bind(hash)
        .bind(from_name)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !renamed {
            tx.rollback().await?;
            return Ok(None);
        }
        pin_if_unpinned(&mut tx, hash, name, &to_json(meta), now).await?;
        tx.commit().await?;
        self.get_policy(hash).await
    }

    /// Pins `name` to a stored version if the name has no active version yet, the version is stored under
    /// `name`, and its meta is still `meta` (what the caller read and compared with what it is publishing; compared
    /// as JSON values, since their text need not be byte for byte what was stored). Returns the version as it now
    /// stands; `None` if it is not stored.
    #[tracing::instrument(skip(self, meta))]
    pub async fn pin_first_version(
        &self,
        hash: &str,
        name: &str,
        meta: &serde_json::Value,
    ) -> Result<Option<StoredPolicy>> {
        let mut tx = self.begin_read_committed().await?;
        // The pin is written before the meta is read back: the write takes SQLite's lock for the rest of the
        // transaction, so nothing can change in between, and a read first could not be upgraded under a writer.
        let pinned = sqlx::query(
            "INSERT INTO policy_pins (name, hash, updated_at) SELECT name, hash, $3 FROM policies \
             WHERE hash = $1 AND name = $2 ON CONFLICT (name) DO NOTHING",
        )
        .bind(hash)
        .bind(name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if pinned {
            let stored: String = sqlx::query("SELECT meta FROM policies WHERE hash = $1")
                .bind(hash)
                .fetch_one(&mut *tx)
                .await?
                .try_get("meta")?;
            if from_json::<serde_json::Value>(&stored, "policies.meta")? != *meta {
                tx.rollback().await?;
                return self.get_policy(hash).await;
            }
        }
        tx.commit().await?;
        self.get_policy(hash).await
    }

    /// Records that a server has just read this version to decide with: a version in use is never pruned
    /// (`Retention::policies`). Written at most once per [`POLICY_USE_RESOLUTION_MS`] per version, so that
    /// servers reading a version often do not write for each read.
    pub async fn touch_policy(&self, hash: &str) -> Result<()> {
        let now = now_ms();
        sqlx::query("UPDATE policies SET used_at = $1 WHERE hash = $2 AND (used_at IS NULL OR used_at < $3)")
            .bind(now)
            .bind(hash)
            .bind(now.saturating_sub(POLICY_USE_RESOLUTION_MS))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_policy(&self, hash: &str) -> Result<Option<StoredPolicy>> {
        let row = sqlx::query(sql!("SELECT {COLUMNS} FROM {FROM} WHERE p.hash = $1"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_policy).transpose()
    }

    /// Names that have an active version, in order, after `after`, at most `limit` of them. Read from the pins
    /// alone: a stored version this version cannot read (a corrupt row) does not hide the others' names.
    pub async fn active_policy_names(&self, after: Option<&str>, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM policy_pins WHERE $1 IS NULL OR name > $1 ORDER BY name LIMIT $2")
            .bind(after)
            .bind(limit.clamp(1, MAX_POLICY_PAGE))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| Ok(row.try_get("name")?)).collect()
    }

    /// The active version of a named policy.
    pub async fn active_policy(&self, name: &str) -> Result<Option<StoredPolicy>> {
        let row = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM policies p JOIN policy_pins pin ON pin.hash = p.hash WHERE pin.name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_policy).transpose()
    }

    /// Stored versions without their bodies, by name and newest first: all of them, or one name's, or only the
    /// active ones, a page at a time. The filter and the page are the database's, and only the page's `meta` is
    /// read (bodies never), so that a listing holds one page of summaries however many versions (of up to a
    /// megabyte, twice over with the source kept in `meta`) clients stored inline.
    pub async fn policy_summaries(&self, listing: &PolicyListing<'_>) -> Result<Vec<PolicySummary>> {
        // The version as JSON text, as stored.
        let version = match self.backend {
            crate::Backend::Sqlite => "json_quote(json_extract(p.meta, '$.meta.version'))",
            crate::Backend::Postgres => "(p.meta::jsonb #> '{meta,version}')::text",
        };
        // The page is chosen first, by columns the index holds; only its rows' `meta` (which holds the policy's
        // source again) is read for the version.
        let sql = format!(
            "SELECT page.hash, page.name, page.created_at, page.active, {version} AS version FROM ( \
               SELECT p.hash AS hash, p.name AS name, p.created_at AS created_at, \
                 CASE WHEN pin.hash IS NULL THEN 0 ELSE 1 END AS active FROM {FROM} \
               WHERE ($1 IS NULL OR p.name = $1) AND ($2 = 0 OR pin.hash IS NOT NULL) \
                 AND ($4 IS NULL OR EXISTS (SELECT 1 FROM policies c WHERE c.hash = $4 AND (p.name > c.name \
                   OR (p.name = c.name AND (p.created_at < c.created_at \
                     OR (p.created_at = c.created_at AND p.hash > c.hash)))))) \
               ORDER BY p.name, p.created_at DESC, p.hash LIMIT $3) page \
             JOIN policies p ON p.hash = page.hash \
             ORDER BY page.name, page.created_at DESC, page.hash"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(listing.name)
            .bind(i64::from(listing.only_active))
            .bind(listing.limit.clamp(1, MAX_POLICY_PAGE))
            .bind(listing.after)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let version = row.try_get::<Option<String>, _>("version")?;
                Ok(PolicySummary {
                    hash: row.try_get("hash")?,
                    name: row.try_get("name")?,
                    created_at: row.try_get("created_at")?,
                    active: row.try_get::<i64, _>("active")? != 0,
                    // SQLite quotes a missing version as `null`.
                    version: version
                        .as_deref()
                        .map(|v| from_json::<serde_json::Value>(v, "policies.meta"))
                        .transpose()?
                        .filter(|v| !v.is_null()),
                })
            })
            .collect()
    }

    /// Points `name` at a stored version of that name.
    #[tracing::instrument(skip(self))]
    pub async fn activate_policy(&self, name: &str, hash: &str) -> Result<StoredPolicy> {
        let policy = self.get_policy(hash).await?.ok_or_else(|| StoreError::PolicyNotFound(hash.to_string()))?;
        if policy.name != name {
            return Err(StoreError::PolicyNameMismatch {
                hash: hash.to_string(),
                actual: policy.name,
                requested: name.to_string(),
            });
        }
        sqlx::query(
            "INSERT INTO policy_pins (name, hash, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET hash = excluded.hash, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(StoredPolicy { active: true, ..policy })
    }
}
