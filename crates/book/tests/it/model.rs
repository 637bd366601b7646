//! A deliberately naive reference model of the matching rules: one vector of live orders per
//! market, linear scans and sorts, no indexes. It shares no code with the engine beyond the
//! public value types, so agreement between the two is evidence that both follow the rules.

#![allow(dead_code)]

use book::{
    CancelCause, Command, Event, MarketId, MarketSpec, ModifyOrder, OrderType, PlaceOrder, Price,
    Qty, RejectReason, SelfTradePrevention, Side, TimeInForce, Timestamp,
};

const DAY: i64 = 86_400_000;

#[derive(Clone, Debug)]
pub struct ModelOrder {
    pub id: u64,
    pub user: u64,
    pub side: Side,
    pub order_type: OrderType,
    pub price: i64,
    pub stop: i64,
    pub remaining: u64,
    pub filled: u64,
    pub seq: u64,
    pub accept: u64,
    pub reputation: u32,
    pub min_reputation: u32,
    pub min_fill: u64,
    pub max_fill: u64,
    pub stp: SelfTradePrevention,
    pub tif: TimeInForce,
    pub post_only: bool,
    pub expire_at: Option<i64>,
    pub armed: bool,
}

#[derive(Clone, Debug)]
pub struct ModelMarket {
    pub spec: MarketSpec,
    pub orders: Vec<ModelOrder>,
    pub next_seq: u64,
    pub last: Option<i64>,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub markets: Vec<ModelMarket>,
    pub now: Timestamp,
}

fn tier(spec: &MarketSpec, reputation: u32) -> usize {
    spec.reputation_tiers
        .iter()
        .filter(|&&t| reputation >= t)
        .count()
}

fn better(side: Side, a: i64, b: i64) -> bool {
    match side {
        Side::Buy => a > b,
        Side::Sell => a < b,
    }
}

fn crosses(side: Side, limit: Option<i64>, maker_price: i64) -> bool {
    match (limit, side) {
        (None, _) => true,
        (Some(l), Side::Buy) => maker_price <= l,
        (Some(l), Side::Sell) => maker_price >= l,
    }
}

/// The rule for one fill, written out plainly.
fn fill_size(taker: &ModelOrder, maker: &ModelOrder) -> u64 {
    let methods_meet = taker.accept & maker.accept != 0;
    let reputations_meet =
        maker.reputation >= taker.min_reputation && taker.reputation >= maker.min_reputation;
    if !methods_meet || !reputations_meet {
        return 0;
    }
    let mut size = taker.remaining.min(maker.remaining);
    size = size.min(taker.max_fill).min(maker.max_fill);
    let taker_needs = taker.min_fill.min(taker.remaining);
    let maker_needs = maker.min_fill.min(maker.remaining);
    if size < taker_needs || size < maker_needs {
        0
    } else {
        size
    }
}

fn fires_up(order: &ModelOrder) -> bool {
    matches!(
        (order.order_type, order.side),
        (OrderType::StopMarket | OrderType::StopLimit, Side::Buy)
            | (
                OrderType::TakeProfitMarket | OrderType::TakeProfitLimit,
                Side::Sell
            )
    )
}

fn due(order: &ModelOrder, last: i64) -> bool {
    if fires_up(order) {
        last >= order.stop
    } else {
        last <= order.stop
    }
}

