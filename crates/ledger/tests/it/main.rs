//! Ledger tests: a trade settled through holds with fees, every refusal leaving the state
//! untouched, atomic batches, and random operation streams with the invariants recomputed from
//! scratch after every step.

use ledger::{
    Balance, BatchRejection, Bucket, HoldKind, Ledger, Op, Owner, Posting, Rejection, limits,
};
use proptest::prelude::*;

const BTC: u32 = 1;
const USD: u32 = 2;

fn ledger_with_assets() -> Ledger {
    let mut ledger = Ledger::new();
    let mut postings = Vec::new();
    for (asset, symbol, decimals) in [(BTC, "BTC", 8), (USD, "USD", 2)] {
        ledger
            .apply(
                &Op::CreateAsset {
                    asset,
                    symbol: symbol.into(),
                    decimals,
                },
                &mut postings,
            )
            .unwrap();
    }
    ledger
}

fn apply(ledger: &mut Ledger, op: Op) -> Result<Vec<Posting>, Rejection> {
    let mut postings = Vec::new();
    ledger.apply(&op, &mut postings).map(|()| postings)
}

fn bal(available: u128, held: u128) -> Balance {
    Balance { available, held }
}

#[test]
fn a_trade_settles_through_holds_with_fees() {
    let mut ledger = ledger_with_assets();
    let (alice, bob) = (Owner::User(1), Owner::User(2));
    apply(
        &mut ledger,
        Op::Deposit {
            user: 1,
            asset: BTC,
            amount: 100_000_000,
        },
    )
    .unwrap();
    apply(
        &mut ledger,
        Op::Deposit {
            user: 2,
            asset: USD,
            amount: 6_000_000,
        },
    )
    .unwrap();
    // Alice sells 0.5 BTC: her base is held. Bob buys at 50,000.00: his quote is held.
    apply(
        &mut ledger,
        Op::Hold {
            hold: 10,
            owner: alice,
            asset: BTC,
            amount: 50_000_000,
            kind: HoldKind::Order,
        },
    )
    .unwrap();
    apply(
        &mut ledger,
        Op::Hold {
            hold: 11,
            owner: bob,
            asset: USD,
            amount: 2_500_000,
            kind: HoldKind::Order,
        },
    )
    .unwrap();
    assert_eq!(ledger.balance(alice, BTC), bal(50_000_000, 50_000_000));
    // A fill of 0.2 BTC at 50,000.00 = 10,000.00 USD, fees 0.1% from what each side receives.
    let batch = [
        Op::Settle {
            hold: 10,
            to: bob,
            amount: 19_980_000,
        },
        Op::Settle {
            hold: 10,
            to: Owner::Fees,
            amount: 20_000,
        },
        Op::Settle {
            hold: 11,
            to: alice,
            amount: 999_000,
        },
        Op::Settle {
            hold: 11,
            to: Owner::Fees,
            amount: 1_000,
        },
    ];
    let mut postings = Vec::new();
    ledger.apply_batch(&batch, &mut postings).unwrap();
    assert_eq!(postings.len(), 8);
    assert_eq!(ledger.balance(alice, BTC), bal(50_000_000, 30_000_000));
    assert_eq!(ledger.balance(bob, BTC), bal(19_980_000, 0));
    assert_eq!(ledger.balance(Owner::Fees, BTC), bal(20_000, 0));
    assert_eq!(ledger.balance(alice, USD), bal(999_000, 0));
    assert_eq!(ledger.balance(bob, USD), bal(3_500_000, 1_500_000));
    assert_eq!(ledger.hold(10).unwrap().amount, 30_000_000);
    // The order is cancelled: the rest of each hold goes back.
    apply(
        &mut ledger,
        Op::Release {
            hold: 10,
            amount: 30_000_000,
        },
    )
    .unwrap();
    apply(
        &mut ledger,
        Op::Release {
            hold: 11,
            amount: 1_500_000,
        },
    )
    .unwrap();
    assert_eq!(ledger.hold(10), None);
    assert_eq!(ledger.balance(alice, BTC), bal(80_000_000, 0));
    assert_eq!(ledger.balance(bob, USD), bal(5_000_000, 0));
    // Bob withdraws 0.1 BTC: held, then paid out.
    apply(
        &mut ledger,
        Op::Hold {
            hold: 12,
            owner: bob,
            asset: BTC,
            amount: 10_000_000,
            kind: HoldKind::Withdrawal,
        },
    )
    .unwrap();
    let postings = apply(
        &mut ledger,
        Op::Withdraw {
            hold: 12,
            amount: 10_000_000,
        },
    )
    .unwrap();
    assert!(
        postings
            .iter()
            .any(|p| p.bucket == Bucket::External && p.delta == 10_000_000)
    );
    assert_eq!(ledger.asset(BTC).unwrap().supply, 90_000_000);
    assert_eq!(ledger.balance(bob, BTC), bal(9_980_000, 0));
    ledger.verify().unwrap();
}

