//! Public market data: assets, markets, depth, ticker, 24 h statistics and recent trades.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use book::{MarketId, MarketSpec, Settlement};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;
use crate::error::{ApiError, ErrorBody};
use crate::wire::{from_units, price_text, qty_text};

/// Most depth levels per side one request returns.
pub const DEPTH_LEVELS_MAX: usize = 500;
/// Most trades one request returns.
pub const TRADES_PAGE_MAX: usize = 1_000;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(assets))
        .routes(routes!(markets))
        .routes(routes!(market))
        .routes(routes!(depth))
        .routes(routes!(ticker))
        .routes(routes!(market_trades))
}

/// An asset.
#[derive(Serialize, ToSchema)]
pub struct AssetView {
    /// Id.
    pub id: u32,
    /// Symbol.
    pub symbol: String,
    /// Decimal places of its minor unit.
    pub decimals: u32,
    /// Everything deposited minus everything withdrawn.
    pub supply: String,
}

/// A market.
#[derive(Serialize, ToSchema)]
pub struct MarketView {
    /// Symbol, `BASE-QUOTE`.
    pub symbol: String,
    /// Base asset symbol.
    pub base: String,
    /// Quote asset symbol.
    pub quote: String,
    /// Price step.
    pub tick: String,
    /// Quantity step.
    pub lot: String,
    /// `instant` or `escrow`.
    pub settlement: String,
    /// Resting side's fee, basis points.
    pub maker_fee_bps: u32,
    /// Incoming side's fee, basis points.
    pub taker_fee_bps: u32,
    /// Smallest order quantity.
    pub min_qty: Option<String>,
    /// Largest order quantity.
    pub max_qty: Option<String>,
    /// Payment methods orders may name.
    pub payment_methods: Vec<String>,
}

/// The market an id names, as the API shows it.
pub fn market_view(state: &agora_core::State, market: MarketId) -> Option<MarketView> {
    let spec = state.engine().market_spec(market)?;
    let config = state.market(market)?;
    let symbol_of = |asset| {
        state
            .ledger()
            .asset(asset)
            .map_or_else(|| asset.to_string(), |a| a.symbol.clone())
    };
    Some(MarketView {
        symbol: spec.symbol.clone(),
        base: symbol_of(config.base),
        quote: symbol_of(config.quote),
        tick: price_text(spec, book::Price(spec.tick)),
        lot: qty_text(spec, book::Qty(spec.lot)),
        settlement: match spec.settlement {
            Settlement::Instant => "instant".into(),
            Settlement::Escrow => "escrow".into(),
        },
        maker_fee_bps: config.maker_fee_bps,
        taker_fee_bps: config.taker_fee_bps,
        min_qty: spec.min_qty.map(|q| qty_text(spec, q)),
        max_qty: spec.max_qty.map(|q| qty_text(spec, q)),
        payment_methods: spec.payment_methods.clone(),
    })
}

/// Looks a market up by symbol, with its spec; 404 when unknown.
pub async fn find_market(app: &App, symbol: &str) -> Result<(MarketId, MarketSpec), ApiError> {
    app.market_by_symbol(symbol).await
}

/// The market a filter names, if it names one.
pub async fn optional_market(
    app: &App,
    symbol: Option<&str>,
) -> Result<Option<MarketId>, ApiError> {
    match symbol {
        Some(symbol) => Ok(Some(find_market(app, symbol).await?.0)),
        None => Ok(None),
    }
}

#[utoipa::path(get, path = "/api/v1/assets", tag = "market data", summary = "Every asset",
    responses((status = 200, description = "Assets", body = Vec<AssetView>)))]
async fn assets(State(app): State<Arc<App>>) -> Result<Json<Vec<AssetView>>, ApiError> {
    let views = app
        .read(|state| {
            state
                .ledger()
                .assets()
                .map(|(id, asset)| AssetView {
                    id,
                    symbol: asset.symbol.clone(),
                    decimals: asset.decimals,
                    supply: from_units(asset.supply, asset.decimals),
                })
                .collect()
        })
        .await?;
    Ok(Json(views))
}

#[utoipa::path(get, path = "/api/v1/markets", tag = "market data", summary = "Every market",
    responses((status = 200, description = "Markets", body = Vec<MarketView>)))]
async fn markets(State(app): State<Arc<App>>) -> Result<Json<Vec<MarketView>>, ApiError> {
    let views = app
        .read(|state| {
            state
                .engine()
                .markets()
                .filter_map(|m| market_view(state, m))
                .collect()
        })
        .await?;
    Ok(Json(views))
}

#[utoipa::path(get, path = "/api/v1/markets/{market}", tag = "market data", summary = "One market",
    params(("market" = String, Path, description = "Symbol, such as BTC-USDT")),
    responses(
        (status = 200, description = "The market", body = MarketView),
        (status = 404, description = "No such market", body = ErrorBody),
    ))]
async fn market(
    State(app): State<Arc<App>>,
    Path(symbol): Path<String>,
) -> Result<Json<MarketView>, ApiError> {
    let (id, _) = find_market(&app, &symbol).await?;
    let view = app.read(move |state| market_view(state, id)).await?;
    view.map(Json)
        .ok_or_else(|| ApiError::not_found("UNKNOWN_MARKET", "no such market"))
}

/// How many levels.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DepthQuery {
    /// Levels per side, 1 to 500 (default 50).
    pub levels: Option<usize>,
}

/// One price level.
#[derive(Serialize, ToSchema)]
pub struct LevelJson {
    /// Price.
    pub price: String,
    /// Open quantity at it.
    pub qty: String,
    /// Orders at it.
    pub orders: u32,
}

