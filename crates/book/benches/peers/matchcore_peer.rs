//! Benchmark adapter that drives the `matchcore` 0.4.0 order book through [`PeerBook`].
//!
//! # The price guard
//!
//! matchcore 0.4.0 matches a crossing limit order with no price limit at all: once it decides the
//! order crosses, it sweeps the opposite side for the order's whole quantity and happily trades at
//! prices worse than the order's own limit (the same happens when an amend moves an order to a
//! crossing price). This adapter therefore never lets matchcore match a limit order that could run
//! past its limit. Before every crossing limit order it adds up, from the book's own levels, the
//! quantity resting at or better than the limit:
//!
//! * if that quantity covers the whole order (or is zero), the order can be sent as it is, because
//!   the sweep then stops inside the limit (or never starts);
//! * otherwise it first sends a market order for exactly the quantity available within the limit,
//!   which takes precisely those makers, and then sends the remainder as a limit order that no
//!   longer crosses (for a good-till-cancel order) or drops it (for an immediate-or-cancel order).
//!
//! Moves follow the same rule: an amend whose new price crosses is first cut down to the quantity
//! available within the new price, and whatever is left is placed again as a fresh resting order.
//!
//! # Ids
//!
//! matchcore names every order after the sequence number of the command that created it, so the
//! adapter keeps two small maps between our ids and matchcore's ids. They hold resting orders only
//! and are pruned as makers fill, so they stay as large as the book and no larger.
//!
//! # Other notes
//!
//! * Every command must carry the next sequence number; timestamps are only used for
//!   good-till-date expiry, which the benchmark never uses, so they are left at zero.
//! * An amend to the same price is a no-op in matchcore (the order keeps its place in the queue),
//!   so a move to the order's current price is done as a cancel followed by a new order, which
//!   sends it to the back of the queue as the trait requires.
//! * matchcore allocates its outcome and trade vectors for every command; the adapter itself
//!   allocates nothing per call once its maps have grown to the size of the book.

use super::{Fill, PeerBook, Side};

use matchcore::{
    AmendCmd, AmendPatch, CancelCmd, Command, CommandKind, CommandMeta, CommandOutcome,
    CommandReport, LimitOrder, LimitOrderPatch, MarketOrder, NewOrder, OrderBook, OrderFlags,
    OrderId, OrderKind, OrderOutcome, Price, Quantity, QuantityPolicy, SequenceNumber, SubmitCmd,
    TimeInForce, Timestamp,
};

// Id maps use the same fast integer hash as Agora, so the adapter's bookkeeping costs the peer
// as little as possible.
use super::IdMap;

/// The `matchcore` 0.4.0 book behind the common benchmark trait.
pub struct MatchcoreBook {
    book: OrderBook,
    /// Sequence number the next command must carry; matchcore rejects any other.
    next_seq: u64,
    /// Our id to matchcore's id, for resting orders only.
    to_engine: IdMap<OrderId>,
    /// matchcore's id to our id, for resting orders only.
    to_ours: IdMap<u64>,
}

impl Default for MatchcoreBook {
    fn default() -> Self {
        Self::new()
    }
}

impl MatchcoreBook {
    /// Creates an empty book.
    pub fn new() -> Self {
        Self {
            book: OrderBook::new("PEER"),
            next_seq: 0,
            to_engine: IdMap::default(),
            to_ours: IdMap::default(),
        }
    }

