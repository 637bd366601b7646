//! Idempotency keys: one row per (user, key), written before the request's command is
//! sequenced and completed with its answer afterwards, so that a retry gets the same answer
//! and a placement interrupted by a crash can be told apart from one never made.

use sqlx::Row;

use crate::{Backend, Store, StoreError};

/// A stored key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRow {
    /// SHA-256 of the request it was first used with.
    pub request_hash: [u8; 32],
    /// The order a placement creates.
    pub order_id: Option<u64>,
    /// The answer's status, once there is one.
    pub status: Option<u16>,
    /// The answer's body.
    pub response: Option<Vec<u8>>,
    /// When it may be forgotten.
    pub expires_ms: i64,
}

/// What beginning a keyed request found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key is new (or had expired): recorded as pending.
    Started,
    /// The key is known.
    Existing(IdempotencyRow),
}

fn decode<R: Row>(row: &R) -> Result<IdempotencyRow, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let hash: Vec<u8> = row.try_get("request_hash")?;
    let request_hash = hash.try_into().map_err(|_| StoreError::Corrupt {
        what: "idempotency key",
        position: 0,
        problem: "its request hash is not 32 bytes".into(),
    })?;
    Ok(IdempotencyRow {
        request_hash,
        order_id: row
            .try_get::<Option<i64>, _>("order_id")?
            .map(|id| id as u64),
        status: row
            .try_get::<Option<i64>, _>("status")?
            .map(|s| s.clamp(0, 999) as u16),
        response: row.try_get("response")?,
        expires_ms: row.try_get("expires_ms")?,
    })
}

const COLUMNS: &str = "request_hash, order_id, status, response, expires_ms";

impl Store {
    /// Records a keyed request as pending, unless the key is known and not expired; then
    /// returns what is stored. An expired key is replaced.
    pub async fn idempotency_begin(
        &self,
        user: u64,
        key: &str,
        request_hash: &[u8; 32],
        order_id: Option<u64>,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<IdempotencyBegin, StoreError> {
        let user = user.min(i64::MAX as u64) as i64;
        let delete_expired =
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND expires_ms <= $3";
        let insert = "INSERT INTO idempotency_keys (user_id, key, request_hash, order_id, created_ms, expires_ms) \
                      VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id, key) DO NOTHING";
        let select =
            format!("SELECT {COLUMNS} FROM idempotency_keys WHERE user_id = $1 AND key = $2");
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                sqlx::query(delete_expired)
                    .bind(user)
                    .bind(key)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                let inserted = sqlx::query(insert)
                    .bind(user)
                    .bind(key)
                    .bind(request_hash.as_slice())
                    .bind(order_id.map(|id| id as i64))
                    .bind(now_ms)
                    .bind(expires_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let begin = if inserted == 1 {
                    IdempotencyBegin::Started
                } else {
                    let row = sqlx::query(sqlx::AssertSqlSafe(select))
                        .bind(user)
                        .bind(key)
                        .fetch_one(&mut *tx)
                        .await?;
                    IdempotencyBegin::Existing(decode(&row)?)
                };
                tx.commit().await?;
                begin
            }};
        }
        Ok(match &self.backend {
            Backend::Sqlite { writer, .. } => run!(writer),
            Backend::Postgres(pool) => run!(pool),
        })
    }

    /// Stores the answer of a pending key.
    pub async fn idempotency_finish(
        &self,
        user: u64,
        key: &str,
        status: u16,
        response: &[u8],
    ) -> Result<(), StoreError> {
        let sql = "UPDATE idempotency_keys SET status = $3, response = $4 WHERE user_id = $1 AND key = $2";
        on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(user.min(i64::MAX as u64) as i64)
                .bind(key)
                .bind(i64::from(status))
                .bind(response)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Forgets a pending key whose request failed before anything changed, so that it can
    /// be retried.
    pub async fn idempotency_forget(&self, user: u64, key: &str) -> Result<(), StoreError> {
        let sql = "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND status IS NULL";
        on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(user.min(i64::MAX as u64) as i64)
                .bind(key)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Deletes expired keys, at most `limit`; returns how many.
    pub async fn purge_idempotency(&self, now_ms: i64, limit: usize) -> Result<u64, StoreError> {
        let sql = "DELETE FROM idempotency_keys WHERE (user_id, key) IN \
                   (SELECT user_id, key FROM idempotency_keys WHERE expires_ms <= $1 LIMIT CAST($2 AS BIGINT))";
        let deleted = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(now_ms)
                .bind(limit.min(crate::limits::PAGE_ROWS_MAX * 10) as i64)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted)
    }

    /// The largest order id recorded by a pending placement (0 when none), so that order ids
    /// given after a restart stay above the ones pending keys hold.
    pub async fn max_pending_order_id(&self) -> Result<u64, StoreError> {
        let sql = "SELECT MAX(order_id) AS m FROM idempotency_keys";
        let max = on_pool!(self, pool => {
            let row = sqlx::query(sql).fetch_one(pool).await?;
            row.try_get::<Option<i64>, _>("m")?.unwrap_or(0)
        });
        Ok(max.max(0) as u64)
    }
}
