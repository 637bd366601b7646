//! Administration: users, assets, markets, deposits and reputation. Every route needs the
//! admin role, except halting and resuming a market, which operators may do.

use std::sync::Arc;

use agora_core::CoreCommand;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use book::MarketSpec;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::account::UserView;
use super::created;
use super::market::{AssetView, MarketView, find_market, market_view};
use crate::app::{App, now_ms};
use crate::auth::{self, Caller, Role};
use crate::error::{ApiError, Body, ErrorBody};
use crate::wire::{self, SettlementName, StpName, from_units};

/// Longest user name.
pub const USERNAME_CHARS_MAX: usize = 64;
/// Longest asset symbol.
pub const ASSET_SYMBOL_CHARS_MAX: usize = 12;
/// Most decimal places of an asset.
pub const ASSET_DECIMALS_MAX: u32 = 18;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(create_user, list_users))
        .routes(routes!(create_asset))
        .routes(routes!(create_market))
        .routes(routes!(update_market))
        .routes(routes!(halt_market))
        .routes(routes!(resume_market))
        .routes(routes!(deposit))
        .routes(routes!(set_reputation))
}

/// A new user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Name: letters, digits, `.`, `_` and `-`, 1 to 64.
    pub username: String,
    /// Password, 8 to 256 bytes.
    pub password: String,
    /// `user` (default), `operator` or `admin`.
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    "user".into()
}

#[utoipa::path(post, path = "/api/v1/admin/users", tag = "admin", summary = "Create a user",
    security(("session" = []), ("api_key" = [])),
    request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = UserView),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn create_user(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(new): Body<NewUser>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let name_ok = !new.username.is_empty()
        && new.username.chars().count() <= USERNAME_CHARS_MAX
        && new
            .username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !name_ok {
        return Err(ApiError::invalid(
            "INVALID_USERNAME",
            "username",
            format!("username must be 1 to {USERNAME_CHARS_MAX} letters, digits, '.', '_' or '-'"),
        ));
    }
    let role = Role::parse(&new.role).ok_or_else(|| {
        ApiError::invalid(
            "INVALID_ROLE",
            "role",
            "role must be user, operator or admin",
        )
    })?;
    auth::check_password(&new.password)?;
    let password = new.password;
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(ApiError::internal)??;
    match app
        .store
        .create_user(&new.username, &hash, role.as_str(), now_ms())
        .await
    {
        Ok(row) => Ok(created(UserView::from(row))),
        Err(store::StoreError::Duplicate { .. }) => Err(ApiError::conflict(
            "USERNAME_TAKEN",
            "a user with this name exists",
        )
        .field("username")),
        Err(error) => Err(error.into()),
    }
}

/// A page of users.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsersQuery {
    /// Users with a larger id than this.
    pub after: Option<u64>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin", summary = "List users by id",
    security(("session" = []), ("api_key" = [])),
    params(UsersQuery),
    responses(
        (status = 200, description = "Users", body = Vec<UserView>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody),
    ))]
async fn list_users(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(query): Query<UsersQuery>,
) -> Result<Json<Vec<UserView>>, ApiError> {
    caller.require(Role::Admin)?;
    let limit = super::market::page_limit(query.limit, 100)?;
    let rows = app.store.users(query.after.unwrap_or(0), limit).await?;
    Ok(Json(rows.into_iter().map(UserView::from).collect()))
}

/// A new asset.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAsset {
    /// Symbol: 1 to 12 upper-case letters or digits.
    pub symbol: String,
    /// Decimal places of its minor unit, 0 to 18.
    pub decimals: u32,
}