#[test]
fn refusals_name_the_rule_and_change_nothing() {
    let mut ledger = ledger_with_assets();
    let alice = Owner::User(1);
    apply(
        &mut ledger,
        Op::Deposit {
            user: 1,
            asset: USD,
            amount: 1_000,
        },
    )
    .unwrap();
    apply(
        &mut ledger,
        Op::Hold {
            hold: 1,
            owner: alice,
            asset: USD,
            amount: 400,
            kind: HoldKind::Order,
        },
    )
    .unwrap();
    let cases = [
        (
            Op::CreateAsset {
                asset: BTC,
                symbol: "XBT".into(),
                decimals: 8,
            },
            Rejection::DuplicateAsset,
        ),
        (
            Op::CreateAsset {
                asset: 9,
                symbol: "USD".into(),
                decimals: 2,
            },
            Rejection::DuplicateAsset,
        ),
        (
            Op::CreateAsset {
                asset: 9,
                symbol: "usd".into(),
                decimals: 2,
            },
            Rejection::InvalidAsset,
        ),
        (
            Op::CreateAsset {
                asset: 9,
                symbol: "EUR".into(),
                decimals: 19,
            },
            Rejection::InvalidAsset,
        ),
        (
            Op::Deposit {
                user: 1,
                asset: 9,
                amount: 1,
            },
            Rejection::UnknownAsset,
        ),
        (
            Op::Deposit {
                user: 1,
                asset: USD,
                amount: 0,
            },
            Rejection::ZeroAmount,
        ),
        (
            Op::Deposit {
                user: 1,
                asset: USD,
                amount: limits::BALANCE_MAX,
            },
            Rejection::BalanceOverflow,
        ),
        (
            Op::Hold {
                hold: 2,
                owner: alice,
                asset: USD,
                amount: 601,
                kind: HoldKind::Order,
            },
            Rejection::InsufficientFunds,
        ),
        (
            Op::Hold {
                hold: 1,
                owner: alice,
                asset: USD,
                amount: 1,
                kind: HoldKind::Order,
            },
            Rejection::DuplicateHold,
        ),
        // An account that was never credited holds nothing.
        (
            Op::Hold {
                hold: 2,
                owner: Owner::User(99),
                asset: USD,
                amount: 1,
                kind: HoldKind::Order,
            },
            Rejection::InsufficientFunds,
        ),
        (
            Op::Hold {
                hold: 2,
                owner: alice,
                asset: USD,
                amount: 0,
                kind: HoldKind::Order,
            },
            Rejection::ZeroAmount,
        ),
        (Op::Release { hold: 7, amount: 1 }, Rejection::UnknownHold),
        (Op::Extend { hold: 7, amount: 1 }, Rejection::UnknownHold),
        (
            Op::Extend {
                hold: 1,
                amount: 601,
            },
            Rejection::InsufficientFunds,
        ),
        (Op::Extend { hold: 1, amount: 0 }, Rejection::ZeroAmount),
        (
            Op::Release {
                hold: 1,
                amount: 401,
            },
            Rejection::HoldExceeded,
        ),
        (Op::Release { hold: 1, amount: 0 }, Rejection::ZeroAmount),
        (
            Op::Settle {
                hold: 1,
                to: alice,
                amount: 1,
            },
            Rejection::SameAccount,
        ),
        (
            Op::Withdraw { hold: 1, amount: 1 },
            Rejection::WrongHoldKind,
        ),
        (
            Op::Transfer {
                from: alice,
                to: Owner::User(2),
                asset: USD,
                amount: 601,
            },
            Rejection::InsufficientFunds,
        ),
        (
            Op::Transfer {
                from: alice,
                to: alice,
                asset: USD,
                amount: 1,
            },
            Rejection::SameAccount,
        ),
    ];
    for (op, reason) in cases {
        let before = ledger.state_hash();
        let mut postings = vec![];
        assert_eq!(ledger.apply(&op, &mut postings), Err(reason), "{op:?}");
        assert!(postings.is_empty());
        assert_eq!(ledger.state_hash(), before, "{op:?} changed the ledger");
    }
    assert_eq!(Rejection::InsufficientFunds.code(), "INSUFFICIENT_FUNDS");
    ledger.verify().unwrap();
}

