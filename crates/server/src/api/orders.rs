//! Orders: place, look up, list, cancel, modify, cancel all; and the caller's trades. Every
//! order operation goes through [`App::submit`], the one path to the sequencer.

use std::sync::Arc;

use agora_core::CoreCommand;
use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::response::Response;
use book::{Event, MarketId, MarketSpec, ModifyOrder, PaymentMethods, PlaceOrder, TimeInForce};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::created;
use super::market::{find_market, optional_market, page_limit};
use crate::app::App;
use crate::auth::Caller;
use crate::error::{ApiError, Body, ErrorBody};
use crate::idempotency::ChosenOrderId;
use crate::wire::{self, OrderTypeName, SideName, StpName, TifName, price_text, qty_text};

/// Payment methods one order may name.
pub const ORDER_PAYMENT_METHODS_MAX: usize = 16;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(place, list, cancel_all))
        .routes(routes!(get_order, cancel, modify))
        .routes(routes!(my_trades))
}

/// A new order.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceRequest {
    /// Market symbol.
    pub market: String,
    /// Side.
    pub side: SideName,
    /// Type (default limit).
    #[serde(rename = "type", default)]
    pub order_type: OrderTypeName,
    /// Limit price; for market-like orders the protection price (required for buys on
    /// instant markets, which hold funds at it).
    pub price: Option<String>,
    /// Trigger price of stop and take-profit orders.
    pub stop_price: Option<String>,
    /// Quantity.
    pub qty: String,
    /// Time in force (default GTC; IOC for market-like orders).
    pub tif: Option<TifName>,
    /// Refuse instead of trading on arrival.
    #[serde(default)]
    pub post_only: bool,
    /// Expiry of a GTD order, ms since the epoch.
    pub expire_at: Option<i64>,
    /// Payment methods accepted (escrow markets); empty: any.
    #[serde(default)]
    pub payment_methods: Vec<String>,
    /// Smallest counterparty reputation accepted.
    #[serde(default)]
    pub min_reputation: u32,
    /// Smallest single fill.
    pub min_fill: Option<String>,
    /// Largest single fill.
    pub max_fill: Option<String>,
    /// Self-trade prevention (default: the market's).
    pub stp: Option<StpName>,
    /// The client's own id for this order: used as the request's idempotency key when no
    /// `Idempotency-Key` header is sent (1 to 128 printable characters).
    pub client_order_id: Option<String>,
}

/// An order as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct OrderView {
    /// Id.
    pub id: u64,
    /// Market.
    pub market: String,
    /// Side.
    pub side: String,
    /// Type.
    #[serde(rename = "type")]
    pub order_type: String,
    /// Limit or protection price, when it has one.
    pub price: Option<String>,
    /// Quantity committed.
    pub qty: String,
    /// Filled so far.
    pub filled: String,
    /// Still open.
    pub remaining: String,
    /// `open`, `filled`, `cancelled` or `expired`.
    pub status: String,
}

/// A trade in an answer.
#[derive(Serialize, ToSchema)]
pub struct FillView {
    /// Price.
    pub price: String,
    /// Quantity.
    pub qty: String,
    /// The resting order.
    pub maker_order: u64,
    /// The incoming order.
    pub taker_order: u64,
}

