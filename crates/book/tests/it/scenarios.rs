//! Table-driven scenarios: each case is a transcript of commands (`> ...`) and the events they
//! must produce, in a compact notation. Every rejection is also checked to leave the state hash
//! unchanged.
//!
//! Notation of events: `accepted ID`, `rejected ID CODE`, `trade MAKER<-TAKER PRICExQTY`,
//! `cancelled ID QTY CAUSE` (plus `open=N` when part of the order stays open), `expired ID QTY`,
//! `triggered ID @LAST`, `modified ID PRICExQTY kept|moved`, `market N`. L2 events are left out
//! except in the scenario that checks them (`book SIDE PRICE QTY/ORDERS`).

use book::{
    Command, Departed, Engine, Event, MarketId, MarketSpec, ModifyOrder, OrderType, PaymentMethods,
    PlaceOrder, Price, Qty, SelfTradePrevention, Settlement, Side, TimeInForce,
};

fn stp(name: &str) -> SelfTradePrevention {
    match name {
        "cancel_newest" => SelfTradePrevention::CancelNewest,
        "cancel_oldest" => SelfTradePrevention::CancelOldest,
        "cancel_both" => SelfTradePrevention::CancelBoth,
        "decrement" => SelfTradePrevention::Decrement,
        other => panic!("unknown stp {other}"),
    }
}

fn parse(engine: &Engine, line: &str) -> Command {
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap();
    let mut args = std::collections::HashMap::new();
    let mut flags = Vec::new();
    let mut positional = Vec::new();
    for word in words {
        match word.split_once('=') {
            Some((k, v)) => {
                args.insert(k, v);
            }
            None if word.chars().all(|c| c.is_ascii_lowercase() || c == '_') => flags.push(word),
            None => positional.push(word),
        }
    }
    let num = |k: &str| args.get(k).map(|v| v.parse::<i64>().unwrap());
    let market = args
        .get("market")
        .map_or(MarketId(0), |s| engine.market_id(s).unwrap_or(MarketId(99)));
    let user = num("user").unwrap_or(0) as u64;
    let id = num("id").unwrap_or(0) as u64;
    match verb {
        "market" => {
            let mut spec = MarketSpec::new(
                positional[0],
                2,
                3,
                num("tick").unwrap_or(1),
                num("lot").unwrap_or(1) as u64,
            );
            spec.min_qty = num("min_qty").map(|q| Qty(q as u64));
            spec.max_qty = num("max_qty").map(|q| Qty(q as u64));
            spec.min_notional = num("min_notional").map(|q| q as u128);
            spec.price_band_bps = num("band").map(|b| b as u32);
            spec.day_cutoff_ms = num("cutoff").unwrap_or(0);
            if let Some(s) = args.get("stp") {
                spec.default_stp = stp(s);
            }
            if flags.contains(&"escrow") {
                spec.settlement = Settlement::Escrow;
            }
            if let Some(t) = args.get("tiers") {
                spec.reputation_tiers = t.split(',').map(|x| x.parse().unwrap()).collect();
            }
            if let Some(m) = args.get("methods") {
                spec.payment_methods = m.split(',').map(String::from).collect();
            }
            Command::CreateMarket(spec)
        }
        "buy" | "sell" => {
            let side = if verb == "buy" { Side::Buy } else { Side::Sell };
            let order_type = match args.get("type").copied().unwrap_or("limit") {
                "limit" => OrderType::Limit,
                "market" => OrderType::Market,
                "stop_market" => OrderType::StopMarket,
                "stop_limit" => OrderType::StopLimit,
                "take_profit_market" => OrderType::TakeProfitMarket,
                "take_profit_limit" => OrderType::TakeProfitLimit,
                other => panic!("unknown type {other}"),
            };
            let tif = match args.get("tif").copied() {
                None if order_type.is_market_like() => TimeInForce::Ioc,
                None | Some("GTC") => TimeInForce::Gtc,
                Some("IOC") => TimeInForce::Ioc,
                Some("FOK") => TimeInForce::Fok,
                Some("DAY") => TimeInForce::Day,
                Some("GTD") => TimeInForce::Gtd,
                Some(other) => panic!("unknown tif {other}"),
            };
            let methods = args.get("methods").map_or(PaymentMethods::ANY, |m| {
                engine
                    .market_spec(market)
                    .and_then(|spec| spec.payment_method_set(m.split(',')))
                    .unwrap_or(PaymentMethods(1 << 63))
            });
            Command::Place(PlaceOrder {
                market,
                id,
                user,
                side,
                order_type,
                price: num("price").map(Price),
                stop_price: num("stop").map(Price),
                qty: Qty(num("qty").unwrap() as u64),
                tif,
                post_only: flags.contains(&"post_only"),
                expire_at: num("expire_at"),
                payment_methods: methods,
                min_reputation: num("min_rep").unwrap_or(0) as u32,
                reputation: num("rep").unwrap_or(0) as u32,
                min_fill: num("min_fill").map(|q| Qty(q as u64)),
                max_fill: num("max_fill").map(|q| Qty(q as u64)),
                stp: args.get("stp").map(|s| stp(s)),
            })
        }
        "cancel" => Command::Cancel { market, id, user },
        "modify" => Command::Modify(ModifyOrder {
            market,
            id,
            user,
            price: num("price").map(Price),
            qty: num("qty").map(|q| Qty(q as u64)),
        }),
        "cancel_all" => Command::CancelAll {
            market: args.get("market").map(|_| market),
            user: num("user").map(|u| u as u64),
        },
        "time" => Command::AdvanceTime {
            now: num("now").unwrap(),
        },
        other => panic!("unknown command {other}"),
    }
}

