//! Public market data: assets, markets, depth, ticker, 24 h statistics, recent trades, candles,
//! liquidity near the mid price and the price impact of a hypothetical sweep.

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
use crate::wire::{self, SideName, from_units, price_text, qty_text};

/// Most depth levels per side one request returns.
pub const DEPTH_LEVELS_MAX: usize = 500;
/// Most trades one request returns.
pub const TRADES_PAGE_MAX: usize = 1_000;
/// Most candles one request returns (what the engine keeps per interval).
pub const CANDLES_MAX: usize = book::limits::CANDLES_KEPT_MAX;
/// Widest liquidity band, in basis points (the whole of one side).
pub const LIQUIDITY_BAND_BPS_MAX: u32 = 10_000;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(assets))
        .routes(routes!(markets))
        .routes(routes!(market))
        .routes(routes!(depth))
        .routes(routes!(ticker))
        .routes(routes!(market_trades))
        .routes(routes!(candles))
        .routes(routes!(liquidity))
        .routes(routes!(price_impact))
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
    /// `active`, or `halted`: no new or modified orders, cancels still taken.
    pub status: String,
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
        status: if config.halted { "halted" } else { "active" }.into(),
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
    #[param(minimum = 1, maximum = 500)]
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
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
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
    #[param(minimum = 1, maximum = 1000)]
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
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
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

/// Which candles.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CandlesQuery {
    /// `1m` (default), `5m`, `1h` or `1d`.
    pub interval: Option<String>,
    /// The last this many intervals that had trades, 1 to 1440 (default 100).
    #[param(minimum = 1, maximum = 1440)]
    pub limit: Option<usize>,
}

/// Open, high, low and close of one interval.
#[derive(Serialize, ToSchema)]
pub struct CandleView {
    /// Start of the interval, ms since the epoch.
    pub open_time: i64,
    /// First trade price.
    pub open: String,
    /// Highest trade price.
    pub high: String,
    /// Lowest trade price.
    pub low: String,
    /// Last trade price.
    pub close: String,
    /// Base traded.
    pub volume: String,
    /// Quote traded.
    pub quote_volume: String,
    /// Trades.
    pub trades: u64,
}

#[utoipa::path(get, path = "/api/v1/markets/{market}/candles", tag = "market data", summary = "Candles of one interval, oldest first",
    params(("market" = String, Path, description = "Symbol"), CandlesQuery),
    responses(
        (status = 200, description = "Candles, oldest first; intervals without trades are absent", body = Vec<CandleView>),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "interval or limit out of range", body = ErrorBody),
    ))]
async fn candles(
    State(app): State<Arc<App>>,
    Path(symbol): Path<String>,
    Query(query): Query<CandlesQuery>,
) -> Result<Json<Vec<CandleView>>, ApiError> {
    let wanted = query.interval.as_deref().unwrap_or("1m");
    let interval = book::Interval::ALL
        .into_iter()
        .find(|i| i.as_str() == wanted)
        .ok_or_else(|| {
            ApiError::invalid(
                "INVALID_FIELD",
                "interval",
                "interval must be 1m, 5m, 1h or 1d",
            )
        })?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=CANDLES_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "limit",
            format!("limit must be 1 to {CANDLES_MAX}"),
        ));
    }
    let (id, spec) = find_market(&app, &symbol).await?;
    let candles = app
        .read(move |state| state.engine().candles(id, interval, limit))
        .await?;
    Ok(Json(
        candles
            .into_iter()
            .map(|c| CandleView {
                open_time: c.open_time,
                open: price_text(&spec, c.open),
                high: price_text(&spec, c.high),
                low: price_text(&spec, c.low),
                close: price_text(&spec, c.close),
                volume: from_units(c.volume, spec.qty_decimals),
                quote_volume: from_units(c.quote_volume, spec.price_decimals + spec.qty_decimals),
                trades: c.trades,
            })
            .collect(),
    ))
}

/// How wide a band.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LiquidityQuery {
    /// Band around the mid price in basis points, 1 to 10000 (default 100, 1%).
    #[param(minimum = 1, maximum = 10000)]
    pub band_bps: Option<u32>,
}

/// Resting quantity and notional near the mid price.
#[derive(Serialize, ToSchema)]
pub struct LiquidityView {
    /// Market.
    pub market: String,
    /// Band around the mid price, basis points.
    pub band_bps: u32,
    /// Mid price, `(best bid + best ask) / 2`; absent unless both sides have orders.
    pub mid: Option<String>,
    /// Bid quantity priced within the band.
    pub bid_qty: String,
    /// Bid notional (quote) within the band.
    pub bid_notional: String,
    /// Ask quantity within the band.
    pub ask_qty: String,
    /// Ask notional within the band.
    pub ask_notional: String,
}

