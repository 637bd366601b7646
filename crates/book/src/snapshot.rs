//! Snapshots and the state hash: one canonical binary encoding of the whole engine state.
//!
//! The encoding lists everything that decides future events (clock, market specifications,
//! sequence counters, market data, and every live order in queue order) and nothing that does
//! not (slab positions, free lists, hash table layout). Two engines that behave the same encode
//! to the same bytes, so the state hash is the SHA-256 of the encoding, and a snapshot restored
//! into a fresh engine continues exactly as the original would.

use std::cmp::Reverse;

use sha2::{Digest, Sha256};

use crate::book::{Book, NEVER, NIL, Order, State};
use crate::engine::Engine;
use crate::market::MarketSpec;
use crate::stats::{Candle, Interval};
use crate::types::{
    MarketId, OrderType, Price, Qty, SelfTradePrevention, Settlement, Side, TimeInForce,
};

const MAGIC: &[u8; 4] = b"AGBK";
const VERSION: u32 = 1;

/// Why a snapshot could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotError {
    /// Byte offset where reading failed.
    pub offset: usize,
    /// What was wrong there.
    pub problem: &'static str,
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid snapshot at byte {}: {}",
            self.offset, self.problem
        )
    }
}

impl std::error::Error for SnapshotError {}

/// Where encoded bytes go: a buffer, or a hasher.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// Slots of a book's live orders in canonical order: bid levels best first, each in queue
/// order; then asks likewise; then armed orders, rising-price triggers first, each set in firing
/// order.
pub(crate) fn canonical_slots(book: &Book) -> Vec<u32> {
    let mut slots = Vec::with_capacity(book.live);
    for side in [Side::Buy, Side::Sell] {
        for level in book.ladder(side).iter_best_first() {
            let mut cursor = book.levels[level as usize].head;
            while cursor != NIL {
                slots.push(cursor);
                cursor = book.orders[cursor as usize].next;
            }
        }
    }
    slots.extend(book.triggers_above.values().copied());
    slots.extend(book.triggers_below.values().copied());
    slots
}

fn encode_into(engine: &Engine, sink: &mut impl Sink) {
    let mut w = Writer { sink };
    w.bytes(MAGIC);
    w.u32(VERSION);
    w.i64(engine.now);
    w.u32(engine.books.len() as u32);
    for book in &engine.books {
        encode_spec(&mut w, &book.spec);
        w.u64(book.next_seq);
        let data = &book.data;
        w.opt_i64(data.last_price);
        w.opt_i64(data.last_trade_at);
        w.opt_i64(data.last_qty.map(|q| q.0 as i64));
        for series in &data.candles {
            w.u32(series.len() as u32);
            for candle in series {
                w.i64(candle.open_time);
                w.i64(candle.open.0);
                w.i64(candle.high.0);
                w.i64(candle.low.0);
                w.i64(candle.close.0);
                w.u128(candle.volume);
                w.u128(candle.quote_volume);
                w.u64(candle.trades);
            }
        }
        let slots = canonical_slots(book);
        w.u32(slots.len() as u32);
        for slot in slots {
            let order = &book.orders[slot as usize];
            w.u64(order.id);
            w.u64(order.user);
            w.u64(order.remaining);
            w.u64(order.accept);
            w.u32(order.reputation);
            w.u32(order.min_reputation);
            w.u64(order.min_fill);
            w.u64(order.max_fill);
            w.i64(order.price);
            w.u64(order.filled);
            w.u64(order.seq);
            w.i64(order.expire_at);
            w.u8(side_code(order.side));
            w.u8(type_code(order.order_type));
            w.u8(tif_code(order.tif));
            w.u8(stp_code(order.stp));
            w.u8(order.post_only as u8);
            match order.state {
                State::Armed => {
                    w.u8(1);
                    w.i64(book.stop_prices[&slot]);
                }
                _ => w.u8(0),
            }
        }
    }
}