fn show(event: &Event, with_book: bool) -> Option<String> {
    Some(match *event {
        Event::MarketCreated { market } => format!("market {}", market.0),
        Event::Rejected { id, reason, .. } => format!("rejected {id} {}", reason.code()),
        Event::Accepted { id, .. } => format!("accepted {id}"),
        Event::Trade {
            maker,
            taker,
            price,
            qty,
            ..
        } => format!("trade {maker}<-{taker} {}x{}", price.0, qty.0),
        Event::Cancelled {
            id,
            remaining,
            open,
            cause,
            ..
        } => {
            let open = if open.0 > 0 {
                format!(" open={}", open.0)
            } else {
                String::new()
            };
            format!("cancelled {id} {} {}{open}", remaining.0, cause.as_str())
        }
        Event::Expired { id, remaining, .. } => format!("expired {id} {}", remaining.0),
        Event::Triggered { id, last_price, .. } => format!("triggered {id} @{}", last_price.0),
        Event::Modified {
            id,
            price,
            qty,
            priority_kept,
            ..
        } => format!(
            "modified {id} {}x{} {}",
            price.0,
            qty.0,
            if priority_kept { "kept" } else { "moved" }
        ),
        Event::Book {
            side,
            price,
            qty,
            orders,
            ..
        } if with_book => format!("book {} {} {}/{}", side.as_str(), price.0, qty.0, orders),
        Event::Book { .. } => return None,
    })
}

/// Runs a transcript and returns it rewritten with the actual events.
fn run(transcript: &str, with_book: bool) -> String {
    let mut engine = Engine::new();
    let mut actual = String::new();
    for line in transcript.lines().map(str::trim) {
        let Some(command) = line.strip_prefix("> ") else {
            continue;
        };
        actual.push_str(line);
        actual.push('\n');
        let before = engine.state_hash();
        let mut events = Vec::new();
        engine.apply(&parse(&engine, command), &mut events);
        if let [Event::Rejected { .. }] = events.as_slice() {
            assert_eq!(
                before,
                engine.state_hash(),
                "rejection changed state: {line}"
            );
        }
        for event in &events {
            if let Some(text) = show(event, with_book) {
                actual.push_str(&text);
                actual.push('\n');
            }
        }
    }
    actual
}