/// What placing did.
#[derive(Serialize, ToSchema)]
pub struct Placed {
    /// The order after the command.
    pub order: OrderView,
    /// Its trades in this command.
    pub fills: Vec<FillView>,
    /// Journal sequence number of the command.
    pub seq: u64,
    /// The client's id, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_order_id: Option<String>,
    /// True when this answer was rebuilt after a restart from the journal, for a keyed
    /// placement whose first answer was lost: the order is as it is now, its fills are not
    /// repeated.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

/// The answer to a keyed placement whose first answer was lost in a crash, rebuilt from the
/// read models; `None` when the order was never journaled.
pub async fn recovered_placement(app: &App, order_id: u64) -> Result<Option<Vec<u8>>, ApiError> {
    app.caught_up().await?;
    let Some(row) = app.store.order_by_id(order_id).await? else {
        return Ok(None);
    };
    let market = MarketId(row.market);
    let spec = app.market_spec(market).await?;
    let answer = Placed {
        order: order_view(&row, &spec),
        fills: Vec::new(),
        seq: row.accepted_seq,
        client_order_id: None,
        recovered: true,
    };
    serde_json::to_vec(&answer)
        .map(Some)
        .map_err(ApiError::internal)
}

fn opt_qty(
    spec: &MarketSpec,
    field: &str,
    text: &Option<String>,
) -> Result<Option<book::Qty>, ApiError> {
    text.as_deref()
        .map(|t| wire::qty(spec, field, t))
        .transpose()
}

fn opt_price(
    spec: &MarketSpec,
    field: &str,
    text: &Option<String>,
) -> Result<Option<book::Price>, ApiError> {
    text.as_deref()
        .map(|t| wire::price(spec, field, t))
        .transpose()
}

#[utoipa::path(post, path = "/api/v1/orders", tag = "orders", summary = "Place an order",
    security(("session" = []), ("api_key" = [])),
    request_body = PlaceRequest,
    responses(
        (status = 201, description = "Accepted and durable", body = Placed),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 409, description = "The idempotency key or client_order_id was used with another request, or its first request is still running", body = ErrorBody),
        (status = 422, description = "A field breaks a rule, or funds are short", body = ErrorBody),
    ))]
async fn place(
    State(app): State<Arc<App>>,
    caller: Caller,
    chosen: Option<Extension<ChosenOrderId>>,
    Body(request): Body<PlaceRequest>,
) -> Result<Response, ApiError> {
    let (market, spec) = find_market(&app, &request.market).await?;
    if request.payment_methods.len() > ORDER_PAYMENT_METHODS_MAX {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "payment_methods",
            format!("at most {ORDER_PAYMENT_METHODS_MAX} payment methods"),
        ));
    }
    let payment_methods = if request.payment_methods.is_empty() {
        PaymentMethods::ANY
    } else {
        spec.payment_method_set(request.payment_methods.iter().map(String::as_str))
            .ok_or_else(|| {
                ApiError::invalid(
                    "UNKNOWN_PAYMENT_METHOD",
                    "payment_methods",
                    format!(
                        "payment methods must be among the market's: {}",
                        spec.payment_methods.join(", ")
                    ),
                )
            })?
    };
    let order_type: book::OrderType = request.order_type.into();
    let tif = match request.tif {
        Some(tif) => tif.into(),
        None if order_type.is_market_like() => TimeInForce::Ioc,
        None => TimeInForce::Gtc,
    };
    let id = match chosen {
        Some(Extension(ChosenOrderId(id))) => id,
        None => app.next_order_id(),
    };
    let place = PlaceOrder {
        market,
        id,
        user: caller.user,
        side: request.side.into(),
        order_type,
        price: opt_price(&spec, "price", &request.price)?,
        stop_price: opt_price(&spec, "stop_price", &request.stop_price)?,
        qty: wire::qty(&spec, "qty", &request.qty)?,
        tif,
        post_only: request.post_only,
        expire_at: request.expire_at,
        payment_methods,
        min_reputation: request.min_reputation,
        reputation: 0,
        min_fill: opt_qty(&spec, "min_fill", &request.min_fill)?,
        max_fill: opt_qty(&spec, "max_fill", &request.max_fill)?,
        stp: request.stp.map(Into::into),
    };
    let ack = app.submit(CoreCommand::Place(place.clone())).await?;
    let mut filled = 0u64;
    let mut fills = Vec::new();
    let mut status = "open";
    let mut remaining = place.qty.0;
    for event in &ack.output.events {
        match *event {
            Event::Trade {
                maker,
                taker,
                price,
                qty,
                ..
            } if maker == id || taker == id => {
                filled += qty.0;
                remaining = remaining.saturating_sub(qty.0);
                fills.push(FillView {
                    price: price_text(&spec, price),
                    qty: qty_text(&spec, qty),
                    maker_order: maker,
                    taker_order: taker,
                });
            }
            Event::Cancelled { id: gone, .. } if gone == id => {
                status = "cancelled";
            }
            Event::Expired { id: gone, .. } if gone == id => status = "expired",
            _ => {}
        }
    }
    if status == "open" && remaining == 0 {
        status = "filled";
    }
    if status != "open" {
        remaining = 0;
    }
    Ok(created(Placed {
        order: OrderView {
            id,
            market: spec.symbol.clone(),
            side: place.side.as_str().into(),
            order_type: place.order_type.as_str().into(),
            price: place.price.map(|p| price_text(&spec, p)),
            qty: qty_text(&spec, place.qty),
            filled: qty_text(&spec, book::Qty(filled)),
            remaining: qty_text(&spec, book::Qty(remaining)),
            status: status.into(),
        },
        fills,
        seq: ack.seq,
        client_order_id: request.client_order_id,
        recovered: false,
    }))
}

