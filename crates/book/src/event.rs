//! What the engine reports: every command produces events, and rejections are events too.

use crate::types::{MarketId, OrderId, OrderType, Price, Qty, Side, UserId};

/// Why a command was rejected. A rejected command changes nothing. Codes are stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The market does not exist.
    UnknownMarket,
    /// A market with this symbol already exists.
    DuplicateMarket,
    /// The market specification breaks a rule (the edge names the field).
    InvalidMarket,
    /// The engine holds [`crate::limits::MARKETS_MAX`] markets.
    TooManyMarkets,
    /// A live order of this market already has this id.
    DuplicateOrderId,
    /// The order quantity is zero.
    InvalidQuantity,
    /// The price is zero or negative, or missing where the order type needs it.
    InvalidPrice,
    /// The stop price is missing, zero or negative, or off the tick.
    InvalidStopPrice,
    /// The price is not a multiple of the tick size.
    BadTick,
    /// The quantity is not a multiple of the lot size.
    BadLot,
    /// The quantity is below the market's minimum order size.
    SizeTooSmall,
    /// The quantity is above the market's maximum order size.
    SizeTooLarge,
    /// Price times quantity is below the market's minimum notional.
    MinNotional,
    /// The price is outside the market's band around the last trade price.
    PriceBand,
    /// A post-only order would trade on arrival.
    PostOnlyWouldCross,
    /// A fill-or-kill order cannot be filled completely by compatible liquidity.
    FokUnfillable,
    /// A market order finds no compatible liquidity.
    NoLiquidity,
    /// The order id is not live in this market.
    UnknownOrder,
    /// The order belongs to another user.
    NotOwner,
    /// The combination of type, time in force and flags is not allowed.
    InvalidTimeInForce,
    /// GTD without an expiry, an expiry not in the future, or an expiry without GTD.
    InvalidExpiry,
    /// Minimum and maximum fill sizes are off the lot or the minimum exceeds the maximum.
    InvalidFillLimits,
    /// A modify that changes neither price nor quantity, or changes what cannot change.
    InvalidModify,
    /// Time cannot move backwards.
    TimeRegression,
    /// The market or the user holds as many live orders or price levels as allowed.
    TooManyOrders,
    /// A payment method the market does not list, or an empty set.
    UnknownPaymentMethod,
    /// Resting the order would take its price level's total quantity past `u64`.
    LevelFull,
}

