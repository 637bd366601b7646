//! Random command streams run through the engine and the reference model side by side: the same
//! events, the same resting book, and the book's invariants after every step. The same streams
//! check determinism: a second run, and a run restored from a snapshot midway, end in the same
//! events and state hash.

use std::collections::{BTreeMap, HashMap};

use book::{
    Command, Engine, Event, MarketId, MarketSpec, ModifyOrder, OrderType, PaymentMethods,
    PlaceOrder, Price, Qty, SelfTradePrevention, Side, TimeInForce,
};
use proptest::prelude::*;

use crate::model::Model;

const TICK: i64 = 5;
const LOT: u64 = 10;
const USERS: u64 = 5;

#[derive(Clone, Debug)]
enum Op {
    Place {
        market: u8,
        sell: bool,
        kind: u8,
        ticks: i64,
        off_tick: bool,
        lots: u64,
        user: u64,
        tif: u8,
        post_only: bool,
        methods: u8,
        reputation: u8,
        min_reputation: u8,
        min_fill: Option<u8>,
        max_fill: Option<u8>,
        stp: Option<u8>,
        stop_ticks: i64,
        expire_in: u16,
    },
    Cancel {
        market: u8,
        pick: u16,
        owner: bool,
    },
    Modify {
        market: u8,
        pick: u16,
        owner: bool,
        ticks: Option<i64>,
        lots: Option<u64>,
    },
    CancelAll {
        market: Option<u8>,
        user: Option<u64>,
    },
    Time {
        advance: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let place = (
        (
            0u8..2,
            any::<bool>(),
            0u8..20,
            90i64..111,
            prop::bool::weighted(0.03),
        ),
        (
            1u64..8,
            0..USERS,
            0u8..10,
            prop::bool::weighted(0.1),
            0u8..8,
        ),
        (
            0u8..30,
            prop::option::weighted(0.2, 0u8..25),
            prop::option::weighted(0.15, 1u8..4),
        ),
        (
            prop::option::weighted(0.15, 1u8..4),
            prop::option::weighted(0.3, 0u8..4),
        ),
        (95i64..106, 0u16..600),
    )
        .prop_map(
            |(
                (market, sell, kind, ticks, off_tick),
                (lots, user, tif, post_only, methods),
                (reputation, min_reputation, min_fill),
                (max_fill, stp),
                (stop_ticks, expire_in),
            )| Op::Place {
                market,
                sell,
                kind,
                ticks,
                off_tick,
                lots,
                user,
                tif,
                post_only,
                methods,
                reputation,
                min_reputation: min_reputation.unwrap_or(0),
                min_fill,
                max_fill,
                stp,
                stop_ticks,
                expire_in,
            },
        );
    prop_oneof![
        12 => place,
        3 => (0u8..2, any::<u16>(), prop::bool::weighted(0.9))
            .prop_map(|(market, pick, owner)| Op::Cancel { market, pick, owner }),
        6 => (
            0u8..2,
            any::<u16>(),
            prop::bool::weighted(0.9),
            prop::option::of(90i64..111),
            prop::option::of(0u64..8)
        )
            .prop_map(|(market, pick, owner, ticks, lots)| Op::Modify {
                market,
                pick,
                owner,
                ticks,
                lots
            }),
        1 => (prop::option::weighted(0.8, 0u8..2), prop::option::weighted(0.8, 0..USERS))
            .prop_map(|(market, user)| Op::CancelAll { market, user }),
        1 => (0u32..400_000).prop_map(|advance| Op::Time { advance }),
    ]
}

fn markets() -> Vec<Command> {
    let mut plain = MarketSpec::new("BTC-USDT", 2, 3, TICK, LOT);
    plain.payment_methods = vec!["sepa".into(), "revolut".into(), "wise".into()];
    plain.day_cutoff_ms = 3_600_000;
    let mut tiered = MarketSpec::new("ETH-USDT", 2, 3, TICK, LOT);
    tiered.payment_methods = vec!["sepa".into(), "revolut".into(), "wise".into()];
    tiered.reputation_tiers = vec![10, 20];
    tiered.price_band_bps = Some(1_000);
    tiered.min_qty = Some(Qty(2 * LOT));
    tiered.max_qty = Some(Qty(6 * LOT));
    tiered.min_notional = Some(1_000 * 10);
    tiered.default_stp = SelfTradePrevention::Decrement;
    vec![Command::CreateMarket(plain), Command::CreateMarket(tiered)]
}

/// Turns random ops into commands, keeping track of ids so cancels and modifies mostly hit
/// live orders of their owners.
struct Builder {
    next_id: u64,
    owners: HashMap<(u8, u64), u64>,
    now: i64,
}

impl Builder {
    fn pick(&self, model: &Model, market: u8, pick: u16, owner: bool) -> (u64, u64) {
        // Mostly live orders; now and then any id at all, live or not.
        let live: Vec<u64> = model
            .markets
            .get(usize::from(market))
            .map(|m| m.orders.iter().map(|o| o.id).collect())
            .unwrap_or_default();
        let id = if pick.is_multiple_of(10) || live.is_empty() {
            u64::from(pick) % (self.next_id + 2)
        } else {
            live[usize::from(pick) % live.len()]
        };
        let user = match (owner, self.owners.get(&(market, id))) {
            (true, Some(&user)) => user,
            _ => u64::from(pick) % USERS,
        };
        (id, user)
    }

