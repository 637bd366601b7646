//! Named bounds on everything the engine stores, so that no input can grow it without limit.

/// Markets one engine holds.
pub const MARKETS_MAX: usize = 4_096;

/// Bytes in a market symbol such as `BTC-USDT`.
pub const SYMBOL_BYTES_MAX: usize = 32;

/// Live orders (resting plus armed conditional orders) in one market.
pub const ORDERS_PER_MARKET_MAX: usize = 4_000_000;

/// Distinct price levels on one side of one book. Levels live in a sorted vector, so this also
/// bounds the cost of inserting a level far from the top of the book.
pub const LEVELS_PER_SIDE_MAX: usize = 200_000;

/// Payment method names one market can register (they are bits of a `u64`).
pub const PAYMENT_METHODS_PER_MARKET_MAX: usize = 64;

/// Bytes in a payment method name.
pub const PAYMENT_METHOD_BYTES_MAX: usize = 32;

/// Reputation tier thresholds of one market.
pub const REPUTATION_TIERS_MAX: usize = 16;

/// Decimal places of a price or quantity unit.
pub const DECIMALS_MAX: u32 = 12;

/// Candles kept per interval per market (1440 one-minute candles make the rolling 24 hours).
pub const CANDLES_KEPT_MAX: usize = 1_440;

/// Levels one L2 depth query returns.
pub const DEPTH_LEVELS_MAX: usize = 1_000;

/// Orders one L3 query returns.
pub const L3_ORDERS_MAX: usize = 10_000;

/// Room a book keeps between operations for the list of orders that left it
/// ([`crate::Engine::departed`]); a larger list, left by one big sweep or cancel-all, is freed
/// when the next operation starts.
pub const DEPARTED_KEPT_MAX: usize = 4_096;
