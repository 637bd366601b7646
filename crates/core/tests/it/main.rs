//! Core tests: a trade settled with fees to exact balances, refusals that change nothing, escrow
//! holds, and random command streams with every invariant recomputed after each command.

mod codec;
mod crash;
mod projector;
mod sequencer;

use agora_core::{CoreCommand, CoreRejection, Output, State};
use book::{
    MarketId, MarketSpec, ModifyOrder, OrderType, PlaceOrder, Price, Qty, RejectReason, Settlement,
    Side, TimeInForce,
};
use ledger::{Balance, Owner, Rejection};
use proptest::prelude::*;

const BTC: u32 = 1;
const USD: u32 = 2;
const MARKET: MarketId = MarketId(0);

/// BTC with 8 decimals, USD with 8 decimals (enough for price 0.01 × lot 0.0001), and a
/// BTC-USD market with 0.1% maker and 0.2% taker fees.
fn setup(settlement: Settlement) -> State {
    let mut state = State::new();
    let mut out = Output::default();
    let mut spec = MarketSpec::new("BTC-USD", 2, 4, 1, 1);
    spec.settlement = settlement;
    for command in [
        CoreCommand::CreateAsset {
            asset: BTC,
            symbol: "BTC".into(),
            decimals: 8,
        },
        CoreCommand::CreateAsset {
            asset: USD,
            symbol: "USD".into(),
            decimals: 8,
        },
        CoreCommand::CreateMarket {
            spec,
            base: BTC,
            quote: USD,
            maker_fee_bps: 10,
            taker_fee_bps: 20,
        },
    ] {
        state.apply(&command, &mut out).unwrap();
    }
    state
}

fn run(state: &mut State, command: CoreCommand) -> Result<Output, CoreRejection> {
    let mut out = Output::default();
    state.apply(&command, &mut out).map(|()| out)
}

/// Credits a user with an asset; the test's set-up, so it must be accepted.
fn deposit(state: &mut State, user: u64, asset: u32, amount: u128) {
    run(
        state,
        CoreCommand::Deposit {
            user,
            asset,
            amount,
        },
    )
    .unwrap();
}

fn limit(id: u64, user: u64, side: Side, price: i64, qty: u64) -> CoreCommand {
    CoreCommand::Place(PlaceOrder::limit(
        MARKET,
        id,
        user,
        side,
        Price(price),
        Qty(qty),
    ))
}

fn bal(available: u128, held: u128) -> Balance {
    Balance { available, held }
}

#[test]
fn an_instant_trade_settles_with_fees_and_releases_what_is_left() {
    let mut state = setup(Settlement::Instant);
    deposit(&mut state, 1, BTC, 100_000_000);
    deposit(&mut state, 2, USD, 10_000_000_000_000);
    // Alice sells 0.5 BTC at 50,000.00: 0.5 BTC held.
    run(&mut state, limit(1, 1, Side::Sell, 5_000_000, 5_000)).unwrap();
    assert_eq!(
        state.ledger().balance(Owner::User(1), BTC),
        bal(50_000_000, 50_000_000)
    );
    // Bob buys 0.2 BTC with a limit of 50,100.00: 10,020 USD held, pays 10,000 at the maker's
    // price, and the 20 USD of price improvement goes back at once.
    run(&mut state, limit(2, 2, Side::Buy, 5_010_000, 2_000)).unwrap();
    let alice = |asset| state.ledger().balance(Owner::User(1), asset);
    let bob = |asset| state.ledger().balance(Owner::User(2), asset);
    // Bob is the taker: 0.2% of 0.2 BTC = 0.0004 BTC fee. Alice is the maker: 0.1% of 10,000 USD.
    assert_eq!(bob(BTC), bal(19_960_000, 0));
    assert_eq!(bob(USD), bal(9_000_000_000_000, 0));
    assert_eq!(alice(USD), bal(999_000_000_000, 0));
    assert_eq!(alice(BTC), bal(50_000_000, 30_000_000));
    let fees = |asset| state.ledger().balance(Owner::Fees, asset);
    assert_eq!(
        (fees(BTC), fees(USD)),
        (bal(40_000, 0), bal(1_000_000_000, 0))
    );
    // Alice cancels the rest: her base comes back.
    run(
        &mut state,
        CoreCommand::Cancel {
            market: MARKET,
            id: 1,
            user: 1,
        },
    )
    .unwrap();
    assert_eq!(
        state.ledger().balance(Owner::User(1), BTC),
        bal(80_000_000, 0)
    );
    assert_eq!(state.order_hold(MARKET, 1), None);
    state.verify().unwrap();
}

