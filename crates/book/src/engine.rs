//! The engine: markets by id, the clock, command dispatch and market-data queries.

use std::collections::BTreeMap;

use crate::book::{Book, Departed, ModifyOrder, NEVER, NIL, PlaceOrder, State};
use crate::event::{Event, RejectReason};
use crate::limits;
use crate::market::MarketSpec;
use crate::stats::{Candle, Interval, Stats24h};
use crate::types::{
    MarketId, OrderId, OrderType, Price, Qty, SelfTradePrevention, Side, TimeInForce, Timestamp,
    UserId,
};

/// Everything the engine can be asked to do. Time only moves with [`Command::AdvanceTime`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Create a market.
    CreateMarket(MarketSpec),
    /// Place an order.
    Place(PlaceOrder),
    /// Cancel a live order of its owner.
    Cancel {
        /// Market.
        market: MarketId,
        /// Order id.
        id: OrderId,
        /// Owner (checked).
        user: UserId,
    },
    /// Change a live order's price and/or open quantity.
    Modify(ModifyOrder),
    /// Cancel every live order of a market, of a user, or of a user in one market.
    CancelAll {
        /// One market, or all.
        market: Option<MarketId>,
        /// One user, or all.
        user: Option<UserId>,
    },
    /// Move the clock forward and expire what is due.
    AdvanceTime {
        /// The new time; not before the current one.
        now: Timestamp,
    },
}

/// The matching engine: a deterministic state machine over commands.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    pub(crate) books: Vec<Book>,
    pub(crate) symbols: BTreeMap<String, MarketId>,
    pub(crate) now: Timestamp,
}

/// One L2 level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelView {
    /// Price.
    pub price: Price,
    /// Total open quantity.
    pub qty: Qty,
    /// Number of orders.
    pub orders: u32,
}

/// L2 depth, best levels first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Bids, highest first.
    pub bids: Vec<LevelView>,
    /// Asks, lowest first.
    pub asks: Vec<LevelView>,
}

/// A live order as the engine holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderView {
    /// Order id.
    pub id: OrderId,
    /// Owner.
    pub user: UserId,
    /// Side.
    pub side: Side,
    /// Type as placed.
    pub order_type: OrderType,
    /// Limit or protection price (zero when none).
    pub price: Price,
    /// Open quantity.
    pub remaining: Qty,
    /// Quantity filled so far.
    pub filled: Qty,
    /// Time in force.
    pub tif: TimeInForce,
    /// Expiry, if any.
    pub expire_at: Option<Timestamp>,
    /// Whether the order rests on the book (false: armed, waiting for its trigger).
    pub resting: bool,
    /// Self-trade prevention mode.
    pub stp: SelfTradePrevention,
    /// Acceptance sequence within the market (time priority).
    pub seq: u64,
    /// The caller's tag given at placement (0 when none; see [`Engine::place_tagged`]).
    pub tag: u64,
}

/// Resting liquidity near the mid price.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liquidity {
    /// Band around the mid price, in basis points.
    pub band_bps: u32,
    /// Bid quantity priced within the band.
    pub bid_qty: u128,
    /// Bid notional within the band.
    pub bid_notional: u128,
    /// Ask quantity within the band.
    pub ask_qty: u128,
    /// Ask notional within the band.
    pub ask_notional: u128,
}

/// What sweeping the book for a notional amount would do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriceImpact {
    /// Side of the hypothetical taker.
    pub side: Side,
    /// Quantity that would fill.
    pub filled_qty: u128,
    /// Notional that would be spent or received (at most the requested notional).
    pub filled_notional: u128,
    /// Best opposite price before the sweep.
    pub best_price: Option<Price>,
    /// Worst price reached.
    pub worst_price: Option<Price>,
    /// Whether the book holds enough to take the whole notional.
    pub complete: bool,
    /// Distance of the average fill price from the best price, in basis points (rounded down).
    pub impact_bps: Option<u128>,
}

impl Engine {
    /// An empty engine at time zero.
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Current engine time.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The id of a market by symbol.
    pub fn market_id(&self, symbol: &str) -> Option<MarketId> {
        self.symbols.get(symbol).copied()
    }

    /// The specification of a market.
    pub fn market_spec(&self, market: MarketId) -> Option<&MarketSpec> {
        self.book(market).map(|book| &book.spec)
    }