    fn command(&mut self, op: &Op, model: &Model) -> Command {
        match *op {
            Op::Place {
                market,
                sell,
                kind,
                ticks,
                off_tick,
                lots,
                user,
                tif,
                post_only,
                methods,
                reputation,
                min_reputation,
                min_fill,
                max_fill,
                stp,
                stop_ticks,
                expire_in,
            } => {
                // Now and then an id used before: rejected while live, accepted again once gone.
                let id = if expire_in % 25 == 0 && self.next_id > 0 {
                    1 + u64::from(expire_in) * 7 % self.next_id
                } else {
                    self.next_id += 1;
                    self.next_id
                };
                self.owners.insert((market, id), user);
                let order_type = match kind {
                    0..=12 => OrderType::Limit,
                    13..=14 => OrderType::Market,
                    15 => OrderType::StopMarket,
                    16 => OrderType::StopLimit,
                    17 => OrderType::TakeProfitMarket,
                    18 => OrderType::TakeProfitLimit,
                    _ => OrderType::Limit,
                };
                let market_like = order_type.is_market_like();
                let tif = match (market_like, tif) {
                    (true, 0..=7) => TimeInForce::Ioc,
                    (true, _) => TimeInForce::Fok,
                    (false, 0..=4) => TimeInForce::Gtc,
                    (false, 5) => TimeInForce::Ioc,
                    (false, 6) => TimeInForce::Fok,
                    (false, 7) => TimeInForce::Day,
                    (false, 8) => TimeInForce::Gtd,
                    (false, _) => TimeInForce::Gtc,
                };
                let price = ticks * TICK + if off_tick { 1 } else { 0 };
                let price = if market_like {
                    // Market orders get a protection price now and then.
                    (ticks % 3 == 0).then_some(Price(price))
                } else {
                    Some(Price(price))
                };
                Command::Place(PlaceOrder {
                    market: MarketId(u32::from(market)),
                    id,
                    user,
                    side: if sell { Side::Sell } else { Side::Buy },
                    order_type,
                    price,
                    stop_price: order_type
                        .is_conditional()
                        .then_some(Price(stop_ticks * TICK)),
                    qty: Qty(lots * LOT),
                    tif,
                    post_only: post_only && !market_like,
                    expire_at: (tif == TimeInForce::Gtd)
                        .then_some(self.now + i64::from(expire_in) * 1_000),
                    payment_methods: if methods == 0 {
                        PaymentMethods::ANY
                    } else {
                        PaymentMethods(u64::from(methods))
                    },
                    min_reputation: u32::from(min_reputation),
                    reputation: u32::from(reputation),
                    min_fill: min_fill.map(|l| Qty(u64::from(l) * LOT)),
                    max_fill: max_fill.map(|l| Qty(u64::from(l) * LOT)),
                    stp: stp.map(|s| match s {
                        0 => SelfTradePrevention::CancelNewest,
                        1 => SelfTradePrevention::CancelOldest,
                        2 => SelfTradePrevention::CancelBoth,
                        _ => SelfTradePrevention::Decrement,
                    }),
                })
            }
            Op::Cancel {
                market,
                pick,
                owner,
            } => {
                let (id, user) = self.pick(model, market, pick, owner);
                Command::Cancel {
                    market: MarketId(u32::from(market)),
                    id,
                    user,
                }
            }
            Op::Modify {
                market,
                pick,
                owner,
                ticks,
                lots,
            } => {
                let (id, user) = self.pick(model, market, pick, owner);
                Command::Modify(ModifyOrder {
                    market: MarketId(u32::from(market)),
                    id,
                    user,
                    price: ticks.map(|t| Price(t * TICK)),
                    qty: lots.map(|l| Qty(l * LOT)),
                })
            }
            Op::CancelAll { market, user } => Command::CancelAll {
                market: market.map(|m| MarketId(u32::from(m))),
                user,
            },
            Op::Time { advance } => {
                self.now += i64::from(advance) * 1_000;
                Command::AdvanceTime { now: self.now }
            }
        }
    }
}

fn without_book(events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| !matches!(e, Event::Book { .. }))
        .copied()
        .collect()
}

