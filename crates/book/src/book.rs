//! One market's order book: resting orders, armed conditional orders, expiries and matching.
//!
//! Orders live in a slab (chunks of 4,096 `Order`s that never move, plus a free list) and are
//! linked into per-level FIFO queues by slab index. Index-only hash tables (sixteen, so that
//! each grows on its own) map order ids to slab slots, so an id costs a few bytes of index
//! beyond the order itself. Every operation validates first and mutates only
//! after every check has passed, so a rejection changes nothing.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::event::{CancelCause, Event, RejectReason};
use crate::ladder::{Ladder, key};
use crate::limits;
use crate::market::MarketSpec;
use crate::slab::Chunked;
use crate::stats::MarketData;
use crate::types::{
    MarketId, OrderId, OrderType, PaymentMethods, Price, Qty, SelfTradePrevention, Side,
    TimeInForce, Timestamp, UserId,
};

/// Marks the end of a linked list and "no level".
pub(crate) const NIL: u32 = u32::MAX;

/// "No expiry".
pub(crate) const NEVER: Timestamp = Timestamp::MAX;

/// A request to place an order. Optional P2P constraints default to "no constraint".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaceOrder {
    /// Market.
    pub market: MarketId,
    /// Order id, unique among the market's live orders.
    pub id: OrderId,
    /// Owner.
    pub user: UserId,
    /// Side.
    pub side: Side,
    /// Type.
    pub order_type: OrderType,
    /// Limit price (limit and stop-limit orders), or protection price (market-like orders).
    pub price: Option<Price>,
    /// Trigger price of stop and take-profit orders.
    pub stop_price: Option<Price>,
    /// Quantity.
    pub qty: Qty,
    /// Time in force.
    pub tif: TimeInForce,
    /// Reject instead of trading on arrival.
    pub post_only: bool,
    /// Expiry of a GTD order.
    pub expire_at: Option<Timestamp>,
    /// Payment methods the owner accepts.
    pub payment_methods: PaymentMethods,
    /// Minimum reputation of a counterparty.
    pub min_reputation: u32,
    /// The owner's reputation, as known to the caller.
    pub reputation: u32,
    /// Minimum size of one fill (a smaller remaining quantity may still fill in one piece).
    pub min_fill: Option<Qty>,
    /// Maximum size of one fill.
    pub max_fill: Option<Qty>,
    /// Self-trade prevention; the market's default when absent.
    pub stp: Option<SelfTradePrevention>,
}

impl PlaceOrder {
    /// A GTC limit order with no constraint.
    pub fn limit(
        market: MarketId,
        id: OrderId,
        user: UserId,
        side: Side,
        price: Price,
        qty: Qty,
    ) -> PlaceOrder {
        PlaceOrder {
            market,
            id,
            user,
            side,
            order_type: OrderType::Limit,
            price: Some(price),
            stop_price: None,
            qty,
            tif: TimeInForce::Gtc,
            post_only: false,
            expire_at: None,
            payment_methods: PaymentMethods::ANY,
            min_reputation: 0,
            reputation: 0,
            min_fill: None,
            max_fill: None,
            stp: None,
        }
    }

    /// An IOC market order with no protection price and no constraint.
    pub fn market(market: MarketId, id: OrderId, user: UserId, side: Side, qty: Qty) -> PlaceOrder {
        PlaceOrder {
            order_type: OrderType::Market,
            price: None,
            tif: TimeInForce::Ioc,
            ..PlaceOrder::limit(market, id, user, side, Price(0), qty)
        }
    }
}

/// A request to change a live order's price and/or open quantity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModifyOrder {
    /// Market.
    pub market: MarketId,
    /// Order id.
    pub id: OrderId,
    /// Owner (checked).
    pub user: UserId,
    /// New limit price.
    pub price: Option<Price>,
    /// New open quantity.
    pub qty: Option<Qty>,
}

/// Where a live order is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// The slot is free.
    Free,
    /// On the book, in a level queue.
    Resting,
    /// A conditional order waiting for its trigger.
    Armed,
}

/// A live order, 120 bytes. Field order keeps the hot matching fields together.
#[derive(Clone, Debug)]
pub(crate) struct Order {
    pub(crate) id: OrderId,
    pub(crate) user: UserId,
    pub(crate) remaining: u64,
    pub(crate) accept: u64,
    pub(crate) reputation: u32,
    pub(crate) min_reputation: u32,
    pub(crate) next: u32,
    pub(crate) prev: u32,
    pub(crate) min_fill: u64,
    pub(crate) max_fill: u64,
    /// Limit price, or the protection price of a market-like conditional order (0 = none).
    pub(crate) price: i64,
    pub(crate) filled: u64,
    /// Acceptance sequence: time priority, and the tie-breaker of triggers and expiries.
    pub(crate) seq: u64,
    pub(crate) expire_at: Timestamp,
    pub(crate) level: u32,
    pub(crate) side: Side,
    pub(crate) order_type: OrderType,
    pub(crate) tif: TimeInForce,
    pub(crate) stp: SelfTradePrevention,
    pub(crate) tier: u8,
    pub(crate) post_only: bool,
    pub(crate) state: State,
    /// The caller's number for this order, given at placement and never read by the engine
    /// (the core keeps the id of the order's hold in it).
    pub(crate) tag: u64,
}

const _: () = assert!(std::mem::size_of::<Order>() == 120);

/// An order that left the book (filled, cancelled, expired, triggered, or moved by a
/// modify): what the caller needs to settle it after the operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Departed {
    /// Order id.
    pub id: OrderId,
    /// Owner.
    pub user: UserId,
    /// The tag given at placement.
    pub tag: u64,
}

/// A price level: a FIFO queue of resting orders (ranked by tier first when the market has tiers).
#[derive(Clone, Debug)]
pub(crate) struct Level {
    pub(crate) price: i64,
    pub(crate) head: u32,
    pub(crate) tail: u32,
    pub(crate) qty: u64,
    pub(crate) count: u32,
}