impl ModelMarket {
    /// Ids of the resting makers a taker meets, in the order it meets them.
    fn queue(&self, taker_side: Side, limit: Option<i64>) -> Vec<u64> {
        let mut makers: Vec<&ModelOrder> = self
            .orders
            .iter()
            .filter(|o| !o.armed && o.side != taker_side && crosses(taker_side, limit, o.price))
            .collect();
        makers.sort_by(|a, b| {
            let price_order = if a.price == b.price {
                std::cmp::Ordering::Equal
            } else if better(a.side, a.price, b.price) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            };
            price_order
                .then(tier(&self.spec, b.reputation).cmp(&tier(&self.spec, a.reputation)))
                .then(a.seq.cmp(&b.seq))
        });
        makers.iter().map(|o| o.id).collect()
    }

    fn find(&self, id: u64) -> Option<usize> {
        self.orders.iter().position(|o| o.id == id)
    }

    /// What the taker could fill now without changing anything.
    fn fillable(&self, taker: &ModelOrder, limit: Option<i64>) -> u64 {
        let mut probe = taker.clone();
        let mut total = 0;
        for id in self.queue(taker.side, limit) {
            let maker = &self.orders[self.find(id).unwrap()];
            let size = fill_size(&probe, maker);
            if size == 0 {
                continue;
            }
            if maker.user == probe.user {
                if probe.stp == SelfTradePrevention::CancelOldest {
                    continue;
                }
                return total;
            }
            total += size;
            probe.remaining -= size;
            if probe.remaining == 0 {
                break;
            }
        }
        total
    }

    fn meets_any(&self, taker: &ModelOrder, limit: Option<i64>) -> bool {
        self.queue(taker.side, limit).into_iter().any(|id| {
            let maker = &self.orders[self.find(id).unwrap()];
            fill_size(taker, maker) > 0
        })
    }

    fn remove(&mut self, id: u64) -> ModelOrder {
        let i = self.find(id).unwrap();
        self.orders.remove(i)
    }

    /// Matches; returns true when self-trade prevention cancelled the taker.
    fn sweep(
        &mut self,
        m: MarketId,
        taker: &mut ModelOrder,
        limit: Option<i64>,
        out: &mut Vec<Event>,
    ) -> bool {
        for id in self.queue(taker.side, limit) {
            if taker.remaining == 0 {
                break;
            }
            let Some(i) = self.find(id) else { continue };
            let size = fill_size(taker, &self.orders[i]);
            if size == 0 {
                continue;
            }
            if self.orders[i].user == taker.user {
                match taker.stp {
                    SelfTradePrevention::CancelNewest => return true,
                    SelfTradePrevention::CancelOldest | SelfTradePrevention::CancelBoth => {
                        let maker = self.remove(id);
                        out.push(Event::Cancelled {
                            market: m,
                            id,
                            user: maker.user,
                            remaining: Qty(maker.remaining),
                            open: Qty(0),
                            cause: CancelCause::SelfTrade,
                        });
                        if taker.stp == SelfTradePrevention::CancelBoth {
                            return true;
                        }
                    }
                    SelfTradePrevention::Decrement => {
                        let cut = self.orders[i].remaining.min(taker.remaining);
                        self.orders[i].remaining -= cut;
                        let maker = self.orders[i].clone();
                        if maker.remaining == 0 {
                            self.remove(id);
                        }
                        out.push(Event::Cancelled {
                            market: m,
                            id,
                            user: maker.user,
                            remaining: Qty(cut),
                            open: Qty(maker.remaining),
                            cause: CancelCause::SelfTrade,
                        });
                        taker.remaining -= cut;
                        out.push(Event::Cancelled {
                            market: m,
                            id: taker.id,
                            user: taker.user,
                            remaining: Qty(cut),
                            open: Qty(taker.remaining),
                            cause: CancelCause::SelfTrade,
                        });
                    }
                }
                continue;
            }
            let maker = &mut self.orders[i];
            maker.remaining -= size;
            maker.filled += size;
            taker.remaining -= size;
            taker.filled += size;
            out.push(Event::Trade {
                market: m,
                maker: maker.id,
                taker: taker.id,
                maker_user: maker.user,
                taker_user: taker.user,
                taker_side: taker.side,
                price: Price(maker.price),
                qty: Qty(size),
            });
            self.last = Some(maker.price);
            if maker.remaining == 0 {
                self.remove(id);
            }
        }
        false
    }

    fn execute(&mut self, m: MarketId, mut order: ModelOrder, out: &mut Vec<Event>) {
        let limit = (order.price != 0).then_some(order.price);
        let market_like = order.order_type.is_market_like();
        let stp_cancelled = self.sweep(m, &mut order, limit, out);
        if order.remaining == 0 {
            return;
        }
        let cause = if stp_cancelled {
            Some(CancelCause::SelfTrade)
        } else if market_like {
            Some(CancelCause::MarketRemainder)
        } else if order.tif == TimeInForce::Fok {
            Some(CancelCause::FillOrKill)
        } else if order.tif == TimeInForce::Ioc {
            Some(CancelCause::ImmediateOrCancel)
        } else {
            None
        };
        match cause {
            Some(cause) => out.push(Event::Cancelled {
                market: m,
                id: order.id,
                user: order.user,
                remaining: Qty(order.remaining),
                open: Qty(0),
                cause,
            }),
            None => {
                order.seq = self.next_seq;
                self.next_seq += 1;
                order.armed = false;
                self.orders.push(order);
            }
        }
    }

    fn run_triggered(&mut self, m: MarketId, mut order: ModelOrder, out: &mut Vec<Event>) {
        let market_like = order.order_type.is_market_like();
        order.order_type = if market_like {
            OrderType::Market
        } else {
            OrderType::Limit
        };
        order.armed = false;
        let limit = (order.price != 0).then_some(order.price);
        let refuse = |cause| Event::Cancelled {
            market: m,
            id: order.id,
            user: order.user,
            remaining: Qty(order.remaining),
            open: Qty(0),
            cause,
        };
        if order.post_only && self.meets_any(&order, limit) {
            out.push(refuse(CancelCause::PostOnly));
            return;
        }
        if order.tif == TimeInForce::Fok && self.fillable(&order, limit) < order.remaining {
            out.push(refuse(CancelCause::FillOrKill));
            return;
        }
        if market_like && self.fillable(&order, limit) == 0 {
            out.push(refuse(CancelCause::NoLiquidity));
            return;
        }
        self.execute(m, order, out);
    }

    fn fire(&mut self, m: MarketId, out: &mut Vec<Event>) {
        while let Some(last) = self.last {
            let mut up: Vec<&ModelOrder> = self
                .orders
                .iter()
                .filter(|o| o.armed && fires_up(o) && due(o, last))
                .collect();
            up.sort_by_key(|o| (o.stop, o.seq));
            let mut down: Vec<&ModelOrder> = self
                .orders
                .iter()
                .filter(|o| o.armed && !fires_up(o) && due(o, last))
                .collect();
            down.sort_by_key(|o| (std::cmp::Reverse(o.stop), o.seq));
            let Some(id) = up.first().or(down.first()).map(|o| o.id) else {
                return;
            };
            let order = self.remove(id);
            out.push(Event::Triggered {
                market: m,
                id,
                user: order.user,
                last_price: Price(last),
            });
            self.run_triggered(m, order, out);
        }
    }
}