/// The market and spec of one of the caller's orders, from the read models; 404 when the
/// order does not exist or is another user's.
async fn own_order(
    app: &App,
    caller: &Caller,
    id: u64,
) -> Result<(store::OrderRow, MarketSpec), ApiError> {
    app.caught_up().await?;
    let row = app
        .store
        .order_by_id(id)
        .await?
        .filter(|row| row.user == caller.user)
        .ok_or_else(|| ApiError::not_found("UNKNOWN_ORDER", "no such order"))?;
    let market = MarketId(row.market);
    let spec = app.market_spec(market).await?;
    Ok((row, spec))
}

/// The market and spec of one of the caller's live orders, from the core's state (no wait for
/// the read models); 404 when the order is not live or is another user's.
async fn own_live_order(
    app: &App,
    caller: &Caller,
    id: u64,
) -> Result<(MarketId, MarketSpec), ApiError> {
    let user = caller.user;
    app.read(move |state| {
        let engine = state.engine();
        engine.markets().find_map(|market| {
            engine
                .order(market, id)
                .filter(|order| order.user == user)
                .and_then(|_| Some((market, engine.market_spec(market)?.clone())))
        })
    })
    .await?
    .ok_or_else(|| ApiError::not_found("UNKNOWN_ORDER", "no such live order"))
}

fn order_view(row: &store::OrderRow, spec: &MarketSpec) -> OrderView {
    OrderView {
        id: row.order_id,
        market: spec.symbol.clone(),
        side: row.side.into(),
        order_type: row.order_type.into(),
        price: row.price.map(|p| price_text(spec, book::Price(p))),
        qty: qty_text(spec, book::Qty(row.qty)),
        filled: qty_text(spec, book::Qty(row.filled)),
        remaining: qty_text(spec, book::Qty(row.open_qty)),
        status: row.status.into(),
    }
}

#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders", summary = "One of the caller's orders",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 400, description = "The id is not an order id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such order of the caller's", body = ErrorBody),
    ))]
async fn get_order(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<OrderView>, ApiError> {
    let (row, spec) = own_order(&app, &caller, id).await?;
    Ok(Json(order_view(&row, &spec)))
}

/// Filters of the caller's orders.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// One market.
    pub market: Option<String>,
    /// `open`, `filled`, `cancelled` or `expired`.
    pub status: Option<String>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/orders", tag = "orders", summary = "The caller's orders, newest first",
    security(("session" = []), ("api_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Orders", body = Vec<OrderView>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "A filter breaks its rule", body = ErrorBody),
    ))]