/// The incoming side of a match: a new order, a triggered one, or a re-priced one.
#[derive(Clone, Debug)]
struct Taker {
    id: OrderId,
    user: UserId,
    side: Side,
    /// Worst acceptable price; `None` sweeps without bound.
    limit: Option<i64>,
    remaining: u64,
    accept: u64,
    reputation: u32,
    min_reputation: u32,
    min_fill: u64,
    max_fill: u64,
    stp: SelfTradePrevention,
    filled: u64,
}

impl Taker {
    #[inline]
    fn crosses(&self, level_price: i64) -> bool {
        match (self.limit, self.side) {
            (None, _) => true,
            (Some(limit), Side::Buy) => level_price <= limit,
            (Some(limit), Side::Sell) => level_price >= limit,
        }
    }

    /// Size of the next fill against `maker`, or 0 when their constraints keep them apart.
    /// Payment methods must intersect, each side must meet the other's minimum reputation, and
    /// the fill (capped by both maximum fill sizes) must reach both minimum fill sizes, where a
    /// minimum larger than an order's remaining quantity counts as that remaining quantity.
    #[inline]
    fn fill_with(&self, maker: &Order) -> u64 {
        if self.accept & maker.accept == 0
            || maker.reputation < self.min_reputation
            || self.reputation < maker.min_reputation
        {
            return 0;
        }
        let fill = self
            .remaining
            .min(maker.remaining)
            .min(self.max_fill)
            .min(maker.max_fill);
        let needed = self
            .min_fill
            .min(self.remaining)
            .max(maker.min_fill.min(maker.remaining));
        if fill < needed { 0 } else { fill }
    }
}

/// How a sweep ended for the taker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SweepEnd {
    /// Filled, out of crossing liquidity, or limited by price.
    Normal,
    /// Self-trade prevention cancelled the taker's remainder.
    SelfTradeCancelled,
}

/// One market's book and market data.
#[derive(Clone, Debug)]
pub(crate) struct Book {
    pub(crate) market: MarketId,
    pub(crate) spec: MarketSpec,
    pub(crate) orders: Chunked<Order>,
    free_orders: Vec<u32>,
    /// Slot of each live order by id, in [`ID_SHARDS`] tables (see [`id_shard`]).
    ids: [HashTable<u32>; ID_SHARDS],
    pub(crate) levels: Vec<Level>,
    free_levels: Vec<u32>,
    pub(crate) bids: Ladder,
    pub(crate) asks: Ladder,
    /// Armed orders that fire when the last price rises to their stop (buy stop, sell
    /// take-profit), by (stop, seq).
    pub(crate) triggers_above: BTreeMap<(i64, u64), u32>,
    /// Armed orders that fire when the last price falls to their stop (sell stop, buy
    /// take-profit), by (stop descending, seq).
    pub(crate) triggers_below: BTreeMap<(Reverse<i64>, u64), u32>,
    /// Stop price of each armed order, by slot.
    pub(crate) stop_prices: FxHashMap<u32, i64>,
    /// Orders with an expiry, by (expire_at, seq).
    pub(crate) expiries: BTreeMap<(Timestamp, u64), u32>,
    pub(crate) live: usize,
    /// The orders that left their slots during the last operation on this book, in the order
    /// they left (cleared as each operation starts, so it holds one operation's worth).
    pub(crate) departed: Vec<Departed>,
    pub(crate) next_seq: u64,
    pub(crate) data: MarketData,
}

#[inline]
fn hash_id(id: OrderId) -> u64 {
    FxBuildHasher.hash_one(id)
}

/// Tables of the id index. A hash table grows all at once: a larger table is allocated and
/// every entry rehashed, here by reading its order's id from the slab, a cache miss each. For
/// a book of a million orders that stalls one placement for tens of milliseconds. Split in
/// sixteen, each table grows on its own, a sixteenth of the work at a time.
const ID_SHARDS: usize = 16;

/// The table of a hash: four bits above those that index buckets in any table of fewer than
/// 2^48 and below the seven the table keeps as tags.
#[inline]
fn id_shard(hash: u64) -> usize {
    ((hash >> 48) as usize) & (ID_SHARDS - 1)
}

impl Book {
    pub(crate) fn new(market: MarketId, spec: MarketSpec) -> Book {
        Book {
            market,
            spec,
            orders: Chunked::default(),
            free_orders: Vec::new(),
            ids: std::array::from_fn(|_| HashTable::new()),
            levels: Vec::new(),
            free_levels: Vec::new(),
            bids: Ladder::default(),
            asks: Ladder::default(),
            triggers_above: BTreeMap::new(),
            triggers_below: BTreeMap::new(),
            stop_prices: FxHashMap::default(),
            expiries: BTreeMap::new(),
            live: 0,
            departed: Vec::new(),
            next_seq: 1,
            data: MarketData::default(),
        }
    }

    // ----- lookups -------------------------------------------------------------------------

    /// Slot of a live order.
    #[inline]
    pub(crate) fn slot_of(&self, id: OrderId) -> Option<u32> {
        let orders = &self.orders;
        let hash = hash_id(id);
        self.ids[id_shard(hash)]
            .find(hash, |&slot| {
                let order = &orders[slot as usize];
                order.id == id && order.state != State::Free
            })
            .copied()
    }

    #[inline]
    pub(crate) fn ladder(&self, side: Side) -> &Ladder {
        match side {
            Side::Buy => &self.bids,
            Side::Sell => &self.asks,
        }
    }