impl Model {
    pub fn apply(&mut self, command: &Command, out: &mut Vec<Event>) {
        match command {
            Command::CreateMarket(spec) => {
                if spec.validate().is_err() {
                    out.push(reject(None, 0, RejectReason::InvalidMarket));
                } else if self.markets.iter().any(|m| m.spec.symbol == spec.symbol) {
                    out.push(reject(None, 0, RejectReason::DuplicateMarket));
                } else {
                    let market = MarketId(self.markets.len() as u32);
                    self.markets.push(ModelMarket {
                        spec: spec.clone(),
                        orders: Vec::new(),
                        next_seq: 1,
                        last: None,
                    });
                    out.push(Event::MarketCreated { market });
                }
            }
            Command::Place(place) => self.place(place, out),
            Command::Cancel { market, id, user } => {
                let Some(mk) = self.markets.get_mut(market.0 as usize) else {
                    out.push(reject(None, *id, RejectReason::UnknownMarket));
                    return;
                };
                match mk.find(*id) {
                    None => out.push(reject(Some(*market), *id, RejectReason::UnknownOrder)),
                    Some(i) if mk.orders[i].user != *user => {
                        out.push(reject(Some(*market), *id, RejectReason::NotOwner))
                    }
                    Some(_) => {
                        let order = mk.remove(*id);
                        out.push(Event::Cancelled {
                            market: *market,
                            id: *id,
                            user: *user,
                            remaining: Qty(order.remaining),
                            open: Qty(0),
                            cause: CancelCause::User,
                        });
                    }
                }
            }
            Command::Modify(modify) => self.modify(modify, out),
            Command::CancelAll { market, user } => {
                let markets: Vec<usize> = match market {
                    Some(m) if (m.0 as usize) < self.markets.len() => vec![m.0 as usize],
                    Some(_) => {
                        out.push(reject(None, 0, RejectReason::UnknownMarket));
                        return;
                    }
                    None => (0..self.markets.len()).collect(),
                };
                for index in markets {
                    let mk = &mut self.markets[index];
                    let mut victims: Vec<(u64, u64)> = mk
                        .orders
                        .iter()
                        .filter(|o| user.is_none_or(|u| u == o.user))
                        .map(|o| (o.seq, o.id))
                        .collect();
                    victims.sort();
                    for (_, id) in victims {
                        let order = mk.remove(id);
                        out.push(Event::Cancelled {
                            market: MarketId(index as u32),
                            id,
                            user: order.user,
                            remaining: Qty(order.remaining),
                            open: Qty(0),
                            cause: CancelCause::CancelAll,
                        });
                    }
                }
            }
            Command::AdvanceTime { now } => {
                if *now < self.now {
                    out.push(reject(None, 0, RejectReason::TimeRegression));
                    return;
                }
                self.now = *now;
                for (index, mk) in self.markets.iter_mut().enumerate() {
                    let mut due: Vec<(i64, u64, u64)> = mk
                        .orders
                        .iter()
                        .filter_map(|o| {
                            o.expire_at
                                .filter(|&at| at <= *now)
                                .map(|at| (at, o.seq, o.id))
                        })
                        .collect();
                    due.sort();
                    for (_, _, id) in due {
                        let order = mk.remove(id);
                        out.push(Event::Expired {
                            market: MarketId(index as u32),
                            id,
                            user: order.user,
                            remaining: Qty(order.remaining),
                        });
                    }
                }
            }
        }
    }