/// Per-order quantity accounting from events: everything ever committed equals filled plus
/// cancelled plus still open.
#[derive(Default)]
struct Accounts {
    committed: BTreeMap<(u32, u64), u64>,
    filled: BTreeMap<(u32, u64), u64>,
    cancelled: BTreeMap<(u32, u64), u64>,
}

impl Accounts {
    fn open_now(&self, key: (u32, u64)) -> u64 {
        self.committed[&key]
            - self.filled.get(&key).unwrap_or(&0)
            - self.cancelled.get(&key).unwrap_or(&0)
    }

    fn record(&mut self, events: &[Event]) {
        for event in events {
            match *event {
                Event::Accepted {
                    market, id, qty, ..
                } => {
                    self.committed.insert((market.0, id), qty.0);
                    self.filled.remove(&(market.0, id));
                    self.cancelled.remove(&(market.0, id));
                }
                Event::Trade {
                    market,
                    maker,
                    taker,
                    qty,
                    ..
                } => {
                    *self.filled.entry((market.0, maker)).or_default() += qty.0;
                    *self.filled.entry((market.0, taker)).or_default() += qty.0;
                }
                Event::Cancelled {
                    market,
                    id,
                    remaining,
                    ..
                }
                | Event::Expired {
                    market,
                    id,
                    remaining,
                    ..
                } => {
                    *self.cancelled.entry((market.0, id)).or_default() += remaining.0;
                }
                Event::Modified {
                    market, id, qty, ..
                } => {
                    let key = (market.0, id);
                    let open = self.open_now(key);
                    let committed = self.committed.get_mut(&key).unwrap();
                    *committed = *committed + qty.0 - open;
                }
                _ => {}
            }
        }
    }

    fn check(&self, engine: &Engine) {
        for &key in self.committed.keys() {
            let open = engine
                .order(MarketId(key.0), key.1)
                .map_or(0, |o| o.remaining.0);
            assert_eq!(
                self.open_now(key),
                open,
                "order {key:?}: committed != filled + cancelled + open"
            );
        }
    }
}

fn check_invariants(engine: &Engine, model: &Model, l2: &BTreeMap<(u32, bool, i64), (u64, u32)>) {
    for id in engine.markets() {
        let market = id.0;
        let views = engine.orders(id);
        // The resting book equals the model's, side by side, in priority order.
        for side in [Side::Buy, Side::Sell] {
            let engine_side: Vec<(u64, i64, u64)> = views
                .iter()
                .filter(|o| o.resting && o.side == side)
                .map(|o| (o.id, o.price.0, o.remaining.0))
                .collect();
            assert_eq!(
                engine_side,
                model.resting(market as usize, side),
                "{side:?} book of market {market}"
            );
        }
        let mut armed: Vec<u64> = views.iter().filter(|o| !o.resting).map(|o| o.id).collect();
        armed.sort();
        assert_eq!(
            armed,
            model.armed(market as usize),
            "armed orders of market {market}"
        );
        // FIFO within a level: sequence numbers ascend within each tier of each level.
        let spec = engine.market_spec(id).unwrap();
        for pair in views.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.resting && b.resting && a.side == b.side && a.price == b.price {
                let tier = |o: &book::OrderView| {
                    let rep = model.markets[market as usize]
                        .orders
                        .iter()
                        .find(|m| m.id == o.id)
                        .unwrap()
                        .reputation;
                    spec.reputation_tiers.iter().filter(|&&t| rep >= t).count()
                };
                assert!(
                    (tier(a), std::cmp::Reverse(a.seq)) > (tier(b), std::cmp::Reverse(b.seq)),
                    "queue order broken at {a:?} then {b:?}"
                );
            }
        }
        // Never crossed between two orders that could trade with each other.
        let mk = &model.markets[market as usize];
        for bid in mk.orders.iter().filter(|o| !o.armed && o.side == Side::Buy) {
            for ask in mk
                .orders
                .iter()
                .filter(|o| !o.armed && o.side == Side::Sell)
            {
                if bid.price < ask.price || bid.user == ask.user {
                    continue;
                }
                let fill_limited = bid.min_fill > 0
                    || ask.min_fill > 0
                    || bid.max_fill != u64::MAX
                    || ask.max_fill != u64::MAX;
                let compatible = bid.accept & ask.accept != 0
                    && bid.reputation >= ask.min_reputation
                    && ask.reputation >= bid.min_reputation;
                assert!(
                    !compatible || fill_limited,
                    "crossed book: bid {} at {} and ask {} at {}",
                    bid.id,
                    bid.price,
                    ask.id,
                    ask.price
                );
            }
        }
        // L2 deltas applied in order reproduce the engine's depth.
        let depth = engine.depth(id, usize::MAX).unwrap();
        let mut from_events: Vec<(bool, i64, u64, u32)> = l2
            .iter()
            .filter(|(k, v)| k.0 == market && v.0 > 0)
            .map(|(k, v)| (k.1, k.2, v.0, v.1))
            .collect();
        from_events.sort();
        let mut from_depth: Vec<(bool, i64, u64, u32)> = depth
            .bids
            .iter()
            .map(|l| (false, l.price.0, l.qty.0, l.orders))
            .chain(
                depth
                    .asks
                    .iter()
                    .map(|l| (true, l.price.0, l.qty.0, l.orders)),
            )
            .collect();
        from_depth.sort();
        assert_eq!(
            from_events, from_depth,
            "L2 deltas disagree with depth in market {market}"
        );
    }
}