    #[inline]
    fn ladder_mut(&mut self, side: Side) -> &mut Ladder {
        match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        }
    }

    /// Best price of a side.
    pub(crate) fn best_price(&self, side: Side) -> Option<i64> {
        self.ladder(side)
            .best()
            .map(|level| self.levels[level as usize].price)
    }

    // ----- slots and levels ----------------------------------------------------------------

    /// Makes room in the id index for `orders` more orders, as a restore does before adding
    /// them, so that none of its tables grows on the way.
    pub(crate) fn reserve_ids(&mut self, orders: usize) {
        // Hashes spread evenly over the tables; an eighth more covers the unevenness.
        let per_table = orders / ID_SHARDS + orders / (ID_SHARDS * 8) + 16;
        let slab = &self.orders;
        for table in &mut self.ids {
            table.reserve(per_table, |&s| hash_id(slab[s as usize].id));
        }
    }

    pub(crate) fn alloc_order(&mut self, order: Order) -> u32 {
        let id = order.id;
        let slot = match self.free_orders.pop() {
            Some(slot) => {
                // The slot's previous order left its id entry behind (see `free_order`); there is
                // exactly one entry per slot, so it is found by its slot value.
                let old = self.orders[slot as usize].id;
                let hash = hash_id(old);
                match self.ids[id_shard(hash)].find_entry(hash, |&s| s == slot) {
                    Ok(entry) => {
                        entry.remove();
                    }
                    Err(_) => unreachable!("every used slot has an id entry"),
                }
                self.orders[slot as usize] = order;
                slot
            }
            None => self.orders.push(order) as u32,
        };
        let orders = &self.orders;
        let hash = hash_id(id);
        self.ids[id_shard(hash)].insert_unique(hash, slot, |&s| hash_id(orders[s as usize].id));
        self.live += 1;
        slot
    }

    /// Releases a slot. Its id entry stays until the slot is reused: removing it here would put
    /// a cache miss on the matching path of every filled maker, and lookups skip free slots.
    /// Empties the list of departed orders as an operation starts, keeping at most
    /// [`limits::DEPARTED_KEPT_MAX`] entries' room.
    fn start_operation(&mut self) {
        if self.departed.capacity() > limits::DEPARTED_KEPT_MAX {
            self.departed = Vec::new();
        } else {
            self.departed.clear();
        }
    }

    fn free_order(&mut self, slot: u32) {
        let order = &mut self.orders[slot as usize];
        order.state = State::Free;
        self.departed.push(Departed {
            id: order.id,
            user: order.user,
            tag: order.tag,
        });
        if order.expire_at != NEVER {
            self.expiries.remove(&(order.expire_at, order.seq));
        }
        self.free_orders.push(slot);
        self.live -= 1;
    }

    /// Links a resting order into the level for its price, creating the level if needed.
    pub(crate) fn link(&mut self, slot: u32) {
        let (side, price, remaining, tier) = {
            let order = &self.orders[slot as usize];
            (order.side, order.price, order.remaining, order.tier)
        };
        let level = match self.ladder(side).search(key(side, price)) {
            Ok(position) => self.ladder(side).level_at(position),
            Err(position) => {
                let level = self.alloc_level(price);
                self.ladder_mut(side)
                    .insert(position, key(side, price), level);
                level
            }
        };
        let tiered = !self.spec.reputation_tiers.is_empty();
        // With reputation tiers, the new order goes behind every order of its tier or higher.
        let mut after = self.levels[level as usize].tail;
        if tiered {
            while after != NIL && self.orders[after as usize].tier < tier {
                after = self.orders[after as usize].prev;
            }
        }
        let before = if after == NIL {
            self.levels[level as usize].head
        } else {
            self.orders[after as usize].next
        };
        {
            let order = &mut self.orders[slot as usize];
            order.prev = after;
            order.next = before;
            order.level = level;
            order.state = State::Resting;
        }
        if after == NIL {
            self.levels[level as usize].head = slot;
        } else {
            self.orders[after as usize].next = slot;
        }
        if before == NIL {
            self.levels[level as usize].tail = slot;
        } else {
            self.orders[before as usize].prev = slot;
        }
        let lvl = &mut self.levels[level as usize];
        lvl.qty += remaining;
        lvl.count += 1;
    }

    /// Unlinks a resting order from its level, removing the level when it empties. Returns the
    /// level when it still has orders.
    fn unlink(&mut self, slot: u32) -> Option<u32> {
        let (prev, next, level, remaining, side) = {
            let order = &self.orders[slot as usize];
            (
                order.prev,
                order.next,
                order.level,
                order.remaining,
                order.side,
            )
        };
        if prev == NIL {
            self.levels[level as usize].head = next;
        } else {
            self.orders[prev as usize].next = next;
        }
        if next == NIL {
            self.levels[level as usize].tail = prev;
        } else {
            self.orders[next as usize].prev = prev;
        }
        let lvl = &mut self.levels[level as usize];
        lvl.qty -= remaining;
        lvl.count -= 1;
        self.orders[slot as usize].level = NIL;
        if lvl.count > 0 {
            return Some(level);
        }
        let price = lvl.price;
        let position = self
            .ladder(side)
            .search(key(side, price))
            .expect("a non-empty level is on its ladder");
        self.ladder_mut(side).remove(position);
        self.free_levels.push(level);
        None
    }

    fn alloc_level(&mut self, price: i64) -> u32 {
        let level = Level {
            price,
            head: NIL,
            tail: NIL,
            qty: 0,
            count: 0,
        };
        match self.free_levels.pop() {
            Some(slot) => {
                self.levels[slot as usize] = level;
                slot
            }
            None => {
                self.levels.push(level);
                (self.levels.len() - 1) as u32
            }
        }
    }

    fn emit_level(&self, side: Side, level: u32, out: &mut Vec<Event>) {
        let lvl = &self.levels[level as usize];
        out.push(Event::Book {
            market: self.market,
            side,
            price: Price(lvl.price),
            qty: Qty(lvl.qty),
            orders: lvl.count,
        });
    }

    /// Emits the L2 state of a level that may be gone (then its quantity is zero).
    fn emit_level_or_gone(&self, side: Side, price: i64, level: Option<u32>, out: &mut Vec<Event>) {
        match level {
            Some(level) => self.emit_level(side, level, out),
            None => out.push(Event::Book {
                market: self.market,
                side,
                price: Price(price),
                qty: Qty::ZERO,
                orders: 0,
            }),
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    // ----- validation ----------------------------------------------------------------------

    fn check_price(&self, price: i64) -> Result<(), RejectReason> {
        if price <= 0 {
            return Err(RejectReason::InvalidPrice);
        }
        // Most ticks are one unit (the unit comes from the tick's decimals): skip the division.
        if self.spec.tick != 1 && price % self.spec.tick != 0 {
            return Err(RejectReason::BadTick);
        }
        Ok(())
    }

    fn check_band(&self, price: i64) -> Result<(), RejectReason> {
        if let (Some(band), Some(last)) = (self.spec.price_band_bps, self.data.last_price) {
            let distance = (i128::from(price) - i128::from(last)).abs() * 10_000;
            if distance > i128::from(band) * i128::from(last) {
                return Err(RejectReason::PriceBand);
            }
        }
        Ok(())
    }

    fn check_size(&self, qty: u64) -> Result<(), RejectReason> {
        if qty == 0 {
            return Err(RejectReason::InvalidQuantity);
        }
        if self.spec.lot != 1 && !qty.is_multiple_of(self.spec.lot) {
            return Err(RejectReason::BadLot);
        }
        if self.spec.min_qty.is_some_and(|min| qty < min.0) {
            return Err(RejectReason::SizeTooSmall);
        }
        if self.spec.max_qty.is_some_and(|max| qty > max.0) {
            return Err(RejectReason::SizeTooLarge);
        }
        Ok(())
    }

    fn check_notional(&self, price: Option<i64>, qty: u64) -> Result<(), RejectReason> {
        if let (Some(min), Some(price)) = (self.spec.min_notional, price)
            && (price as u128) * u128::from(qty) < min
        {
            return Err(RejectReason::MinNotional);
        }
        Ok(())
    }

    /// Whether one more live order fits, and, for an order that may rest `qty` at `price`,
    /// whether its level can take it: a new level needs room on the ladder, an existing one must
    /// keep its total within `u64`. `moving` is a resting order that leaves its level first (a
    /// modify). Limits per user belong to the layer that knows users (the core), not the book.
    pub(crate) fn check_capacity(
        &self,
        side: Side,
        rest: Option<(i64, u64)>,
        moving: Option<&Order>,
    ) -> Result<(), RejectReason> {
        if self.live >= limits::ORDERS_PER_MARKET_MAX && moving.is_none() {
            return Err(RejectReason::TooManyOrders);
        }
        let Some((price, qty)) = rest else {
            return Ok(());
        };
        let ladder = self.ladder(side);
        match ladder.search(key(side, price)) {
            Ok(position) => {
                let level = ladder.level_at(position);
                let mut total = self.levels[level as usize].qty;
                if let Some(order) = moving.filter(|o| o.level == level) {
                    total -= order.remaining;
                }
                if total.checked_add(qty).is_none() {
                    return Err(RejectReason::LevelFull);
                }
            }
            Err(_) => {
                // Moving the only order of a level frees that level first.
                let frees_level = moving.is_some_and(|o| self.levels[o.level as usize].count == 1);
                if ladder.len() >= limits::LEVELS_PER_SIDE_MAX && !frees_level {
                    return Err(RejectReason::TooManyOrders);
                }
            }
        }
        Ok(())
    }

    fn validate_place(&self, cmd: &PlaceOrder, now: Timestamp) -> Result<(), RejectReason> {
        if self.slot_of(cmd.id).is_some() {
            return Err(RejectReason::DuplicateOrderId);
        }
        let market_like = cmd.order_type.is_market_like();
        match cmd.price {
            Some(price) => self.check_price(price.0)?,
            None if !market_like => return Err(RejectReason::InvalidPrice),
            None => {}
        }
        if cmd.order_type.is_conditional() {
            match cmd.stop_price {
                Some(stop) if stop.0 > 0 && stop.0 % self.spec.tick == 0 => {}
                _ => return Err(RejectReason::InvalidStopPrice),
            }
        } else if cmd.stop_price.is_some() {
            return Err(RejectReason::InvalidStopPrice);
        }
        self.check_size(cmd.qty.0)?;
        if !self.spec.payment_methods_ok(cmd.payment_methods) {
            return Err(RejectReason::UnknownPaymentMethod);
        }
        self.check_notional(cmd.price.or(cmd.stop_price).map(|p| p.0), cmd.qty.0)?;
        if let (Some(price), false) = (cmd.price, market_like) {
            self.check_band(price.0)?;
        }
        if market_like && !matches!(cmd.tif, TimeInForce::Ioc | TimeInForce::Fok) {
            return Err(RejectReason::InvalidTimeInForce);
        }
        if cmd.post_only && (market_like || !cmd.tif.rests()) {
            return Err(RejectReason::InvalidTimeInForce);
        }
        match (cmd.tif, cmd.expire_at) {
            (TimeInForce::Gtd, Some(at)) if at > now => {}
            (TimeInForce::Gtd, _) | (_, Some(_)) => return Err(RejectReason::InvalidExpiry),
            _ => {}
        }
        let lot = self.spec.lot;
        let fill_ok = |q: Option<Qty>| q.is_none_or(|q| q.0 > 0 && q.0 % lot == 0);
        if !fill_ok(cmd.min_fill)
            || !fill_ok(cmd.max_fill)
            || matches!((cmd.min_fill, cmd.max_fill), (Some(min), Some(max)) if min > max)
        {
            return Err(RejectReason::InvalidFillLimits);
        }
        // A conditional order takes a slot now; its level is checked when it triggers.
        let may_rest = cmd.tif.rests() && cmd.order_type == OrderType::Limit;
        let rest = cmd.price.filter(|_| may_rest).map(|p| (p.0, cmd.qty.0));
        self.check_capacity(cmd.side, rest, None)
    }

    // ----- matching ------------------------------------------------------------------------

    /// Quantity the taker could fill now, stopping once `target` is reached, without changing
    /// anything. Mirrors [`Book::sweep`]: a resting order of the same user stops the count unless
    /// the taker's self-trade mode cancels resting orders.
    fn fillable(&self, taker: &Taker, target: u64) -> u64 {
        let ladder = self.ladder(taker.side.opposite());
        let mut probe = taker.clone();
        let mut filled = 0;
        for level in ladder.iter_best_first() {
            let lvl = &self.levels[level as usize];
            if !probe.crosses(lvl.price) {
                break;
            }
            let mut cursor = lvl.head;
            while cursor != NIL {
                let maker = &self.orders[cursor as usize];
                cursor = maker.next;
                let fill = probe.fill_with(maker);
                if fill == 0 {
                    continue;
                }
                if maker.user == probe.user {
                    if probe.stp == SelfTradePrevention::CancelOldest {
                        continue;
                    }
                    return filled;
                }
                filled += fill;
                probe.remaining -= fill;
                if filled >= target || probe.remaining == 0 {
                    return filled;
                }
            }
        }
        filled
    }

    /// Whether a post-only order at this price would meet a compatible resting order.
    fn would_cross(&self, taker: &Taker) -> bool {
        let ladder = self.ladder(taker.side.opposite());
        for level in ladder.iter_best_first() {
            let lvl = &self.levels[level as usize];
            if !taker.crosses(lvl.price) {
                break;
            }
            let mut cursor = lvl.head;
            while cursor != NIL {
                let maker = &self.orders[cursor as usize];
                if taker.fill_with(maker) > 0 {
                    return true;
                }
                cursor = maker.next;
            }
        }
        false
    }

    /// Matches the taker against the opposite side, best level first, skipping resting orders
    /// it cannot trade with. Emits trades, self-trade cancellations and one L2 event per level
    /// touched.
    fn sweep(&mut self, taker: &mut Taker, now: Timestamp, out: &mut Vec<Event>) -> SweepEnd {
        let maker_side = taker.side.opposite();
        let mut position = self.ladder(maker_side).len();
        let mut end = SweepEnd::Normal;
        while position > 0 && taker.remaining > 0 && end == SweepEnd::Normal {
            position -= 1;
            let level = self.ladder(maker_side).level_at(position);
            let level_price = self.levels[level as usize].price;
            if !taker.crosses(level_price) {
                break;
            }
            let mut cursor = self.levels[level as usize].head;
            let mut touched = false;
            while cursor != NIL && taker.remaining > 0 {
                let slot = cursor;
                let maker = &self.orders[slot as usize];
                cursor = maker.next;
                let fill = taker.fill_with(maker);
                if fill == 0 {
                    continue;
                }
                touched = true;
                if maker.user == taker.user {
                    end = self.prevent_self_trade(taker, slot, out);
                    if end != SweepEnd::Normal {
                        break;
                    }
                    continue;
                }
                let maker = &mut self.orders[slot as usize];
                maker.remaining -= fill;
                maker.filled += fill;
                let maker_id = maker.id;
                let maker_user = maker.user;
                let maker_done = maker.remaining == 0;
                self.levels[level as usize].qty -= fill;
                taker.remaining -= fill;
                taker.filled += fill;
                out.push(Event::Trade {
                    market: self.market,
                    maker: maker_id,
                    taker: taker.id,
                    maker_user,
                    taker_user: taker.user,
                    taker_side: taker.side,
                    price: Price(level_price),
                    qty: Qty(fill),
                });
                self.data.record_trade(now, level_price, fill);
                if maker_done {
                    self.remove_resting(slot);
                }
            }
            if touched {
                // No level is allocated during a sweep, so a level emptied here still reads as
                // empty in its (freed) slot.
                let alive = (self.levels[level as usize].count > 0).then_some(level);
                self.emit_level_or_gone(maker_side, level_price, alive, out);
            }
        }
        end
    }

    /// Applies the taker's self-trade mode against its own resting order in `slot`.
    fn prevent_self_trade(
        &mut self,
        taker: &mut Taker,
        slot: u32,
        out: &mut Vec<Event>,
    ) -> SweepEnd {
        match taker.stp {
            SelfTradePrevention::CancelNewest => SweepEnd::SelfTradeCancelled,
            SelfTradePrevention::CancelOldest => {
                self.cancel_resting(slot, CancelCause::SelfTrade, out, false);
                SweepEnd::Normal
            }
            SelfTradePrevention::CancelBoth => {
                self.cancel_resting(slot, CancelCause::SelfTrade, out, false);
                SweepEnd::SelfTradeCancelled
            }
            SelfTradePrevention::Decrement => {
                let maker_remaining = self.orders[slot as usize].remaining;
                let cut = maker_remaining.min(taker.remaining);
                if cut == maker_remaining {
                    self.cancel_resting(slot, CancelCause::SelfTrade, out, false);
                } else {
                    let maker = &mut self.orders[slot as usize];
                    maker.remaining -= cut;
                    let (id, user, open, level) =
                        (maker.id, maker.user, maker.remaining, maker.level);
                    self.levels[level as usize].qty -= cut;
                    out.push(Event::Cancelled {
                        market: self.market,
                        id,
                        user,
                        remaining: Qty(cut),
                        open: Qty(open),
                        cause: CancelCause::SelfTrade,
                    });
                }
                // The taker loses the same quantity; at zero it is done and nothing rests.
                taker.remaining -= cut;
                out.push(Event::Cancelled {
                    market: self.market,
                    id: taker.id,
                    user: taker.user,
                    remaining: Qty(cut),
                    open: Qty(taker.remaining),
                    cause: CancelCause::SelfTrade,
                });
                SweepEnd::Normal
            }
        }
    }

    /// Removes a resting order that has been filled completely.
    fn remove_resting(&mut self, slot: u32) {
        let _ = self.unlink(slot);
        self.free_order(slot);
    }

    /// Cancels a live order (resting or armed) with a cause, emitting the event and, for a
    /// resting order outside a sweep, its L2 change.
    fn cancel_resting(
        &mut self,
        slot: u32,
        cause: CancelCause,
        out: &mut Vec<Event>,
        emit_l2: bool,
    ) {
        let order = &self.orders[slot as usize];
        let (id, user, remaining, side, price, state) = (
            order.id,
            order.user,
            order.remaining,
            order.side,
            order.price,
            order.state,
        );
        let level = match state {
            State::Resting => self.unlink(slot),
            State::Armed => {
                self.disarm(slot);
                None
            }
            State::Free => unreachable!("cancel of a free slot"),
        };
        self.free_order(slot);
        out.push(Event::Cancelled {
            market: self.market,
            id,
            user,
            remaining: Qty(remaining),
            open: Qty(0),
            cause,
        });
        if emit_l2 && state == State::Resting {
            self.emit_level_or_gone(side, price, level, out);
        }
    }

    fn disarm(&mut self, slot: u32) {
        let stop = self
            .stop_prices
            .remove(&slot)
            .expect("an armed order has a stop price");
        let order = &self.orders[slot as usize];
        if fires_above(order.order_type, order.side) {
            self.triggers_above.remove(&(stop, order.seq));
        } else {
            self.triggers_below.remove(&(Reverse(stop), order.seq));
        }
    }

    fn taker_from(&self, order: &Order, limit: Option<i64>) -> Taker {
        Taker {
            id: order.id,
            user: order.user,
            side: order.side,
            limit,
            remaining: order.remaining,
            accept: order.accept,
            reputation: order.reputation,
            min_reputation: order.min_reputation,
            min_fill: order.min_fill,
            max_fill: order.max_fill,
            stp: order.stp,
            filled: order.filled,
        }
    }

    // ----- operations ----------------------------------------------------------------------

    /// The order a valid placement creates.
    fn new_order(&self, cmd: &PlaceOrder, tag: u64, now: Timestamp) -> Order {
        Order {
            id: cmd.id,
            user: cmd.user,
            remaining: cmd.qty.0,
            accept: cmd.payment_methods.0,
            reputation: cmd.reputation,
            min_reputation: cmd.min_reputation,
            next: NIL,
            prev: NIL,
            min_fill: cmd.min_fill.map_or(0, |q| q.0),
            max_fill: cmd.max_fill.map_or(u64::MAX, |q| q.0),
            price: cmd.price.map_or(0, |p| p.0),
            filled: 0,
            seq: 0,
            expire_at: match cmd.tif {
                TimeInForce::Day => self.spec.next_cutoff(now),
                TimeInForce::Gtd => cmd.expire_at.unwrap_or(NEVER),
                _ => NEVER,
            },
            level: NIL,
            side: cmd.side,
            order_type: cmd.order_type,
            tif: cmd.tif,
            stp: cmd.stp.unwrap_or(self.spec.default_stp),
            tier: self.spec.tier_of(cmd.reputation),
            post_only: cmd.post_only,
            state: State::Free,
            tag,
        }
    }

    /// The checks of a non-conditional order that depend on the book: post-only, fill-or-kill
    /// and market-order liquidity.
    fn book_refusal(&self, cmd: &PlaceOrder, taker: &Taker) -> Option<RejectReason> {
        if cmd.post_only && self.would_cross(taker) {
            Some(RejectReason::PostOnlyWouldCross)
        } else if cmd.tif == TimeInForce::Fok && self.fillable(taker, cmd.qty.0) < cmd.qty.0 {
            Some(RejectReason::FokUnfillable)
        } else if cmd.order_type == OrderType::Market && self.fillable(taker, 1) == 0 {
            Some(RejectReason::NoLiquidity)
        } else {
            None
        }
    }

    /// Every check `place` makes, without placing.
    pub(crate) fn check_place(&self, cmd: &PlaceOrder, now: Timestamp) -> Result<(), RejectReason> {
        self.validate_place(cmd, now)?;
        if cmd.order_type.is_conditional() {
            return Ok(());
        }
        let order = self.new_order(cmd, 0, now);
        let taker = self.taker_from(&order, (order.price != 0).then_some(order.price));
        self.book_refusal(cmd, &taker).map_or(Ok(()), Err)
    }

    /// Every check `modify` makes, without modifying.
    pub(crate) fn check_modify(&self, cmd: &ModifyOrder) -> Result<(), RejectReason> {
        self.validate_modify(cmd).map(|_| ())
    }

    /// Places an order carrying the caller's `tag`. Emits `Rejected` alone when any check
    /// fails.
    pub(crate) fn place(
        &mut self,
        cmd: &PlaceOrder,
        tag: u64,
        now: Timestamp,
        out: &mut Vec<Event>,
    ) {
        self.start_operation();
        if let Err(reason) = self.validate_place(cmd, now) {
            self.reject(cmd.id, reason, out);
            return;
        }
        let order = self.new_order(cmd, tag, now);

        if cmd.order_type.is_conditional() {
            let stop = cmd.stop_price.map_or(0, |p| p.0);
            let due = self
                .data
                .last_price
                .is_some_and(|last| trigger_due(cmd.order_type, cmd.side, stop, last));
            if !due {
                self.accept(&order, out);
                self.arm(order, stop);
                return;
            }
            // Already due: accept and trigger at once, then continue as a triggered order.
            self.accept(&order, out);
            out.push(Event::Triggered {
                market: self.market,
                id: order.id,
                user: order.user,
                last_price: Price(self.data.last_price.unwrap_or(0)),
            });
            self.run_triggered(order, now, out);
            self.fire_triggers(now, out);
            return;
        }

        // Limit orders always have a price; a market order's price is its optional protection.
        let limit = (order.price != 0).then_some(order.price);
        let taker = self.taker_from(&order, limit);
        // The checks that depend on the book, still before any change.
        if let Some(reason) = self.book_refusal(cmd, &taker) {
            self.reject(cmd.id, reason, out);
            return;
        }
        self.accept(&order, out);
        self.execute(order, taker, now, out);
        self.fire_triggers(now, out);
    }

    fn reject(&self, id: OrderId, reason: RejectReason, out: &mut Vec<Event>) {
        out.push(Event::Rejected {
            market: Some(self.market),
            id,
            reason,
        });
    }

    fn accept(&self, order: &Order, out: &mut Vec<Event>) {
        out.push(Event::Accepted {
            market: self.market,
            id: order.id,
            user: order.user,
            side: order.side,
            order_type: order.order_type,
            qty: Qty(order.remaining),
        });
    }

    fn arm(&mut self, mut order: Order, stop: i64) {
        order.seq = self.take_seq();
        order.state = State::Armed;
        let fires_up = fires_above(order.order_type, order.side);
        let (seq, expire_at) = (order.seq, order.expire_at);
        let slot = self.alloc_order(order);
        if fires_up {
            self.triggers_above.insert((stop, seq), slot);
        } else {
            self.triggers_below.insert((Reverse(stop), seq), slot);
        }
        self.stop_prices.insert(slot, stop);
        if expire_at != NEVER {
            self.expiries.insert((expire_at, seq), slot);
        }
    }

    /// Sweeps with a taker built from `order` (not in a slot), then rests or cancels the rest.
    fn execute(
        &mut self,
        mut order: Order,
        mut taker: Taker,
        now: Timestamp,
        out: &mut Vec<Event>,
    ) {
        let end = self.sweep(&mut taker, now, out);
        order.remaining = taker.remaining;
        order.filled = taker.filled;
        if taker.remaining == 0 {
            return;
        }
        let cause = match end {
            SweepEnd::SelfTradeCancelled => Some(CancelCause::SelfTrade),
            SweepEnd::Normal if order.order_type.is_market_like() => {
                Some(CancelCause::MarketRemainder)
            }
            SweepEnd::Normal if !order.tif.rests() => Some(if order.tif == TimeInForce::Fok {
                CancelCause::FillOrKill
            } else {
                CancelCause::ImmediateOrCancel
            }),
            SweepEnd::Normal => None,
        };
        match cause {
            Some(cause) => out.push(Event::Cancelled {
                market: self.market,
                id: order.id,
                user: order.user,
                remaining: Qty(taker.remaining),
                open: Qty(0),
                cause,
            }),
            None => {
                let slot = self.alloc_order(order);
                self.rest(slot, out);
            }
        }
    }

    /// Puts the order in `slot` at the back of its level with a new sequence number, indexes its
    /// expiry, and reports the level.
    fn rest(&mut self, slot: u32, out: &mut Vec<Event>) {
        let seq = self.take_seq();
        self.orders[slot as usize].seq = seq;
        self.link(slot);
        let order = &self.orders[slot as usize];
        let (side, level, expire_at) = (order.side, order.level, order.expire_at);
        if expire_at != NEVER {
            self.expiries.insert((expire_at, seq), slot);
        }
        self.emit_level(side, level, out);
    }

    /// Runs a triggered conditional order (already out of its slot) as a market or limit order.
    fn run_triggered(&mut self, mut order: Order, now: Timestamp, out: &mut Vec<Event>) {
        let market_like = order.order_type.is_market_like();
        order.order_type = if market_like {
            OrderType::Market
        } else {
            OrderType::Limit
        };
        let limit = (order.price != 0).then_some(order.price);
        let taker = self.taker_from(&order, limit);
        let refuse = |cause| Event::Cancelled {
            market: self.market,
            id: order.id,
            user: order.user,
            remaining: Qty(order.remaining),
            open: Qty(0),
            cause,
        };
        if order.post_only && self.would_cross(&taker) {
            out.push(refuse(CancelCause::PostOnly));
            return;
        }
        if order.tif == TimeInForce::Fok && self.fillable(&taker, order.remaining) < order.remaining
        {
            out.push(refuse(CancelCause::FillOrKill));
            return;
        }
        if market_like && self.fillable(&taker, 1) == 0 {
            out.push(refuse(CancelCause::NoLiquidity));
            return;
        }
        // The slot it held was released when it triggered, so only the level limit can refuse
        // it here.
        if !market_like
            && order.tif.rests()
            && self
                .check_capacity(order.side, Some((order.price, order.remaining)), None)
                .is_err()
        {
            out.push(refuse(CancelCause::BookFull));
            return;
        }
        self.execute(order, taker, now, out);
    }

    /// Fires every due armed order, one at a time and in a fixed order, until none is due:
    /// first orders that fire on a rising price (lowest stop first), then those that fire on a
    /// falling price (highest stop first), ties by acceptance order. A fired order's trades can
    /// make more orders due; each order fires at most once, so this ends.
    fn fire_triggers(&mut self, now: Timestamp, out: &mut Vec<Event>) {
        while let Some(last) = self.data.last_price {
            let slot = if let Some((&(stop, _), &slot)) = self.triggers_above.first_key_value()
                && stop <= last
            {
                slot
            } else if let Some((&(Reverse(stop), _), &slot)) = self.triggers_below.first_key_value()
                && stop >= last
            {
                slot
            } else {
                return;
            };
            self.disarm(slot);
            let order = self.orders[slot as usize].clone();
            self.free_order(slot);
            out.push(Event::Triggered {
                market: self.market,
                id: order.id,
                user: order.user,
                last_price: Price(last),
            });
            self.run_triggered(order, now, out);
        }
    }

    /// Cancels one live order of its owner.
    pub(crate) fn cancel(&mut self, id: OrderId, user: UserId, out: &mut Vec<Event>) {
        self.start_operation();
        let slot = match self.owned_slot(id, user) {
            Ok(slot) => slot,
            Err(reason) => return self.reject(id, reason, out),
        };
        self.cancel_resting(slot, CancelCause::User, out, true);
    }

    fn owned_slot(&self, id: OrderId, user: UserId) -> Result<u32, RejectReason> {
        let slot = self.slot_of(id).ok_or(RejectReason::UnknownOrder)?;
        if self.orders[slot as usize].user != user {
            return Err(RejectReason::NotOwner);
        }
        Ok(slot)
    }

    /// Cancels every live order of the market, or of one user in it, oldest first.
    pub(crate) fn cancel_all(&mut self, user: Option<UserId>, out: &mut Vec<Event>) {
        self.start_operation();
        let mut slots: Vec<(u64, u32)> = self
            .orders
            .iter()
            .enumerate()
            .filter(|(_, order)| order.state != State::Free && user.is_none_or(|u| u == order.user))
            .map(|(slot, order)| (order.seq, slot as u32))
            .collect();
        slots.sort_unstable();
        for (_, slot) in slots {
            self.cancel_resting(slot, CancelCause::CancelAll, out, true);
        }
    }

    /// Changes a live order's price and/or open quantity. A smaller quantity at the same price
    /// keeps the order's place; any other change sends it to the back and, if the new price
    /// crosses, it trades first as a taker.
    pub(crate) fn modify(&mut self, cmd: &ModifyOrder, now: Timestamp, out: &mut Vec<Event>) {
        self.start_operation();
        let slot = match self.validate_modify(cmd) {
            Ok(slot) => slot,
            Err(reason) => return self.reject(cmd.id, reason, out),
        };
        let order = &self.orders[slot as usize];
        let new_price = cmd.price.map_or(order.price, |p| p.0);
        let new_qty = cmd.qty.map_or(order.remaining, |q| q.0);
        let keeps_priority = new_price == order.price && new_qty <= order.remaining;
        if order.state == State::Armed {
            // An armed order keeps its trigger position; only its terms change.
            let order = &mut self.orders[slot as usize];
            order.price = new_price;
            order.remaining = new_qty;
            out.push(self.modified_event(slot, true));
            return;
        }
        if keeps_priority {
            let order = &mut self.orders[slot as usize];
            let cut = order.remaining - new_qty;
            order.remaining = new_qty;
            let (side, level) = (order.side, order.level);
            self.levels[level as usize].qty -= cut;
            out.push(self.modified_event(slot, true));
            self.emit_level(side, level, out);
            return;
        }
        // Off the book and to the back: the order keeps its slot and id entry, takes a new
        // place in the expiry index, and trades first if its new price crosses.
        let (side, old_price, expire_at, old_seq) =
            (order.side, order.price, order.expire_at, order.seq);
        let old_level = self.unlink(slot);
        if expire_at != NEVER {
            self.expiries.remove(&(expire_at, old_seq));
        }
        let order = &mut self.orders[slot as usize];
        order.price = new_price;
        order.remaining = new_qty;
        out.push(self.modified_event(slot, false));
        self.emit_level_or_gone(side, old_price, old_level, out);
        let mut taker = self.taker_from(&self.orders[slot as usize], Some(new_price));
        let end = self.sweep(&mut taker, now, out);
        let order = &mut self.orders[slot as usize];
        order.remaining = taker.remaining;
        order.filled = taker.filled;
        if taker.remaining == 0 {
            self.free_order(slot);
        } else if end == SweepEnd::SelfTradeCancelled {
            out.push(Event::Cancelled {
                market: self.market,
                id: taker.id,
                user: taker.user,
                remaining: Qty(taker.remaining),
                open: Qty(0),
                cause: CancelCause::SelfTrade,
            });
            self.free_order(slot);
        } else {
            self.rest(slot, out);
        }
        self.fire_triggers(now, out);
    }

    fn validate_modify(&self, cmd: &ModifyOrder) -> Result<u32, RejectReason> {
        let slot = self.owned_slot(cmd.id, cmd.user)?;
        let order = &self.orders[slot as usize];
        if cmd.price.is_none() && cmd.qty.is_none() {
            return Err(RejectReason::InvalidModify);
        }
        if cmd.price.is_some() && order.order_type.is_market_like() {
            return Err(RejectReason::InvalidModify);
        }
        let new_price = cmd.price.map_or(order.price, |p| p.0);
        let new_qty = cmd.qty.map_or(order.remaining, |q| q.0);
        if new_price == order.price && new_qty == order.remaining {
            return Err(RejectReason::InvalidModify);
        }
        if let Some(price) = cmd.price {
            self.check_price(price.0)?;
            self.check_band(price.0)?;
        }
        let reduction_only = new_price == order.price && new_qty < order.remaining;
        if reduction_only {
            if new_qty == 0 {
                return Err(RejectReason::InvalidQuantity);
            }
            if !new_qty.is_multiple_of(self.spec.lot) {
                return Err(RejectReason::BadLot);
            }
        } else {
            self.check_size(new_qty)?;
            let price = (new_price != 0).then_some(new_price);
            self.check_notional(price, new_qty)?;
            // Filled plus open must stay representable, so later fills cannot overflow.
            if order.filled.checked_add(new_qty).is_none() {
                return Err(RejectReason::SizeTooLarge);
            }
        }
        if order.state == State::Resting && !reduction_only {
            self.check_capacity(order.side, Some((new_price, new_qty)), Some(order))?;
            if order.post_only {
                let mut taker = self.taker_from(order, Some(new_price));
                taker.remaining = new_qty;
                if self.would_cross(&taker) {
                    return Err(RejectReason::PostOnlyWouldCross);
                }
            }
        }
        Ok(slot)
    }

    fn modified_event(&self, slot: u32, priority_kept: bool) -> Event {
        let order = &self.orders[slot as usize];
        Event::Modified {
            market: self.market,
            id: order.id,
            user: order.user,
            price: Price(order.price),
            qty: Qty(order.remaining),
            priority_kept,
        }
    }

    /// Expires every order whose expiry is at or before `now`, in expiry then acceptance order.
    pub(crate) fn expire(&mut self, now: Timestamp, out: &mut Vec<Event>) {
        self.start_operation();
        while let Some((&(at, _), &slot)) = self.expiries.first_key_value() {
            if at > now {
                break;
            }
            let order = &self.orders[slot as usize];
            let (id, user, remaining, side, price, state) = (
                order.id,
                order.user,
                order.remaining,
                order.side,
                order.price,
                order.state,
            );
            let level = match state {
                State::Resting => self.unlink(slot),
                State::Armed => {
                    self.disarm(slot);
                    None
                }
                State::Free => unreachable!("an expiry of a free slot"),
            };
            self.free_order(slot);
            out.push(Event::Expired {
                market: self.market,
                id,
                user,
                remaining: Qty(remaining),
            });
            if state == State::Resting {
                self.emit_level_or_gone(side, price, level, out);
            }
        }
    }

    /// Heap bytes held by the book's order and level structures.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.orders.heap_bytes()
            + self.free_orders.capacity() * 4
            + self.ids.iter().map(HashTable::capacity).sum::<usize>() * 5
            + self.levels.capacity() * std::mem::size_of::<Level>()
            + self.free_levels.capacity() * 4
            + self.bids.heap_bytes()
            + self.asks.heap_bytes()
            + self.departed.capacity() * std::mem::size_of::<Departed>()
    }
}

/// Whether an order of this type and side fires when the price rises to its stop.
pub(crate) fn fires_above(order_type: OrderType, side: Side) -> bool {
    matches!(
        (order_type, side),
        (OrderType::StopMarket | OrderType::StopLimit, Side::Buy)
            | (
                OrderType::TakeProfitMarket | OrderType::TakeProfitLimit,
                Side::Sell
            )
    )
}

/// Whether a conditional order with this stop is due at the last trade price.
pub(crate) fn trigger_due(order_type: OrderType, side: Side, stop: i64, last: i64) -> bool {
    if fires_above(order_type, side) {
        last >= stop
    } else {
        last <= stop
    }
}
