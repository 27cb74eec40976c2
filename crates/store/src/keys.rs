//! API keys: only a sha256 of each key is stored; the plaintext is shown once, at creation.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Backend, Result, Store, new_id, now_ms};

/// Serialises [`Store::install_named_key`] across servers sharing one PostgreSQL database (SQLite's write lock
/// does the same there). Any constant other than the migrations' lock.
const PG_KEY_INSTALL_LOCK: i64 = 0x5afe_6b65;

const KEY_COLUMNS: &str = "id, name, scopes, created_at, revoked_at";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl ApiKeyRecord {
    /// `admin` implies every scope.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "admin")
    }
}

pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// What [`Store::install_named_key`] found and left.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyInstall {
    /// The key is the one live key of its name: the newest. `retired` older live ones were revoked with this.
    Current { key: ApiKeyRecord, retired: u64 },
    /// The key is not the one to keep: it was revoked before (a value rotated away from), or a key of the same
    /// name created after it is live, in which case it is revoked now. The newest live key of the name is untouched.
    Superseded { key: ApiKeyRecord },
    /// The plaintext is already a key of another name (a client's): nothing was changed. Installing it would
    /// revoke that client's key, or every key of this name.
    OtherName { name: String },
}

/// Stores a key unless one with this hash exists (whatever its name).
async fn insert_key_row<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
    name: &str,
    key_hash: &str,
    scopes: &[String],
    created_at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO api_keys (id, name, key_hash, scopes, created_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (key_hash) DO NOTHING",
    )
    .bind(new_id())
    .bind(name)
    .bind(key_hash)
    .bind(scopes.join(" "))
    .bind(created_at)
    .execute(executor)
    .await?;
    Ok(())
}

fn row_to_key(row: &AnyRow) -> Result<ApiKeyRecord> {
    let scopes: String = row.try_get("scopes")?;
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        scopes: scopes.split_whitespace().map(str::to_string).collect(),
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

impl Store {
    /// Creates a key with fresh randomness and returns its record and the plaintext (never stored).
    pub async fn create_api_key(&self, name: &str, scopes: &[String]) -> Result<(ApiKeyRecord, String)> {
        // Two v4 UUIDs: 244 bits from the OS CSPRNG.
        let secret = format!("sg_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let record = self.insert_api_key(name, scopes, &secret).await?;
        Ok((record, secret))
    }

    /// Registers a key whose plaintext the operator chose (e.g. SAFEGUARD_ADMIN_KEY). Idempotent.
    pub async fn insert_api_key(&self, name: &str, scopes: &[String], secret: &str) -> Result<ApiKeyRecord> {
        let key_hash = hash_api_key(secret);
        insert_key_row(&self.pool, name, &key_hash, scopes, now_ms()).await?;
        let row = sqlx::query("SELECT id, name, scopes, created_at, revoked_at FROM api_keys WHERE key_hash = $1")
            .bind(&key_hash)
            .fetch_one(&self.pool)
            .await?;
        row_to_key(&row)
    }

    /// Makes the key with this plaintext the one live key named `name`, creating it if new: how an operator-set
    /// key (SAFEGUARD_ADMIN_KEY) is rotated.
    ///
    /// Servers starting together with different values must end with exactly one live key, never none, so the
    /// whole install is one transaction that holds a lock every install takes (SQLite's write lock, a PostgreSQL
    /// advisory lock), and it only ever revokes keys older than the newest live one. A new value is created newer
    /// than every key of its name, whatever this host's clock says, so the last start with a new value wins, as
    /// rotation means; a value already stored keeps its creation time, so an old replica starting after the
    /// rotation finds its value superseded instead of undoing the rotation.
    pub async fn install_named_key(&self, name: &str, scopes: &[String], secret: &str) -> Result<KeyInstall> {
        let key_hash = hash_api_key(secret);
        let mut conn = self.pool.acquire().await?;
        let mut tx = match self.backend {
            Backend::Sqlite => sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                // Under READ COMMITTED a revocation does not see a key another install has inserted but not yet
                // committed: without the lock, two new values could both stay live.
                sqlx::query(sql!("SELECT pg_advisory_xact_lock({PG_KEY_INSTALL_LOCK})")).execute(&mut *tx).await?;
                tx
            }
        };
        let existing = sqlx::query(sql!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"))
            .bind(&key_hash)
            .fetch_optional(&mut *tx)
            .await?;
        let ours = match existing {
            Some(row) => row_to_key(&row)?,
            None => {
                let row = sqlx::query("SELECT MAX(created_at) AS newest FROM api_keys WHERE name = $1")
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await?;
                let newest: Option<i64> = row.try_get("newest")?;
                let now = now_ms();
                let created_at = newest.map_or(now, |newest| now.max(newest.saturating_add(1)));
                // A key created with this plaintext under another name since the look-up above (not an install:
                // those wait for the lock) is found again below rather than failing the start.
                insert_key_row(&mut *tx, name, &key_hash, scopes, created_at).await?;
                let row = sqlx::query(sql!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"))
                    .bind(&key_hash)
                    .fetch_one(&mut *tx)
                    .await?;
                row_to_key(&row)?
            }
        };
        if ours.name != name {
            tx.rollback().await?;
            return Ok(KeyInstall::OtherName { name: ours.name });
        }
        if ours.revoked_at.is_some() {
            // Revoking anything on behalf of a retired value could take the current key with it.
            tx.rollback().await?;
            return Ok(KeyInstall::Superseded { key: ours });
        }
        let keep = sqlx::query(sql!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE (name = $1 OR id = $2) AND revoked_at IS NULL \
             ORDER BY created_at DESC, id DESC LIMIT 1"
        ))
        .bind(name)
        .bind(&ours.id)
        .fetch_one(&mut *tx)
        .await?;
        let keep = row_to_key(&keep)?;
        let revoked_at = now_ms();
        let retired = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE (name = $2 OR id = $3) AND revoked_at IS NULL \
             AND (created_at < $4 OR (created_at = $4 AND id < $5))",
        )
        .bind(revoked_at)
        .bind(name)
        .bind(&ours.id)
        .bind(keep.created_at)
        .bind(&keep.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if keep.id == ours.id {
            Ok(KeyInstall::Current { key: ours, retired })
        } else {
            Ok(KeyInstall::Superseded { key: ApiKeyRecord { revoked_at: Some(revoked_at), ..ours } })
        }
    }

    /// The live (not revoked) key with this plaintext, if any.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query(
            "SELECT id, name, scopes, created_at, revoked_at FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash_api_key(secret))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_key).transpose()
    }

    /// Whether any key was ever made (revoked ones count: a server that had keys does not open up again).
    pub async fn has_api_keys(&self) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_keys").fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
        let rows = sqlx::query("SELECT id, name, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_key).collect()
    }

    pub async fn revoke_api_key(&self, id: &str) -> Result<bool> {
        let updated = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(updated == 1)
    }
}