fn run(ops: &[Op], split: usize) {
    let mut engine = Engine::new();
    let mut model = Model::default();
    let mut builder = Builder {
        next_id: 0,
        owners: HashMap::new(),
        now: 0,
    };
    let mut l2 = BTreeMap::new();
    let mut accounts = Accounts::default();
    let mut commands = markets();
    let mut all_events = Vec::new();
    let mut snapshot = None;
    for step in 0..ops.len() + 2 {
        if step >= 2 {
            let command = builder.command(&ops[step - 2], &model);
            commands.push(command);
        }
        let command = &commands[step];
        if step == split + 2 {
            snapshot = Some((engine.snapshot(), all_events.len()));
        }
        // The dry-run checks agree with what the command then does.
        let checked = match command {
            Command::Place(place) => Some(engine.check_place(place)),
            Command::Modify(modify) => Some(engine.check_modify(modify)),
            _ => None,
        };
        let mut events = Vec::new();
        engine.apply(command, &mut events);
        if let Some(checked) = checked {
            let rejected = match events.first() {
                Some(Event::Rejected { reason, .. }) => Err(*reason),
                _ => Ok(()),
            };
            assert_eq!(
                checked, rejected,
                "step {step}: check disagrees with {command:?}"
            );
        }
        let mut expected = Vec::new();
        model.apply(command, &mut expected);
        assert_eq!(without_book(&events), expected, "step {step}: {command:?}");
        for event in &events {
            if let Event::Book {
                market,
                side,
                price,
                qty,
                orders,
            } = *event
            {
                l2.insert((market.0, side == Side::Sell, price.0), (qty.0, orders));
            }
        }
        accounts.record(&events);
        accounts.check(&engine);
        check_invariants(&engine, &model, &l2);
        all_events.extend(events);
    }

    // Determinism: a second run gives the same events and hash.
    let mut again = Engine::new();
    let mut events = Vec::new();
    for command in &commands {
        again.apply(command, &mut events);
    }
    assert_eq!(events, all_events);
    assert_eq!(again.state_hash(), engine.state_hash());

    // A snapshot midway plus the rest of the stream gives the same events and hash.
    if let Some((bytes, events_before)) = snapshot {
        let mut restored = Engine::restore(&bytes).expect("snapshot restores");
        let mut rest = Vec::new();
        for command in &commands[split + 2..] {
            restored.apply(command, &mut rest);
        }
        assert_eq!(rest, all_events[events_before..]);
        assert_eq!(restored.state_hash(), engine.state_hash());
        assert_eq!(restored.snapshot(), engine.snapshot());
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("AGORA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_reference_model(ops in prop::collection::vec(op(), 1..250), split in 0usize..250) {
        let split = split.min(ops.len());
        run(&ops, split);
    }
}