#[utoipa::path(post, path = "/api/v1/admin/assets", tag = "admin", summary = "Register an asset",
    security(("session" = []), ("api_key" = [])),
    request_body = NewAsset,
    responses(
        (status = 201, description = "Registered", body = AssetView),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "The symbol is taken", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn create_asset(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(new): Body<NewAsset>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let symbol_ok = !new.symbol.is_empty()
        && new.symbol.len() <= ASSET_SYMBOL_CHARS_MAX
        && new
            .symbol
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !symbol_ok {
        return Err(ApiError::invalid(
            "INVALID_SYMBOL",
            "symbol",
            format!("symbol must be 1 to {ASSET_SYMBOL_CHARS_MAX} upper-case letters or digits"),
        ));
    }
    if new.decimals > ASSET_DECIMALS_MAX {
        return Err(ApiError::invalid(
            "INVALID_DECIMALS",
            "decimals",
            format!("decimals must be 0 to {ASSET_DECIMALS_MAX}"),
        ));
    }
    // Ids come from the state; the lock keeps two creations from choosing the same one.
    let _guard = app.admin_lock.lock().await;
    let symbol = new.symbol.clone();
    let (taken, next_id) = app
        .read(move |state| {
            let assets = state.ledger().assets();
            let mut taken = false;
            let mut max = 0;
            for (id, asset) in assets {
                taken |= asset.symbol == symbol;
                max = max.max(id);
            }
            (taken, max + 1)
        })
        .await?;
    if taken {
        return Err(
            ApiError::conflict("ASSET_EXISTS", "an asset with this symbol exists").field("symbol"),
        );
    }
    app.submit(CoreCommand::CreateAsset {
        asset: next_id,
        symbol: new.symbol.clone(),
        decimals: new.decimals,
    })
    .await?;
    Ok(created(AssetView {
        id: next_id,
        symbol: new.symbol,
        decimals: new.decimals,
        supply: from_units(0, new.decimals),
    }))
}

/// The id and decimals of the asset with this symbol; 422 `UNKNOWN_ASSET` on `field`.
pub(super) async fn asset_by_symbol(
    app: &App,
    symbol: &str,
    field: &str,
) -> Result<(u32, u32), ApiError> {
    let wanted = symbol.to_string();
    app.read(move |state| {
        state
            .ledger()
            .assets()
            .find(|(_, a)| a.symbol == wanted)
            .map(|(id, a)| (id, a.decimals))
    })
    .await?
    .ok_or_else(|| ApiError::invalid("UNKNOWN_ASSET", field, format!("no asset {symbol}")))
}

/// A new market.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMarket {
    /// `BASE-QUOTE`, both registered assets.
    pub symbol: String,
    /// Price step, such as "0.01".
    pub tick: String,
    /// Quantity step, such as "0.0001".
    pub lot: String,
    /// `instant` (default) or `escrow`.
    #[serde(default)]
    pub settlement: SettlementName,
    /// Resting side's fee in basis points (default 0).
    #[serde(default)]
    pub maker_fee_bps: u32,
    /// Incoming side's fee in basis points (default 0).
    #[serde(default)]
    pub taker_fee_bps: u32,
    /// Smallest order quantity.
    pub min_qty: Option<String>,
    /// Largest order quantity.
    pub max_qty: Option<String>,
    /// Largest distance of a limit price from the last trade, basis points.
    pub price_band_bps: Option<u32>,
    /// Default self-trade prevention.
    pub stp: Option<StpName>,
    /// Payment methods orders may name (escrow markets).
    #[serde(default)]
    pub payment_methods: Vec<String>,
}

fn step(field: &str, text: &str) -> Result<(u32, u64), ApiError> {
    let value = wire::decimal(field, text)?.normalize();
    let invalid = || {
        ApiError::invalid(
            "INVALID_MARKET",
            field,
            format!(
                "{field} must be positive with at most {} decimal places",
                book::limits::DECIMALS_MAX
            ),
        )
    };
    if value.is_zero() || value.scale() > book::limits::DECIMALS_MAX {
        return Err(invalid());
    }
    let units = u64::try_from(value.mantissa()).map_err(|_| invalid())?;
    Ok((value.scale(), units))
}

