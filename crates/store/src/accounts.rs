//! Accounts (users and their API keys) and the read-model queries the server answers from.
//!
//! The store keeps what it is given: a password hash, never a password, and an API key's
//! secret, because verifying an HMAC signature needs it. Roles are names the caller defines.
//! Every time is a millisecond timestamp given by the caller.
//!
//! The read-model queries read the `orders` and `trades` tables that
//! [`Store::write_projection`] fills. Numbers that it stores with an `as i64` cast (order ids,
//! users, quantities) are looked up and read back with the same cast, so a read returns
//! exactly what was written; sequence numbers, stored with `to_db`, are read with `from_db`.
//! Bounds that come from callers (`after_id`, `before_seq`) saturate instead of panicking.

use sqlx::Row;

use crate::{Backend, OrderRow, Store, StoreError, TradeRow, from_db, limits};

/// A user account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRow {
    /// Given by the store: increasing, never given out again (gaps are possible).
    pub id: u64,
    /// Unique, case-sensitive.
    pub username: String,
    /// The password's hash, as the caller made it.
    pub password_hash: String,
    /// A role name the caller defines.
    pub role: String,
    /// When the account was created.
    pub created_ms: i64,
}

/// An API key (its secret is kept because HMAC verification needs it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRow {
    /// The public half, unique.
    pub key_id: String,
    /// The owner.
    pub user_id: u64,
    /// The shared secret signatures are made with.
    pub secret: String,
    /// The owner's name for it.
    pub label: String,
    /// When it was created.
    pub created_ms: i64,
    /// Revoked keys are kept (so a key id is never used again) but must be refused.
    pub revoked: bool,
}

/// The names [`OrderRow::side`] and [`TradeRow::taker_side`] take: the book's `Side::as_str`.
const SIDES: [&str; 2] = ["buy", "sell"];

/// The names [`OrderRow::order_type`] takes: the book's `OrderType::as_str`.
const ORDER_TYPES: [&str; 6] = [
    "limit",
    "market",
    "stop_market",
    "stop_limit",
    "take_profit_market",
    "take_profit_limit",
];

/// The names [`OrderRow::status`] takes: the statuses the core's projector writes.
const ORDER_STATUSES: [&str; 4] = ["open", "filled", "cancelled", "expired"];

const USER_COLUMNS: &str = "id, username, password_hash, role, created_ms";
const API_KEY_COLUMNS: &str = "key_id, user_id, secret, label, created_ms, revoked";
const ORDER_COLUMNS: &str = "market, order_id, accepted_seq, user_id, side, order_type, price, qty, filled, open_qty, status, updated_seq";
const TRADE_COLUMNS: &str =
    "seq, n, market, maker, taker, maker_user, taker_user, taker_side, price, qty";

/// A page size as SQL's `LIMIT` takes it, at most [`limits::PAGE_ROWS_MAX`].
fn page_limit(limit: usize) -> i64 {
    limit.min(limits::PAGE_ROWS_MAX) as i64
}

/// A failed insert as the caller should see it: a taken unique key is [`StoreError::Duplicate`].
fn taken(error: sqlx::Error, what: &'static str) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Duplicate { what },
        _ => StoreError::Database(error),
    }
}

/// `text` as one of the static `names`, or [`StoreError::Corrupt`].
fn static_name(
    names: &[&'static str],
    text: &str,
    column: &str,
    what: &'static str,
    position: u64,
) -> Result<&'static str, StoreError> {
    names
        .iter()
        .copied()
        .find(|name| *name == text)
        .ok_or_else(|| StoreError::Corrupt {
            what,
            position,
            problem: format!("unknown {column} {text:?}"),
        })
}

/// A small number (market, trade position) that must fit 32 bits, or [`StoreError::Corrupt`].
fn small(value: i64, what: &'static str, position: u64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt {
        what,
        position,
        problem: format!("number {value} is out of range"),
    })
}

fn decode_user<R: Row>(row: &R) -> Result<UserRow, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let id = from_db(row.try_get("id")?, "user", 0)?;
    Ok(UserRow {
        id,
        username: row.try_get("username")?,
        password_hash: row.try_get("password_hash")?,
        role: row.try_get("role")?,
        created_ms: row.try_get("created_ms")?,
    })
}

