//! Benchmark adapter that drives the `nanobook` 0.19.3 exchange through [`PeerBook`].
//!
//! # The cancel workaround
//!
//! nanobook's own cancel (`Exchange::cancel`, `OrderBook::cancel_order`, and `Exchange::modify`,
//! which cancels first) is broken in 0.19.3. Each order remembers its index in its price level's
//! queue at the moment it was added, but the queue shifts whenever the orders ahead of it are
//! filled and popped, and the remembered index is never corrected. A later cancel then turns the
//! wrong queue slot (another order, or no slot at all) into a tombstone, while the cancelled order
//! stays in the queue with no quantity left. The next sweep of that level trades a zero quantity
//! against it and, because the level's cached total no longer adds up, keeps coming back to a
//! level with no orders in it: it loops forever.
//!
//! This adapter never calls those functions. It cancels through the public lower layer instead:
//! `PriceLevels::remove_order` takes the order out of its level by searching the queue for its id
//! (so the stale index does not matter) and keeps the level's total right, and `Order::cancel`
//! then marks the order itself as cancelled. Since no tombstone is ever created, the remembered
//! indices are never used. The price of the workaround is that a cancel costs a linear scan of
//! the order's price level instead of nanobook's intended constant time. With it, cancels and
//! moves are exact, so `supports_cancel` keeps its default of true.
//!
//! # Other notes
//!
//! * nanobook has no move that keeps the order's id (its `modify` gives the order a new id and
//!   uses the broken cancel), so a move is our cancel followed by a new good-till-cancel order for
//!   the remaining quantity, which nanobook matches first if it crosses.
//! * nanobook assigns its own order ids, so the adapter keeps two small maps between our ids and
//!   its ids. They hold resting orders only and are pruned as makers fill.
//! * The exchange keeps a copy of every trade, and every order it has ever seen, for the life of
//!   the book. To keep memory (and its hash map) from growing without bound in long runs, the
//!   adapter clears the trade copy after each order (a plain `Vec::clear`) and asks nanobook to
//!   drop finished orders every `HISTORY_PERIOD` operations, as its documentation suggests for
//!   long-running use.
//! * With its default `event-log` feature nanobook also appends every command to an event log
//!   that cannot be cleared; the benchmark should depend on it with `default-features = false`.
//!   The adapter works either way.

use super::{Fill, PeerBook, Side};

use nanobook::{Exchange, OrderId, Price, SubmitResult, TimeInForce};

/// How many operations run between two clean-ups of nanobook's order history. Each clean-up walks
/// nanobook's whole order map, so it is spread out enough to cost well under one map entry per
/// operation on average.
const HISTORY_PERIOD: u32 = 1 << 16;

// Id maps use the same fast integer hash as Agora, so the adapter's bookkeeping costs the peer
// as little as possible.
use super::IdMap;

/// The `nanobook` 0.19.3 exchange behind the common benchmark trait.
pub struct NanobookBook {
    exchange: Exchange,
    /// Our id to nanobook's id, for resting orders only.
    to_engine: IdMap<OrderId>,
    /// nanobook's id to our id, for resting orders only.
    to_ours: IdMap<u64>,
    /// Operations left before the next clean-up of nanobook's order history.
    until_cleanup: u32,
}

impl Default for NanobookBook {
    fn default() -> Self {
        Self::new()
    }
}

impl NanobookBook {
    /// Creates an empty book.
    pub fn new() -> Self {
        Self {
            exchange: Exchange::new(),
            to_engine: IdMap::default(),
            to_ours: IdMap::default(),
            until_cleanup: HISTORY_PERIOD,
        }
    }

    /// Counts one operation and drops nanobook's finished orders when the period is over.
    fn tick(&mut self) {
        self.until_cleanup -= 1;
        if self.until_cleanup == 0 {
            self.until_cleanup = HISTORY_PERIOD;
            self.exchange.clear_order_history();
        }
    }