    fn place(&mut self, cmd: &PlaceOrder, out: &mut Vec<Event>) {
        let now = self.now;
        let Some(mk) = self.markets.get_mut(cmd.market.0 as usize) else {
            out.push(reject(None, cmd.id, RejectReason::UnknownMarket));
            return;
        };
        let m = cmd.market;
        if let Err(reason) = validate_place(mk, cmd, now) {
            out.push(reject(Some(m), cmd.id, reason));
            return;
        }
        let order = ModelOrder {
            id: cmd.id,
            user: cmd.user,
            side: cmd.side,
            order_type: cmd.order_type,
            price: cmd.price.map_or(0, |p| p.0),
            stop: cmd.stop_price.map_or(0, |p| p.0),
            remaining: cmd.qty.0,
            filled: 0,
            seq: 0,
            accept: cmd.payment_methods.0,
            reputation: cmd.reputation,
            min_reputation: cmd.min_reputation,
            min_fill: cmd.min_fill.map_or(0, |q| q.0),
            max_fill: cmd.max_fill.map_or(u64::MAX, |q| q.0),
            stp: cmd.stp.unwrap_or(mk.spec.default_stp),
            tif: cmd.tif,
            post_only: cmd.post_only,
            expire_at: match cmd.tif {
                TimeInForce::Day => {
                    // The first cutoff strictly after now, counted in whole days.
                    let mut cutoff = mk.spec.day_cutoff_ms;
                    while cutoff > now {
                        cutoff -= DAY;
                    }
                    while cutoff <= now {
                        cutoff += DAY;
                    }
                    Some(cutoff)
                }
                TimeInForce::Gtd => cmd.expire_at,
                _ => None,
            },
            armed: false,
        };
        let accepted = Event::Accepted {
            market: m,
            id: cmd.id,
            user: cmd.user,
            side: cmd.side,
            order_type: cmd.order_type,
            qty: cmd.qty,
        };
        if cmd.order_type.is_conditional() {
            out.push(accepted);
            if mk.last.is_some_and(|last| due(&order, last)) {
                out.push(Event::Triggered {
                    market: m,
                    id: order.id,
                    user: order.user,
                    last_price: Price(mk.last.unwrap()),
                });
                mk.run_triggered(m, order, out);
                mk.fire(m, out);
            } else {
                let mut order = order;
                order.seq = mk.next_seq;
                mk.next_seq += 1;
                order.armed = true;
                mk.orders.push(order);
            }
            return;
        }
        let limit = (order.price != 0).then_some(order.price);
        if cmd.post_only && mk.meets_any(&order, limit) {
            out.push(reject(Some(m), cmd.id, RejectReason::PostOnlyWouldCross));
            return;
        }
        if cmd.tif == TimeInForce::Fok && mk.fillable(&order, limit) < cmd.qty.0 {
            out.push(reject(Some(m), cmd.id, RejectReason::FokUnfillable));
            return;
        }
        if cmd.order_type == OrderType::Market && mk.fillable(&order, limit) == 0 {
            out.push(reject(Some(m), cmd.id, RejectReason::NoLiquidity));
            return;
        }
        out.push(accepted);
        mk.execute(m, order, out);
        mk.fire(m, out);
    }

