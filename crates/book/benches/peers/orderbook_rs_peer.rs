//! Benchmark adapter that drives the `orderbook-rs` 0.15.3 order book (library `orderbook_rs`)
//! through [`PeerBook`].
//!
//! orderbook-rs is built for many threads sharing one book: every method takes `&self`, and each
//! call goes through its submit gate, atomics and concurrent maps. The benchmark drives it from a
//! single thread, which is the cheapest way to use it correctly: the book is owned directly (no
//! `Arc` around it, no locks of our own) and every call runs uncontended.
//!
//! How each operation maps onto the crate:
//!
//! * Good-till-cancel orders use `add_limit_order_with_result`, which matches, rests the remainder
//!   and hands back the trades of this call.
//! * Immediate-or-cancel orders use `match_limit_order`, which matches up to the limit price and
//!   never rests anything. A limit order with `TimeInForce::Ioc` is not used because the crate
//!   reports a partly filled IOC as an error and returns its trades only to a trade listener.
//! * Market orders use `match_market_order`; it reports an error (and trades nothing) when the
//!   opposite side is empty, which for us is simply an order without fills.
//! * The crate has no move that keeps the id and returns the trades it causes (`update_order`
//!   reports trades only to a listener), so a move is a `cancel_order`, which returns the removed
//!   order with its remaining quantity, followed by `add_limit_order_with_result` under the same
//!   id at the new price. This is also what `update_order` does inside.
//!
//! Order ids are the crate's `Id::Sequential`, which carries our u64 as it is, so no id map is
//! needed. Every order is stamped with a time from the book's clock; a `StubClock` (a counter)
//! replaces the default wall clock, as the crate suggests for deterministic runs, which also keeps
//! a system call out of every order. The crate allocates per call (an `Arc` for the order, a
//! result with its own trade list, a trade id derived by hashing); that is its cost and is left
//! as it is.

use super::{Fill, PeerBook, Side};

use orderbook_rs::{Id, OrderBook, StubClock, TimeInForce};

use std::sync::Arc;

/// Copies the crate's trades into `fills`. The crate names the maker by the id it was placed with,
/// which is always one of ours. This is a macro rather than a function because the trade type
/// lives in the crate's `pricelevel` dependency, which it does not re-export and which the
/// benchmark does not depend on, so the type cannot be named here.
macro_rules! push_trades {
    ($trades:expr, $taker:expr, $fills:expr) => {
        for trade in $trades {
            $fills.push(Fill {
                maker: trade
                    .maker_order_id()
                    .as_u64()
                    .expect("every maker was placed with a sequential id"),
                taker: $taker,
                price: trade.price().as_u128() as i64,
                qty: trade.quantity().as_u64(),
            });
        }
    };
}

/// The `orderbook-rs` 0.15.3 book behind the common benchmark trait.
pub struct OrderbookRsBook {
    book: OrderBook<()>,
}

impl Default for OrderbookRsBook {
    fn default() -> Self {
        Self::new()
    }
}

impl OrderbookRsBook {
    /// Creates an empty book.
    pub fn new() -> Self {
        Self {
            book: OrderBook::with_clock("PEER", Arc::new(StubClock::new())),
        }
    }

    /// Places a good-till-cancel limit order under our id and copies its trades into `fills`.
    fn add_gtc(
        &mut self,
        id: u64,
        side: orderbook_rs::Side,
        price: i64,
        qty: u64,
        fills: &mut Vec<Fill>,
    ) {
        let added = self.book.add_limit_order_with_result(
            Id::Sequential(id),
            price as u128,
            qty,
            side,
            TimeInForce::Gtc,
            None,
        );
        match added {
            Ok((_, Some(result))) => push_trades!(result.match_result.trades().as_vec(), id, fills),
            Ok((_, None)) => {}
            Err(e) => panic!("orderbook-rs refused a limit order: {e}"),
        }
    }
}

/// Converts our side into the crate's.
fn engine_side(side: Side) -> orderbook_rs::Side {
    match side {
        Side::Buy => orderbook_rs::Side::Buy,
        Side::Sell => orderbook_rs::Side::Sell,
    }
}

impl PeerBook for OrderbookRsBook {
    fn name(&self) -> &'static str {
        "orderbook-rs 0.15.3"
    }

    fn place_gtc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        self.add_gtc(id, engine_side(side), price, qty, fills);
    }

    fn place_ioc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        match self
            .book
            .match_limit_order(Id::Sequential(id), qty, engine_side(side), price as u128)
        {
            Ok(result) => push_trades!(result.trades().as_vec(), id, fills),
            Err(e) => panic!("orderbook-rs refused an IOC order: {e}"),
        }
    }

    fn place_market(&mut self, id: u64, side: Side, qty: u64, fills: &mut Vec<Fill>) {
        // An error here means the opposite side was empty, so nothing traded.
        if let Ok(result) = self
            .book
            .match_market_order(Id::Sequential(id), qty, engine_side(side))
        {
            push_trades!(result.trades().as_vec(), id, fills);
        }
    }

    fn cancel(&mut self, id: u64) -> bool {
        match self.book.cancel_order(Id::Sequential(id)) {
            Ok(removed) => removed.is_some(),
            Err(e) => panic!("orderbook-rs failed a cancel: {e}"),
        }
    }

    fn move_order(&mut self, id: u64, new_price: i64, fills: &mut Vec<Fill>) -> bool {
        let removed = match self.book.cancel_order(Id::Sequential(id)) {
            Ok(Some(order)) => order,
            Ok(None) => return false,
            Err(e) => panic!("orderbook-rs failed a cancel: {e}"),
        };
        let remaining = removed.visible_quantity().as_u64();
        self.add_gtc(id, removed.side(), new_price, remaining, fills);
        true
    }
}