    /// Copies the trades of one submit into `fills` with our ids, forgets makers that no longer
    /// rest, and records the order itself if part of it now rests. Only the last maker of a sweep
    /// can be left partly filled: every earlier one was used up before the taker moved on, so only
    /// the last needs a look-up in the book.
    fn finish(&mut self, result: &SubmitResult, taker: u64, fills: &mut Vec<Fill>) {
        let trades = &result.trades;
        for (i, trade) in trades.iter().enumerate() {
            let engine_maker = trade.passive_order_id;
            let last = i + 1 == trades.len();
            let gone = !last
                || self
                    .exchange
                    .get_order(engine_maker)
                    .is_none_or(|order| !order.is_active());
            let maker = if gone {
                let ours = self.to_ours.remove(&engine_maker.0);
                if let Some(ours) = ours {
                    self.to_engine.remove(&ours);
                }
                ours
            } else {
                self.to_ours.get(&engine_maker.0).copied()
            };
            fills.push(Fill {
                maker: maker.expect("every nanobook maker was placed through this adapter"),
                taker,
                price: trade.price.0,
                qty: trade.quantity,
            });
        }
        if !trades.is_empty() {
            // The exchange's own copy of the trades is not needed; clearing keeps its capacity.
            self.exchange.clear_trades();
        }
        if result.resting_quantity > 0 {
            self.to_engine.insert(taker, result.order_id);
            self.to_ours.insert(result.order_id.0, taker);
        }
    }

    /// Places a limit order with nanobook's own time-in-force handling.
    fn place_limit(
        &mut self,
        id: u64,
        side: Side,
        price: i64,
        qty: u64,
        tif: TimeInForce,
        fills: &mut Vec<Fill>,
    ) {
        let result = self
            .exchange
            .submit_limit(engine_side(side), Price(price), qty, tif);
        self.finish(&result, id, fills);
        self.tick();
    }

    /// Takes a resting order out of the book without nanobook's broken cancel (see the top of
    /// this file) and returns its side and remaining quantity.
    fn remove_resting(&mut self, engine_id: OrderId) -> (nanobook::Side, u64) {
        let book = self.exchange.book_mut();
        let order = book
            .get_order(engine_id)
            .filter(|order| order.is_active())
            .expect("the id maps only hold resting orders");
        let (side, price, remaining) = (order.side, order.price, order.remaining_quantity);
        let removed = book
            .side_mut(side)
            .remove_order(price, engine_id, remaining);
        debug_assert!(
            removed,
            "a resting nanobook order was missing from its level"
        );
        if let Some(order) = book.get_order_mut(engine_id) {
            order.cancel();
        }
        (side, remaining)
    }
}

/// Converts our side into nanobook's.
fn engine_side(side: Side) -> nanobook::Side {
    match side {
        Side::Buy => nanobook::Side::Buy,
        Side::Sell => nanobook::Side::Sell,
    }
}

impl PeerBook for NanobookBook {
    fn name(&self) -> &'static str {
        "nanobook 0.19.3"
    }

    fn place_gtc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        self.place_limit(id, side, price, qty, TimeInForce::GTC, fills);
    }

    fn place_ioc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        self.place_limit(id, side, price, qty, TimeInForce::IOC, fills);
    }

    fn place_market(&mut self, id: u64, side: Side, qty: u64, fills: &mut Vec<Fill>) {
        let result = self.exchange.submit_market(engine_side(side), qty);
        self.finish(&result, id, fills);
        self.tick();
    }

    fn cancel(&mut self, id: u64) -> bool {
        // The maps hold exactly the resting orders, so an id missing from them is not resting.
        let Some(engine_id) = self.to_engine.remove(&id) else {
            return false;
        };
        self.to_ours.remove(&engine_id.0);
        self.remove_resting(engine_id);
        self.tick();
        true
    }

    fn move_order(&mut self, id: u64, new_price: i64, fills: &mut Vec<Fill>) -> bool {
        let Some(engine_id) = self.to_engine.remove(&id) else {
            return false;
        };
        self.to_ours.remove(&engine_id.0);
        let (side, remaining) = self.remove_resting(engine_id);
        // The new order goes to the back of its level and trades first if it crosses; `finish`
        // records its new nanobook id under our same id if part of it rests.
        let result =
            self.exchange
                .submit_limit(side, Price(new_price), remaining, TimeInForce::GTC);
        self.finish(&result, id, fills);
        self.tick();
        true
    }
}