    /// Runs one command and returns its outcome together with the id matchcore gives an order
    /// created by it (which is always the command's sequence number).
    fn run(&mut self, kind: CommandKind) -> (CommandOutcome, OrderId) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let outcome = self.book.execute(&Command {
            meta: CommandMeta {
                sequence_number: SequenceNumber(seq),
                timestamp: Timestamp(0),
            },
            kind,
        });
        (outcome, OrderId(seq))
    }

    /// Quantity resting on the side opposite to `side` at prices at least as good as `limit`,
    /// counted only up to `want` because anything beyond that makes no difference to the guard.
    fn available_within(&self, side: matchcore::Side, limit: Price, want: u64) -> u64 {
        let limit_book = self.book.limit();
        let levels = limit_book.levels();
        let mut total = 0u64;
        match side {
            matchcore::Side::Buy => {
                for (_, &level) in limit_book.asks().range(..=limit) {
                    total += levels[level].total_quantity().0;
                    if total >= want {
                        break;
                    }
                }
            }
            matchcore::Side::Sell => {
                for (_, &level) in limit_book.bids().range(limit..).rev() {
                    total += levels[level].total_quantity().0;
                    if total >= want {
                        break;
                    }
                }
            }
        }
        total.min(want)
    }

    /// Copies the trades of one order outcome into `fills` with our ids, and forgets makers that
    /// no longer rest. Only the last maker of a sweep can be left partly filled: every earlier one
    /// was used up before the taker moved on, so only the last needs a look-up in the book.
    /// Returns the quantity the order executed.
    fn collect(&mut self, outcome: &OrderOutcome, taker: u64, fills: &mut Vec<Fill>) -> u64 {
        let Some(result) = outcome.match_result() else {
            return 0;
        };
        let trades = result.trades();
        for (i, trade) in trades.iter().enumerate() {
            let engine_maker = trade.maker_order_id();
            let last = i + 1 == trades.len();
            let gone = !last || !self.book.limit().orders().contains_key(&engine_maker);
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
                maker: maker.expect("every matchcore maker was placed through this adapter"),
                taker,
                price: trade.price().0 as i64,
                qty: trade.quantity().0,
            });
        }
        result.executed_quantity().0
    }

    /// Submits one order command and copies its trades into `fills`. Returns the executed
    /// quantity and the id matchcore gave the order.
    fn submit(&mut self, order: NewOrder, taker: u64, fills: &mut Vec<Fill>) -> (u64, OrderId) {
        let (outcome, engine_id) = self.run(CommandKind::Submit(SubmitCmd { order }));
        let executed = match &outcome {
            CommandOutcome::Applied(CommandReport::Submit(effects)) => {
                self.collect(effects.target_order(), taker, fills)
            }
            other => panic!("matchcore refused a submit: {other:?}"),
        };
        (executed, engine_id)
    }

    /// Records a resting order in both id maps.
    fn remember(&mut self, ours: u64, engine_id: OrderId) {
        self.to_engine.insert(ours, engine_id);
        self.to_ours.insert(engine_id.0, ours);
    }

    /// Sends a limit order that is known not to trade past its limit and rests what is left of a
    /// good-till-cancel order.
    fn submit_limit(
        &mut self,
        id: u64,
        side: matchcore::Side,
        price: Price,
        qty: u64,
        tif: TimeInForce,
        fills: &mut Vec<Fill>,
    ) {
        let order = LimitOrder::new(
            price,
            QuantityPolicy::Standard {
                quantity: Quantity(qty),
            },
            OrderFlags::new(side, false, tif),
        );
        let (executed, engine_id) = self.submit(NewOrder::Limit(order), id, fills);
        if tif == TimeInForce::Gtc && executed < qty {
            self.remember(id, engine_id);
        }
    }

    /// A limit order with the price guard described at the top of this file.
    fn place_limit(
        &mut self,
        id: u64,
        side: Side,
        price: i64,
        qty: u64,
        tif: TimeInForce,
        fills: &mut Vec<Fill>,
    ) {
        let side = engine_side(side);
        let price = Price(price as u64);
        let within = self.available_within(side, price, qty);
        if within == 0 || within == qty {
            // Either nothing crosses or the sweep is filled before it can pass the limit.
            self.submit_limit(id, side, price, qty, tif, fills);
            return;
        }
        // Take exactly what lies within the limit with a market order ...
        let market = MarketOrder::new(Quantity(within), side, false);
        self.submit(NewOrder::Market(market), id, fills);
        // ... and rest the rest, which no longer crosses; an IOC order simply drops it.
        if tif == TimeInForce::Gtc {
            self.submit_limit(id, side, price, qty - within, tif, fills);
        }
    }

    /// Cancels a resting order by matchcore id, which must be live.
    fn cancel_engine(&mut self, engine_id: OrderId) {
        let (outcome, _) = self.run(CommandKind::Cancel(CancelCmd {
            order_id: engine_id,
            order_kind: OrderKind::Limit,
        }));
        assert!(
            matches!(outcome, CommandOutcome::Applied(_)),
            "matchcore refused a cancel: {outcome:?}"
        );
    }

    /// Runs an amend of a resting order and copies its trades into `fills`. Returns the executed
    /// quantity.
    fn amend(
        &mut self,
        engine_id: OrderId,
        patch: LimitOrderPatch,
        taker: u64,
        fills: &mut Vec<Fill>,
    ) -> u64 {
        let (outcome, _) = self.run(CommandKind::Amend(AmendCmd {
            order_id: engine_id,
            patch: AmendPatch::Limit(patch),
        }));
        match &outcome {
            CommandOutcome::Applied(CommandReport::Amend(effects)) => {
                self.collect(effects.target_order(), taker, fills)
            }
            other => panic!("matchcore refused an amend: {other:?}"),
        }
    }
}

