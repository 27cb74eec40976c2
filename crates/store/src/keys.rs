//! API keys: only a sha256 of each key is stored; the plaintext is shown once, at creation.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, Store, new_id, now_ms};

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
        sqlx::query(
            "INSERT INTO api_keys (id, name, key_hash, scopes, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (key_hash) DO NOTHING",
        )
        .bind(new_id())
        .bind(name)
        .bind(&key_hash)
        .bind(scopes.join(" "))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT id, name, scopes, created_at, revoked_at FROM api_keys WHERE key_hash = $1")
            .bind(&key_hash)
            .fetch_one(&self.pool)
            .await?;
        row_to_key(&row)
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

    /// Revokes every live key named `name` except `keep`; returns how many.
    pub async fn revoke_api_keys_named(&self, name: &str, keep: &str) -> Result<u64> {
        let updated =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE name = $2 AND id <> $3 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(name)
                .bind(keep)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(updated)
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
