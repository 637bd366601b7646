//! The `withdrawals` read model: one row per withdrawal, projected from the journal by
//! [`Store::write_projection`] (a request inserts it, a completion or cancellation updates its
//! status), and the queries the server answers from it. Ids and users are stored with an
//! `as i64` cast and read back with the same cast; amounts are decimal strings because they
//! exceed 64 bits.

use sqlx::Row;

use crate::{Backend, Store, StoreError, from_db, limits};

/// The statuses a withdrawal row can have.
pub const WITHDRAWAL_STATUSES: [&str; 3] = ["pending", "completed", "cancelled"];

/// A withdrawal's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WithdrawalRow {
    /// Withdrawal id.
    pub id: u64,
    /// Owner.
    pub user: u64,
    /// Asset id.
    pub asset: u32,
    /// Amount in the asset's minor units.
    pub amount: u128,
    /// Where the funds go, as the user gave it.
    pub destination: String,
    /// `pending`, `completed` or `cancelled`.
    pub status: &'static str,
    /// The command that requested it.
    pub requested_seq: u64,
    /// The last command that changed it.
    pub updated_seq: u64,
}

/// Which withdrawals a listing returns, newest (highest id) first.
#[derive(Clone, Debug, Default)]
pub struct WithdrawalFilter<'a> {
    /// Only this user's.
    pub user: Option<u64>,
    /// Only this status.
    pub status: Option<&'a str>,
    /// Only ids below this one: the next page after the last id of the previous one.
    pub before_id: Option<u64>,
}

const COLUMNS: &str = "id, user_id, asset, amount, destination, status, requested_seq, updated_seq";

fn decode<R: Row>(row: &R) -> Result<WithdrawalRow, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let what = "withdrawal";
    let id = row.try_get::<i64, _>("id")? as u64;
    let corrupt = |problem: String| StoreError::Corrupt {
        what,
        position: id,
        problem,
    };
    let amount: String = row.try_get("amount")?;
    let status: String = row.try_get("status")?;
    let asset: i64 = row.try_get("asset")?;
    Ok(WithdrawalRow {
        id,
        user: row.try_get::<i64, _>("user_id")? as u64,
        asset: u32::try_from(asset)
            .map_err(|_| corrupt(format!("asset {asset} is out of range")))?,
        amount: amount
            .parse()
            .map_err(|_| corrupt(format!("amount {amount:?} is not a number")))?,
        destination: row.try_get("destination")?,
        status: WITHDRAWAL_STATUSES
            .iter()
            .copied()
            .find(|s| *s == status)
            .ok_or_else(|| corrupt(format!("unknown status {status:?}")))?,
        requested_seq: from_db(row.try_get("requested_seq")?, what, id)?,
        updated_seq: from_db(row.try_get("updated_seq")?, what, id)?,
    })
}

impl Store {
    /// The withdrawal with this id.
    pub async fn withdrawal(&self, id: u64) -> Result<Option<WithdrawalRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM withdrawals WHERE id = $1");
        let row = on_read_models!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id as i64)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode)
                .transpose()?
        });
        Ok(row)
    }

    /// Withdrawals that pass `filter`, newest (highest id) first; at most `limit` (itself at
    /// most [`limits::PAGE_ROWS_MAX`]).
    pub async fn withdrawals(
        &self,
        filter: &WithdrawalFilter<'_>,
        limit: usize,
    ) -> Result<Vec<WithdrawalRow>, StoreError> {
        let rows = on_read_models!(self, pool => {
            let mut query =
                sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM withdrawals WHERE 1 = 1"));
            if let Some(user) = filter.user {
                query.push(" AND user_id = ").push_bind(user as i64);
            }
            if let Some(status) = filter.status {
                query.push(" AND status = ").push_bind(status);
            }
            if let Some(before) = filter.before_id {
                query.push(" AND id < ").push_bind(i64::try_from(before).unwrap_or(i64::MAX));
            }
            query
                .push(" ORDER BY id DESC LIMIT CAST(")
                .push_bind(limit.min(limits::PAGE_ROWS_MAX) as i64)
                .push(" AS BIGINT)");
            query
                .build()
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode)
                .collect::<Result<_, _>>()?
        });
        Ok(rows)
    }

    /// The highest withdrawal id in the read model (0 when there is none).
    pub async fn max_withdrawal_id(&self) -> Result<u64, StoreError> {
        let sql = "SELECT COALESCE(MAX(id), 0) AS id FROM withdrawals";
        let id: i64 =
            on_read_models!(self, pool => sqlx::query(sql).fetch_one(pool).await?.try_get("id")?);
        Ok(id as u64)
    }
}