async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<OrderView>>, ApiError> {
    let limit = page_limit(query.limit, 100)?;
    if let Some(status) = &query.status
        && !matches!(status.as_str(), "open" | "filled" | "cancelled" | "expired")
    {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "status",
            "status must be open, filled, cancelled or expired",
        ));
    }
    let market = optional_market(&app, query.market.as_deref()).await?;
    app.caught_up().await?;
    let rows = app
        .store
        .orders_of_user(
            caller.user,
            market.map(|m| m.0),
            query.status.as_deref(),
            None,
            limit,
        )
        .await?;
    let specs = app.market_specs(rows.iter().map(|row| row.market)).await?;
    Ok(Json(
        rows.iter()
            .filter_map(|row| {
                specs
                    .get(row.market as usize)
                    .map(|spec| order_view(row, spec))
            })
            .collect(),
    ))
}

/// What a cancel did.
#[derive(Serialize, ToSchema)]
pub struct Cancelled {
    /// Orders cancelled.
    pub cancelled: Vec<u64>,
    /// Journal sequence number of the command.
    pub seq: u64,
}

#[utoipa::path(delete, path = "/api/v1/orders/{id}", tag = "orders", summary = "Cancel one of the caller's orders",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "Order id")),
    responses(
        (status = 200, description = "Cancelled", body = Cancelled),
        (status = 400, description = "The id is not an order id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such live order of the caller's", body = ErrorBody),
        (status = 409, description = "Another command on this order is running (CONFLICTING_COMMAND)", body = ErrorBody),
    ))]
async fn cancel(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<Cancelled>, ApiError> {
    let (market, _) = own_live_order(&app, &caller, id).await?;
    let _busy = app.in_flight.object("order", id)?;
    let ack = app
        .submit(CoreCommand::Cancel {
            market,
            id,
            user: caller.user,
        })
        .await?;
    Ok(Json(Cancelled {
        cancelled: cancelled_ids(&ack.output.events),
        seq: ack.seq,
    }))
}

fn cancelled_ids(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match *e {
            Event::Cancelled { id, .. } => Some(id),
            _ => None,
        })
        .collect()
}

/// A change to a live order.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModifyRequest {
    /// New limit price.
    pub price: Option<String>,
    /// New open quantity.
    pub qty: Option<String>,
}

/// What a modify did.
#[derive(Serialize, ToSchema)]
pub struct Modified {
    /// Whether the order kept its place in the queue.
    pub priority_kept: bool,
    /// Its trades in this command (a new price may cross).
    pub fills: Vec<FillView>,
    /// Journal sequence number of the command.
    pub seq: u64,
}

#[utoipa::path(patch, path = "/api/v1/orders/{id}", tag = "orders", summary = "Change the price or quantity of a live order",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "Order id")),
    request_body = ModifyRequest,
    responses(
        (status = 200, description = "Modified", body = Modified),
        (status = 400, description = "The id is not an order id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such live order of the caller's", body = ErrorBody),
        (status = 409, description = "Another command on this order is running (CONFLICTING_COMMAND)", body = ErrorBody),
        (status = 422, description = "A field breaks a rule, or funds are short", body = ErrorBody),
    ))]
async fn modify(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
    Body(request): Body<ModifyRequest>,
) -> Result<Json<Modified>, ApiError> {
    if request.price.is_none() && request.qty.is_none() {
        return Err(ApiError::invalid(
            "INVALID_MODIFY",
            "price",
            "give a new price, a new qty, or both",
        ));
    }
    let (market, spec) = own_live_order(&app, &caller, id).await?;
    let _busy = app.in_flight.object("order", id)?;
    let modify = ModifyOrder {
        market,
        id,
        user: caller.user,
        price: opt_price(&spec, "price", &request.price)?,
        qty: opt_qty(&spec, "qty", &request.qty)?,
    };
    let ack = app.submit(CoreCommand::Modify(modify)).await?;
    let mut priority_kept = false;
    let mut fills = Vec::new();
    for event in &ack.output.events {
        match *event {
            Event::Modified {
                id: changed,
                priority_kept: kept,
                ..
            } if changed == id => priority_kept = kept,
            Event::Trade {
                maker,
                taker,
                price,
                qty,
                ..
            } => fills.push(FillView {
                price: price_text(&spec, price),
                qty: qty_text(&spec, qty),
                maker_order: maker,
                taker_order: taker,
            }),
            _ => {}
        }
    }
    Ok(Json(Modified {
        priority_kept,
        fills,
        seq: ack.seq,
    }))
}