fn decode_api_key<R: Row>(row: &R) -> Result<ApiKeyRow, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(ApiKeyRow {
        key_id: row.try_get("key_id")?,
        user_id: from_db(row.try_get("user_id")?, "api key", 0)?,
        secret: row.try_get("secret")?,
        label: row.try_get("label")?,
        created_ms: row.try_get("created_ms")?,
        revoked: row.try_get::<i64, _>("revoked")? != 0,
    })
}

fn decode_order<R: Row>(row: &R) -> Result<OrderRow, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let what = "order";
    let accepted_seq = from_db(row.try_get("accepted_seq")?, what, 0)?;
    let name = |names: &[&'static str], column: &str| -> Result<&'static str, StoreError> {
        let text: String = row.try_get(column)?;
        static_name(names, &text, column, what, accepted_seq)
    };
    Ok(OrderRow {
        market: small(row.try_get("market")?, what, accepted_seq)?,
        order_id: row.try_get::<i64, _>("order_id")? as u64,
        accepted_seq,
        user: row.try_get::<i64, _>("user_id")? as u64,
        side: name(&SIDES, "side")?,
        order_type: name(&ORDER_TYPES, "order_type")?,
        price: row.try_get("price")?,
        qty: row.try_get::<i64, _>("qty")? as u64,
        filled: row.try_get::<i64, _>("filled")? as u64,
        open_qty: row.try_get::<i64, _>("open_qty")? as u64,
        status: name(&ORDER_STATUSES, "status")?,
        updated_seq: from_db(row.try_get("updated_seq")?, what, accepted_seq)?,
    })
}

fn decode_trade<R: Row>(row: &R) -> Result<TradeRow, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let what = "trade";
    let seq = from_db(row.try_get("seq")?, what, 0)?;
    let taker_side: String = row.try_get("taker_side")?;
    Ok(TradeRow {
        seq,
        n: small(row.try_get("n")?, what, seq)?,
        market: small(row.try_get("market")?, what, seq)?,
        maker: row.try_get::<i64, _>("maker")? as u64,
        taker: row.try_get::<i64, _>("taker")? as u64,
        maker_user: row.try_get::<i64, _>("maker_user")? as u64,
        taker_user: row.try_get::<i64, _>("taker_user")? as u64,
        taker_side: static_name(&SIDES, &taker_side, "taker_side", what, seq)?,
        price: row.try_get("price")?,
        qty: row.try_get::<i64, _>("qty")? as u64,
    })
}