#[test]
fn a_batch_applies_whole_or_not_at_all() {
    let mut ledger = ledger_with_assets();
    apply(
        &mut ledger,
        Op::Deposit {
            user: 1,
            asset: USD,
            amount: 1_000,
        },
    )
    .unwrap();
    let before = ledger.state_hash();
    let batch = [
        Op::Transfer {
            from: Owner::User(1),
            to: Owner::User(2),
            asset: USD,
            amount: 600,
        },
        Op::Hold {
            hold: 5,
            owner: Owner::User(2),
            asset: USD,
            amount: 600,
            kind: HoldKind::Escrow,
        },
        Op::Transfer {
            from: Owner::User(1),
            to: Owner::User(3),
            asset: USD,
            amount: 600,
        },
    ];
    let mut postings = vec![Posting {
        owner: Owner::Fees,
        asset: 0,
        bucket: Bucket::External,
        delta: 0,
    }];
    assert_eq!(
        ledger.apply_batch(&batch, &mut postings),
        Err(BatchRejection {
            index: 2,
            reason: Rejection::InsufficientFunds
        })
    );
    assert_eq!(
        postings.len(),
        1,
        "the caller's earlier postings stay, the batch's are gone"
    );
    assert_eq!(ledger.state_hash(), before);
    assert_eq!(ledger.hold(5), None);
    assert_eq!(
        ledger.apply_batch(&[], &mut postings),
        Err(BatchRejection {
            index: 0,
            reason: Rejection::InvalidBatch
        })
    );
    ledger.verify().unwrap();
}

#[derive(Clone, Debug)]
enum RandomOp {
    Deposit(u64, u32, u128),
    Hold(u64, u64, u32, u128, u8),
    Release(u64, u128),
    Extend(u64, u128),
    Settle(u64, u64, u128),
    Withdraw(u64, u128),
    Transfer(u64, u64, u32, u128),
}

fn random_op() -> impl Strategy<Value = RandomOp> {
    let user = 0u64..4;
    let asset = 1u32..4; // asset 3 does not exist
    let amount = prop_oneof![1u128..500, Just(0u128), Just(limits::BALANCE_MAX)];
    let hold = 0u64..8;
    prop_oneof![
        (user.clone(), asset.clone(), amount.clone())
            .prop_map(|(u, a, x)| RandomOp::Deposit(u, a, x)),
        (
            hold.clone(),
            user.clone(),
            asset.clone(),
            amount.clone(),
            0u8..3
        )
            .prop_map(|(h, u, a, x, k)| RandomOp::Hold(h, u, a, x, k)),
        (hold.clone(), amount.clone()).prop_map(|(h, x)| RandomOp::Release(h, x)),
        (hold.clone(), amount.clone()).prop_map(|(h, x)| RandomOp::Extend(h, x)),
        (hold.clone(), user.clone(), amount.clone())
            .prop_map(|(h, u, x)| RandomOp::Settle(h, u, x)),
        (hold.clone(), amount.clone()).prop_map(|(h, x)| RandomOp::Withdraw(h, x)),
        (user.clone(), user, asset, amount).prop_map(|(f, t, a, x)| RandomOp::Transfer(f, t, a, x)),
    ]
}

fn owner(user: u64) -> Owner {
    if user == 0 {
        Owner::Fees
    } else {
        Owner::User(user)
    }
}