/// Which orders to cancel.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CancelAllQuery {
    /// Only this market.
    pub market: Option<String>,
}

#[utoipa::path(delete, path = "/api/v1/orders", tag = "orders", summary = "Cancel all of the caller's live orders",
    security(("session" = []), ("api_key" = [])),
    params(CancelAllQuery),
    responses(
        (status = 200, description = "Cancelled", body = Cancelled),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
    ))]
async fn cancel_all(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(query): Query<CancelAllQuery>,
) -> Result<Json<Cancelled>, ApiError> {
    let market = optional_market(&app, query.market.as_deref()).await?;
    let ack = app
        .submit(CoreCommand::CancelAll {
            market,
            user: Some(caller.user),
        })
        .await?;
    Ok(Json(Cancelled {
        cancelled: cancelled_ids(&ack.output.events),
        seq: ack.seq,
    }))
}

/// One of the caller's trades.
#[derive(Serialize, ToSchema)]
pub struct MyTrade {
    /// Market.
    pub market: String,
    /// Journal sequence number of the command that caused it.
    pub seq: u64,
    /// The caller's order.
    pub order: u64,
    /// The caller's side.
    pub side: String,
    /// Whether the caller's order was resting.
    pub maker: bool,
    /// Price.
    pub price: String,
    /// Quantity.
    pub qty: String,
}

/// Filters of the caller's trades.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MyTradesQuery {
    /// One market.
    pub market: Option<String>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/trades", tag = "orders", summary = "The caller's trades, newest first",
    security(("session" = []), ("api_key" = [])),
    params(MyTradesQuery),
    responses(
        (status = 200, description = "Trades", body = Vec<MyTrade>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such market", body = ErrorBody),
        (status = 422, description = "A filter breaks its rule", body = ErrorBody),
    ))]
async fn my_trades(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(query): Query<MyTradesQuery>,
) -> Result<Json<Vec<MyTrade>>, ApiError> {
    let limit = page_limit(query.limit, 100)?;
    let market = optional_market(&app, query.market.as_deref()).await?;
    app.caught_up().await?;
    let rows = app
        .store
        .trades_of_user(caller.user, market.map(|m| m.0), limit)
        .await?;
    let specs = app.market_specs(rows.iter().map(|row| row.market)).await?;
    let mut trades = Vec::new();
    for t in rows {
        let Some(spec) = specs.get(t.market as usize) else {
            continue;
        };
        let maker = t.maker_user == caller.user;
        let taker_buys = t.taker_side == "buy";
        trades.push(MyTrade {
            market: spec.symbol.clone(),
            seq: t.seq,
            order: if maker { t.maker } else { t.taker },
            side: if maker == taker_buys { "sell" } else { "buy" }.into(),
            maker,
            price: price_text(spec, book::Price(t.price)),
            qty: qty_text(spec, book::Qty(t.qty)),
        });
    }
    Ok(Json(trades))
}

/// An order command arriving over the WebSocket, answered as its REST twin answers.
#[derive(Debug)]
pub struct WsAnswer {
    /// The HTTP status the REST route gives.
    pub status: u16,
    /// Its JSON body, as the route wrote it (`null` for none).
    pub body: Box<serde_json::value::RawValue>,
    /// The stored answer of an earlier command with the same idempotency key.
    pub replayed: bool,
}

/// The target of a cancel or a modify: the `id` of its `args`.
#[derive(serde::Deserialize)]
struct WsTarget<'a> {
    #[serde(default, borrow)]
    id: Option<&'a serde_json::value::RawValue>,
}