#[test]
fn refusals_change_nothing() {
    let mut state = setup(Settlement::Instant);
    deposit(&mut state, 1, USD, 1_000_000_000);
    run(&mut state, limit(1, 1, Side::Buy, 100, 10_000)).unwrap();
    let cases = [
        // The engine's verdict comes before the funds check: a duplicate id is reported as such
        // even when the order is also unfunded.
        (
            limit(1, 1, Side::Buy, 100, 2_000_000),
            CoreRejection::Book(RejectReason::DuplicateOrderId),
        ),
        (
            limit(2, 1, Side::Buy, 100, 2_000_000),
            CoreRejection::Ledger(Rejection::InsufficientFunds),
        ),
        (
            limit(2, 1, Side::Sell, 100, 1),
            CoreRejection::Ledger(Rejection::InsufficientFunds),
        ),
        (
            limit(1, 1, Side::Buy, 100, 1),
            CoreRejection::Book(RejectReason::DuplicateOrderId),
        ),
        (
            CoreCommand::Place(PlaceOrder::market(MARKET, 3, 1, Side::Buy, Qty(1))),
            CoreRejection::Book(RejectReason::NoLiquidity),
        ),
        (
            CoreCommand::Modify(ModifyOrder {
                market: MARKET,
                id: 1,
                user: 1,
                price: None,
                qty: Some(Qty(2_000_000)),
            }),
            CoreRejection::Ledger(Rejection::InsufficientFunds),
        ),
        (
            CoreCommand::Cancel {
                market: MARKET,
                id: 9,
                user: 1,
            },
            CoreRejection::Book(RejectReason::UnknownOrder),
        ),
        (
            CoreCommand::CompleteWithdrawal { id: 4 },
            CoreRejection::UnknownWithdrawal,
        ),
        (
            CoreCommand::RequestWithdrawal {
                id: 4,
                user: 1,
                asset: USD,
                amount: 1_000_000_000,
                destination: "bank:DE00 1234".into(),
            },
            CoreRejection::Ledger(Rejection::InsufficientFunds),
        ),
        (
            CoreCommand::CreateMarket {
                spec: MarketSpec::new("ETH-USD", 2, 8, 1, 1),
                base: 7,
                quote: USD,
                maker_fee_bps: 0,
                taker_fee_bps: 0,
            },
            CoreRejection::InvalidMarketAssets,
        ),
        (
            CoreCommand::CreateMarket {
                spec: MarketSpec::new("BTC-EUR", 2, 8, 1, 1),
                base: BTC,
                quote: USD,
                maker_fee_bps: 0,
                taker_fee_bps: 0,
            },
            CoreRejection::InvalidMarketAssets,
        ),
        (
            // Decimals whose sum overflows: refused, not a panic.
            CoreCommand::CreateMarket {
                spec: MarketSpec::new("BTC-EUR", u32::MAX, 1, 1, 1),
                base: BTC,
                quote: USD,
                maker_fee_bps: 0,
                taker_fee_bps: 0,
            },
            CoreRejection::InvalidMarketAssets,
        ),
        (
            CoreCommand::CreateMarket {
                spec: MarketSpec::new("BTC-EUR", 0, 0, 1, 1),
                base: BTC,
                quote: USD,
                maker_fee_bps: 1_001,
                taker_fee_bps: 0,
            },
            CoreRejection::InvalidFee,
        ),
        (
            CoreCommand::AdvanceTime { now: -1 },
            CoreRejection::Book(RejectReason::TimeRegression),
        ),
    ];
    for (command, reason) in cases {
        let before = state.state_hash();
        let mut out = Output::default();
        assert_eq!(state.apply(&command, &mut out), Err(reason), "{command:?}");
        assert!(
            out.events.is_empty() && out.postings.is_empty(),
            "{command:?} left output"
        );
        assert_eq!(state.state_hash(), before, "{command:?} changed the state");
    }
    // A market sell needs base; a market buy on an instant market needs a protection price.
    deposit(&mut state, 2, BTC, 100_000_000);
    run(&mut state, limit(5, 2, Side::Sell, 200, 10)).unwrap();
    let naked = CoreCommand::Place(PlaceOrder::market(MARKET, 6, 1, Side::Buy, Qty(1)));
    assert_eq!(
        run(&mut state, naked).unwrap_err(),
        CoreRejection::ProtectionRequired
    );
    state.verify().unwrap();
}

