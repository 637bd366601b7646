//! Snapshots of the whole core: the engine's and the ledger's own snapshots plus the core's
//! tables, restored with every field checked and every invariant recomputed.

use book::{Engine, MarketId};
use ledger::Ledger;

use crate::codec::{DecodeError, Reader, Writer};
use crate::{EscrowParties, EscrowTrade, MarketConfig, State, Tracked};

const MAGIC: &[u8; 4] = b"AGCR";
/// The bytes are those of version 3; the hash recorded with a snapshot covers each escrow's
/// market, seller and buyer since this version.
const VERSION: u32 = 4;
/// The version whose recorded state hash left out escrows' markets, sellers and buyers.
const VERSION_ESCROW_PARTIES_UNHASHED: u32 = 3;
/// The version before markets could be halted: read as if none were.
const VERSION_UNHALTED: u32 = 2;

/// Why a core snapshot could not be restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotError(pub String);

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid core snapshot: {}", self.0)
    }
}

impl std::error::Error for SnapshotError {}

impl From<DecodeError> for SnapshotError {
    fn from(error: DecodeError) -> Self {
        SnapshotError(error.to_string())
    }
}

impl State {
    /// The whole state as bytes, canonical (equal states encode equally).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        let mut w = Writer(&mut out);
        w.u32(VERSION);
        for part in [self.engine.snapshot(), self.ledger.snapshot()] {
            w.u64(part.len() as u64);
            w.0.extend_from_slice(&part);
        }
        w.u32(self.markets.len() as u32);
        for config in &self.markets {
            w.u32(config.base);
            w.u32(config.quote);
            w.u32(config.maker_fee_bps);
            w.u32(config.taker_fee_bps);
            w.u8(u8::from(config.halted));
        }
        let mut reputations: Vec<_> = self.reputations.iter().collect();
        reputations.sort_unstable();
        w.u64(reputations.len() as u64);
        for (user, reputation) in reputations {
            w.u64(*user);
            w.u32(*reputation);
        }
        let orders = self.tracked_orders();
        w.u64(orders.len() as u64);
        for ((market, id), tracked) in orders {
            w.u32(market.0);
            w.u64(id);
            w.u64(tracked.user);
            w.opt_u64(tracked.hold);
        }
        let mut withdrawals: Vec<_> = self.withdrawals.iter().collect();
        withdrawals.sort_unstable();
        w.u64(withdrawals.len() as u64);
        for (id, hold) in withdrawals {
            w.u64(*id);
            w.u64(*hold);
        }
        w.u64(self.escrows.len() as u64);
        for (trade, escrow) in &self.escrows {
            w.u64(*trade);
            w.u32(escrow.market.0);
            w.u64(escrow.seller);
            w.u64(escrow.buyer);
            w.u64(escrow.hold);
            w.u128(escrow.base_amount);
            w.u128(escrow.quote_amount);
        }
        w.u64(self.next_hold);
        w.u64(self.next_trade);
        out
    }

    /// The hash of this state as the snapshot `bytes` it was restored from recorded it: the
    /// current [`State::state_hash`], or for a snapshot older than version 4, the hash without
    /// escrows' markets, sellers and buyers. What recovery checks a snapshot's recorded hash
    /// against.
    pub fn state_hash_as_recorded_by(&self, bytes: &[u8]) -> [u8; 32] {
        let version = bytes
            .get(MAGIC.len()..MAGIC.len() + 4)
            .and_then(|version| version.try_into().ok())
            .map_or(VERSION, u32::from_le_bytes);
        if version <= VERSION_ESCROW_PARTIES_UNHASHED {
            self.state_hash_with(EscrowParties::Unhashed)
        } else {
            self.state_hash()
        }
    }

    /// Rebuilds a core from [`State::snapshot`] bytes; refuses anything inconsistent.
    pub fn restore(bytes: &[u8]) -> Result<State, SnapshotError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(SnapshotError("not a core snapshot".into()));
        }
        let version = r.u32()?;
        if !(VERSION_UNHALTED..=VERSION).contains(&version) {
            return Err(SnapshotError(format!(
                "core snapshot version {version}; this build reads {VERSION_UNHALTED} to {VERSION}"
            )));
        }
        let engine_len = r.u64()? as usize;
        let engine =
            Engine::restore(r.take(engine_len)?).map_err(|e| SnapshotError(e.to_string()))?;
        let ledger_len = r.u64()? as usize;
        let ledger =
            Ledger::restore(r.take(ledger_len)?).map_err(|e| SnapshotError(e.to_string()))?;
        let mut state = State {
            engine,
            ledger,
            ..State::new()
        };
        let markets = r.u32()? as usize;
        if markets != state.engine.markets().count() {
            return Err(SnapshotError(
                "market count differs from the engine's".into(),
            ));
        }
        for index in 0..markets {
            let (base, quote, maker, taker) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            let spec = state
                .engine
                .market_spec(MarketId(index as u32))
                .expect("counted above")
                .clone();
            let mut config = MarketConfig::new(&state.ledger, &spec, base, quote, maker, taker)
                .map_err(|reason| SnapshotError(format!("market {index}: {}", reason.code())))?;
            if version >= VERSION_ESCROW_PARTIES_UNHASHED {
                config.halted = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(SnapshotError(format!("market {index}: bad halted flag"))),
                };
            }
            state.markets.push(config);
        }
        let left = |r: &Reader<'_>| (r.bytes.len() - r.at) as u64;
        let count = |r: &mut Reader<'_>| -> Result<u64, SnapshotError> {
            let count = r.u64()?;
            if count > left(r) {
                return Err(SnapshotError("count larger than the snapshot".into()));
            }
            Ok(count)
        };
        for _ in 0..count(&mut r)? {
            state.reputations.insert(r.u64()?, r.u32()?);
        }
        // The tracked orders, sorted, each a live order of the engine, which keeps its hold's
        // id as its tag; `verify` below finds any live order left out.
        let mut previous = None;
        for _ in 0..count(&mut r)? {
            let (market, id) = (MarketId(r.u32()?), r.u64()?);
            let tracked = Tracked {
                user: r.u64()?,
                hold: r.opt_u64()?,
            };
            if previous >= Some((market, id)) {
                return Err(SnapshotError("tracked orders out of order or twice".into()));
            }
            previous = Some((market, id));
            if tracked.hold == Some(0)
                || state.engine.order(market, id).map(|o| o.user) != Some(tracked.user)
                || !state.engine.set_tag(market, id, tracked.hold.unwrap_or(0))
            {
                return Err(SnapshotError(format!(
                    "tracked order {id} of market {} is not the engine's",
                    market.0
                )));
            }
            // The per-user counts are derived from the tracked orders.
            *state.open_orders.entry(tracked.user).or_insert(0) += 1;
        }
        for _ in 0..count(&mut r)? {
            state.withdrawals.insert(r.u64()?, r.u64()?);
        }
        for _ in 0..count(&mut r)? {
            let trade = r.u64()?;
            let escrow = EscrowTrade {
                market: MarketId(r.u32()?),
                seller: r.u64()?,
                buyer: r.u64()?,
                hold: r.u64()?,
                base_amount: r.u128()?,
                quote_amount: r.u128()?,
            };
            state.escrows.insert(trade, escrow);
        }
        state.next_hold = r.u64()?;
        state.next_trade = r.u64()?;
        if r.at != bytes.len() {
            return Err(SnapshotError("trailing bytes".into()));
        }
        state.verify().map_err(SnapshotError)?;
        Ok(state)
    }
}