fn check(name: &str, transcript: &str, with_book: bool) {
    let expected: String = transcript
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    let actual = run(transcript, with_book);
    assert_eq!(
        actual, expected,
        "scenario `{name}`\n--- expected\n{expected}--- actual\n{actual}"
    );
}

/// Scenarios that leave out L2 events.
const SCENARIOS: &[(&str, &str)] = &[
    (
        "limit orders trade at the resting price, partial fills rest",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=5
         accepted 1
         > buy id=2 user=2 price=101 qty=3
         accepted 2
         trade 1<-2 100x3
         > buy id=3 user=3 price=100 qty=4
         accepted 3
         trade 1<-3 100x2
         > sell id=4 user=1 price=99 qty=1
         accepted 4
         trade 3<-4 100x1",
    ),
    (
        "price then time priority",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=101 qty=1
         accepted 1
         > sell id=2 user=2 price=100 qty=1
         accepted 2
         > sell id=3 user=3 price=100 qty=1
         accepted 3
         > buy id=4 user=4 price=101 qty=3
         accepted 4
         trade 2<-4 100x1
         trade 3<-4 100x1
         trade 1<-4 101x1",
    ),
    (
        "market orders sweep, cancel the rest, respect protection, need liquidity",
        "> market BTC-USD
         market 0
         > buy id=1 user=1 type=market qty=1
         rejected 1 NO_LIQUIDITY
         > sell id=2 user=2 price=100 qty=1
         accepted 2
         > sell id=3 user=2 price=105 qty=1
         accepted 3
         > sell id=4 user=2 price=110 qty=1
         accepted 4
         > buy id=5 user=1 type=market price=105 qty=5
         accepted 5
         trade 2<-5 100x1
         trade 3<-5 105x1
         cancelled 5 3 market_remainder
         > buy id=6 user=1 type=market qty=5
         accepted 6
         trade 4<-6 110x1
         cancelled 6 4 market_remainder
         > sell id=7 user=1 type=market qty=1 tif=GTC
         rejected 7 INVALID_TIME_IN_FORCE",
    ),
    (
        "IOC cancels the rest; FOK fills whole or is rejected",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=2
         accepted 1
         > buy id=2 user=2 price=100 qty=5 tif=IOC
         accepted 2
         trade 1<-2 100x2
         cancelled 2 3 ioc
         > sell id=3 user=1 price=100 qty=2
         accepted 3
         > sell id=4 user=1 price=101 qty=2
         accepted 4
         > buy id=5 user=2 price=101 qty=5 tif=FOK
         rejected 5 FOK_UNFILLABLE
         > buy id=6 user=2 price=100 qty=3 tif=FOK
         rejected 6 FOK_UNFILLABLE
         > buy id=7 user=2 price=101 qty=4 tif=FOK
         accepted 7
         trade 3<-7 100x2
         trade 4<-7 101x2",
    ),
    (
        "post-only rests or is rejected",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=2
         accepted 1
         > buy id=2 user=2 price=100 qty=1 post_only
         rejected 2 POST_ONLY_WOULD_CROSS
         > buy id=3 user=2 price=99 qty=1 post_only
         accepted 3
         > buy id=4 user=2 price=99 qty=1 post_only tif=IOC
         rejected 4 INVALID_TIME_IN_FORCE
         > modify id=3 user=2 price=100
         rejected 3 POST_ONLY_WOULD_CROSS",
    ),
    (
        "DAY expires at the daily cutoff, GTD at its time",
        "> market BTC-USD cutoff=3600000
         market 0
         > time now=1000
         > buy id=1 user=1 price=100 qty=1 tif=DAY
         accepted 1
         > buy id=2 user=1 price=99 qty=1 tif=GTD expire_at=5000
         accepted 2
         > buy id=3 user=1 price=98 qty=1 tif=GTD expire_at=1000
         rejected 3 INVALID_EXPIRY
         > buy id=4 user=1 price=98 qty=1 tif=GTD
         rejected 4 INVALID_EXPIRY
         > buy id=5 user=1 price=98 qty=1 expire_at=9000
         rejected 5 INVALID_EXPIRY
         > time now=4999
         > time now=5000
         expired 2 1
         > time now=3599999
         > time now=3600000
         expired 1 1
         > time now=10
         rejected 0 TIME_REGRESSION",
    ),
    (
        "stop and take-profit orders trigger on the last trade price",
        "> market BTC-USD
         market 0
         > buy id=1 user=1 type=stop_market stop=105 qty=1
         accepted 1
         > sell id=2 user=1 type=take_profit_limit stop=105 price=104 qty=1
         accepted 2
         > sell id=3 user=2 type=stop_limit stop=95 price=95 qty=1
         accepted 3
         > sell id=4 user=3 price=105 qty=3
         accepted 4
         > buy id=5 user=4 price=105 qty=1
         accepted 5
         trade 4<-5 105x1
         triggered 1 @105
         trade 4<-1 105x1
         triggered 2 @105
         > buy id=2 user=5 price=90 qty=1
         rejected 2 DUPLICATE_ORDER_ID
         > buy id=7 user=5 price=104 qty=1
         accepted 7
         trade 2<-7 104x1
         > sell id=8 user=6 price=95 qty=1
         accepted 8
         > buy id=9 user=7 price=95 qty=1
         accepted 9
         trade 8<-9 95x1
         triggered 3 @95",
    ),
    (
        "triggers fire in price-path order, then by acceptance; take-profit market orders fire too",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=1
         accepted 1
         > buy id=2 user=2 price=100 qty=1
         accepted 2
         trade 1<-2 100x1
         > buy id=3 user=3 type=stop_limit stop=104 price=90 qty=1
         accepted 3
         > buy id=4 user=4 type=stop_limit stop=102 price=90 qty=1
         accepted 4
         > sell id=5 user=5 type=take_profit_market stop=103 qty=1
         accepted 5
         > sell id=6 user=6 type=stop_limit stop=99 price=120 qty=1
         accepted 6
         > buy id=7 user=7 type=take_profit_market stop=98 qty=1
         accepted 7
         > sell id=8 user=8 price=105 qty=1
         accepted 8
         > buy id=9 user=9 price=105 qty=1
         accepted 9
         trade 8<-9 105x1
         triggered 4 @105
         triggered 5 @105
         trade 4<-5 90x1
         triggered 6 @90
         triggered 7 @90
         trade 6<-7 120x1
         triggered 3 @120",
    ),
    (
        "a conditional order already due triggers at once",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=2
         accepted 1
         > buy id=2 user=2 price=100 qty=1
         accepted 2
         trade 1<-2 100x1
         > buy id=3 user=3 type=stop_market stop=99 qty=1
         accepted 3
         triggered 3 @100
         trade 1<-3 100x1
         > sell id=4 user=3 type=take_profit_market stop=101 qty=1
         accepted 4
         > sell id=5 user=3 type=stop_market stop=101 qty=1
         accepted 5
         triggered 5 @100
         cancelled 5 1 no_liquidity
         > buy id=6 user=3 type=stop_limit qty=1 stop=101
         rejected 6 INVALID_PRICE
         > buy id=7 user=3 type=stop_limit qty=1 price=101
         rejected 7 INVALID_STOP_PRICE",
    ),
    (
        "self-trade prevention modes",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=2
         accepted 1
         > sell id=2 user=2 price=100 qty=2
         accepted 2
         > buy id=3 user=1 price=100 qty=3
         accepted 3
         cancelled 3 3 self_trade
         > buy id=4 user=1 price=100 qty=3 stp=cancel_oldest
         accepted 4
         cancelled 1 2 self_trade
         trade 2<-4 100x2
         > sell id=5 user=1 price=101 qty=1
         accepted 5
         > buy id=6 user=1 price=101 qty=2 stp=cancel_both
         accepted 6
         cancelled 5 1 self_trade
         cancelled 6 2 self_trade
         > sell id=7 user=1 price=102 qty=5
         accepted 7
         > sell id=8 user=2 price=102 qty=1
         accepted 8
         > buy id=9 user=1 price=102 qty=2 stp=decrement
         accepted 9
         cancelled 7 2 self_trade open=3
         cancelled 9 2 self_trade
         > buy id=10 user=1 price=102 qty=4 stp=decrement
         accepted 10
         cancelled 7 3 self_trade
         cancelled 10 3 self_trade open=1
         trade 8<-10 102x1",
    ),
    (
        "the market's default self-trade mode applies when the order names none",
        "> market BTC-USD stp=cancel_oldest
         market 0
         > sell id=1 user=1 price=100 qty=1
         accepted 1
         > buy id=2 user=1 price=100 qty=1
         accepted 2
         cancelled 1 1 self_trade
         > buy id=3 user=1 price=100 qty=1 stp=cancel_newest
         accepted 3",
    ),
    (
        "payment methods: incompatible orders are skipped, not blocking the level",
        "> market BTC-USD methods=sepa,revolut,wise
         market 0
         > sell id=1 user=1 price=100 qty=1 methods=sepa
         accepted 1
         > sell id=2 user=2 price=100 qty=1 methods=wise,revolut
         accepted 2
         > sell id=3 user=3 price=101 qty=1
         accepted 3
         > buy id=4 user=4 price=101 qty=3 methods=revolut tif=IOC
         accepted 4
         trade 2<-4 100x1
         trade 3<-4 101x1
         cancelled 4 1 ioc
         > buy id=5 user=4 price=101 qty=2 methods=revolut tif=FOK
         rejected 5 FOK_UNFILLABLE
         > buy id=6 user=4 price=101 qty=1 methods=paypal
         rejected 6 UNKNOWN_PAYMENT_METHOD",
    ),
    (
        "reputation minimums apply both ways",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=1 rep=5 min_rep=50
         accepted 1
         > sell id=2 user=2 price=100 qty=1 rep=80
         accepted 2
         > buy id=3 user=3 price=100 qty=1 rep=10 min_rep=0
         accepted 3
         trade 2<-3 100x1
         > buy id=4 user=4 price=100 qty=1 rep=60 min_rep=10
         accepted 4
         > buy id=5 user=5 price=100 qty=1 rep=60 min_rep=0
         accepted 5
         trade 1<-5 100x1",
    ),
    (
        "minimum and maximum fill sizes",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=10 min_fill=5
         accepted 1
         > sell id=2 user=2 price=100 qty=10 max_fill=2
         accepted 2
         > buy id=3 user=3 price=100 qty=3 tif=IOC
         accepted 3
         trade 2<-3 100x2
         cancelled 3 1 ioc
         > buy id=4 user=3 price=100 qty=6
         accepted 4
         trade 1<-4 100x6
         > buy id=5 user=5 price=100 qty=4
         accepted 5
         trade 1<-5 100x4
         > buy id=6 user=3 price=100 qty=3 min_fill=4 max_fill=2
         rejected 6 INVALID_FILL_LIMITS",
    ),
    (
        "reputation tiers rank before time within a level",
        "> market BTC-USD tiers=10,20
         market 0
         > sell id=1 user=1 price=100 qty=1 rep=5
         accepted 1
         > sell id=2 user=2 price=100 qty=1 rep=25
         accepted 2
         > sell id=3 user=3 price=100 qty=1 rep=15
         accepted 3
         > sell id=4 user=4 price=100 qty=1 rep=30
         accepted 4
         > buy id=5 user=5 price=100 qty=4
         accepted 5
         trade 2<-5 100x1
         trade 4<-5 100x1
         trade 3<-5 100x1
         trade 1<-5 100x1",
    ),
    (
        "modify: a smaller quantity keeps priority, anything else loses it",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=5
         accepted 1
         > sell id=2 user=2 price=100 qty=5
         accepted 2
         > modify id=1 user=1 qty=4
         modified 1 100x4 kept
         > buy id=3 user=3 price=100 qty=1
         accepted 3
         trade 1<-3 100x1
         > modify id=1 user=1 qty=6
         modified 1 100x6 moved
         > buy id=4 user=3 price=100 qty=1
         accepted 4
         trade 2<-4 100x1
         > buy id=5 user=4 price=98 qty=2
         accepted 5
         > modify id=2 user=2 price=98
         modified 2 98x4 moved
         trade 5<-2 98x2
         > modify id=2 user=2
         rejected 2 INVALID_MODIFY
         > modify id=2 user=2 qty=1 price=98
         modified 2 98x1 kept
         > modify id=2 user=9 qty=1
         rejected 2 NOT_OWNER
         > modify id=77 user=2 qty=1
         rejected 77 UNKNOWN_ORDER
         > modify id=2 user=2 qty=0
         rejected 2 INVALID_QUANTITY
         > modify id=2 user=2 price=-5
         rejected 2 INVALID_PRICE",
    ),
    (
        "cancel and cancel-all",
        "> market BTC-USD
         market 0
         > market ETH-USD
         market 1
         > buy id=1 user=1 price=10 qty=1
         accepted 1
         > buy id=2 user=2 price=11 qty=1
         accepted 2
         > buy id=3 user=1 price=12 qty=1
         accepted 3
         > buy id=1 user=1 price=10 qty=1 market=ETH-USD
         accepted 1
         > cancel id=2 user=1
         rejected 2 NOT_OWNER
         > cancel id=2 user=2
         cancelled 2 1 user
         > cancel id=2 user=2
         rejected 2 UNKNOWN_ORDER
         > cancel_all user=1 market=BTC-USD
         cancelled 1 1 cancel_all
         cancelled 3 1 cancel_all
         > cancel_all user=1
         cancelled 1 1 cancel_all
         > cancel id=1 user=1 market=XRP-USD
         rejected 1 UNKNOWN_MARKET",
    ),
    (
        "ids of orders that are gone can be used again",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=1
         accepted 1
         > buy id=2 user=2 price=100 qty=1
         accepted 2
         trade 1<-2 100x1
         > cancel id=1 user=1
         rejected 1 UNKNOWN_ORDER
         > sell id=1 user=3 price=101 qty=2
         accepted 1
         > buy id=1 user=3 price=99 qty=1
         rejected 1 DUPLICATE_ORDER_ID
         > sell id=3 user=3 price=102 qty=1
         accepted 3
         > cancel id=1 user=3
         cancelled 1 2 user
         > cancel id=1 user=3
         rejected 1 UNKNOWN_ORDER
         > modify id=3 user=3 qty=2
         modified 3 102x2 moved",
    ),
    (
        "extreme quantities, prices and times are refused or saturate, never overflow",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=9223372036854775807 qty=9223372036854775807
         accepted 1
         > sell id=2 user=2 price=9223372036854775807 qty=9223372036854775807
         accepted 2
         > sell id=3 user=3 price=9223372036854775807 qty=9223372036854775807
         rejected 3 LEVEL_FULL
         > buy id=4 user=4 price=9223372036854775807 qty=9223372036854775807
         accepted 4
         trade 1<-4 9223372036854775807x9223372036854775807
         > buy id=5 user=4 price=9223372036854775807 qty=9223372036854775807
         accepted 5
         trade 2<-5 9223372036854775807x9223372036854775807
         > time now=9223372036854775807
         > buy id=6 user=4 price=1 qty=1 tif=DAY
         accepted 6",
    ),
    (
        "rejection codes",
        "> market BTC-USD tick=5 lot=10 min_qty=20 max_qty=100 min_notional=5000 band=1000
         market 0
         > market BTC-USD
         rejected 0 DUPLICATE_MARKET
         > market btc-usd tick=1
         rejected 0 INVALID_MARKET
         > buy id=1 user=1 price=101 qty=20
         rejected 1 BAD_TICK
         > buy id=1 user=1 price=100 qty=25
         rejected 1 BAD_LOT
         > buy id=1 user=1 price=100 qty=10
         rejected 1 SIZE_TOO_SMALL
         > buy id=1 user=1 price=100 qty=110
         rejected 1 SIZE_TOO_LARGE
         > buy id=1 user=1 price=100 qty=40
         rejected 1 MIN_NOTIONAL
         > buy id=1 user=1 price=100 qty=0
         rejected 1 INVALID_QUANTITY
         > buy id=1 user=1 qty=50
         rejected 1 INVALID_PRICE
         > buy id=1 user=1 price=100 qty=50
         accepted 1
         > buy id=1 user=2 price=100 qty=50
         rejected 1 DUPLICATE_ORDER_ID
         > sell id=2 user=2 price=100 qty=50
         accepted 2
         trade 1<-2 100x50
         > buy id=3 user=1 price=115 qty=50
         rejected 3 PRICE_BAND
         > buy id=3 user=1 price=110 qty=50
         accepted 3
         > buy id=4 user=1 price=110 qty=50 market=NOPE-USD
         rejected 4 UNKNOWN_MARKET
         > buy id=5 user=1 price=110 qty=50 stop=100
         rejected 5 INVALID_STOP_PRICE",
    ),
];