#[utoipa::path(get, path = "/api/v1/markets/{market}/liquidity", tag = "market data", summary = "Resting liquidity within a band around the mid price",
    params(("market" = String, Path, description = "Symbol"), LiquidityQuery),
    responses(
        (status = 200, description = "Liquidity; zero on both sides unless both sides have orders", body = LiquidityView),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "band_bps out of range", body = ErrorBody),
    ))]
async fn liquidity(
    State(app): State<Arc<App>>,
    Path(symbol): Path<String>,
    Query(query): Query<LiquidityQuery>,
) -> Result<Json<LiquidityView>, ApiError> {
    let band_bps = query.band_bps.unwrap_or(100);
    if !(1..=LIQUIDITY_BAND_BPS_MAX).contains(&band_bps) {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "band_bps",
            format!("band_bps must be 1 to {LIQUIDITY_BAND_BPS_MAX}"),
        ));
    }
    let (id, spec) = find_market(&app, &symbol).await?;
    let (liquidity, best) = app
        .read(move |state| {
            let engine = state.engine();
            (engine.liquidity(id, band_bps), engine.best_bid_ask(id))
        })
        .await?;
    // The mid price has at most one more decimal place than the prices: half a tick.
    let mid = match best {
        Some((Some(bid), Some(ask))) => {
            let twice = i128::from(bid.price.0) + i128::from(ask.price.0);
            u128::try_from(twice)
                .ok()
                .map(|twice| from_units(twice * 5, spec.price_decimals + 1))
        }
        _ => None,
    };
    let notional_decimals = spec.price_decimals + spec.qty_decimals;
    let l = liquidity.unwrap_or(book::Liquidity {
        band_bps,
        bid_qty: 0,
        bid_notional: 0,
        ask_qty: 0,
        ask_notional: 0,
    });
    Ok(Json(LiquidityView {
        market: symbol,
        band_bps,
        mid,
        bid_qty: from_units(l.bid_qty, spec.qty_decimals),
        bid_notional: from_units(l.bid_notional, notional_decimals),
        ask_qty: from_units(l.ask_qty, spec.qty_decimals),
        ask_notional: from_units(l.ask_notional, notional_decimals),
    }))
}

/// A hypothetical taker.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ImpactQuery {
    /// `buy` (spend the notional on asks) or `sell` (raise it from bids).
    pub side: SideName,
    /// Quote amount, a positive decimal string.
    pub notional: String,
}

/// What sweeping the book for a notional would do; nothing is placed.
#[derive(Serialize, ToSchema)]
pub struct ImpactView {
    /// Market.
    pub market: String,
    /// The taker's side.
    pub side: String,
    /// Quantity that would fill, in whole lots.
    pub filled_qty: String,
    /// Quote that would be spent or raised (at most the notional asked).
    pub filled_notional: String,
    /// Best opposite price before the sweep.
    pub best_price: Option<String>,
    /// Worst price reached.
    pub worst_price: Option<String>,
    /// Whether the book holds enough for the whole notional.
    pub complete: bool,
    /// Distance of the average fill price from the best price, basis points, rounded down.
    pub impact_bps: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/markets/{market}/price-impact", tag = "market data", summary = "What a market order for a notional would fill, and at what cost",
    params(("market" = String, Path, description = "Symbol"), ImpactQuery),
    responses(
        (status = 200, description = "The sweep, computed on the current book", body = ImpactView),
        (status = 400, description = "side or notional missing", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "notional not a positive decimal", body = ErrorBody),
    ))]
async fn price_impact(
    State(app): State<Arc<App>>,
    Path(symbol): Path<String>,
    Query(query): Query<ImpactQuery>,
) -> Result<Json<ImpactView>, ApiError> {
    let (id, spec) = find_market(&app, &symbol).await?;
    let notional_decimals = spec.price_decimals + spec.qty_decimals;
    let notional = wire::amount("notional", &query.notional, notional_decimals)?;
    if notional == 0 {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "notional",
            "notional must be positive",
        ));
    }
    let side: book::Side = query.side.into();
    let impact = app
        .read(move |state| state.engine().price_impact(id, side, notional))
        .await?
        .ok_or_else(|| ApiError::not_found("UNKNOWN_MARKET", "no such market"))?;
    Ok(Json(ImpactView {
        market: symbol,
        side: match side {
            book::Side::Buy => "buy".into(),
            book::Side::Sell => "sell".into(),
        },
        filled_qty: from_units(impact.filled_qty, spec.qty_decimals),
        filled_notional: from_units(impact.filled_notional, notional_decimals),
        best_price: impact.best_price.map(|p| price_text(&spec, p)),
        worst_price: impact.worst_price.map(|p| price_text(&spec, p)),
        complete: impact.complete,
        impact_bps: impact.impact_bps.map(|b| b.to_string()),
    }))
}
