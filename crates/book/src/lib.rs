//! Agora's matching engine: a deterministic order book with P2P constraints.
//!
//! The engine is a pure state machine: [`Engine::apply`] takes a [`Command`] and appends
//! [`Event`]s. It does no I/O, reads no clock (time arrives in [`Command::AdvanceTime`]) and
//! uses no randomness, so the same commands always give the same events and the same
//! [`Engine::state_hash`]. Prices and quantities are integers in each market's units; decimal
//! strings belong to the callers.
//!
//! Matching is price-time priority (optionally reputation tier before time), trades happen at
//! the resting order's price, and a resting order whose P2P constraints (payment methods,
//! reputation, fill sizes) do not fit the incoming order is skipped without blocking its level.

mod book;
mod engine;
mod event;
mod ladder;
pub mod limits;
mod market;
mod slab;
mod snapshot;
mod stats;
mod types;

pub use book::{Departed, ModifyOrder, PlaceOrder};
pub use engine::{Command, Depth, Engine, LevelView, Liquidity, OrderView, PriceImpact};
pub use event::{CancelCause, Event, RejectReason};
pub use market::{DAY_MS, MarketSpec, MarketSpecError};
pub use snapshot::SnapshotError;
pub use stats::{Candle, Interval, Stats24h};
pub use types::{
    MarketId, OrderId, OrderType, PaymentMethods, Price, Qty, SelfTradePrevention, Settlement,
    Side, TimeInForce, Timestamp, UserId,
};