impl Store {
    /// Creates a user and returns it with its new id. Fails with [`StoreError::Duplicate`]
    /// (`what: "username"`) when the name is taken; names are compared case-sensitively.
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        let sql = "INSERT INTO users (username, password_hash, role, created_ms) VALUES ($1, $2, $3, $4) RETURNING id";
        let id: i64 = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(username)
                .bind(password_hash)
                .bind(role)
                .bind(now_ms)
                .fetch_one(pool)
                .await
                .map_err(|error| taken(error, "username"))?
                .try_get("id")?
        });
        Ok(UserRow {
            id: from_db(id, "user", 0)?,
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            role: role.to_string(),
            created_ms: now_ms,
        })
    }

    /// The user with this exact (case-sensitive) name.
    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
        let user = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(username)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_user)
                .transpose()?
        });
        Ok(user)
    }

    /// The user with this id.
    pub async fn user_by_id(&self, id: u64) -> Result<Option<UserRow>, StoreError> {
        // Ids are given out from 1 by the database, so one beyond its range names no user.
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        let user = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_user)
                .transpose()?
        });
        Ok(user)
    }

    /// Users with an id above `after_id` in id order, at most `limit` (itself at most
    /// [`limits::PAGE_ROWS_MAX`]): the next page after the last id of the previous one.
    pub async fn users(&self, after_id: u64, limit: usize) -> Result<Vec<UserRow>, StoreError> {
        let after_id = i64::try_from(after_id).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT CAST($2 AS BIGINT)"
        );
        let users = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(after_id)
                .bind(page_limit(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_user)
                .collect::<Result<_, _>>()?
        });
        Ok(users)
    }

    /// How many users there are.
    pub async fn user_count(&self) -> Result<u64, StoreError> {
        let sql = "SELECT COUNT(*) AS n FROM users";
        let n: i64 = on_pool!(self, pool => sqlx::query(sql).fetch_one(pool).await?.try_get("n")?);
        from_db(n, "user count", 0)
    }

    /// Gives a user a new role; false when there is no such user.
    pub async fn set_user_role(&self, id: u64, role: &str) -> Result<bool, StoreError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let sql = "UPDATE users SET role = $1 WHERE id = $2";
        let changed = on_writer!(self, pool => {
            sqlx::query(sql).bind(role).bind(id).execute(pool).await?.rows_affected()
        });
        Ok(changed > 0)
    }

    /// Stores a new API key of `user_id` and returns it. Fails with [`StoreError::Duplicate`]
    /// (`what: "api key"`) when the key id is taken, even by a revoked key, and with
    /// [`StoreError::UnknownUser`] when there is no such user.
    pub async fn create_api_key(
        &self,
        key_id: &str,
        user_id: u64,
        secret: &str,
        label: &str,
        now_ms: i64,
    ) -> Result<ApiKeyRow, StoreError> {
        let Ok(user) = i64::try_from(user_id) else {
            return Err(StoreError::UnknownUser(user_id));
        };
        let sql = "INSERT INTO api_keys (key_id, user_id, secret, label, created_ms, revoked) VALUES ($1, $2, $3, $4, $5, 0)";
        on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(key_id)
                .bind(user)
                .bind(secret)
                .bind(label)
                .bind(now_ms)
                .execute(pool)
                .await
                .map_err(|error| match &error {
                    sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                        StoreError::UnknownUser(user_id)
                    }
                    _ => taken(error, "api key"),
                })?
                .rows_affected()
        });
        Ok(ApiKeyRow {
            key_id: key_id.to_string(),
            user_id,
            secret: secret.to_string(),
            label: label.to_string(),
            created_ms: now_ms,
            revoked: false,
        })
    }

    /// The API key with this id, revoked or not.
    pub async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = $1");
        let key = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(key_id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_api_key)
                .transpose()?
        });
        Ok(key)
    }

    /// A user's API keys: the live ones oldest first, then the revoked ones oldest first; at
    /// most [`limits::PAGE_ROWS_MAX`]. The caller bounds how many live keys a user may hold;
    /// revoked keys are kept and can pile up, so they are the ones a full page leaves out.
    pub async fn api_keys_of(&self, user_id: u64) -> Result<Vec<ApiKeyRow>, StoreError> {
        let Ok(user) = i64::try_from(user_id) else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY revoked, created_ms, key_id LIMIT CAST($2 AS BIGINT)"
        );
        let keys = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(user)
                .bind(page_limit(limits::PAGE_ROWS_MAX))
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_api_key)
                .collect::<Result<_, _>>()?
        });
        Ok(keys)
    }

    /// Marks an API key revoked (a key is never deleted, so its id is never used again).
    /// False when there is no such key or, with `Some(user)`, when it is not that user's; true
    /// also when it was revoked already.
    pub async fn revoke_api_key(
        &self,
        key_id: &str,
        user: Option<u64>,
    ) -> Result<bool, StoreError> {
        let changed = match user {
            None => {
                let sql = "UPDATE api_keys SET revoked = 1 WHERE key_id = $1";
                on_writer!(self, pool => {
                    sqlx::query(sql).bind(key_id).execute(pool).await?.rows_affected()
                })
            }
            Some(user) => {
                let Ok(user) = i64::try_from(user) else {
                    return Ok(false);
                };
                let sql = "UPDATE api_keys SET revoked = 1 WHERE key_id = $1 AND user_id = $2";
                on_writer!(self, pool => {
                    sqlx::query(sql).bind(key_id).bind(user).execute(pool).await?.rows_affected()
                })
            }
        };
        Ok(changed > 0)
    }

    /// The newest row (highest `accepted_seq`) of order `order_id` in `market`: an id can be
    /// used again once its order is gone, and each use has its own row.
    pub async fn order_row(
        &self,
        market: u32,
        order_id: u64,
    ) -> Result<Option<OrderRow>, StoreError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE market = $1 AND order_id = $2 ORDER BY accepted_seq DESC LIMIT 1"
        );
        let order = on_read_models!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(i64::from(market))
                .bind(order_id as i64)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_order)
                .transpose()?
        });
        Ok(order)
    }

    /// The newest row of the order with this id in any market (the server gives ids from one
    /// counter, so an id names one order).
    pub async fn order_by_id(&self, order_id: u64) -> Result<Option<OrderRow>, StoreError> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1 ORDER BY accepted_seq DESC LIMIT 1"
        );
        let order = on_read_models!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(order_id as i64)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_order)
                .transpose()?
        });
        Ok(order)
    }

    /// A user's orders, newest first (by `accepted_seq`, which is unique: a command accepts
    /// at most one order), optionally only one market and/or one status (`open`, `filled`,
    /// `cancelled`, `expired`), and only those accepted before `before_seq` when given: the
    /// next page after the last `accepted_seq` of the previous one. At most `limit` (itself
    /// at most [`limits::PAGE_ROWS_MAX`]).
    pub async fn orders_of_user(
        &self,
        user: u64,
        market: Option<u32>,
        status: Option<&str>,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<OrderRow>, StoreError> {
        // Each combination of filters is its own statement, so that each gets the plan of the
        // index that serves it (orders_by_user with a status, orders_by_user_seq without).
        let orders = on_read_models!(self, pool => {
            let mut query =
                sqlx::QueryBuilder::new(format!("SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = "));
            query.push_bind(user as i64);
            if let Some(market) = market {
                query.push(" AND market = ").push_bind(i64::from(market));
            }
            if let Some(status) = status {
                query.push(" AND status = ").push_bind(status);
            }
            if let Some(before_seq) = before_seq {
                let before_seq = i64::try_from(before_seq).unwrap_or(i64::MAX);
                query.push(" AND accepted_seq < ").push_bind(before_seq);
            }
            query
                .push(" ORDER BY accepted_seq DESC LIMIT CAST(")
                .push_bind(page_limit(limit))
                .push(" AS BIGINT)");
            query
                .build()
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_order)
                .collect::<Result<_, _>>()?
        });
        Ok(orders)
    }

    /// Trades in which the user is the maker or the taker (or both), newest first (by `seq`,
    /// then `n`), optionally only one market; at most `limit` (itself at most
    /// [`limits::PAGE_ROWS_MAX`]).
    pub async fn trades_of_user(
        &self,
        user: u64,
        market: Option<u32>,
        limit: usize,
    ) -> Result<Vec<TradeRow>, StoreError> {
        // One newest-first walk per side, each on its own index and each stopped at the limit,
        // then merged: an `OR` of the two would read and sort all of the user's trades. A
        // trade with oneself is taken from the maker side only.
        let sql = format!(
            "SELECT {TRADE_COLUMNS} FROM (SELECT {TRADE_COLUMNS} FROM trades WHERE maker_user = $1 AND ($2 IS NULL OR market = $2) ORDER BY seq DESC, n DESC LIMIT CAST($3 AS BIGINT)) AS made \
             UNION ALL \
             SELECT {TRADE_COLUMNS} FROM (SELECT {TRADE_COLUMNS} FROM trades WHERE taker_user = $1 AND maker_user <> $1 AND ($2 IS NULL OR market = $2) ORDER BY seq DESC, n DESC LIMIT CAST($3 AS BIGINT)) AS took \
             ORDER BY seq DESC, n DESC LIMIT CAST($3 AS BIGINT)"
        );
        let trades = on_read_models!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(user as i64)
                .bind(market.map(i64::from))
                .bind(page_limit(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_trade)
                .collect::<Result<_, _>>()?
        });
        Ok(trades)
    }

    /// A market's newest trades, newest first (by `seq`, then `n`); at most `limit` (itself
    /// at most [`limits::PAGE_ROWS_MAX`]).
    pub async fn recent_trades(
        &self,
        market: u32,
        limit: usize,
    ) -> Result<Vec<TradeRow>, StoreError> {
        let sql = format!(
            "SELECT {TRADE_COLUMNS} FROM trades WHERE market = $1 ORDER BY seq DESC, n DESC LIMIT CAST($2 AS BIGINT)"
        );
        let trades = on_read_models!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(i64::from(market))
                .bind(page_limit(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_trade)
                .collect::<Result<_, _>>()?
        });
        Ok(trades)
    }

    /// The largest order id the `orders` read model holds, in any market (0 when none).
    pub async fn max_order_id(&self) -> Result<u64, StoreError> {
        let sql = "SELECT COALESCE(MAX(order_id), 0) AS id FROM orders";
        let id: i64 =
            on_read_models!(self, pool => sqlx::query(sql).fetch_one(pool).await?.try_get("id")?);
        Ok(id as u64)
    }
}