fn to_op(op: &RandomOp) -> Op {
    match *op {
        RandomOp::Deposit(user, asset, amount) => Op::Deposit {
            user: user.max(1),
            asset,
            amount,
        },
        RandomOp::Hold(hold, user, asset, amount, kind) => Op::Hold {
            hold,
            owner: owner(user),
            asset,
            amount,
            kind: [HoldKind::Order, HoldKind::Escrow, HoldKind::Withdrawal][kind as usize],
        },
        RandomOp::Release(hold, amount) => Op::Release { hold, amount },
        RandomOp::Extend(hold, amount) => Op::Extend { hold, amount },
        RandomOp::Settle(hold, user, amount) => Op::Settle {
            hold,
            to: owner(user),
            amount,
        },
        RandomOp::Withdraw(hold, amount) => Op::Withdraw { hold, amount },
        RandomOp::Transfer(from, to, asset, amount) => Op::Transfer {
            from: owner(from),
            to: owner(to),
            asset,
            amount,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("AGORA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_after_every_operation(ops in prop::collection::vec(random_op(), 1..200), batch_every in 2usize..6) {
        let mut ledger = ledger_with_assets();
        let mut deposited = [0u128; 4];
        let mut withdrawn = [0u128; 4];
        let ops: Vec<Op> = ops.iter().map(to_op).collect();
        for (step, chunk) in ops.chunks(batch_every).enumerate() {
            let before = ledger.state_hash();
            let mut postings = Vec::new();
            // Alternate single operations and atomic batches.
            let result = if step % 2 == 0 {
                chunk.iter().try_for_each(|op| {
                    let snapshot = ledger.state_hash();
                    let start = postings.len();
                    let result = ledger.apply(op, &mut postings);
                    if result.is_err() {
                        assert_eq!(ledger.state_hash(), snapshot, "a refusal changed the ledger");
                        assert_eq!(postings.len(), start);
                    }
                    Ok::<(), ()>(())
                })
            } else {
                match ledger.apply_batch(chunk, &mut postings) {
                    Ok(()) => Ok(()),
                    Err(_) => {
                        prop_assert_eq!(ledger.state_hash(), before, "a refused batch changed the ledger");
                        prop_assert!(postings.is_empty());
                        Err(())
                    }
                }
            };
            let _ = result;
            for posting in &postings {
                if posting.bucket == Bucket::External {
                    let slot = posting.asset as usize;
                    if posting.delta < 0 { deposited[slot] += (-posting.delta) as u128 } else { withdrawn[slot] += posting.delta as u128 }
                }
            }
            // Every change balances per asset.
            let mut sums = std::collections::BTreeMap::new();
            for posting in &postings {
                *sums.entry(posting.asset).or_insert(0i128) += posting.delta;
            }
            prop_assert!(sums.values().all(|&s| s == 0));
            // Recomputed from scratch: totals, holds and held balances agree.
            prop_assert_eq!(ledger.verify(), Ok(()));
            for asset in [BTC, USD] {
                let supply = ledger.asset(asset).unwrap().supply;
                prop_assert_eq!(supply, deposited[asset as usize] - withdrawn[asset as usize]);
            }
        }
    }
}

#[test]
fn snapshots_round_trip_and_damage_is_an_error() {
    let mut ledger = ledger_with_assets();
    apply(
        &mut ledger,
        Op::Deposit {
            user: 1,
            asset: BTC,
            amount: 1_000,
        },
    )
    .unwrap();
    apply(
        &mut ledger,
        Op::Deposit {
            user: 2,
            asset: USD,
            amount: 5_000,
        },
    )
    .unwrap();
    apply(
        &mut ledger,
        Op::Hold {
            hold: 3,
            owner: Owner::User(1),
            asset: BTC,
            amount: 400,
            kind: HoldKind::Escrow,
        },
    )
    .unwrap();
    apply(
        &mut ledger,
        Op::Settle {
            hold: 3,
            to: Owner::Fees,
            amount: 100,
        },
    )
    .unwrap();
    let bytes = ledger.snapshot();
    let restored = Ledger::restore(&bytes).unwrap();
    assert_eq!(restored.state_hash(), ledger.state_hash());
    assert_eq!(restored.snapshot(), bytes);
    for cut in 0..bytes.len() {
        assert!(Ledger::restore(&bytes[..cut]).is_err());
    }
    for position in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[position] ^= 0x01;
        // Either refused, or (a changed symbol letter, say) still consistent: never a panic.
        if let Ok(other) = Ledger::restore(&damaged) {
            other.verify().unwrap();
        }
    }
}