#[utoipa::path(post, path = "/api/v1/admin/markets", tag = "admin", summary = "Create a market",
    security(("session" = []), ("api_key" = [])),
    request_body = NewMarket,
    responses(
        (status = 201, description = "Created", body = MarketView),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "The market exists", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn create_market(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(new): Body<NewMarket>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let (base_symbol, quote_symbol) = new.symbol.split_once('-').ok_or_else(|| {
        ApiError::invalid("INVALID_MARKET", "symbol", "symbol must be BASE-QUOTE")
    })?;
    let (price_decimals, tick) = step("tick", &new.tick)?;
    let (qty_decimals, lot) = step("lot", &new.lot)?;
    let tick = i64::try_from(tick)
        .map_err(|_| ApiError::invalid("INVALID_MARKET", "tick", "tick is too large"))?;
    let mut spec = MarketSpec::new(new.symbol.clone(), price_decimals, qty_decimals, tick, lot);
    spec.min_qty = new
        .min_qty
        .as_deref()
        .map(|t| wire::qty(&spec, "min_qty", t))
        .transpose()?;
    spec.max_qty = new
        .max_qty
        .as_deref()
        .map(|t| wire::qty(&spec, "max_qty", t))
        .transpose()?;
    spec.price_band_bps = new.price_band_bps;
    spec.settlement = match new.settlement {
        SettlementName::Instant => book::Settlement::Instant,
        SettlementName::Escrow => book::Settlement::Escrow,
    };
    if let Some(stp) = new.stp {
        spec.default_stp = stp.into();
    }
    if new.payment_methods.len() > book::limits::PAYMENT_METHODS_PER_MARKET_MAX {
        return Err(ApiError::invalid(
            "INVALID_MARKET",
            "payment_methods",
            format!(
                "at most {} payment methods",
                book::limits::PAYMENT_METHODS_PER_MARKET_MAX
            ),
        ));
    }
    spec.payment_methods = new.payment_methods;
    if let Err(e) = spec.validate() {
        let field = if e.field == "market" {
            "symbol"
        } else {
            e.field
        };
        return Err(ApiError::invalid(
            "INVALID_MARKET",
            field,
            format!("{field}: {}", e.rule),
        ));
    }
    let (base, _) = asset_by_symbol(&app, base_symbol, "symbol").await?;
    let (quote, _) = asset_by_symbol(&app, quote_symbol, "symbol").await?;
    app.submit(CoreCommand::CreateMarket {
        spec,
        base,
        quote,
        maker_fee_bps: new.maker_fee_bps,
        taker_fee_bps: new.taker_fee_bps,
    })
    .await
    .map_err(|e| match e.code {
        "INVALID_FEE" => ApiError {
            field: Some("maker_fee_bps".into()),
            ..e
        },
        _ => e,
    })?;
    let (id, _) = find_market(&app, &new.symbol).await?;
    let view = app.read(move |state| market_view(state, id)).await?;
    Ok(created(view.ok_or_else(|| {
        ApiError::internal("a created market is missing")
    })?))
}

/// A change to a market's terms; fields left out stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarketUpdate {
    /// Resting side's fee, basis points (at most 1000).
    #[schema(maximum = 1000)]
    pub maker_fee_bps: Option<u32>,
    /// Incoming side's fee, basis points.
    #[schema(maximum = 1000)]
    pub taker_fee_bps: Option<u32>,
}

#[utoipa::path(patch, path = "/api/v1/admin/markets/{market}", tag = "admin",
    summary = "Change a market's fees (they apply from the next trade)",
    security(("session" = []), ("api_key" = [])),
    params(("market" = String, Path, description = "Market symbol, BASE-QUOTE")),
    request_body = MarketUpdate,
    responses(
        (status = 200, description = "Changed and durable", body = MarketView),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn update_market(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(symbol): Path<String>,
    Body(update): Body<MarketUpdate>,
) -> Result<Json<MarketView>, ApiError> {
    caller.require(Role::Admin)?;
    let (id, _) = find_market(&app, &symbol).await?;
    if update.maker_fee_bps.is_none() && update.taker_fee_bps.is_none() {
        return Err(ApiError::invalid(
            "NOTHING_TO_CHANGE",
            "maker_fee_bps",
            "name at least one of maker_fee_bps and taker_fee_bps",
        ));
    }
    for (field, value) in [
        ("maker_fee_bps", update.maker_fee_bps),
        ("taker_fee_bps", update.taker_fee_bps),
    ] {
        if value.is_some_and(|v| v > agora_core::limits::FEE_BPS_MAX) {
            return Err(ApiError::invalid(
                "INVALID_FEE",
                field,
                format!(
                    "{field} must be at most {}",
                    agora_core::limits::FEE_BPS_MAX
                ),
            ));
        }
    }
    let current = app
        .read(move |state| state.market(id).map(|c| (c.maker_fee_bps, c.taker_fee_bps)))
        .await?
        .ok_or_else(|| ApiError::not_found("UNKNOWN_MARKET", "no such market"))?;
    app.submit(CoreCommand::SetMarketFees {
        market: id,
        maker_fee_bps: update.maker_fee_bps.unwrap_or(current.0),
        taker_fee_bps: update.taker_fee_bps.unwrap_or(current.1),
    })
    .await?;
    market_answer(&app, id).await
}

async fn market_answer(app: &App, id: book::MarketId) -> Result<Json<MarketView>, ApiError> {
    app.read(move |state| market_view(state, id))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::internal("a known market is missing"))
}