#[test]
fn scenarios() {
    for (name, transcript) in SCENARIOS {
        check(name, transcript, false);
    }
}

#[test]
fn market_and_level_limits_are_rejections() {
    let mut engine = Engine::new();
    let mut events = Vec::new();
    for i in 0..book::limits::MARKETS_MAX {
        engine.create_market(
            MarketSpec::new(format!("A{i}-USD"), 0, 0, 1, 1),
            &mut events,
        );
    }
    events.clear();
    engine.create_market(MarketSpec::new("LAST-USD", 0, 0, 1, 1), &mut events);
    assert!(matches!(
        events[..],
        [Event::Rejected {
            reason: book::RejectReason::TooManyMarkets,
            ..
        }]
    ));

    // Bids at rising prices fill the ladder from its cheap end.
    let market = MarketId(0);
    let levels = book::limits::LEVELS_PER_SIDE_MAX as i64;
    for price in 1..=levels {
        let order = PlaceOrder::limit(market, price as u64, 1, Side::Buy, Price(price), Qty(1));
        engine.place(&order, &mut events);
    }
    events.clear();
    let before = engine.state_hash();
    let one_more = PlaceOrder::limit(market, 0, 1, Side::Buy, Price(levels + 1), Qty(1));
    engine.place(&one_more, &mut events);
    assert!(matches!(
        events[..],
        [Event::Rejected {
            reason: book::RejectReason::TooManyOrders,
            ..
        }]
    ));
    assert_eq!(before, engine.state_hash());
    // An existing level still takes orders, and moving a level's only order is allowed.
    events.clear();
    let same_level = PlaceOrder::limit(market, 0, 1, Side::Buy, Price(levels), Qty(1));
    engine.place(&same_level, &mut events);
    assert!(matches!(events[0], Event::Accepted { .. }));
    events.clear();
    let modify = ModifyOrder {
        market,
        id: 1,
        user: 1,
        price: Some(Price(levels + 1)),
        qty: None,
    };
    engine.modify(&modify, &mut events);
    assert!(matches!(
        events[0],
        Event::Modified {
            priority_kept: false,
            ..
        }
    ));
}

