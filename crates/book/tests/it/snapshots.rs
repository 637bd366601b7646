//! Snapshots: a round trip keeps every live order and the state hash; damaged bytes are
//! reported with their offset, never a panic.

use book::{
    Command, Engine, MarketId, MarketSpec, OrderType, PlaceOrder, Price, Qty, Side, TimeInForce,
};

fn populated() -> Engine {
    let mut engine = Engine::new();
    let mut events = Vec::new();
    let mut spec = MarketSpec::new("BTC-USDT", 2, 3, 5, 10);
    spec.reputation_tiers = vec![10];
    spec.payment_methods = vec!["sepa".into(), "wise".into()];
    engine.apply(&Command::CreateMarket(spec), &mut events);
    engine.apply(&Command::AdvanceTime { now: 1_000 }, &mut events);
    let market = MarketId(0);
    for i in 0..40u64 {
        let side = if i % 2 == 0 { Side::Buy } else { Side::Sell };
        let price = if side == Side::Buy {
            500 - 5 * (i as i64 % 7)
        } else {
            505 + 5 * (i as i64 % 5)
        };
        let mut order = PlaceOrder::limit(
            market,
            i + 1,
            i % 4,
            side,
            Price(price),
            Qty(10 * (1 + i % 3)),
        );
        order.reputation = (i % 20) as u32;
        if i % 5 == 0 {
            order.tif = TimeInForce::Day;
        }
        engine.apply(&Command::Place(order), &mut events);
    }
    let mut stop = PlaceOrder::market(market, 100, 9, Side::Buy, Qty(10));
    stop.order_type = OrderType::StopMarket;
    stop.stop_price = Some(Price(600));
    engine.apply(&Command::Place(stop), &mut events);
    let mut cross = PlaceOrder::limit(market, 101, 8, Side::Buy, Price(510), Qty(30));
    cross.tif = TimeInForce::Ioc;
    engine.apply(&Command::Place(cross), &mut events);
    engine
}

#[test]
fn a_snapshot_restores_the_same_state() {
    let engine = populated();
    let bytes = engine.snapshot();
    let restored = Engine::restore(&bytes).unwrap();
    assert_eq!(restored.state_hash(), engine.state_hash());
    assert_eq!(restored.orders(MarketId(0)), engine.orders(MarketId(0)));
    assert_eq!(
        restored.depth(MarketId(0), 100),
        engine.depth(MarketId(0), 100)
    );
    assert_eq!(
        restored.stats_24h(MarketId(0)),
        engine.stats_24h(MarketId(0))
    );
}

#[test]
fn damaged_snapshots_are_errors_not_panics() {
    let bytes = populated().snapshot();
    for length in 0..bytes.len() {
        let error = Engine::restore(&bytes[..length]).expect_err("a truncated snapshot is refused");
        assert!(error.offset <= length, "{error}");
    }
    let mut extended = bytes.clone();
    extended.push(0);
    assert_eq!(
        Engine::restore(&extended).unwrap_err().problem,
        "trailing bytes"
    );
    // Every single-byte change either still decodes or is refused; none panics.
    for position in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut damaged = bytes.clone();
            damaged[position] ^= flip;
            let _ = Engine::restore(&damaged);
        }
    }
}