/// An order command arriving over the WebSocket, run by the same handler as its REST twin
/// and through the same idempotency step: `key` (the message's `idempotency_key`) or a
/// placement's `client_order_id` is looked up in the same per-user key space as the
/// `Idempotency-Key` header, for the twin's method and path and the command's `args`, which
/// stand for the twin's body as the client wrote them (`{}` when absent).
pub async fn ws_command(
    app: &Arc<App>,
    caller: Caller,
    op: &str,
    args: &str,
    key: Option<&serde_json::value::RawValue>,
) -> Result<WsAnswer, ApiError> {
    use axum::http::Method;
    let order_id = || {
        serde_json::from_str::<WsTarget>(args)
            .ok()
            .and_then(|target| target.id)
            .and_then(|id| serde_json::from_str::<u64>(id.get()).ok())
            .ok_or_else(|| ApiError::invalid("INVALID_FIELD", "id", "id must be an order id"))
    };
    let without_id = || {
        let mut fields: serde_json::Value = crate::error::parse_json(args.as_bytes())?;
        if let Some(map) = fields.as_object_mut() {
            map.remove("id");
        }
        serde_json::to_vec(&fields).map_err(ApiError::internal)
    };
    let (method, id, body) = match op {
        "place" => (Method::POST, None, args.as_bytes().to_vec()),
        "cancel" => (Method::DELETE, Some(order_id()?), Vec::new()),
        "modify" => (Method::PATCH, Some(order_id()?), without_id()?),
        _ => {
            return Err(ApiError::invalid(
                "INVALID_FIELD",
                "op",
                "op must be place, cancel or modify",
            ));
        }
    };
    let key = match key.map(|raw| serde_json::from_str::<String>(raw.get())) {
        None if op == "place" => crate::idempotency::placement_key(&body)?,
        None => None,
        Some(Ok(key)) => Some(crate::idempotency::checked_key(&key, "idempotency_key")?),
        Some(Err(_)) => Some(crate::idempotency::checked_key("", "idempotency_key")?),
    };
    let op = op.to_string();
    let (run_app, run_body) = (app.clone(), body.clone());
    let run = move |chosen: Option<ChosenOrderId>| {
        let app = run_app;
        let body = run_body;
        async move {
            let answer = async {
                let response = match id {
                    None => {
                        let request = crate::error::parse_json(&body)?;
                        place(State(app), caller, chosen.map(Extension), Body(request)).await?
                    }
                    Some(id) if op == "cancel" => axum::response::IntoResponse::into_response(
                        cancel(State(app), caller, Path(id)).await?,
                    ),
                    Some(id) => {
                        let request = crate::error::parse_json(&body)?;
                        axum::response::IntoResponse::into_response(
                            modify(State(app), caller, Path(id), Body(request)).await?,
                        )
                    }
                };
                Ok::<_, ApiError>(response)
            };
            answer
                .await
                .unwrap_or_else(axum::response::IntoResponse::into_response)
        }
    };
    let response = match key {
        Some(key) => {
            let path = match id {
                None => "/api/v1/orders".to_string(),
                Some(id) => format!("/api/v1/orders/{id}"),
            };
            crate::idempotency::keyed(
                app,
                caller,
                key,
                (method, path, body.into()),
                id.is_none(),
                run,
            )
            .await?
        }
        None => run(None).await,
    };
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .contains_key(crate::idempotency::REPLAYED_HEADER);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(ApiError::internal)?;
    // The routes write JSON; anything else (an empty body) is answered as `null`.
    let body = std::str::from_utf8(&body)
        .ok()
        .and_then(|text| serde_json::from_str::<&serde_json::value::RawValue>(text).ok())
        .map_or_else(
            || serde_json::value::RawValue::NULL.to_owned(),
            |raw| raw.to_owned(),
        );
    Ok(WsAnswer {
        status,
        body,
        replayed,
    })
}
