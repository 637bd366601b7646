//! Plain value types shared by the whole engine: prices, quantities, ids, sides and order options.

use std::fmt;

/// A price as an integer count of the market's price units (`10^-price_decimals` of the quote
/// asset). Always positive for an order; the tick size is a multiple of one unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Price(pub i64);

/// A quantity as an integer count of the market's quantity units (`10^-qty_decimals` of the base
/// asset). The lot size is a multiple of one unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Qty(pub u64);

impl Qty {
    /// No quantity.
    pub const ZERO: Qty = Qty(0);
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Qty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An order id chosen by the caller, unique among the live orders of one market.
pub type OrderId = u64;

/// A user (account) id chosen by the caller.
pub type UserId = u64;

/// Engine time in milliseconds since the Unix epoch. Time only moves when a command says so.
pub type Timestamp = i64;

/// Index of a market inside one [`crate::Engine`], assigned in creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MarketId(pub u32);

/// Side of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// Buys the base asset, pays the quote asset.
    Buy,
    /// Sells the base asset, receives the quote asset.
    Sell,
}

impl Side {
    /// The other side.
    pub fn opposite(self) -> Side {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }

    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
}

/// The kind of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderType {
    /// Trades at its price or better; the remainder follows the time in force.
    Limit,
    /// Sweeps the opposite side until filled, the side is empty or the optional protection price
    /// is reached; the remainder is cancelled, never rested.
    Market,
    /// A market order armed until the last trade price reaches the stop price against it
    /// (buy: last >= stop; sell: last <= stop).
    StopMarket,
    /// A limit order armed like [`OrderType::StopMarket`].
    StopLimit,
    /// A market order armed until the last trade price moves in its favour to the stop price
    /// (buy: last <= stop; sell: last >= stop).
    TakeProfitMarket,
    /// A limit order armed like [`OrderType::TakeProfitMarket`].
    TakeProfitLimit,
}

impl OrderType {
    /// Whether the order waits for a trigger before it reaches the book.
    pub fn is_conditional(self) -> bool {
        !matches!(self, OrderType::Limit | OrderType::Market)
    }

    /// Whether the order (once triggered) trades without resting, like a market order.
    pub fn is_market_like(self) -> bool {
        matches!(
            self,
            OrderType::Market | OrderType::StopMarket | OrderType::TakeProfitMarket
        )
    }

    /// Stable snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderType::Limit => "limit",
            OrderType::Market => "market",
            OrderType::StopMarket => "stop_market",
            OrderType::StopLimit => "stop_limit",
            OrderType::TakeProfitMarket => "take_profit_market",
            OrderType::TakeProfitLimit => "take_profit_limit",
        }
    }
}

/// How long an order stays on the book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimeInForce {
    /// Good till cancelled.
    Gtc,
    /// Immediate or cancel: trades what it can now, the rest is cancelled.
    Ioc,
    /// Fill or kill: trades its whole quantity now or is rejected without any effect.
    Fok,
    /// Expires at the market's next daily cutoff.
    Day,
    /// Good till date: expires at the order's `expire_at`.
    Gtd,
}

impl TimeInForce {
    /// Stable upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeInForce::Gtc => "GTC",
            TimeInForce::Ioc => "IOC",
            TimeInForce::Fok => "FOK",
            TimeInForce::Day => "DAY",
            TimeInForce::Gtd => "GTD",
        }
    }

    /// Whether the unfilled remainder may rest on the book.
    pub fn rests(self) -> bool {
        matches!(self, TimeInForce::Gtc | TimeInForce::Day | TimeInForce::Gtd)
    }
}

/// What happens when an incoming order would trade with a resting order of the same user.
/// The incoming (taker) order's mode decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelfTradePrevention {
    /// Cancel the rest of the incoming order; the resting one stays.
    CancelNewest,
    /// Cancel the resting order and keep matching.
    CancelOldest,
    /// Cancel both.
    CancelBoth,
    /// Reduce both by the smaller remaining quantity without a trade; an order reduced to zero is
    /// cancelled.
    Decrement,
}

impl SelfTradePrevention {
    /// Stable snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SelfTradePrevention::CancelNewest => "cancel_newest",
            SelfTradePrevention::CancelOldest => "cancel_oldest",
            SelfTradePrevention::CancelBoth => "cancel_both",
            SelfTradePrevention::Decrement => "decrement",
        }
    }
}

/// How a market's trades settle; the engine only carries it for the layers above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Settlement {
    /// Both assets are on the ledger and settle at once.
    Instant,
    /// The quote asset is paid off-platform while the base asset is held in escrow.
    Escrow,
}

impl Settlement {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Settlement::Instant => "instant",
            Settlement::Escrow => "escrow",
        }
    }
}

/// A set of payment methods as a bitset over the market's method registry (at most
/// [`crate::limits::PAYMENT_METHODS_PER_MARKET_MAX`] names). Two orders can trade only when their
/// sets intersect. [`PaymentMethods::ANY`] accepts every method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PaymentMethods(pub u64);

impl PaymentMethods {
    /// Accepts every payment method (the default).
    pub const ANY: PaymentMethods = PaymentMethods(u64::MAX);

    /// Whether an order accepting `self` can trade with one accepting `other`.
    #[inline]
    pub fn intersects(self, other: PaymentMethods) -> bool {
        self.0 & other.0 != 0
    }
}

impl Default for PaymentMethods {
    fn default() -> Self {
        PaymentMethods::ANY
    }
}