/// Converts our side into matchcore's.
fn engine_side(side: Side) -> matchcore::Side {
    match side {
        Side::Buy => matchcore::Side::Buy,
        Side::Sell => matchcore::Side::Sell,
    }
}

impl PeerBook for MatchcoreBook {
    fn name(&self) -> &'static str {
        "matchcore 0.4.0"
    }

    fn place_gtc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        self.place_limit(id, side, price, qty, TimeInForce::Gtc, fills);
    }

    fn place_ioc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        self.place_limit(id, side, price, qty, TimeInForce::Ioc, fills);
    }

    fn place_market(&mut self, id: u64, side: Side, qty: u64, fills: &mut Vec<Fill>) {
        // A plain market order is what matchcore does right: it sweeps best price first and
        // drops what it cannot fill.
        let market = MarketOrder::new(Quantity(qty), engine_side(side), false);
        self.submit(NewOrder::Market(market), id, fills);
    }

    fn cancel(&mut self, id: u64) -> bool {
        // The maps hold exactly the resting orders, so an id missing from them is not resting and
        // matchcore need not be asked.
        let Some(engine_id) = self.to_engine.remove(&id) else {
            return false;
        };
        self.to_ours.remove(&engine_id.0);
        self.cancel_engine(engine_id);
        true
    }

    fn move_order(&mut self, id: u64, new_price: i64, fills: &mut Vec<Fill>) -> bool {
        let Some(&engine_id) = self.to_engine.get(&id) else {
            return false;
        };
        let resting = self
            .book
            .limit()
            .orders()
            .get(&engine_id)
            .expect("the id maps only hold resting orders");
        let side = resting.inner().flags().side();
        let old_price = resting.inner().price();
        let remaining = resting.inner().total_quantity().0;
        let new_price = Price(new_price as u64);

        if new_price == old_price {
            // matchcore treats this amend as a no-op and the order would keep its place, so
            // cancel it and place it again at the back of the same level. It rested at this
            // price, so it cannot cross now.
            self.to_engine.remove(&id);
            self.to_ours.remove(&engine_id.0);
            self.cancel_engine(engine_id);
            self.submit_limit(id, side, new_price, remaining, TimeInForce::Gtc, fills);
            return true;
        }

        let within = self.available_within(side, new_price, remaining);
        if within == 0 || within == remaining {
            // The amend cannot run past its new price: either nothing crosses or the order is
            // used up within the price. matchcore moves it to the back of the new level itself.
            let executed = self.amend(
                engine_id,
                LimitOrderPatch::new().with_price(new_price),
                id,
                fills,
            );
            if executed == remaining {
                self.to_engine.remove(&id);
                self.to_ours.remove(&engine_id.0);
            }
            return true;
        }

        // Part of the order can trade within the new price: shrink the amended order to exactly
        // that part, so the amend fills it completely (and matchcore retires the order) without
        // passing the price, then rest the rest under the same id of ours.
        self.to_engine.remove(&id);
        self.to_ours.remove(&engine_id.0);
        let patch = LimitOrderPatch::new()
            .with_price(new_price)
            .with_quantity_policy(QuantityPolicy::Standard {
                quantity: Quantity(within),
            });
        self.amend(engine_id, patch, id, fills);
        self.submit_limit(
            id,
            side,
            new_price,
            remaining - within,
            TimeInForce::Gtc,
            fills,
        );
        true
    }
}