    fn modify(&mut self, cmd: &ModifyOrder, out: &mut Vec<Event>) {
        let now = self.now;
        let _ = now;
        let Some(mk) = self.markets.get_mut(cmd.market.0 as usize) else {
            out.push(reject(None, cmd.id, RejectReason::UnknownMarket));
            return;
        };
        let m = cmd.market;
        let Some(i) = mk.find(cmd.id) else {
            out.push(reject(Some(m), cmd.id, RejectReason::UnknownOrder));
            return;
        };
        let order = mk.orders[i].clone();
        if order.user != cmd.user {
            out.push(reject(Some(m), cmd.id, RejectReason::NotOwner));
            return;
        }
        let new_price = cmd.price.map_or(order.price, |p| p.0);
        let new_qty = cmd.qty.map_or(order.remaining, |q| q.0);
        let invalid = (cmd.price.is_none() && cmd.qty.is_none())
            || (cmd.price.is_some() && order.order_type.is_market_like())
            || (new_price == order.price && new_qty == order.remaining);
        if invalid {
            out.push(reject(Some(m), cmd.id, RejectReason::InvalidModify));
            return;
        }
        if cmd.price.is_some()
            && let Err(reason) = check_price(&mk.spec, new_price).and(check_band(mk, new_price))
        {
            out.push(reject(Some(m), cmd.id, reason));
            return;
        }
        let reduction = new_price == order.price && new_qty < order.remaining;
        let size_check = if reduction {
            if new_qty == 0 {
                Err(RejectReason::InvalidQuantity)
            } else if !new_qty.is_multiple_of(mk.spec.lot) {
                Err(RejectReason::BadLot)
            } else {
                Ok(())
            }
        } else {
            check_size(&mk.spec, new_qty).and(check_notional(
                &mk.spec,
                (new_price != 0).then_some(new_price),
                new_qty,
            ))
        };
        if let Err(reason) = size_check {
            out.push(reject(Some(m), cmd.id, reason));
            return;
        }
        if !order.armed && !reduction && order.post_only {
            let mut probe = order.clone();
            probe.remaining = new_qty;
            if mk.meets_any(&probe, Some(new_price)) {
                out.push(reject(Some(m), cmd.id, RejectReason::PostOnlyWouldCross));
                return;
            }
        }
        if order.armed || reduction {
            mk.orders[i].price = new_price;
            mk.orders[i].remaining = new_qty;
            out.push(Event::Modified {
                market: m,
                id: cmd.id,
                user: order.user,
                price: Price(new_price),
                qty: Qty(new_qty),
                priority_kept: true,
            });
            return;
        }
        let mut order = mk.remove(cmd.id);
        order.price = new_price;
        order.remaining = new_qty;
        out.push(Event::Modified {
            market: m,
            id: cmd.id,
            user: order.user,
            price: Price(new_price),
            qty: Qty(new_qty),
            priority_kept: false,
        });
        mk.execute(m, order, out);
        mk.fire(m, out);
    }

    /// Resting orders of a market in queue order per side, best first: (id, price, remaining).
    pub fn resting(&self, market: usize, side: Side) -> Vec<(u64, i64, u64)> {
        let mk = &self.markets[market];
        // The queue a taker on the other side would meet with no limit is the book in priority
        // order.
        mk.queue(side.opposite(), None)
            .into_iter()
            .map(|id| {
                let o = &mk.orders[mk.find(id).unwrap()];
                (o.id, o.price, o.remaining)
            })
            .collect()
    }

    /// Armed orders' ids sorted.
    pub fn armed(&self, market: usize) -> Vec<u64> {
        let mut ids: Vec<u64> = self.markets[market]
            .orders
            .iter()
            .filter(|o| o.armed)
            .map(|o| o.id)
            .collect();
        ids.sort();
        ids
    }
}