#[test]
fn escrow_fills_keep_the_sellers_base_held_per_trade() {
    let mut state = setup(Settlement::Escrow);
    deposit(&mut state, 1, BTC, 10_000);
    run(&mut state, limit(1, 1, Side::Sell, 100, 1)).unwrap();
    // The buyer pays off-platform: no funds needed, nothing held for the buy.
    run(&mut state, limit(2, 2, Side::Buy, 100, 1)).unwrap();
    let escrows: Vec<_> = state.escrows().values().copied().collect();
    assert_eq!(escrows.len(), 1);
    assert_eq!(
        (escrows[0].seller, escrows[0].buyer, escrows[0].base_amount),
        (1, 2, 10_000)
    );
    assert_eq!(state.ledger().balance(Owner::User(1), BTC), bal(0, 10_000));
    assert_eq!(state.ledger().balance(Owner::User(2), BTC), bal(0, 0));
    state.verify().unwrap();
}

#[test]
fn withdrawals_hold_then_leave_or_return() {
    let mut state = setup(Settlement::Instant);
    deposit(&mut state, 1, BTC, 1_000);
    run(
        &mut state,
        CoreCommand::RequestWithdrawal {
            id: 1,
            user: 1,
            asset: BTC,
            amount: 600,
            destination: "bank:DE00 1234".into(),
        },
    )
    .unwrap();
    assert_eq!(
        run(
            &mut state,
            CoreCommand::RequestWithdrawal {
                id: 1,
                user: 1,
                asset: BTC,
                amount: 1,
                destination: "bank:DE00 1234".into(),
            }
        )
        .unwrap_err(),
        CoreRejection::DuplicateWithdrawal
    );
    // A destination longer than the journal keeps is refused, holding nothing.
    let before = state.state_hash();
    assert_eq!(
        run(
            &mut state,
            CoreCommand::RequestWithdrawal {
                id: 3,
                user: 1,
                asset: BTC,
                amount: 1,
                destination: "x".repeat(agora_core::limits::DESTINATION_BYTES_MAX + 1),
            }
        )
        .unwrap_err(),
        CoreRejection::InvalidDestination
    );
    assert_eq!(state.state_hash(), before);
    run(
        &mut state,
        CoreCommand::RequestWithdrawal {
            id: 2,
            user: 1,
            asset: BTC,
            amount: 400,
            destination: "bank:DE00 1234".into(),
        },
    )
    .unwrap();
    run(&mut state, CoreCommand::CompleteWithdrawal { id: 1 }).unwrap();
    run(&mut state, CoreCommand::CancelWithdrawal { id: 2 }).unwrap();
    assert_eq!(state.ledger().balance(Owner::User(1), BTC), bal(400, 0));
    assert_eq!(state.ledger().asset(BTC).unwrap().supply, 400);
    state.verify().unwrap();
}

#[derive(Clone, Debug)]
enum RandomCommand {
    Deposit(u64, bool, u16),
    Place {
        user: u64,
        sell: bool,
        kind: u8,
        price: i64,
        qty: u64,
        tif: u8,
    },
    Cancel(u16),
    Modify(u16, Option<i64>, Option<u64>),
    CancelAll(Option<u64>),
    Time(u32),
    Withdraw(u64, bool, u16),
    Halt(bool),
    Fees(u16, u16),
}