fn encode_spec(w: &mut Writer<'_, impl Sink>, spec: &MarketSpec) {
    w.str(&spec.symbol);
    w.u32(spec.price_decimals);
    w.u32(spec.qty_decimals);
    w.i64(spec.tick);
    w.u64(spec.lot);
    w.opt_i64(spec.min_qty.map(|q| q.0 as i64));
    w.opt_i64(spec.max_qty.map(|q| q.0 as i64));
    match spec.min_notional {
        Some(n) => {
            w.u8(1);
            w.u128(n);
        }
        None => w.u8(0),
    }
    w.opt_i64(spec.price_band_bps.map(i64::from));
    w.u8(match spec.settlement {
        Settlement::Instant => 0,
        Settlement::Escrow => 1,
    });
    w.u8(stp_code(spec.default_stp));
    w.i64(spec.day_cutoff_ms);
    w.u32(spec.reputation_tiers.len() as u32);
    for &tier in &spec.reputation_tiers {
        w.u32(tier);
    }
    w.u32(spec.payment_methods.len() as u32);
    for name in &spec.payment_methods {
        w.str(name);
    }
}

impl Engine {
    /// The canonical encoding of the whole state, to store as a snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode_into(self, &mut bytes);
        bytes
    }

    /// SHA-256 of the canonical encoding: equal for engines that will behave the same.
    pub fn state_hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        encode_into(self, &mut hasher);
        hasher.finalize().into()
    }

    /// Rebuilds an engine from [`Engine::snapshot`] bytes, checking every field.
    pub fn restore(bytes: &[u8]) -> Result<Engine, SnapshotError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(r.error("not an Agora book snapshot"));
        }
        if r.u32()? != VERSION {
            return Err(r.error("unsupported snapshot version"));
        }
        let mut engine = Engine {
            now: r.i64()?,
            ..Engine::default()
        };
        let markets = r.u32()? as usize;
        if markets > crate::limits::MARKETS_MAX {
            return Err(r.error("too many markets"));
        }
        for index in 0..markets {
            let spec = decode_spec(&mut r)?;
            if spec.validate().is_err() {
                return Err(r.error("invalid market specification"));
            }
            if engine.symbols.contains_key(&spec.symbol) {
                return Err(r.error("duplicate market symbol"));
            }
            let market = MarketId(index as u32);
            engine.symbols.insert(spec.symbol.clone(), market);
            let mut book = Book::new(market, spec);
            book.next_seq = r.u64()?;
            book.data.last_price = r.opt_i64()?;
            book.data.last_trade_at = r.opt_i64()?;
            book.data.last_qty = r.opt_i64()?.map(|q| Qty(q as u64));
            for interval in Interval::ALL {
                let count = r.u32()? as usize;
                if count > crate::limits::CANDLES_KEPT_MAX {
                    return Err(r.error("too many candles"));
                }
                let series = &mut book.data.candles[interval as usize];
                for _ in 0..count {
                    series.push_back(Candle {
                        open_time: r.i64()?,
                        open: Price(r.i64()?),
                        high: Price(r.i64()?),
                        low: Price(r.i64()?),
                        close: Price(r.i64()?),
                        volume: r.u128()?,
                        quote_volume: r.u128()?,
                        trades: r.u64()?,
                    });
                }
            }
            book.data.restore_marker();
            let orders = r.u32()? as usize;
            if orders > crate::limits::ORDERS_PER_MARKET_MAX {
                return Err(r.error("too many orders"));
            }
            // Room for the orders the bytes left can hold at most, so that a false count
            // cannot make the index reserve more than the snapshot's size warrants.
            book.reserve_ids(orders.min((bytes.len() - r.at) / ORDER_BYTES_MIN));
            for _ in 0..orders {
                decode_order(&mut r, &mut book)?;
            }
            engine.books.push(book);
        }
        if r.at != bytes.len() {
            return Err(r.error("trailing bytes"));
        }
        Ok(engine)
    }
}