    /// Ids of every market, in creation order.
    pub fn markets(&self) -> impl Iterator<Item = MarketId> + '_ {
        (0..self.books.len() as u32).map(MarketId)
    }

    fn book(&self, market: MarketId) -> Option<&Book> {
        self.books.get(market.0 as usize)
    }

    /// Applies one command, appending its events to `out`.
    pub fn apply(&mut self, command: &Command, out: &mut Vec<Event>) {
        match command {
            Command::CreateMarket(spec) => self.create_market(spec.clone(), out),
            Command::Place(place) => self.place(place, out),
            Command::Cancel { market, id, user } => self.cancel(*market, *id, *user, out),
            Command::Modify(modify) => self.modify(modify, out),
            Command::CancelAll { market, user } => self.cancel_all(*market, *user, out),
            Command::AdvanceTime { now } => self.advance_time(*now, out),
        }
    }

    /// Creates a market.
    pub fn create_market(&mut self, spec: MarketSpec, out: &mut Vec<Event>) {
        let reject = |reason| Event::Rejected {
            market: None,
            id: 0,
            reason,
        };
        if spec.validate().is_err() {
            out.push(reject(RejectReason::InvalidMarket));
            return;
        }
        if self.symbols.contains_key(&spec.symbol) {
            out.push(reject(RejectReason::DuplicateMarket));
            return;
        }
        if self.books.len() >= limits::MARKETS_MAX {
            out.push(reject(RejectReason::TooManyMarkets));
            return;
        }
        let market = MarketId(self.books.len() as u32);
        self.symbols.insert(spec.symbol.clone(), market);
        self.books.push(Book::new(market, spec));
        out.push(Event::MarketCreated { market });
    }

    fn book_or_reject(
        &mut self,
        market: MarketId,
        id: OrderId,
        out: &mut Vec<Event>,
    ) -> Option<&mut Book> {
        let found = self.books.get_mut(market.0 as usize);
        if found.is_none() {
            out.push(Event::Rejected {
                market: None,
                id,
                reason: RejectReason::UnknownMarket,
            });
        }
        found
    }

    /// Places an order.
    #[inline]
    pub fn place(&mut self, place: &PlaceOrder, out: &mut Vec<Event>) {
        self.place_tagged(place, 0, out);
    }

    /// Places an order carrying the caller's `tag`, a number the engine keeps with the order
    /// and never reads: [`OrderView::tag`] while it is live, [`Departed::tag`] when it leaves.
    #[inline]
    pub fn place_tagged(&mut self, place: &PlaceOrder, tag: u64, out: &mut Vec<Event>) {
        let now = self.now;
        if let Some(book) = self.book_or_reject(place.market, place.id, out) {
            book.place(place, tag, now, out);
        }
    }

    /// The orders that left `market`'s book during the engine's last operation on that market
    /// (filled, cancelled, expired, triggered, or moved by a modify, which may bring them
    /// back), in the order they left. Each operation on a market starts by clearing its list.
    pub fn departed(&self, market: MarketId) -> &[Departed] {
        self.book(market).map_or(&[], |book| &book.departed)
    }

    /// Every live order of a market (resting or armed) as its id, owner and tag, in slot
    /// order: cheaper than [`Engine::orders`] when only these are needed.
    pub fn tags(&self, market: MarketId) -> impl Iterator<Item = (OrderId, UserId, u64)> + '_ {
        self.book(market)
            .into_iter()
            .flat_map(|book| book.orders.iter())
            .filter(|order| order.state != State::Free)
            .map(|order| (order.id, order.user, order.tag))
    }

    /// Sets the tag of a live order (see [`Engine::place_tagged`]), as when restoring a caller's
    /// own snapshot; `false` when the market has no such order.
    pub fn set_tag(&mut self, market: MarketId, id: OrderId, tag: u64) -> bool {
        let Some(book) = self.books.get_mut(market.0 as usize) else {
            return false;
        };
        match book.slot_of(id) {
            Some(slot) => {
                book.orders[slot as usize].tag = tag;
                true
            }
            None => false,
        }
    }

    /// Every check [`Engine::place`] makes, without placing: `Ok` means the same placement
    /// would be accepted now. Lets a caller check its own preconditions (funds) in between.
    pub fn check_place(&self, place: &PlaceOrder) -> Result<(), RejectReason> {
        self.book(place.market)
            .ok_or(RejectReason::UnknownMarket)?
            .check_place(place, self.now)
    }

    /// Every check [`Engine::modify`] makes, without modifying.
    pub fn check_modify(&self, modify: &ModifyOrder) -> Result<(), RejectReason> {
        self.book(modify.market)
            .ok_or(RejectReason::UnknownMarket)?
            .check_modify(modify)
    }

    /// Cancels a live order of its owner.
    #[inline]
    pub fn cancel(&mut self, market: MarketId, id: OrderId, user: UserId, out: &mut Vec<Event>) {
        if let Some(book) = self.book_or_reject(market, id, out) {
            book.cancel(id, user, out);
        }
    }

    /// Changes a live order's price and/or open quantity.
    #[inline]
    pub fn modify(&mut self, modify: &ModifyOrder, out: &mut Vec<Event>) {
        let now = self.now;
        if let Some(book) = self.book_or_reject(modify.market, modify.id, out) {
            book.modify(modify, now, out);
        }
    }

    /// Cancels every live order of a market and/or user, oldest first, market by market.
    pub fn cancel_all(
        &mut self,
        market: Option<MarketId>,
        user: Option<UserId>,
        out: &mut Vec<Event>,
    ) {
        match market {
            Some(market) => {
                if let Some(book) = self.book_or_reject(market, 0, out) {
                    book.cancel_all(user, out);
                }
            }
            None => {
                for book in &mut self.books {
                    book.cancel_all(user, out);
                }
            }
        }
    }

    /// Moves the clock to `now` and expires every order due by then, market by market.
    pub fn advance_time(&mut self, now: Timestamp, out: &mut Vec<Event>) {
        if now < self.now {
            out.push(Event::Rejected {
                market: None,
                id: 0,
                reason: RejectReason::TimeRegression,
            });
            return;
        }
        self.now = now;
        for book in &mut self.books {
            book.expire(now, out);
        }
    }

    // ----- queries -------------------------------------------------------------------------

    /// A live order.
    pub fn order(&self, market: MarketId, id: OrderId) -> Option<OrderView> {
        let book = self.book(market)?;
        let slot = book.slot_of(id)?;
        let order = &book.orders[slot as usize];
        Some(OrderView {
            id: order.id,
            user: order.user,
            side: order.side,
            order_type: order.order_type,
            price: Price(order.price),
            remaining: Qty(order.remaining),
            filled: Qty(order.filled),
            tif: order.tif,
            expire_at: (order.expire_at != NEVER).then_some(order.expire_at),
            resting: order.state == State::Resting,
            stp: order.stp,
            seq: order.seq,
            tag: order.tag,
        })
    }

    /// Number of live orders (resting and armed) in a market.
    pub fn live_orders(&self, market: MarketId) -> usize {
        self.book(market).map_or(0, |book| book.live)
    }

    /// Top `levels` L2 levels of each side (at most [`limits::DEPTH_LEVELS_MAX`]).
    pub fn depth(&self, market: MarketId, levels: usize) -> Option<Depth> {
        let book = self.book(market)?;
        let levels = levels.min(limits::DEPTH_LEVELS_MAX);
        let view = |side: Side| -> Vec<LevelView> {
            book.ladder(side)
                .iter_best_first()
                .take(levels)
                .map(|level| {
                    let lvl = &book.levels[level as usize];
                    LevelView {
                        price: Price(lvl.price),
                        qty: Qty(lvl.qty),
                        orders: lvl.count,
                    }
                })
                .collect()
        };
        Some(Depth {
            bids: view(Side::Buy),
            asks: view(Side::Sell),
        })
    }

    /// Best bid and best ask.
    pub fn best_bid_ask(&self, market: MarketId) -> Option<(Option<LevelView>, Option<LevelView>)> {
        let depth = self.depth(market, 1)?;
        Some((depth.bids.first().copied(), depth.asks.first().copied()))
    }

    /// The resting orders at one price level in queue order (at most [`limits::L3_ORDERS_MAX`]).
    pub fn level_orders(&self, market: MarketId, side: Side, price: Price) -> Vec<OrderView> {
        let Some(book) = self.book(market) else {
            return Vec::new();
        };
        let ladder = book.ladder(side);
        let Ok(position) = ladder.search(crate::ladder::key(side, price.0)) else {
            return Vec::new();
        };
        let mut cursor = book.levels[ladder.level_at(position) as usize].head;
        let mut orders = Vec::new();
        while cursor != NIL && orders.len() < limits::L3_ORDERS_MAX {
            let order = &book.orders[cursor as usize];
            orders.extend(self.order(market, order.id));
            cursor = order.next;
        }
        orders
    }

    /// Every live order of a market in a canonical order: bids best first and in queue order,
    /// then asks likewise, then armed orders in trigger order.
    pub fn orders(&self, market: MarketId) -> Vec<OrderView> {
        let Some(book) = self.book(market) else {
            return Vec::new();
        };
        let mut views = Vec::with_capacity(book.live);
        for slot in crate::snapshot::canonical_slots(book) {
            views.extend(self.order(market, book.orders[slot as usize].id));
        }
        views
    }

    /// Price of the last trade.
    pub fn last_price(&self, market: MarketId) -> Option<Price> {
        self.book(market)?.data.last_price.map(Price)
    }

    /// Rolling 24-hour statistics at one-minute resolution.
    pub fn stats_24h(&self, market: MarketId) -> Option<Stats24h> {
        Some(self.book(market)?.data.stats_24h(self.now))
    }

    /// The last `count` candles of an interval, oldest first.
    pub fn candles(&self, market: MarketId, interval: Interval, count: usize) -> Vec<Candle> {
        self.book(market)
            .map(|book| book.data.candles(interval, count))
            .unwrap_or_default()
    }

    /// The mid price as a fraction `(sum of best bid and best ask) / 2`, returned as that sum to
    /// stay exact; `None` unless both sides have orders.
    fn mid_twice(book: &Book) -> Option<i128> {
        Some(i128::from(book.best_price(Side::Buy)?) + i128::from(book.best_price(Side::Sell)?))
    }

    /// Resting quantity and notional priced within `band_bps` of the mid price on each side.
    pub fn liquidity(&self, market: MarketId, band_bps: u32) -> Option<Liquidity> {
        let book = self.book(market)?;
        let mid_twice = Engine::mid_twice(book)?;
        let band = i128::from(band_bps);
        let mut liquidity = Liquidity {
            band_bps,
            bid_qty: 0,
            bid_notional: 0,
            ask_qty: 0,
            ask_notional: 0,
        };
        // price >= mid * (1 - band) <=> price * 2 * 10_000 >= mid_twice * (10_000 - band).
        for level in book.ladder(Side::Buy).iter_best_first() {
            let lvl = &book.levels[level as usize];
            if i128::from(lvl.price) * 20_000 < mid_twice * (10_000 - band) {
                break;
            }
            liquidity.bid_qty = liquidity.bid_qty.saturating_add(u128::from(lvl.qty));
            liquidity.bid_notional = liquidity
                .bid_notional
                .saturating_add(lvl.price as u128 * u128::from(lvl.qty));
        }
        for level in book.ladder(Side::Sell).iter_best_first() {
            let lvl = &book.levels[level as usize];
            if i128::from(lvl.price) * 20_000 > mid_twice * (10_000 + band) {
                break;
            }
            liquidity.ask_qty = liquidity.ask_qty.saturating_add(u128::from(lvl.qty));
            liquidity.ask_notional = liquidity
                .ask_notional
                .saturating_add(lvl.price as u128 * u128::from(lvl.qty));
        }
        Some(liquidity)
    }

    /// What a taker on `side` spending (buy) or raising (sell) `notional` would fill, walking
    /// the L2 book. Quantities are taken in whole lots.
    pub fn price_impact(
        &self,
        market: MarketId,
        side: Side,
        notional: u128,
    ) -> Option<PriceImpact> {
        let book = self.book(market)?;
        let lot = u128::from(book.spec.lot);
        let mut impact = PriceImpact {
            side,
            filled_qty: 0,
            filled_notional: 0,
            best_price: book.best_price(side.opposite()).map(Price),
            worst_price: None,
            complete: false,
            impact_bps: None,
        };
        for level in book.ladder(side.opposite()).iter_best_first() {
            let lvl = &book.levels[level as usize];
            let price = lvl.price as u128;
            let left = notional - impact.filled_notional;
            let affordable = left / price / lot * lot;
            let take = affordable.min(u128::from(lvl.qty));
            if take == 0 {
                impact.complete = true;
                break;
            }
            impact.filled_qty += take;
            impact.filled_notional += take * price;
            impact.worst_price = Some(Price(lvl.price));
            if take < u128::from(lvl.qty) {
                impact.complete = true;
                break;
            }
        }
        if let (Some(best), true) = (impact.best_price, impact.filled_qty > 0) {
            // Beyond u128 the impact is not reported rather than wrong.
            impact.impact_bps =
                impact
                    .filled_qty
                    .checked_mul(best.0 as u128)
                    .and_then(|paid_at_best| {
                        let distance = impact.filled_notional.abs_diff(paid_at_best);
                        distance.checked_mul(10_000).map(|d| d / paid_at_best)
                    });
        }
        Some(impact)
    }

    /// Heap bytes held by the order books (orders, id index, levels, ladders).
    pub fn book_heap_bytes(&self) -> usize {
        self.books.iter().map(Book::heap_bytes).sum()
    }
}
