//! The command streams of the benchmarks: `agora bench core` and the replay benchmark
//! (`cargo bench -p agora-core --bench replay`) run the same mix.

use book::{MarketId, MarketSpec, PlaceOrder, Price, Qty, Side};

use crate::CoreCommand;

/// Two assets (1 BTC and 2 USD, eight decimals each) and the market BTC-USD between them
/// (market 0: two price and four quantity decimals, fees 10 and 20 basis points).
pub fn market() -> Vec<CoreCommand> {
    vec![
        CoreCommand::CreateAsset {
            asset: 1,
            symbol: "BTC".into(),
            decimals: 8,
        },
        CoreCommand::CreateAsset {
            asset: 2,
            symbol: "USD".into(),
            decimals: 8,
        },
        CoreCommand::CreateMarket {
            spec: MarketSpec::new("BTC-USD", 2, 4, 1, 1),
            base: 1,
            quote: 2,
            maker_fee_bps: 10,
            taker_fee_bps: 20,
        },
    ]
}

/// [`market`], and a large deposit of both assets for users 1 to `users`.
pub fn setup(users: u64) -> Vec<CoreCommand> {
    let mut commands = market();
    for user in 1..=users {
        commands.push(CoreCommand::Deposit {
            user,
            asset: 1,
            amount: 1 << 80,
        });
        commands.push(CoreCommand::Deposit {
            user,
            asset: 2,
            amount: 1 << 90,
        });
    }
    commands
}

/// Command `n` of user `user`'s place/cancel mix: two placements around the mid price, then a
/// cancel of the older one. Buys rest below the mid and sells above it, so nothing trades.
pub fn place_cancel(user: u64, n: u64) -> CoreCommand {
    let id = (user << 40) | n;
    if n % 3 == 2 {
        return CoreCommand::Cancel {
            market: MarketId(0),
            id: id - 2,
            user,
        };
    }
    let spread = ((id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 100) as i64;
    let side = if n.is_multiple_of(2) {
        Side::Buy
    } else {
        Side::Sell
    };
    let price = match side {
        Side::Buy => 1_000_000 - 1 - spread,
        Side::Sell => 1_000_000 + 1 + spread,
    };
    CoreCommand::Place(PlaceOrder::limit(
        MarketId(0),
        id,
        user,
        side,
        Price(price),
        Qty(1 + n % 10),
    ))
}