fn decode_spec(r: &mut Reader<'_>) -> Result<MarketSpec, SnapshotError> {
    let symbol = r.string()?;
    let price_decimals = r.u32()?;
    let qty_decimals = r.u32()?;
    let tick = r.i64()?;
    let lot = r.u64()?;
    let mut spec = MarketSpec::new(symbol, price_decimals, qty_decimals, tick, lot);
    spec.min_qty = r.opt_i64()?.map(|q| Qty(q as u64));
    spec.max_qty = r.opt_i64()?.map(|q| Qty(q as u64));
    spec.min_notional = match r.u8()? {
        0 => None,
        1 => Some(r.u128()?),
        _ => return Err(r.error("bad option tag")),
    };
    spec.price_band_bps = match r.opt_i64()? {
        None => None,
        Some(band) => Some(u32::try_from(band).map_err(|_| r.error("price band out of range"))?),
    };
    spec.settlement = match r.u8()? {
        0 => Settlement::Instant,
        1 => Settlement::Escrow,
        _ => return Err(r.error("bad settlement code")),
    };
    spec.default_stp = stp_from(r.u8()?).ok_or_else(|| r.error("bad self-trade mode"))?;
    spec.day_cutoff_ms = r.i64()?;
    let tiers = r.u32()? as usize;
    if tiers > crate::limits::REPUTATION_TIERS_MAX {
        return Err(r.error("too many reputation tiers"));
    }
    for _ in 0..tiers {
        spec.reputation_tiers.push(r.u32()?);
    }
    let methods = r.u32()? as usize;
    if methods > crate::limits::PAYMENT_METHODS_PER_MARKET_MAX {
        return Err(r.error("too many payment methods"));
    }
    for _ in 0..methods {
        spec.payment_methods.push(r.string()?);
    }
    Ok(spec)
}

/// The fewest bytes an encoded order takes (see [`decode_order`]).
const ORDER_BYTES_MIN: usize = 94;

fn decode_order(r: &mut Reader<'_>, book: &mut Book) -> Result<(), SnapshotError> {
    let mut order = Order {
        id: r.u64()?,
        user: r.u64()?,
        remaining: r.u64()?,
        accept: r.u64()?,
        reputation: r.u32()?,
        min_reputation: r.u32()?,
        next: NIL,
        prev: NIL,
        min_fill: r.u64()?,
        max_fill: r.u64()?,
        price: r.i64()?,
        filled: r.u64()?,
        seq: r.u64()?,
        expire_at: r.i64()?,
        level: NIL,
        side: side_from(r.u8()?).ok_or_else(|| r.error("bad side"))?,
        order_type: type_from(r.u8()?).ok_or_else(|| r.error("bad order type"))?,
        tif: tif_from(r.u8()?).ok_or_else(|| r.error("bad time in force"))?,
        stp: stp_from(r.u8()?).ok_or_else(|| r.error("bad self-trade mode"))?,
        tier: 0,
        post_only: match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(r.error("bad flag")),
        },
        state: State::Free,
        tag: 0,
    };
    order.tier = book.spec.tier_of(order.reputation);
    if order.remaining == 0 || order.seq == 0 || order.seq >= book.next_seq {
        return Err(r.error("order with no quantity or an impossible sequence"));
    }
    if book.slot_of(order.id).is_some() {
        return Err(r.error("duplicate order id"));
    }
    if order.filled.checked_add(order.remaining).is_none() {
        return Err(r.error("order quantities overflow"));
    }
    match r.u8()? {
        0 => {
            if order.price <= 0 || order.order_type != OrderType::Limit {
                return Err(r.error("resting order without a limit price"));
            }
            if book
                .check_capacity(order.side, Some((order.price, order.remaining)), None)
                .is_err()
            {
                return Err(r.error("a price level over its limits"));
            }
            book.restore_resting(order);
        }
        1 => {
            let stop = r.i64()?;
            if !order.order_type.is_conditional() {
                return Err(r.error("armed order that is not conditional"));
            }
            book.restore_armed(order, stop);
        }
        _ => return Err(r.error("bad order state")),
    }
    Ok(())
}