#[test]
fn l2_events_report_each_touched_level_once_per_sweep() {
    check(
        "l2",
        "> market BTC-USD
         market 0
         > sell id=1 user=1 price=100 qty=2
         accepted 1
         book sell 100 2/1
         > sell id=2 user=2 price=100 qty=3
         accepted 2
         book sell 100 5/2
         > sell id=3 user=2 price=101 qty=1
         accepted 3
         book sell 101 1/1
         > buy id=4 user=3 price=101 qty=6
         accepted 4
         trade 1<-4 100x2
         trade 2<-4 100x3
         book sell 100 0/0
         trade 3<-4 101x1
         book sell 101 0/0
         > modify id=4 user=3 price=99
         rejected 4 UNKNOWN_ORDER
         > buy id=5 user=3 price=99 qty=2
         accepted 5
         book buy 99 2/1
         > modify id=5 user=3 qty=1
         modified 5 99x1 kept
         book buy 99 1/1
         > modify id=5 user=3 price=98
         modified 5 98x1 moved
         book buy 99 0/0
         book buy 98 1/1
         > cancel id=5 user=3
         cancelled 5 1 user
         book buy 98 0/0",
        true,
    );
}

#[test]
fn tags_stay_with_orders_and_each_operation_reports_the_orders_that_left() {
    let mut engine = Engine::new();
    let mut out = Vec::new();
    engine.create_market(MarketSpec::new("BTC-USD", 2, 3, 1, 1), &mut out);
    let m = MarketId(0);
    let limit =
        |id, user, side, price, qty| PlaceOrder::limit(m, id, user, side, Price(price), Qty(qty));
    engine.place_tagged(&limit(1, 1, Side::Sell, 100, 2), 11, &mut out);
    engine.place_tagged(&limit(2, 2, Side::Sell, 100, 3), 12, &mut out);
    assert_eq!(engine.order(m, 1).unwrap().tag, 11);
    assert!(engine.departed(m).is_empty());

    // A buy of 4 fills order 1 and part of order 2; the buy itself never rests.
    engine.place_tagged(&limit(3, 3, Side::Buy, 100, 4), 13, &mut out);
    let gone = |id, user, tag| Departed { id, user, tag };
    assert_eq!(engine.departed(m), [gone(1, 1, 11)]);
    assert_eq!(engine.order(m, 2).unwrap().tag, 12);
    assert!(engine.order(m, 3).is_none());

    // Each operation on the market starts a new list, a rejected one too.
    engine.cancel(m, 2, 2, &mut out);
    assert_eq!(engine.departed(m), [gone(2, 2, 12)]);
    engine.cancel(m, 2, 2, &mut out);
    assert!(engine.departed(m).is_empty());

    // A modify that crosses: the resting buy leaves first, then the moved sell, both filled.
    engine.place_tagged(&limit(5, 5, Side::Sell, 110, 1), 15, &mut out);
    engine.place_tagged(&limit(6, 6, Side::Buy, 105, 1), 16, &mut out);
    let modify = ModifyOrder {
        market: m,
        id: 5,
        user: 5,
        price: Some(Price(105)),
        qty: None,
    };
    engine.modify(&modify, &mut out);
    assert_eq!(engine.departed(m), [gone(6, 6, 16), gone(5, 5, 15)]);

    // Untagged placements carry 0; a tag can be set on a live order only.
    engine.place(&limit(7, 7, Side::Buy, 90, 1), &mut out);
    assert_eq!(engine.order(m, 7).unwrap().tag, 0);
    assert!(engine.set_tag(m, 7, 70));
    assert_eq!(engine.order(m, 7).unwrap().tag, 70);
    assert!(!engine.set_tag(m, 8, 80));
    assert!(!engine.set_tag(MarketId(1), 7, 70));

    // A cancel-all lists every order it ends; the next operation gives the room back.
    for id in 100..5_100 {
        engine.place_tagged(&limit(id, 9, Side::Buy, 50, 1), id, &mut out);
    }
    engine.cancel_all(Some(m), Some(9), &mut out);
    assert_eq!(engine.departed(m).len(), 5_000);
    let with_list = engine.book_heap_bytes();
    engine.cancel(m, 100, 9, &mut out);
    assert!(engine.departed(m).is_empty());
    assert!(with_list - engine.book_heap_bytes() >= 5_000 * std::mem::size_of::<Departed>());
}