impl RejectReason {
    /// The stable upper-case code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::UnknownMarket => "UNKNOWN_MARKET",
            RejectReason::DuplicateMarket => "DUPLICATE_MARKET",
            RejectReason::InvalidMarket => "INVALID_MARKET",
            RejectReason::TooManyMarkets => "TOO_MANY_MARKETS",
            RejectReason::DuplicateOrderId => "DUPLICATE_ORDER_ID",
            RejectReason::InvalidQuantity => "INVALID_QUANTITY",
            RejectReason::InvalidPrice => "INVALID_PRICE",
            RejectReason::InvalidStopPrice => "INVALID_STOP_PRICE",
            RejectReason::BadTick => "BAD_TICK",
            RejectReason::BadLot => "BAD_LOT",
            RejectReason::SizeTooSmall => "SIZE_TOO_SMALL",
            RejectReason::SizeTooLarge => "SIZE_TOO_LARGE",
            RejectReason::MinNotional => "MIN_NOTIONAL",
            RejectReason::PriceBand => "PRICE_BAND",
            RejectReason::PostOnlyWouldCross => "POST_ONLY_WOULD_CROSS",
            RejectReason::FokUnfillable => "FOK_UNFILLABLE",
            RejectReason::NoLiquidity => "NO_LIQUIDITY",
            RejectReason::UnknownOrder => "UNKNOWN_ORDER",
            RejectReason::NotOwner => "NOT_OWNER",
            RejectReason::InvalidTimeInForce => "INVALID_TIME_IN_FORCE",
            RejectReason::InvalidExpiry => "INVALID_EXPIRY",
            RejectReason::InvalidFillLimits => "INVALID_FILL_LIMITS",
            RejectReason::InvalidModify => "INVALID_MODIFY",
            RejectReason::TimeRegression => "TIME_REGRESSION",
            RejectReason::TooManyOrders => "TOO_MANY_ORDERS",
            RejectReason::UnknownPaymentMethod => "UNKNOWN_PAYMENT_METHOD",
            RejectReason::LevelFull => "LEVEL_FULL",
        }
    }

    /// The field of the command the rejection is about, as named in the replay format.
    pub fn field(self) -> Option<&'static str> {
        match self {
            RejectReason::UnknownMarket
            | RejectReason::DuplicateMarket
            | RejectReason::TooManyMarkets => Some("market"),
            RejectReason::InvalidMarket => None,
            RejectReason::DuplicateOrderId
            | RejectReason::UnknownOrder
            | RejectReason::TooManyOrders => Some("id"),
            RejectReason::NotOwner => Some("user"),
            RejectReason::InvalidQuantity
            | RejectReason::BadLot
            | RejectReason::SizeTooSmall
            | RejectReason::SizeTooLarge
            | RejectReason::FokUnfillable
            | RejectReason::NoLiquidity
            | RejectReason::LevelFull => Some("qty"),
            RejectReason::InvalidPrice
            | RejectReason::BadTick
            | RejectReason::MinNotional
            | RejectReason::PriceBand
            | RejectReason::PostOnlyWouldCross => Some("price"),
            RejectReason::InvalidStopPrice => Some("stop_price"),
            RejectReason::InvalidTimeInForce => Some("tif"),
            RejectReason::InvalidExpiry => Some("expire_at"),
            RejectReason::InvalidFillLimits => Some("min_fill"),
            RejectReason::InvalidModify => Some("price"),
            RejectReason::TimeRegression => Some("now"),
            RejectReason::UnknownPaymentMethod => Some("payment_methods"),
        }
    }

    /// A human sentence stating the rule.
    pub fn message(self) -> &'static str {
        match self {
            RejectReason::UnknownMarket => "the market does not exist",
            RejectReason::DuplicateMarket => "a market with this symbol already exists",
            RejectReason::InvalidMarket => "the market specification is invalid",
            RejectReason::TooManyMarkets => "the engine holds the maximum number of markets",
            RejectReason::DuplicateOrderId => "a live order of this market already has this id",
            RejectReason::InvalidQuantity => "the quantity must be positive",
            RejectReason::InvalidPrice => {
                "the price must be positive and is required for limit orders"
            }
            RejectReason::InvalidStopPrice => {
                "the stop price must be positive, on the tick, and is required for stop and take-profit orders"
            }
            RejectReason::BadTick => "the price is not a multiple of the tick size",
            RejectReason::BadLot => "the quantity is not a multiple of the lot size",
            RejectReason::SizeTooSmall => "the quantity is below the market's minimum order size",
            RejectReason::SizeTooLarge => "the quantity is above the market's maximum order size",
            RejectReason::MinNotional => {
                "price times quantity is below the market's minimum notional"
            }
            RejectReason::PriceBand => {
                "the price is outside the market's band around the last trade price"
            }
            RejectReason::PostOnlyWouldCross => "the post-only order would trade on arrival",
            RejectReason::FokUnfillable => {
                "compatible liquidity cannot fill the whole fill-or-kill order"
            }
            RejectReason::NoLiquidity => "no compatible liquidity for the market order",
            RejectReason::UnknownOrder => "no live order with this id in this market",
            RejectReason::NotOwner => "the order belongs to another user",
            RejectReason::InvalidTimeInForce => {
                "this time in force is not allowed for this order type (market orders: IOC or FOK; post-only: GTC, DAY or GTD)"
            }
            RejectReason::InvalidExpiry => {
                "GTD needs expire_at in the future, and only GTD takes expire_at"
            }
            RejectReason::InvalidFillLimits => {
                "min_fill and max_fill must be positive multiples of the lot with min_fill <= max_fill"
            }
            RejectReason::InvalidModify => {
                "a modify must change the price or the quantity of a limit order"
            }
            RejectReason::TimeRegression => "time cannot move backwards",
            RejectReason::TooManyOrders => {
                "the market or the user holds the maximum number of live orders or price levels"
            }
            RejectReason::UnknownPaymentMethod => {
                "payment methods must be a non-empty set of names the market lists"
            }
            RejectReason::LevelFull => {
                "the price level's total quantity would exceed the largest quantity the engine represents"
            }
        }
    }
}

