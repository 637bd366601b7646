//! The journal codec: every command survives a round trip; damaged bytes are errors.

use agora_core::CoreCommand;
use agora_core::codec::{decode_all, encode};
use book::{
    MarketId, MarketSpec, ModifyOrder, OrderType, PaymentMethods, PlaceOrder, Price, Qty,
    SelfTradePrevention, Settlement, Side, TimeInForce,
};
use proptest::prelude::*;

fn place() -> impl Strategy<Value = CoreCommand> {
    (
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            0usize..6,
        ),
        (
            any::<Option<i64>>(),
            any::<Option<i64>>(),
            any::<u64>(),
            0usize..5,
            any::<bool>(),
        ),
        (
            any::<Option<i64>>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            prop::option::of(0usize..4),
        ),
    )
        .prop_map(
            |(
                (market, id, user, sell, kind),
                (price, stop, qty, tif, post),
                (expire, methods, min_rep, rep),
                (min_fill, max_fill, stp),
            )| {
                CoreCommand::Place(PlaceOrder {
                    market: MarketId(market),
                    id,
                    user,
                    side: if sell { Side::Sell } else { Side::Buy },
                    order_type: [
                        OrderType::Limit,
                        OrderType::Market,
                        OrderType::StopMarket,
                        OrderType::StopLimit,
                        OrderType::TakeProfitMarket,
                        OrderType::TakeProfitLimit,
                    ][kind],
                    price: price.map(Price),
                    stop_price: stop.map(Price),
                    qty: Qty(qty),
                    tif: [
                        TimeInForce::Gtc,
                        TimeInForce::Ioc,
                        TimeInForce::Fok,
                        TimeInForce::Day,
                        TimeInForce::Gtd,
                    ][tif],
                    post_only: post,
                    expire_at: expire,
                    payment_methods: PaymentMethods(methods),
                    min_reputation: min_rep,
                    reputation: rep,
                    min_fill: min_fill.map(Qty),
                    max_fill: max_fill.map(Qty),
                    stp: stp.map(|s| {
                        [
                            SelfTradePrevention::CancelNewest,
                            SelfTradePrevention::CancelOldest,
                            SelfTradePrevention::CancelBoth,
                            SelfTradePrevention::Decrement,
                        ][s]
                    }),
                })
            },
        )
}

fn command() -> impl Strategy<Value = CoreCommand> {
    prop_oneof![
        (any::<u32>(), "[A-Z]{1,8}", any::<u32>()).prop_map(|(asset, symbol, decimals)| {
            CoreCommand::CreateAsset {
                asset,
                symbol,
                decimals,
            }
        }),
        (
            "[A-Z]{1,5}-[A-Z]{1,5}",
            (0u32..13, 0u32..13, any::<i64>(), any::<u64>()),
            (
                any::<Option<u64>>(),
                any::<Option<u64>>(),
                any::<Option<u128>>(),
                any::<Option<u32>>(),
                any::<bool>()
            ),
            (
                prop::collection::vec(any::<u32>(), 0..4),
                prop::collection::vec("[a-z]{1,6}", 0..4)
            ),
            (
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<i64>()
            ),
        )
            .prop_map(
                |(
                    symbol,
                    (pd, qd, tick, lot),
                    (min, max, notional, band, escrow),
                    (tiers, methods),
                    (base, quote, maker, taker, cutoff),
                )| {
                    let mut spec = MarketSpec::new(symbol, pd, qd, tick, lot);
                    spec.min_qty = min.map(Qty);
                    spec.max_qty = max.map(Qty);
                    spec.min_notional = notional;
                    spec.price_band_bps = band;
                    spec.settlement = if escrow {
                        Settlement::Escrow
                    } else {
                        Settlement::Instant
                    };
                    spec.default_stp = SelfTradePrevention::Decrement;
                    spec.day_cutoff_ms = cutoff;
                    spec.reputation_tiers = tiers;
                    spec.payment_methods = methods;
                    CoreCommand::CreateMarket {
                        spec,
                        base,
                        quote,
                        maker_fee_bps: maker,
                        taker_fee_bps: taker,
                    }
                }
            ),
        (any::<u64>(), any::<u32>(), any::<u128>()).prop_map(|(user, asset, amount)| {
            CoreCommand::Deposit {
                user,
                asset,
                amount,
            }
        }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u128>(),
            // Empty (journals before destinations were kept) and up to the longest.
            "[ -~]{0,256}"
        )
            .prop_map(|(id, user, asset, amount, destination)| {
                CoreCommand::RequestWithdrawal {
                    id,
                    user,
                    asset,
                    amount,
                    destination,
                }
            }),
        any::<u64>().prop_map(|id| CoreCommand::CompleteWithdrawal { id }),
        any::<u64>().prop_map(|id| CoreCommand::CancelWithdrawal { id }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(user, reputation)| CoreCommand::SetReputation { user, reputation }),
        place(),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(m, id, user)| CoreCommand::Cancel {
            market: MarketId(m),
            id,
            user
        }),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<Option<i64>>(),
            any::<Option<u64>>()
        )
            .prop_map(|(m, id, user, price, qty)| {
                CoreCommand::Modify(ModifyOrder {
                    market: MarketId(m),
                    id,
                    user,
                    price: price.map(Price),
                    qty: qty.map(Qty),
                })
            }),
        (any::<Option<u32>>(), any::<Option<u64>>()).prop_map(|(m, user)| CoreCommand::CancelAll {
            market: m.map(MarketId),
            user
        }),
        any::<i64>().prop_map(|now| CoreCommand::AdvanceTime { now }),
        any::<u32>().prop_map(|m| CoreCommand::HaltMarket {
            market: MarketId(m)
        }),
        any::<u32>().prop_map(|m| CoreCommand::ResumeMarket {
            market: MarketId(m)
        }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(m, maker, taker)| {
            CoreCommand::SetMarketFees {
                market: MarketId(m),
                maker_fee_bps: maker,
                taker_fee_bps: taker,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn commands_survive_a_round_trip(commands in prop::collection::vec(command(), 0..20)) {
        let mut bytes = Vec::new();
        for command in &commands {
            encode(command, &mut bytes);
        }
        prop_assert_eq!(decode_all(&bytes).unwrap(), commands);
        // Any strict prefix that cuts a command is an error, never a panic or a wrong command.
        if !bytes.is_empty() {
            let cut = bytes.len() - 1;
            prop_assert!(decode_all(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_all(&bytes);
    }
}