/// Aggregated depth.
#[derive(Serialize, ToSchema)]
pub struct DepthView {
    /// Market.
    pub market: String,
    /// Bids, best first.
    pub bids: Vec<LevelJson>,
    /// Asks, best first.
    pub asks: Vec<LevelJson>,
}

#[utoipa::path(get, path = "/api/v1/markets/{market}/depth", tag = "market data", summary = "Order book depth",
    params(("market" = String, Path, description = "Symbol"), DepthQuery),
    responses(
        (status = 200, description = "Depth", body = DepthView),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "levels out of range", body = ErrorBody),
    ))]
async fn depth(
    State(app): State<Arc<App>>,
    Path(symbol): Path<String>,
    Query(query): Query<DepthQuery>,
) -> Result<Json<DepthView>, ApiError> {
    let levels = query.levels.unwrap_or(50);
    if !(1..=DEPTH_LEVELS_MAX).contains(&levels) {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "levels",
            format!("levels must be 1 to {DEPTH_LEVELS_MAX}"),
        ));
    }
    let (id, spec) = find_market(&app, &symbol).await?;
    let depth = app
        .read(move |state| state.engine().depth(id, levels))
        .await?
        .unwrap_or_default();
    let side = |levels: Vec<book::LevelView>| {
        levels
            .into_iter()
            .map(|l| LevelJson {
                price: price_text(&spec, l.price),
                qty: qty_text(&spec, l.qty),
                orders: l.orders,
            })
            .collect()
    };
    Ok(Json(DepthView {
        market: symbol,
        bids: side(depth.bids),
        asks: side(depth.asks),
    }))
}

/// Best prices and 24 h statistics.
#[derive(Serialize, ToSchema)]
pub struct TickerView {
    /// Market.
    pub market: String,
    /// Best bid price.
    pub bid: Option<String>,
    /// Quantity at the best bid.
    pub bid_qty: Option<String>,
    /// Best ask price.
    pub ask: Option<String>,
    /// Quantity at the best ask.
    pub ask_qty: Option<String>,
    /// Last trade price.
    pub last: Option<String>,
    /// First trade price of the last 24 h.
    pub open_24h: Option<String>,
    /// Highest of the last 24 h.
    pub high_24h: Option<String>,
    /// Lowest of the last 24 h.
    pub low_24h: Option<String>,
    /// Base traded in the last 24 h.
    pub volume_24h: String,
    /// Quote traded in the last 24 h.
    pub quote_volume_24h: String,
    /// Trades in the last 24 h.
    pub trades_24h: u64,
}

#[utoipa::path(get, path = "/api/v1/markets/{market}/ticker", tag = "market data", summary = "Best bid and offer, last price, 24 h statistics",
    params(("market" = String, Path, description = "Symbol")),
    responses(
        (status = 200, description = "Ticker", body = TickerView),
        (status = 404, description = "No such market", body = ErrorBody),
    ))]
async fn ticker(
    State(app): State<Arc<App>>,
    Path(symbol): Path<String>,
) -> Result<Json<TickerView>, ApiError> {
    let (id, spec) = find_market(&app, &symbol).await?;
    let (best, last, stats) = app
        .read(move |state| {
            let engine = state.engine();
            (
                engine.best_bid_ask(id),
                engine.last_price(id),
                engine.stats_24h(id),
            )
        })
        .await?;
    let (bid, ask) = best.unwrap_or((None, None));
    let stats = stats.unwrap_or_default();
    let price = |p: Option<book::Price>| p.map(|p| price_text(&spec, p));
    Ok(Json(TickerView {
        market: symbol,
        bid: bid.map(|l| price_text(&spec, l.price)),
        bid_qty: bid.map(|l| qty_text(&spec, l.qty)),
        ask: ask.map(|l| price_text(&spec, l.price)),
        ask_qty: ask.map(|l| qty_text(&spec, l.qty)),
        last: price(last),
        open_24h: price(stats.open),
        high_24h: price(stats.high),
        low_24h: price(stats.low),
        volume_24h: from_units(stats.volume, spec.qty_decimals),
        quote_volume_24h: from_units(stats.quote_volume, spec.price_decimals + spec.qty_decimals),
        trades_24h: stats.trades,
    }))
}

/// A page size.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TradesQuery {
    /// At most this many, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// A public trade.
#[derive(Serialize, ToSchema)]
pub struct PublicTrade {
    /// Journal sequence number of the command that caused it.
    pub seq: u64,
    /// Price.
    pub price: String,
    /// Quantity.
    pub qty: String,
    /// The incoming order's side.
    pub taker_side: String,
}

/// Checks a page size.
pub fn page_limit(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=TRADES_PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "limit",
            format!("limit must be 1 to {TRADES_PAGE_MAX}"),
        ));
    }
    Ok(limit)
}

#[utoipa::path(get, path = "/api/v1/markets/{market}/trades", tag = "market data", summary = "A market's recent trades",
    params(("market" = String, Path, description = "Symbol"), TradesQuery),
    responses(
        (status = 200, description = "Trades, newest first", body = Vec<PublicTrade>),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody),
    ))]
async fn market_trades(
    State(app): State<Arc<App>>,
    Path(symbol): Path<String>,
    Query(query): Query<TradesQuery>,
) -> Result<Json<Vec<PublicTrade>>, ApiError> {
    let limit = page_limit(query.limit, 100)?;
    let (id, spec) = find_market(&app, &symbol).await?;
    app.caught_up().await?;
    let rows = app.store.recent_trades(id.0, limit).await?;
    Ok(Json(
        rows.into_iter()
            .map(|t| PublicTrade {
                seq: t.seq,
                price: price_text(&spec, book::Price(t.price)),
                qty: qty_text(&spec, book::Qty(t.qty)),
                taker_side: t.taker_side.into(),
            })
            .collect(),
    ))
}
