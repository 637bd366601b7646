//! Adapters that drive third-party order-book crates through one common trait, so the benchmark
//! can replay the same workloads on each of them and on our own engine.
//!
//! Each peer lives in its own module. A module's header explains which of the crate's APIs it
//! uses, which of its defects it works around, and which operations it has to emulate.

/// Side of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A bid: buys from the asks.
    Buy,
    /// An ask: sells to the bids.
    Sell,
}

/// One execution: resting order `maker` traded with incoming order `taker` at the maker's price.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// Id of the resting order.
    pub maker: u64,
    /// Id of the incoming order.
    pub taker: u64,
    /// Price of the trade, which is the resting order's price.
    pub price: i64,
    /// Quantity traded.
    pub qty: u64,
}

/// The operations every benchmark workload uses. Prices are positive integer ticks, quantities
/// positive integer lots, ids unique u64 chosen by the caller. Matching is price-time priority and
/// trades happen at the resting order's price.
pub trait PeerBook {
    /// Short name printed in the benchmark table.
    fn name(&self) -> &'static str;
    /// Good-till-cancel limit order: trade against what crosses, rest the remainder.
    fn place_gtc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>);
    /// Immediate-or-cancel limit order: trade against what crosses, drop the remainder.
    fn place_ioc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>);
    /// Market order for `qty`: sweep the opposite side until filled or empty; drop the remainder.
    fn place_market(&mut self, id: u64, side: Side, qty: u64, fills: &mut Vec<Fill>);
    /// Cancel a resting order. Returns false when the id is not resting.
    fn cancel(&mut self, id: u64) -> bool;
    /// Move a resting order to `new_price` keeping its remaining quantity and id; it loses time
    /// priority and, if the new price crosses, trades as a taker first (remainder rests).
    /// Returns false when the id is not resting.
    fn move_order(&mut self, id: u64, new_price: i64, fills: &mut Vec<Fill>) -> bool;
    /// Whether `cancel` and `move_order` work on this peer. A peer that returns false here is
    /// left out of every workload that cancels or moves orders.
    fn supports_cancel(&self) -> bool {
        true
    }
}

/// Id maps kept by adapters whose peer names orders itself.
pub type IdMap<V> = rustc_hash::FxHashMap<u64, V>;

pub mod matchcore_peer;
pub mod nanobook_peer;
pub mod orderbook_rs_peer;