impl Book {
    fn restore_resting(&mut self, order: Order) {
        let (seq, expire_at) = (order.seq, order.expire_at);
        let slot = self.alloc_order(order);
        self.link(slot);
        if expire_at != NEVER {
            self.expiries.insert((expire_at, seq), slot);
        }
    }

    fn restore_armed(&mut self, mut order: Order, stop: i64) {
        order.state = State::Armed;
        let (seq, expire_at) = (order.seq, order.expire_at);
        let fires_up = crate::book::fires_above(order.order_type, order.side);
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
}

fn side_code(side: Side) -> u8 {
    side as u8
}
fn side_from(code: u8) -> Option<Side> {
    [Side::Buy, Side::Sell].get(code as usize).copied()
}
const TYPES: [OrderType; 6] = [
    OrderType::Limit,
    OrderType::Market,
    OrderType::StopMarket,
    OrderType::StopLimit,
    OrderType::TakeProfitMarket,
    OrderType::TakeProfitLimit,
];
fn type_code(order_type: OrderType) -> u8 {
    order_type as u8
}
fn type_from(code: u8) -> Option<OrderType> {
    TYPES.get(code as usize).copied()
}
const TIFS: [TimeInForce; 5] = [
    TimeInForce::Gtc,
    TimeInForce::Ioc,
    TimeInForce::Fok,
    TimeInForce::Day,
    TimeInForce::Gtd,
];
fn tif_code(tif: TimeInForce) -> u8 {
    tif as u8
}
fn tif_from(code: u8) -> Option<TimeInForce> {
    TIFS.get(code as usize).copied()
}
const STPS: [SelfTradePrevention; 4] = [
    SelfTradePrevention::CancelNewest,
    SelfTradePrevention::CancelOldest,
    SelfTradePrevention::CancelBoth,
    SelfTradePrevention::Decrement,
];
fn stp_code(stp: SelfTradePrevention) -> u8 {
    stp as u8
}
fn stp_from(code: u8) -> Option<SelfTradePrevention> {
    STPS.get(code as usize).copied()
}

struct Writer<'a, S: Sink> {
    sink: &'a mut S,
}

impl<S: Sink> Writer<'_, S> {
    fn bytes(&mut self, bytes: &[u8]) {
        self.sink.put(bytes);
    }
    fn u8(&mut self, v: u8) {
        self.sink.put(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.sink.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.sink.put(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.sink.put(&v.to_le_bytes());
    }
    fn u128(&mut self, v: u128) {
        self.sink.put(&v.to_le_bytes());
    }
    fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.i64(v);
            }
            None => self.u8(0),
        }
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.sink.put(s.as_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn error(&self, problem: &'static str) -> SnapshotError {
        SnapshotError {
            offset: self.at,
            problem,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.error("truncated"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn u128(&mut self) -> Result<u128, SnapshotError> {
        Ok(u128::from_le_bytes(self.array()?))
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, SnapshotError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.i64()?)),
            _ => Err(self.error("bad option tag")),
        }
    }
    fn string(&mut self) -> Result<String, SnapshotError> {
        let len = self.u32()? as usize;
        if len > 256 {
            return Err(self.error("string too long"));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::ORDER_BYTES_MIN;
    use crate::{Engine, MarketId, MarketSpec, OrderId, PlaceOrder, Price, Qty, Side};

    /// A plain resting limit order, the smallest kind, adds exactly `ORDER_BYTES_MIN` bytes
    /// to a snapshot: the bound a restore reserves by is never above the truth.
    #[test]
    fn the_smallest_order_takes_order_bytes_min() {
        let mut engine = Engine::new();
        let mut out = Vec::new();
        engine.create_market(MarketSpec::new("BTC-USD", 2, 4, 1, 1), &mut out);
        let before = engine.snapshot().len();
        let id: OrderId = 1;
        engine.place(
            &PlaceOrder::limit(MarketId(0), id, 7, Side::Buy, Price(100), Qty(1)),
            &mut out,
        );
        assert_eq!(engine.snapshot().len() - before, ORDER_BYTES_MIN);
    }
}