#[utoipa::path(post, path = "/api/v1/admin/markets/{market}/halt", tag = "admin",
    summary = "Halt a market: no new or modified orders, cancels still taken",
    description = "Needs the operator role. Halting a halted market changes nothing.",
    security(("session" = []), ("api_key" = [])),
    params(("market" = String, Path, description = "Market symbol, BASE-QUOTE")),
    responses(
        (status = 200, description = "Halted and durable", body = MarketView),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
    ))]
async fn halt_market(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(symbol): Path<String>,
) -> Result<Json<MarketView>, ApiError> {
    caller.require(Role::Operator)?;
    let (id, _) = find_market(&app, &symbol).await?;
    app.submit(CoreCommand::HaltMarket { market: id }).await?;
    market_answer(&app, id).await
}

#[utoipa::path(post, path = "/api/v1/admin/markets/{market}/resume", tag = "admin",
    summary = "Resume a halted market",
    description = "Needs the operator role. Resuming an active market changes nothing.",
    security(("session" = []), ("api_key" = [])),
    params(("market" = String, Path, description = "Market symbol, BASE-QUOTE")),
    responses(
        (status = 200, description = "Resumed and durable", body = MarketView),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
    ))]
async fn resume_market(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(symbol): Path<String>,
) -> Result<Json<MarketView>, ApiError> {
    caller.require(Role::Operator)?;
    let (id, _) = find_market(&app, &symbol).await?;
    app.submit(CoreCommand::ResumeMarket { market: id }).await?;
    market_answer(&app, id).await
}

/// Funds arriving for a user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeposit {
    /// The user credited.
    pub user_id: u64,
    /// Asset symbol.
    pub asset: String,
    /// Amount, a decimal string.
    pub amount: String,
}

/// A credited deposit.
#[derive(Serialize, ToSchema)]
pub struct Deposited {
    /// Journal sequence number of the command.
    pub seq: u64,
    /// The user's available balance after it.
    pub available: String,
}

#[utoipa::path(post, path = "/api/v1/admin/deposits", tag = "admin", summary = "Credit a deposit",
    security(("session" = []), ("api_key" = [])),
    request_body = NewDeposit,
    responses(
        (status = 201, description = "Credited and durable", body = Deposited),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn deposit(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(new): Body<NewDeposit>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    if app.store.user_by_id(new.user_id).await?.is_none() {
        return Err(ApiError::not_found("UNKNOWN_USER", "no such user").field("user_id"));
    }
    let asset = asset_by_symbol(&app, &new.asset, "asset").await?;
    let amount = wire::amount("amount", &new.amount, asset.1)?;
    if amount == 0 {
        return Err(ApiError::invalid(
            "INVALID_AMOUNT",
            "amount",
            "amount must be positive",
        ));
    }
    let ack = app
        .submit(CoreCommand::Deposit {
            user: new.user_id,
            asset: asset.0,
            amount,
        })
        .await?;
    let user = new.user_id;
    let balance = app
        .read(move |state| state.ledger().balance(ledger::Owner::User(user), asset.0))
        .await?;
    Ok(created(Deposited {
        seq: ack.seq,
        available: from_units(balance.available, asset.1),
    }))
}

/// A reputation score.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewReputation {
    /// Score used by markets' tiers and orders' minimums.
    pub reputation: u32,
}

#[utoipa::path(put, path = "/api/v1/admin/users/{id}/reputation", tag = "admin", summary = "Set a user's reputation",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "User id")),
    request_body = NewReputation,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "The id is not a user id, or the body is not JSON", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn set_reputation(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
    Body(new): Body<NewReputation>,
) -> Result<axum::http::StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    if app.store.user_by_id(id).await?.is_none() {
        return Err(ApiError::not_found("UNKNOWN_USER", "no such user"));
    }
    app.submit(CoreCommand::SetReputation {
        user: id,
        reputation: new.reputation,
    })
    .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