fn random_command() -> impl Strategy<Value = RandomCommand> {
    prop_oneof![
        2 => (1u64..5, any::<bool>(), 1u16..2_000).prop_map(|(u, b, a)| RandomCommand::Deposit(u, b, a)),
        8 => (1u64..5, any::<bool>(), 0u8..10, 95i64..106, 1u64..20, 0u8..6)
            .prop_map(|(user, sell, kind, price, qty, tif)| RandomCommand::Place { user, sell, kind, price, qty, tif }),
        2 => any::<u16>().prop_map(RandomCommand::Cancel),
        2 => (any::<u16>(), prop::option::of(95i64..106), prop::option::of(1u64..20))
            .prop_map(|(p, price, qty)| RandomCommand::Modify(p, price, qty)),
        1 => prop::option::of(1u64..5).prop_map(RandomCommand::CancelAll),
        1 => (0u32..100_000).prop_map(RandomCommand::Time),
        1 => (1u64..5, any::<bool>(), 1u16..500).prop_map(|(u, b, a)| RandomCommand::Withdraw(u, b, a)),
        1 => any::<bool>().prop_map(RandomCommand::Halt),
        1 => (0u16..1_200, 0u16..1_200).prop_map(|(maker, taker)| RandomCommand::Fees(maker, taker)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("AGORA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn holds_and_balances_stay_exact(commands in prop::collection::vec(random_command(), 1..200), escrow in any::<bool>()) {
        let mut state = setup(if escrow { Settlement::Escrow } else { Settlement::Instant });
        let mut now = 0;
        let mut next_id = 0u64;
        let mut next_withdrawal = 0u64;
        let mut deposited = [0u128; 3];
        let mut withdrawn = [0u128; 3];
        for random in commands {
            let live: Vec<(u64, u64)> = state.engine().orders(MARKET).iter().map(|o| (o.id, o.user)).collect();
            let command = match random {
                RandomCommand::Deposit(user, btc, amount) => CoreCommand::Deposit {
                    user,
                    asset: if btc { BTC } else { USD },
                    amount: u128::from(amount) * 1_000_000,
                },
                RandomCommand::Place { user, sell, kind, price, qty, tif } => {
                    next_id += 1;
                    let side = if sell { Side::Sell } else { Side::Buy };
                    let mut order = PlaceOrder::limit(MARKET, next_id, user, side, Price(price * 100), Qty(qty * 100));
                    match kind {
                        0 => {
                            order.order_type = OrderType::Market;
                            order.tif = TimeInForce::Ioc;
                            if price % 2 == 0 { order.price = None }
                        }
                        1 => {
                            order.order_type = OrderType::StopLimit;
                            order.stop_price = Some(Price((200 - price) * 100));
                        }
                        _ => {}
                    }
                    if kind != 0 {
                        order.tif = [TimeInForce::Gtc, TimeInForce::Ioc, TimeInForce::Fok, TimeInForce::Day, TimeInForce::Gtc, TimeInForce::Gtc][tif as usize];
                    }
                    CoreCommand::Place(order)
                }
                RandomCommand::Cancel(pick) => {
                    let (id, user) = live.get(pick as usize % live.len().max(1)).copied().unwrap_or((1, 1));
                    CoreCommand::Cancel { market: MARKET, id, user }
                }
                RandomCommand::Modify(pick, price, qty) => {
                    let (id, user) = live.get(pick as usize % live.len().max(1)).copied().unwrap_or((1, 1));
                    CoreCommand::Modify(ModifyOrder {
                        market: MARKET,
                        id,
                        user,
                        price: price.map(|p| Price(p * 100)),
                        qty: qty.map(|q| Qty(q * 100)),
                    })
                }
                RandomCommand::CancelAll(user) => CoreCommand::CancelAll { market: None, user },
                RandomCommand::Time(advance) => {
                    now += i64::from(advance) * 1_000;
                    CoreCommand::AdvanceTime { now }
                }
                RandomCommand::Halt(true) => CoreCommand::HaltMarket { market: MARKET },
                RandomCommand::Halt(false) => CoreCommand::ResumeMarket { market: MARKET },
                RandomCommand::Fees(maker, taker) => CoreCommand::SetMarketFees {
                    market: MARKET,
                    maker_fee_bps: u32::from(maker),
                    taker_fee_bps: u32::from(taker),
                },
                RandomCommand::Withdraw(user, btc, amount) => {
                    next_withdrawal += 1;
                    CoreCommand::RequestWithdrawal {
                        id: next_withdrawal,
                        user,
                        asset: if btc { BTC } else { USD },
                        amount: u128::from(amount) * 1_000_000,
                        destination: format!("bank:{user}"),
                    }
                }
            };
            let before = state.state_hash();
            let mut out = Output::default();
            match state.apply(&command, &mut out) {
                Err(_) => {
                    prop_assert_eq!(state.state_hash(), before, "a refusal changed the state: {:?}", command);
                    prop_assert!(out.events.is_empty() && out.postings.is_empty());
                }
                Ok(()) => {
                    if let CoreCommand::Deposit { asset, amount, .. } = command {
                        deposited[asset as usize] += amount;
                    }
                    // Every other withdrawal is paid out, the rest cancelled.
                    if let CoreCommand::RequestWithdrawal { id, asset, amount, .. } = command {
                        let finish = if id % 2 == 0 {
                            withdrawn[asset as usize] += amount;
                            CoreCommand::CompleteWithdrawal { id }
                        } else {
                            CoreCommand::CancelWithdrawal { id }
                        };
                        state.apply(&finish, &mut out).unwrap();
                    }
                }
            }
            if let Err(problem) = state.verify() {
                prop_assert!(false, "after {:?}: {}", command, problem);
            }
            for asset in [BTC, USD] {
                prop_assert_eq!(
                    state.ledger().asset(asset).unwrap().supply,
                    deposited[asset as usize] - withdrawn[asset as usize]
                );
            }
        }        // A snapshot restores to the same state, and both go on identically.
        let bytes = state.snapshot();
        let mut restored = State::restore(&bytes).unwrap();
        prop_assert_eq!(restored.state_hash(), state.state_hash());
        prop_assert_eq!(restored.snapshot(), bytes);
        let next = limit(1_000_000, 1, Side::Buy, 10_000, 100);
        let (mut a, mut b) = (Output::default(), Output::default());
        prop_assert_eq!(state.apply(&next, &mut a), restored.apply(&next, &mut b));
        prop_assert_eq!(a.events, b.events);
        prop_assert_eq!(restored.state_hash(), state.state_hash());
    }
}

#[test]
fn damaged_core_snapshots_are_errors() {
    let mut state = setup(Settlement::Instant);
    deposit(&mut state, 1, BTC, 20_000_000);
    run(
        &mut state,
        CoreCommand::SetReputation {
            user: 1,
            reputation: 7,
        },
    )
    .unwrap();
    run(&mut state, limit(1, 1, Side::Sell, 100, 1_000)).unwrap();
    run(
        &mut state,
        CoreCommand::RequestWithdrawal {
            id: 9,
            user: 1,
            asset: BTC,
            amount: 5,
            destination: "bank:DE00 1234".into(),
        },
    )
    .unwrap();
    let bytes = state.snapshot();
    assert_eq!(
        State::restore(&bytes).unwrap().state_hash(),
        state.state_hash()
    );
    for cut in 0..bytes.len() {
        assert!(
            State::restore(&bytes[..cut]).is_err(),
            "a snapshot cut at {cut} was accepted"
        );
    }
    for position in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[position] ^= 0x40;
        if let Ok(other) = State::restore(&damaged) {
            other.verify().unwrap();
        }
    }
}

#[test]
fn a_snapshot_whose_holds_overflow_is_refused_not_a_panic() {
    // Two orders' holds of one user's BTC, each rewritten to 2^127 in the snapshot's bytes:
    // their sum overflows an amount. A snapshot passes the store's checksum only if it was
    // written so, but restoring must still answer with an error.
    let mut state = setup(Settlement::Instant);
    deposit(&mut state, 1, BTC, 100_000_000);
    run(&mut state, limit(1, 1, Side::Sell, 100, 1_111)).unwrap();
    run(&mut state, limit(2, 1, Side::Sell, 100, 2_222)).unwrap();
    let mut bytes = state.snapshot();
    for qty in [1_111u128, 2_222] {
        // A sell holds its quantity in the base asset's units (8 decimals, lots of 4).
        let held = (qty * 10_000).to_le_bytes();
        let at = bytes
            .windows(held.len())
            .position(|window| window == held)
            .expect("the hold's amount is in the snapshot");
        bytes[at..at + held.len()].copy_from_slice(&(1u128 << 127).to_le_bytes());
    }
    let restored = std::panic::catch_unwind(|| State::restore(&bytes).map(|_| ()));
    let error = restored
        .expect("restoring does not panic")
        .expect_err("holds that overflow are refused");
    assert!(error.to_string().contains("overflow"), "{error}");
}

#[test]
fn a_user_holds_at_most_the_open_order_limit() {
    let mut state = setup(Settlement::Instant);
    deposit(&mut state, 1, BTC, 1 << 80);
    let max = agora_core::limits::OPEN_ORDERS_PER_USER_MAX as u64;
    for id in 1..=max {
        run(&mut state, limit(id, 1, Side::Sell, 100, 1)).unwrap();
    }
    assert_eq!(state.open_orders(1), max as u32);
    let before = state.state_hash();
    assert_eq!(
        run(&mut state, limit(max + 1, 1, Side::Sell, 100, 1)).unwrap_err(),
        CoreRejection::TooManyOpenOrders
    );
    assert_eq!(state.state_hash(), before);
    // Another user is not affected, and a cancel makes room.
    deposit(&mut state, 2, USD, 1 << 60);
    run(&mut state, limit(max + 2, 2, Side::Buy, 99, 1)).unwrap();
    run(
        &mut state,
        CoreCommand::Cancel {
            market: MARKET,
            id: 1,
            user: 1,
        },
    )
    .unwrap();
    assert_eq!(state.open_orders(1), max as u32 - 1);
    run(&mut state, limit(max + 1, 1, Side::Sell, 100, 1)).unwrap();
    // Filled orders stop counting too.
    run(&mut state, limit(max + 3, 2, Side::Buy, 100, 10)).unwrap();
    assert_eq!(state.open_orders(1), max as u32 - 10);
    state.verify().unwrap();
}

#[test]
fn a_halted_market_refuses_orders_but_lets_them_be_cancelled() {
    let mut state = setup(Settlement::Instant);
    for (user, asset) in [(1, BTC), (2, USD)] {
        run(
            &mut state,
            CoreCommand::Deposit {
                user,
                asset,
                amount: 10_000_000_000_000,
            },
        )
        .unwrap();
    }
    run(&mut state, limit(1, 1, Side::Sell, 5_000_000, 5_000)).unwrap();
    run(&mut state, CoreCommand::HaltMarket { market: MARKET }).unwrap();
    assert!(state.market(MARKET).unwrap().halted);
    // Halting again changes nothing.
    let before = state.state_hash();
    run(&mut state, CoreCommand::HaltMarket { market: MARKET }).unwrap();
    assert_eq!(state.state_hash(), before);

    // A crossing buy and a modification are refused, and change nothing.
    for command in [
        limit(2, 2, Side::Buy, 5_000_000, 1_000),
        CoreCommand::Modify(ModifyOrder {
            market: MARKET,
            id: 1,
            user: 1,
            price: Some(Price(4_900_000)),
            qty: None,
        }),
    ] {
        assert_eq!(
            run(&mut state, command).unwrap_err(),
            CoreRejection::MarketHalted
        );
        assert_eq!(state.state_hash(), before);
    }
    assert_eq!(CoreRejection::MarketHalted.code(), "MARKET_HALTED");
    // The halt and the book survive a snapshot.
    let restored = State::restore(&state.snapshot()).unwrap();
    assert!(restored.market(MARKET).unwrap().halted);
    assert_eq!(restored.state_hash(), state.state_hash());

    // The resting order can still be pulled; after a resume, orders trade again.
    run(
        &mut state,
        CoreCommand::Cancel {
            market: MARKET,
            id: 1,
            user: 1,
        },
    )
    .unwrap();
    run(&mut state, limit(3, 1, Side::Sell, 5_000_000, 5_000)).unwrap_err();
    run(&mut state, CoreCommand::ResumeMarket { market: MARKET }).unwrap();
    run(&mut state, limit(3, 1, Side::Sell, 5_000_000, 5_000)).unwrap();
    let out = run(&mut state, limit(4, 2, Side::Buy, 5_000_000, 1_000)).unwrap();
    assert!(
        out.events
            .iter()
            .any(|e| matches!(e, book::Event::Trade { .. })),
        "{:?}",
        out.events
    );
    for command in [
        CoreCommand::HaltMarket {
            market: MarketId(7),
        },
        CoreCommand::ResumeMarket {
            market: MarketId(7),
        },
    ] {
        assert_eq!(
            run(&mut state, command).unwrap_err(),
            CoreRejection::Book(RejectReason::UnknownMarket)
        );
    }
    state.verify().unwrap();
}

#[test]
fn new_fees_apply_to_the_next_trade_and_are_bounded() {
    let mut state = setup(Settlement::Instant);
    for (user, asset) in [(1, BTC), (2, USD)] {
        run(
            &mut state,
            CoreCommand::Deposit {
                user,
                asset,
                amount: 10_000_000_000_000,
            },
        )
        .unwrap();
    }
    let before = state.state_hash();
    for (maker, taker) in [(1_001, 0), (0, 1_001)] {
        assert_eq!(
            run(
                &mut state,
                CoreCommand::SetMarketFees {
                    market: MARKET,
                    maker_fee_bps: maker,
                    taker_fee_bps: taker,
                },
            )
            .unwrap_err(),
            CoreRejection::InvalidFee
        );
    }
    assert_eq!(state.state_hash(), before);
    run(
        &mut state,
        CoreCommand::SetMarketFees {
            market: MARKET,
            maker_fee_bps: 0,
            taker_fee_bps: 100,
        },
    )
    .unwrap();
    let fees = |state: &State| state.ledger().balance(Owner::Fees, BTC).available;
    run(&mut state, limit(1, 1, Side::Sell, 5_000_000, 10_000)).unwrap();
    run(&mut state, limit(2, 2, Side::Buy, 5_000_000, 10_000)).unwrap();
    // 1% of the 1 BTC the taker receives.
    assert_eq!(fees(&state), 1_000_000);
    assert_eq!(state.ledger().balance(Owner::Fees, USD).available, 0);
    let restored = State::restore(&state.snapshot()).unwrap();
    assert_eq!(restored.market(MARKET).unwrap().taker_fee_bps, 100);
    state.verify().unwrap();
}

/// The state hash and the snapshot bytes of a fixed history, recorded when they were last
/// changed on purpose. Snapshots on disk and `journal verify` depend on both: a change to how
/// the core keeps its state must leave them as they are, or change them deliberately (with a
/// new snapshot version) and update these figures.
#[test]
fn the_state_hash_and_snapshot_of_a_known_history_do_not_drift() {
    use sha2::{Digest, Sha256};
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut found = Vec::new();
    let mut found_version_3 = Vec::new();
    for settlement in [Settlement::Instant, Settlement::Escrow] {
        let mut state = setup(settlement);
        for user in 1..=4 {
            for asset in [BTC, USD] {
                let deposit = CoreCommand::Deposit {
                    user,
                    asset,
                    amount: 1 << 50,
                };
                run(&mut state, deposit).unwrap();
            }
        }
        let mut stop = PlaceOrder::limit(MARKET, 20, 4, Side::Sell, Price(95), Qty(3));
        stop.order_type = OrderType::StopLimit;
        stop.stop_price = Some(Price(96));
        let mut day = PlaceOrder::limit(MARKET, 21, 3, Side::Buy, Price(90), Qty(5));
        day.tif = TimeInForce::Day;
        let history = [
            limit(1, 1, Side::Sell, 100, 10),
            limit(2, 2, Side::Sell, 101, 7),
            limit(3, 3, Side::Buy, 97, 4),
            CoreCommand::Place(stop),
            CoreCommand::Place(day),
            // Fills order 1 and part of order 2, at a better price than the buyer's limit.
            limit(4, 4, Side::Buy, 105, 12),
            CoreCommand::Modify(ModifyOrder {
                market: MARKET,
                id: 3,
                user: 3,
                price: Some(Price(98)),
                qty: Some(Qty(6)),
            }),
            // Trades at 98 against order 3 and rests the rest at 96.
            limit(5, 1, Side::Sell, 96, 7),
            // Trades at 96, which fires the stop; the stop's sell takes the rest of this buy.
            limit(6, 2, Side::Buy, 96, 2),
            CoreCommand::Cancel {
                market: MARKET,
                id: 2,
                user: 2,
            },
            limit(7, 1, Side::Buy, 93, 3),
            // Expires the day order.
            CoreCommand::AdvanceTime {
                now: 2 * book::DAY_MS,
            },
        ];
        for command in history {
            let outcome = run(&mut state, command.clone());
            assert!(outcome.is_ok(), "{command:?}: {outcome:?}");
        }
        state.verify().unwrap();
        // The stop fired and rests the rest of its sell; the day order expired.
        let stop = state.engine().order(MARKET, 20).unwrap();
        assert!(stop.resting && stop.remaining == Qty(2));
        assert!(state.engine().order(MARKET, 21).is_none());
        found.push(hex(&state.state_hash()));
        let bytes = state.snapshot();
        found.push(hex(&Sha256::digest(&bytes)));
        // The same bytes as version 3 wrote them, and the hash such a snapshot recorded.
        let mut version_3 = bytes.clone();
        version_3[4..8].copy_from_slice(&3u32.to_le_bytes());
        let restored = State::restore(&version_3).unwrap();
        assert_eq!(restored.state_hash(), state.state_hash());
        found_version_3.push(hex(&restored.state_hash_as_recorded_by(&version_3)));
        found_version_3.push(hex(&Sha256::digest(&version_3)));
    }
    // Since snapshot version 4 the hash covers each escrow's market, seller and buyer: the
    // escrow market's hash and both snapshots' bytes (their version) changed with it.
    let expected = [
        "00903763bb433a0f887dc9d1753de9525a59311b6798ddcefe6a4aa69b2dc713",
        "d56f6609a71f5919df7c16af87908dd8a6c42af8cb16944df193d5bfe6e860bc",
        "5eb6f34e6076c48bdf3b54918121878fbf8b1588d84c1908115d8fe6f9ee6b38",
        "5777dd9cfec41427dae5943fb0b7d699aacf754825c645ebde348130faaacc64",
    ];
    assert_eq!(found, expected);
    // Recorded with version 3, before the core's per-order tracking moved into the engine and
    // unchanged by it: a snapshot written then still restores and matches its recorded hash.
    let expected_version_3 = [
        "00903763bb433a0f887dc9d1753de9525a59311b6798ddcefe6a4aa69b2dc713",
        "efed04b2fb2b393f6cca7dddb46c71d1bdf11ef5f4d2f511cde5e0f049f4bc51",
        "d3e6fd81528c163cfd9fd42959b12bcee539b89bd2db46ecd812182739fbe93d",
        "f6d89d8ad6d35912d198c83c230ddf7ddc30d209f80854eab9532bd11d6f383f",
    ];
    assert_eq!(found_version_3, expected_version_3);
}

#[test]
fn an_escrows_market_seller_and_buyer_are_in_the_state_hash() {
    let mut state = setup(Settlement::Escrow);
    for user in 1..=3 {
        deposit(&mut state, user, BTC, 1 << 40);
    }
    run(&mut state, limit(1, 1, Side::Sell, 100, 10)).unwrap();
    run(&mut state, limit(2, 2, Side::Buy, 100, 10)).unwrap();
    let escrow = *state.escrows().values().next().expect("the trade's escrow");
    assert_eq!((escrow.seller, escrow.buyer), (1, 2));
    // The last escrow is encoded just before the two counters (8 bytes each): market (4),
    // seller (8), buyer (8), hold (8), base and quote amounts (16 each).
    let bytes = state.snapshot();
    let buyer_at = bytes.len() - 16 - 32 - 8 - 8;
    assert_eq!(bytes[buyer_at..buyer_at + 8], 2u64.to_le_bytes());
    let mut other_buyer = bytes.clone();
    other_buyer[buyer_at..buyer_at + 8].copy_from_slice(&3u64.to_le_bytes());
    let other = State::restore(&other_buyer).unwrap();
    assert_eq!(other.escrows().values().next().unwrap().buyer, 3);
    assert_ne!(other.state_hash(), state.state_hash());
    // A snapshot of version 3 recorded the hash without them.
    let mut version_3 = other_buyer.clone();
    version_3[4..8].copy_from_slice(&3u32.to_le_bytes());
    let mut original_3 = bytes.clone();
    original_3[4..8].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(
        State::restore(&version_3)
            .unwrap()
            .state_hash_as_recorded_by(&version_3),
        State::restore(&original_3)
            .unwrap()
            .state_hash_as_recorded_by(&original_3),
    );
}