/// Why an order left the book without being filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CancelCause {
    /// Its owner cancelled it.
    User,
    /// A cancel-all covered it.
    CancelAll,
    /// The unfilled rest of an IOC order.
    ImmediateOrCancel,
    /// The unfilled rest of a market order (liquidity or protection price exhausted).
    MarketRemainder,
    /// Self-trade prevention.
    SelfTrade,
    /// A triggered post-only order would have crossed.
    PostOnly,
    /// A triggered fill-or-kill order could not be filled completely.
    FillOrKill,
    /// A triggered market order found no compatible liquidity.
    NoLiquidity,
    /// A triggered limit order would need a new price level on a side that holds the maximum.
    BookFull,
}

impl CancelCause {
    /// Stable snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelCause::User => "user",
            CancelCause::CancelAll => "cancel_all",
            CancelCause::ImmediateOrCancel => "ioc",
            CancelCause::MarketRemainder => "market_remainder",
            CancelCause::SelfTrade => "self_trade",
            CancelCause::PostOnly => "post_only",
            CancelCause::FillOrKill => "fok",
            CancelCause::NoLiquidity => "no_liquidity",
            CancelCause::BookFull => "book_full",
        }
    }
}

/// One thing that happened. A command's events are appended in the order they happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A market was created.
    MarketCreated {
        /// The new market.
        market: MarketId,
    },
    /// The command was rejected and changed nothing.
    Rejected {
        /// The market the command named, when it exists.
        market: Option<MarketId>,
        /// The order id the command named (0 for commands without one).
        id: OrderId,
        /// Why.
        reason: RejectReason,
    },
    /// An order was accepted (before any trade it causes).
    Accepted {
        /// Market.
        market: MarketId,
        /// Order id.
        id: OrderId,
        /// Owner.
        user: UserId,
        /// Side.
        side: Side,
        /// Type.
        order_type: OrderType,
        /// Quantity.
        qty: Qty,
    },
    /// A trade at the resting (maker) order's price.
    Trade {
        /// Market.
        market: MarketId,
        /// The resting order.
        maker: OrderId,
        /// The incoming order.
        taker: OrderId,
        /// Owner of the resting order.
        maker_user: UserId,
        /// Owner of the incoming order.
        taker_user: UserId,
        /// Side of the incoming order.
        taker_side: Side,
        /// Price.
        price: Price,
        /// Quantity.
        qty: Qty,
    },
    /// An order, or part of it, was cancelled.
    Cancelled {
        /// Market.
        market: MarketId,
        /// Order id.
        id: OrderId,
        /// Owner.
        user: UserId,
        /// The quantity that was open and is now cancelled.
        remaining: Qty,
        /// The quantity still open afterwards: zero unless self-trade prevention's decrement
        /// reduced a larger order.
        open: Qty,
        /// Why.
        cause: CancelCause,
    },
    /// An order reached its expiry time.
    Expired {
        /// Market.
        market: MarketId,
        /// Order id.
        id: OrderId,
        /// Owner.
        user: UserId,
        /// The quantity that was open and is now expired.
        remaining: Qty,
    },
    /// A stop or take-profit order was triggered and now enters the book.
    Triggered {
        /// Market.
        market: MarketId,
        /// Order id.
        id: OrderId,
        /// Owner.
        user: UserId,
        /// The last trade price that triggered it.
        last_price: Price,
    },
    /// An order's price or quantity changed.
    Modified {
        /// Market.
        market: MarketId,
        /// Order id.
        id: OrderId,
        /// Owner.
        user: UserId,
        /// The order's limit price afterwards (zero for market-like conditional orders).
        price: Price,
        /// The open quantity afterwards.
        qty: Qty,
        /// Whether the order kept its place in the queue.
        priority_kept: bool,
    },
    /// An L2 change: the total open quantity at one price level after the change.
    Book {
        /// Market.
        market: MarketId,
        /// Side of the level.
        side: Side,
        /// Price of the level.
        price: Price,
        /// Total open quantity at the level (zero when the level is gone).
        qty: Qty,
        /// Orders at the level.
        orders: u32,
    },
}