fn reject(market: Option<MarketId>, id: u64, reason: RejectReason) -> Event {
    Event::Rejected { market, id, reason }
}

fn check_price(spec: &MarketSpec, price: i64) -> Result<(), RejectReason> {
    if price <= 0 {
        Err(RejectReason::InvalidPrice)
    } else if price % spec.tick != 0 {
        Err(RejectReason::BadTick)
    } else {
        Ok(())
    }
}

fn check_band(mk: &ModelMarket, price: i64) -> Result<(), RejectReason> {
    match (mk.spec.price_band_bps, mk.last) {
        (Some(band), Some(last)) => {
            let distance = (price - last).abs() as i128 * 10_000;
            if distance > band as i128 * last as i128 {
                Err(RejectReason::PriceBand)
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

fn check_size(spec: &MarketSpec, qty: u64) -> Result<(), RejectReason> {
    if qty == 0 {
        Err(RejectReason::InvalidQuantity)
    } else if !qty.is_multiple_of(spec.lot) {
        Err(RejectReason::BadLot)
    } else if spec.min_qty.is_some_and(|m| qty < m.0) {
        Err(RejectReason::SizeTooSmall)
    } else if spec.max_qty.is_some_and(|m| qty > m.0) {
        Err(RejectReason::SizeTooLarge)
    } else {
        Ok(())
    }
}

fn check_notional(spec: &MarketSpec, price: Option<i64>, qty: u64) -> Result<(), RejectReason> {
    match (spec.min_notional, price) {
        (Some(min), Some(p)) if (p as u128) * (qty as u128) < min => Err(RejectReason::MinNotional),
        _ => Ok(()),
    }
}

fn validate_place(mk: &ModelMarket, cmd: &PlaceOrder, now: Timestamp) -> Result<(), RejectReason> {
    if mk.find(cmd.id).is_some() {
        return Err(RejectReason::DuplicateOrderId);
    }
    let market_like = cmd.order_type.is_market_like();
    match cmd.price {
        Some(p) => check_price(&mk.spec, p.0)?,
        None if !market_like => return Err(RejectReason::InvalidPrice),
        None => {}
    }
    if cmd.order_type.is_conditional() {
        match cmd.stop_price {
            Some(s) if s.0 > 0 && s.0 % mk.spec.tick == 0 => {}
            _ => return Err(RejectReason::InvalidStopPrice),
        }
    } else if cmd.stop_price.is_some() {
        return Err(RejectReason::InvalidStopPrice);
    }
    check_size(&mk.spec, cmd.qty.0)?;
    let listed = mk.spec.payment_methods.len();
    let methods = cmd.payment_methods.0;
    if methods != u64::MAX && (methods == 0 || (listed < 64 && methods >> listed != 0)) {
        return Err(RejectReason::UnknownPaymentMethod);
    }
    check_notional(
        &mk.spec,
        cmd.price.or(cmd.stop_price).map(|p| p.0),
        cmd.qty.0,
    )?;
    if let (Some(p), false) = (cmd.price, market_like) {
        check_band(mk, p.0)?;
    }
    if market_like && !matches!(cmd.tif, TimeInForce::Ioc | TimeInForce::Fok) {
        return Err(RejectReason::InvalidTimeInForce);
    }
    if cmd.post_only && (market_like || matches!(cmd.tif, TimeInForce::Ioc | TimeInForce::Fok)) {
        return Err(RejectReason::InvalidTimeInForce);
    }
    match (cmd.tif, cmd.expire_at) {
        (TimeInForce::Gtd, Some(at)) if at > now => {}
        (TimeInForce::Gtd, _) | (_, Some(_)) => return Err(RejectReason::InvalidExpiry),
        _ => {}
    }
    let lot = mk.spec.lot;
    let bad = |q: Option<Qty>| q.is_some_and(|q| q.0 == 0 || q.0 % lot != 0);
    if bad(cmd.min_fill)
        || bad(cmd.max_fill)
        || matches!((cmd.min_fill, cmd.max_fill), (Some(a), Some(b)) if a > b)
    {
        return Err(RejectReason::InvalidFillLimits);
    }
    Ok(())
}
