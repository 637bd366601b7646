//! Agora's core state machine: the matching engine and the ledger driven together by one
//! stream of commands, so that every order is backed by held funds and every trade settles.
//!
//! [`State::apply`] is deterministic and pure like its parts: the same commands give the same
//! events, postings and [`State::state_hash`]. A command is checked completely (funds, and the
//! engine's rules, which the engine checks before it changes anything) before anything
//! changes, so a [`CoreRejection`] changes nothing; once checks pass, the ledger operations
//! that follow cannot fail, and if one did, that is a bug and the core panics rather than
//! continue on a state it cannot trust.
//!
//! Funds: placing an order holds what it may spend. A sell holds the base quantity. A buy on
//! an `instant` market holds the quote at its limit price (a market buy holds its protection
//! price times its quantity, so it needs one). A buy on an `escrow` market holds nothing: the
//! quote is paid off-platform. Holds shrink as fills happen and are released when the order
//! ends. Trades on `instant` markets settle at once: each side receives its asset minus its fee
//! (maker or taker, in basis points, rounded down), and fees go to the fee account. On
//! `escrow` markets the seller's filled base moves to an escrow hold per trade; releasing it is
//! the settlement flow's work.

use std::borrow::Cow;
use std::collections::BTreeMap;

use book::{
    Engine, Event, MarketId, MarketSpec, ModifyOrder, OrderId, OrderType, OrderView, PlaceOrder,
    RejectReason, Settlement, Side, Timestamp, UserId,
};
use ledger::{AssetId, HoldId, HoldKind, Ledger, Op, Owner, Posting, Rejection};
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};

pub use ledger::Amount;

/// Metric names (the `metrics` facade: whatever recorder the process installs renders them).
pub mod names {
    /// Counter: commands acknowledged (journaled).
    pub const ACCEPTED: &str = "agora_core_commands_accepted_total";
    /// Counter: commands refused before the journal, by `code`.
    pub const REJECTED: &str = "agora_core_commands_rejected_total";
    /// Histogram: commands per journal batch (group commit).
    pub const BATCH_COMMANDS: &str = "agora_core_batch_commands";
    /// Histogram: seconds to append one batch durably, from the write task's call to the
    /// store's commit.
    pub const APPEND_SECONDS: &str = "agora_core_append_seconds";
    /// Gauge: the last durable command's sequence number.
    pub const JOURNAL_SEQ: &str = "agora_core_journal_seq";
    /// Gauge: commands waiting in the sequencer's queue when the last batch was closed.
    pub const QUEUED: &str = "agora_core_queued_commands";
    /// Histogram: seconds to write one snapshot and prune the old ones.
    pub const SNAPSHOT_SECONDS: &str = "agora_core_snapshot_write_seconds";
    /// Gauge: 1 once the sequencer has stopped after a failed write, else 0.
    pub const STOPPED: &str = "agora_core_stopped";
    /// Gauge: the last command written to the read models by the projector.
    pub const PROJECTED_SEQ: &str = "agora_core_projected_seq";
    /// Histogram: seconds to write one journal batch's rows to the read models.
    pub const PROJECTION_WRITE_SECONDS: &str = "agora_core_projection_write_seconds";
}

pub mod codec;
pub mod projector;
pub mod sequencer;
mod snapshot;
pub mod workload;

pub use snapshot::SnapshotError;

/// Named bounds.
pub mod limits {
    /// Largest maker or taker fee, in basis points (10%).
    pub const FEE_BPS_MAX: u32 = 1_000;
    /// Pending withdrawals in the whole system.
    pub const WITHDRAWALS_PENDING_MAX: usize = 1_000_000;
    /// Longest withdrawal destination (an account or address), in bytes; the journal codec
    /// reads no longer string.
    pub const DESTINATION_BYTES_MAX: usize = 256;
    /// Live orders (resting or armed) of one user across all markets.
    pub const OPEN_ORDERS_PER_USER_MAX: u32 = 50_000;
    /// Room the core keeps between commands for its scratch lists of touched and departed
    /// orders; a larger list, left by one big cancel-all or sweep, is freed after its command.
    pub const SCRATCH_KEPT_MAX: usize = 4_096;
    /// Live orders from which [`crate::State::state_hash`] computes the engine's digest on a
    /// second thread, beside the ledger's; below it a thread costs more than it saves.
    pub const PARALLEL_HASH_ORDERS_MIN: usize = 50_000;
}

/// Everything the core can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreCommand {
    /// Register an asset in the ledger.
    CreateAsset {
        /// Id.
        asset: AssetId,
        /// Symbol.
        symbol: String,
        /// Decimal places of its minor unit: at least the quantity (base) or price plus
        /// quantity (quote) decimals of every market that uses it.
        decimals: u32,
    },
    /// Create a market trading `base` against `quote`.
    CreateMarket {
        /// The engine's market definition.
        spec: MarketSpec,
        /// Base asset.
        base: AssetId,
        /// Quote asset.
        quote: AssetId,
        /// Fee of the resting side, in basis points of what it receives.
        maker_fee_bps: u32,
        /// Fee of the incoming side.
        taker_fee_bps: u32,
    },
    /// Funds arrive for a user.
    Deposit {
        /// User.
        user: UserId,
        /// Asset.
        asset: AssetId,
        /// Amount in minor units.
        amount: Amount,
    },
    /// Hold funds for a withdrawal.
    RequestWithdrawal {
        /// Withdrawal id, unique among pending withdrawals.
        id: u64,
        /// User.
        user: UserId,
        /// Asset.
        asset: AssetId,
        /// Amount.
        amount: Amount,
        /// Where the funds go (an account or address), as the user gave it; at most
        /// [`limits::DESTINATION_BYTES_MAX`] bytes. Empty in journals written before it was
        /// recorded.
        destination: String,
    },
    /// The withdrawal was paid out: the held funds leave the ledger.
    CompleteWithdrawal {
        /// Withdrawal id.
        id: u64,
    },
    /// The withdrawal was abandoned: the held funds return.
    CancelWithdrawal {
        /// Withdrawal id.
        id: u64,
    },
    /// Set a user's reputation, used for orders placed from now on.
    SetReputation {
        /// User.
        user: UserId,
        /// Reputation.
        reputation: u32,
    },
    /// Place an order (its `reputation` is taken from the core, not from the caller).
    Place(PlaceOrder),
    /// Cancel an order.
    Cancel {
        /// Market.
        market: MarketId,
        /// Order.
        id: OrderId,
        /// Owner.
        user: UserId,
    },
    /// Modify an order.
    Modify(ModifyOrder),
    /// Cancel many orders.
    CancelAll {
        /// One market, or all.
        market: Option<MarketId>,
        /// One user, or all.
        user: Option<UserId>,
    },
    /// Move time forward.
    AdvanceTime {
        /// New time, ms since the epoch.
        now: Timestamp,
    },
    /// Stop trading on a market: placements and modifications are refused with
    /// [`CoreRejection::MarketHalted`] until it resumes; cancels still work, and resting orders
    /// stay (and still expire). Halting a halted market changes nothing.
    HaltMarket {
        /// Market.
        market: MarketId,
    },
    /// Let a halted market trade again. Resuming an active market changes nothing.
    ResumeMarket {
        /// Market.
        market: MarketId,
    },
    /// Change a market's fees, for trades from the next command on.
    SetMarketFees {
        /// Market.
        market: MarketId,
        /// Fee of the resting side, in basis points.
        maker_fee_bps: u32,
        /// Fee of the incoming side.
        taker_fee_bps: u32,
    },
}

/// Why the core refused a command. A refusal changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreRejection {
    /// The matching engine's rule.
    Book(RejectReason),
    /// The ledger's rule (insufficient funds, unknown asset, …).
    Ledger(Rejection),
    /// A market's assets are unknown, the same, or too coarse for its tick and lot.
    InvalidMarketAssets,
    /// A fee above [`limits::FEE_BPS_MAX`].
    InvalidFee,
    /// A buy on an instant market without a price to bound what it spends.
    ProtectionRequired,
    /// An amount does not fit the ledger's range.
    AmountOverflow,
    /// No pending withdrawal has this id.
    UnknownWithdrawal,
    /// A pending withdrawal already has this id.
    DuplicateWithdrawal,
    /// Too many pending withdrawals.
    TooManyWithdrawals,
    /// The user holds [`limits::OPEN_ORDERS_PER_USER_MAX`] live orders.
    TooManyOpenOrders,
    /// The market is halted: it takes no placements or modifications.
    MarketHalted,
    /// A withdrawal destination over [`limits::DESTINATION_BYTES_MAX`] bytes.
    InvalidDestination,
}

impl CoreRejection {
    /// Stable upper-case code.
    pub fn code(self) -> &'static str {
        match self {
            CoreRejection::Book(reason) => reason.code(),
            CoreRejection::Ledger(reason) => reason.code(),
            CoreRejection::InvalidMarketAssets => "INVALID_MARKET_ASSETS",
            CoreRejection::InvalidFee => "INVALID_FEE",
            CoreRejection::ProtectionRequired => "PROTECTION_REQUIRED",
            CoreRejection::AmountOverflow => "AMOUNT_OVERFLOW",
            CoreRejection::UnknownWithdrawal => "UNKNOWN_WITHDRAWAL",
            CoreRejection::DuplicateWithdrawal => "DUPLICATE_WITHDRAWAL",
            CoreRejection::TooManyWithdrawals => "TOO_MANY_WITHDRAWALS",
            CoreRejection::TooManyOpenOrders => "TOO_MANY_OPEN_ORDERS",
            CoreRejection::MarketHalted => "MARKET_HALTED",
            CoreRejection::InvalidDestination => "INVALID_DESTINATION",
        }
    }
}

/// A market's link to the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarketConfig {
    /// Base asset.
    pub base: AssetId,
    /// Quote asset.
    pub quote: AssetId,
    /// Maker fee, basis points.
    pub maker_fee_bps: u32,
    /// Taker fee, basis points.
    pub taker_fee_bps: u32,
    /// Minor units of the base asset per quantity unit.
    pub base_per_qty: u128,
    /// Minor units of the quote asset per (price unit × quantity unit).
    pub quote_per_notional: u128,
    /// How trades settle.
    pub settlement: Settlement,
    /// Whether trading is halted ([`CoreCommand::HaltMarket`]).
    pub halted: bool,
}

impl MarketConfig {
    /// The link of a market to its assets, checked: the fees within bounds, both assets known
    /// and different, and fine enough that every quantity and every price times quantity is a
    /// whole number of minor units.
    pub fn new(
        ledger: &Ledger,
        spec: &MarketSpec,
        base: AssetId,
        quote: AssetId,
        maker_fee_bps: u32,
        taker_fee_bps: u32,
    ) -> Result<MarketConfig, CoreRejection> {
        if maker_fee_bps > limits::FEE_BPS_MAX || taker_fee_bps > limits::FEE_BPS_MAX {
            return Err(CoreRejection::InvalidFee);
        }
        let (Some(base_asset), Some(quote_asset)) = (ledger.asset(base), ledger.asset(quote))
        else {
            return Err(CoreRejection::InvalidMarketAssets);
        };
        // Decimals come from a command: summed without overflow, or refused.
        let Some(notional_decimals) = spec.price_decimals.checked_add(spec.qty_decimals) else {
            return Err(CoreRejection::InvalidMarketAssets);
        };
        if base == quote
            || base_asset.decimals < spec.qty_decimals
            || quote_asset.decimals < notional_decimals
        {
            return Err(CoreRejection::InvalidMarketAssets);
        }
        let (Some(base_per_qty), Some(quote_per_notional)) = (
            10u128.checked_pow(base_asset.decimals - spec.qty_decimals),
            10u128.checked_pow(quote_asset.decimals - notional_decimals),
        ) else {
            return Err(CoreRejection::InvalidMarketAssets);
        };
        Ok(MarketConfig {
            base,
            quote,
            maker_fee_bps,
            taker_fee_bps,
            base_per_qty,
            quote_per_notional,
            settlement: spec.settlement,
            halted: false,
        })
    }
}

/// An escrow trade waiting for the off-platform payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscrowTrade {
    /// Market.
    pub market: MarketId,
    /// Seller, whose base is held.
    pub seller: UserId,
    /// Buyer, who pays off-platform.
    pub buyer: UserId,
    /// The hold on the seller's base.
    pub hold: HoldId,
    /// Base amount held.
    pub base_amount: Amount,
    /// Quote amount the buyer owes off-platform.
    pub quote_amount: Amount,
}

/// What a command did: engine events and ledger postings, in order.
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// Matching-engine events.
    pub events: Vec<Event>,
    /// Ledger postings.
    pub postings: Vec<Posting>,
}

impl Output {
    /// Empties both lists, keeping their capacity.
    pub fn clear(&mut self) {
        self.events.clear();
        self.postings.clear();
    }
}

/// What the core tracks of each live order: its owner, and the hold backing it (none for a
/// buy on an escrow market, which pays off-platform). The engine keeps both with the order:
/// the owner as such, the hold's id as the order's tag (0 for none; hold ids start at 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Tracked {
    pub(crate) user: UserId,
    pub(crate) hold: Option<HoldId>,
}

impl Tracked {
    fn from_tag(user: UserId, tag: u64) -> Tracked {
        Tracked {
            user,
            hold: (tag != 0).then_some(tag),
        }
    }
}

/// The core state.
#[derive(Clone, Debug, Default)]
pub struct State {
    engine: Engine,
    ledger: Ledger,
    markets: Vec<MarketConfig>,
    reputations: FxHashMap<UserId, u32>,
    /// Live orders per user (the engine's, counted by owner), kept for the per-user limit.
    open_orders: FxHashMap<UserId, u32>,
    withdrawals: FxHashMap<u64, HoldId>,
    escrows: BTreeMap<u64, EscrowTrade>,
    next_hold: HoldId,
    next_trade: u64,
    /// Scratch list of the orders a command touched (empty between commands).
    touched: Vec<(MarketId, OrderId)>,
    /// Scratch list of the orders that left the engine during a command, and the order it
    /// placed, sorted for lookup (empty between commands).
    gone: Vec<(MarketId, OrderId, Tracked)>,
}

impl State {
    /// An empty core.
    pub fn new() -> State {
        State {
            next_hold: 1,
            next_trade: 1,
            ..State::default()
        }
    }

    /// The matching engine, for queries.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The ledger, for queries.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// A market's link to the ledger.
    pub fn market(&self, market: MarketId) -> Option<&MarketConfig> {
        self.markets.get(market.0 as usize)
    }

    /// The hold backing a live order.
    pub fn order_hold(&self, market: MarketId, id: OrderId) -> Option<HoldId> {
        self.engine
            .order(market, id)
            .and_then(|order| Tracked::from_tag(order.user, order.tag).hold)
    }

    /// What the core tracks of an order the command being applied touched: the engine's while
    /// the order is live, else what it had when it left during the command (`gone`).
    fn tracked(&self, market: MarketId, id: OrderId) -> Option<Tracked> {
        match self.engine.order(market, id) {
            Some(order) => Some(Tracked::from_tag(order.user, order.tag)),
            None => self.gone_tracked(market, id),
        }
    }

    fn gone_tracked(&self, market: MarketId, id: OrderId) -> Option<Tracked> {
        self.gone
            .binary_search_by_key(&(market, id), |&(m, i, _)| (m, i))
            .ok()
            .map(|at| self.gone[at].2)
    }

    /// Every live order with what the core tracks of it, sorted: for the state hash and the
    /// snapshot.
    pub(crate) fn tracked_orders(&self) -> Vec<((MarketId, OrderId), Tracked)> {
        let mut orders = Vec::new();
        for market in self.engine.markets() {
            orders.extend(
                self.engine
                    .tags(market)
                    .map(|(id, user, tag)| ((market, id), Tracked::from_tag(user, tag))),
            );
        }
        orders.sort_unstable();
        orders
    }

    /// A user's live orders across all markets.
    pub fn open_orders(&self, user: UserId) -> u32 {
        self.open_orders.get(&user).copied().unwrap_or(0)
    }

    /// Pending escrow trades by trade number.
    pub fn escrows(&self) -> &BTreeMap<u64, EscrowTrade> {
        &self.escrows
    }

    /// A user's reputation (0 until set).
    pub fn reputation(&self, user: UserId) -> u32 {
        self.reputations.get(&user).copied().unwrap_or(0)
    }

    /// Applies one command. On `Err` nothing changed and `out` is as it was.
    pub fn apply(&mut self, command: &CoreCommand, out: &mut Output) -> Result<(), CoreRejection> {
        match command {
            CoreCommand::CreateAsset {
                asset,
                symbol,
                decimals,
            } => self.ledger_op(
                &Op::CreateAsset {
                    asset: *asset,
                    symbol: symbol.clone(),
                    decimals: *decimals,
                },
                out,
            ),
            CoreCommand::CreateMarket {
                spec,
                base,
                quote,
                maker_fee_bps,
                taker_fee_bps,
            } => self.create_market(spec, *base, *quote, *maker_fee_bps, *taker_fee_bps, out),
            CoreCommand::Deposit {
                user,
                asset,
                amount,
            } => self.ledger_op(
                &Op::Deposit {
                    user: *user,
                    asset: *asset,
                    amount: *amount,
                },
                out,
            ),
            CoreCommand::RequestWithdrawal {
                id,
                user,
                asset,
                amount,
                destination,
            } => {
                if destination.len() > limits::DESTINATION_BYTES_MAX {
                    return Err(CoreRejection::InvalidDestination);
                }
                if self.withdrawals.contains_key(id) {
                    return Err(CoreRejection::DuplicateWithdrawal);
                }
                if self.withdrawals.len() >= limits::WITHDRAWALS_PENDING_MAX {
                    return Err(CoreRejection::TooManyWithdrawals);
                }
                let hold = self.next_hold;
                self.ledger_op(
                    &Op::Hold {
                        hold,
                        owner: Owner::User(*user),
                        asset: *asset,
                        amount: *amount,
                        kind: HoldKind::Withdrawal,
                    },
                    out,
                )?;
                self.next_hold += 1;
                self.withdrawals.insert(*id, hold);
                Ok(())
            }
            CoreCommand::CompleteWithdrawal { id } | CoreCommand::CancelWithdrawal { id } => {
                let hold = *self
                    .withdrawals
                    .get(id)
                    .ok_or(CoreRejection::UnknownWithdrawal)?;
                let amount = self
                    .ledger
                    .hold(hold)
                    .expect("a pending withdrawal has its hold")
                    .amount;
                let op = match command {
                    CoreCommand::CompleteWithdrawal { .. } => Op::Withdraw { hold, amount },
                    _ => Op::Release { hold, amount },
                };
                self.must(&op, out);
                self.withdrawals.remove(id);
                Ok(())
            }
            CoreCommand::SetReputation { user, reputation } => {
                self.reputations.insert(*user, *reputation);
                Ok(())
            }
            CoreCommand::Place(place) => self.place(place, out),
            CoreCommand::Modify(modify) => self.modify(modify, out),
            CoreCommand::Cancel { market, id, user } => {
                let start = out.events.len();
                self.engine.cancel(*market, *id, *user, &mut out.events);
                self.after_engine(start, out)
            }
            CoreCommand::CancelAll { market, user } => {
                let start = out.events.len();
                self.engine.cancel_all(*market, *user, &mut out.events);
                self.after_engine(start, out)
            }
            CoreCommand::AdvanceTime { now } => {
                let start = out.events.len();
                self.engine.advance_time(*now, &mut out.events);
                self.after_engine(start, out)
            }
            CoreCommand::HaltMarket { market } | CoreCommand::ResumeMarket { market } => {
                let config = self
                    .markets
                    .get_mut(market.0 as usize)
                    .ok_or(CoreRejection::Book(RejectReason::UnknownMarket))?;
                config.halted = matches!(command, CoreCommand::HaltMarket { .. });
                Ok(())
            }
            CoreCommand::SetMarketFees {
                market,
                maker_fee_bps,
                taker_fee_bps,
            } => {
                if *maker_fee_bps > limits::FEE_BPS_MAX || *taker_fee_bps > limits::FEE_BPS_MAX {
                    return Err(CoreRejection::InvalidFee);
                }
                let config = self
                    .markets
                    .get_mut(market.0 as usize)
                    .ok_or(CoreRejection::Book(RejectReason::UnknownMarket))?;
                config.maker_fee_bps = *maker_fee_bps;
                config.taker_fee_bps = *taker_fee_bps;
                Ok(())
            }
        }
    }

    /// A ledger operation whose refusal is the command's refusal.
    fn ledger_op(&mut self, op: &Op, out: &mut Output) -> Result<(), CoreRejection> {
        self.ledger
            .apply(op, &mut out.postings)
            .map_err(CoreRejection::Ledger)
    }

    /// A ledger operation that the checks already made safe: a refusal here is a bug.
    fn must(&mut self, op: &Op, out: &mut Output) {
        if let Err(reason) = self.ledger.apply(op, &mut out.postings) {
            panic!("ledger refused {op:?} after the core's checks passed: {reason}");
        }
    }

    fn create_market(
        &mut self,
        spec: &MarketSpec,
        base: AssetId,
        quote: AssetId,
        maker_fee_bps: u32,
        taker_fee_bps: u32,
        out: &mut Output,
    ) -> Result<(), CoreRejection> {
        let config = MarketConfig::new(
            &self.ledger,
            spec,
            base,
            quote,
            maker_fee_bps,
            taker_fee_bps,
        )?;
        let start = out.events.len();
        self.engine.create_market(spec.clone(), &mut out.events);
        match out.events[start..] {
            [Event::MarketCreated { market }] => {
                debug_assert_eq!(market.0 as usize, self.markets.len());
                self.markets.push(config);
                Ok(())
            }
            [Event::Rejected { reason, .. }] => {
                out.events.truncate(start);
                Err(CoreRejection::Book(reason))
            }
            _ => unreachable!("market creation reports one event"),
        }
    }

    /// What a live or new order must have on hold: the asset and amount, or `None` when it
    /// holds nothing (a buy on an escrow market).
    fn requirement(
        config: &MarketConfig,
        side: Side,
        price: i64,
        remaining: u64,
    ) -> Result<Option<(AssetId, Amount)>, CoreRejection> {
        match (side, config.settlement) {
            (Side::Sell, _) => u128::from(remaining)
                .checked_mul(config.base_per_qty)
                .map(|amount| Some((config.base, amount)))
                .ok_or(CoreRejection::AmountOverflow),
            (Side::Buy, Settlement::Escrow) => Ok(None),
            (Side::Buy, Settlement::Instant) => {
                if price <= 0 {
                    return Err(CoreRejection::ProtectionRequired);
                }
                (price as u128)
                    .checked_mul(u128::from(remaining))
                    .and_then(|notional| notional.checked_mul(config.quote_per_notional))
                    .map(|amount| Some((config.quote, amount)))
                    .ok_or(CoreRejection::AmountOverflow)
            }
        }
    }

    fn place(&mut self, place: &PlaceOrder, out: &mut Output) -> Result<(), CoreRejection> {
        // The engine checks counterparties' minimum reputation against the owner's as the
        // core knows it; the command is copied only when the caller's figure differs.
        let reputation = self.reputation(place.user);
        let place = if place.reputation == reputation {
            Cow::Borrowed(place)
        } else {
            Cow::Owned(PlaceOrder {
                reputation,
                ..place.clone()
            })
        };
        let Some(config) = self.markets.get(place.market.0 as usize) else {
            return Err(CoreRejection::Book(RejectReason::UnknownMarket));
        };
        if config.halted {
            return Err(CoreRejection::MarketHalted);
        }
        let price = place.price.map_or(0, |p| p.0);
        // The funds check reads only the ledger. When it fails, the engine's own verdict still
        // comes first, so a malformed order is reported as such rather than as unfunded; when
        // it passes, the engine's placement below makes its checks once, not twice.
        let open = self.open_orders(place.user);
        let funded = State::requirement(config, place.side, price, place.qty.0).and_then(|need| {
            if open >= limits::OPEN_ORDERS_PER_USER_MAX {
                return Err(CoreRejection::TooManyOpenOrders);
            }
            match need {
                Some((asset, amount))
                    if self
                        .ledger
                        .balance(Owner::User(place.user), asset)
                        .available
                        < amount =>
                {
                    Err(CoreRejection::Ledger(Rejection::InsufficientFunds))
                }
                _ => Ok(need),
            }
        });
        let need = match funded {
            Ok(need) => need,
            Err(refusal) => {
                self.engine
                    .check_place(&place)
                    .map_err(CoreRejection::Book)?;
                return Err(refusal);
            }
        };
        let start = out.events.len();
        // The order carries the id its hold will have, if it needs one, as its engine tag.
        let hold = need.map(|_| self.next_hold);
        self.engine
            .place_tagged(&place, hold.unwrap_or(0), &mut out.events);
        if let Some(&Event::Rejected { reason, .. }) = out.events.get(start) {
            out.events.truncate(start);
            return Err(CoreRejection::Book(reason));
        }
        // Accepted, and funded: the hold cannot be refused. The engine's events are settled
        // only below, so the hold exists before the order's trades are. An order that does not
        // stay live is counted out again when its events are settled.
        if let (Some((asset, amount)), Some(hold)) = (need, hold) {
            self.next_hold += 1;
            self.must(
                &Op::Hold {
                    hold,
                    owner: Owner::User(place.user),
                    asset,
                    amount,
                    kind: HoldKind::Order,
                },
                out,
            );
        }
        *self.open_orders.entry(place.user).or_insert(0) += 1;
        let placed = (
            place.market,
            place.id,
            Tracked {
                user: place.user,
                hold,
            },
        );
        self.settle_and_release(start, Some(placed), out);
        Ok(())
    }

    fn modify(&mut self, modify: &ModifyOrder, out: &mut Output) -> Result<(), CoreRejection> {
        self.engine
            .check_modify(modify)
            .map_err(CoreRejection::Book)?;
        let order = self
            .engine
            .order(modify.market, modify.id)
            .expect("a modify that passes its checks names a live order");
        let config = &self.markets[modify.market.0 as usize];
        if config.halted {
            return Err(CoreRejection::MarketHalted);
        }
        let price = modify.price.map_or(order.price.0, |p| p.0);
        let qty = modify.qty.map_or(order.remaining.0, |q| q.0);
        let need = State::requirement(config, order.side, price, qty)?;
        let hold = self.order_hold(modify.market, modify.id);
        let extra = match (need, hold) {
            (Some((asset, amount)), Some(hold)) => {
                let held = self
                    .ledger
                    .hold(hold)
                    .expect("a live order's hold exists")
                    .amount;
                let extra = amount.saturating_sub(held);
                if extra > 0
                    && self
                        .ledger
                        .balance(Owner::User(order.user), asset)
                        .available
                        < extra
                {
                    return Err(CoreRejection::Ledger(Rejection::InsufficientFunds));
                }
                extra
            }
            _ => 0,
        };
        if let (true, Some(hold)) = (extra > 0, hold) {
            self.must(
                &Op::Extend {
                    hold,
                    amount: extra,
                },
                out,
            );
        }
        let start = out.events.len();
        self.engine.modify(modify, &mut out.events);
        assert!(
            !matches!(out.events.get(start), Some(Event::Rejected { .. })),
            "the engine rejected a modify its dry run accepted"
        );
        self.settle_and_release(start, None, out);
        Ok(())
    }

    /// After an engine command that may be rejected without side effects (cancel, cancel-all,
    /// time): map a rejection, or settle and release.
    fn after_engine(&mut self, start: usize, out: &mut Output) -> Result<(), CoreRejection> {
        if let Some(&Event::Rejected { reason, .. }) = out.events.get(start) {
            out.events.truncate(start);
            return Err(CoreRejection::Book(reason));
        }
        self.settle_and_release(start, None, out);
        Ok(())
    }

    /// Settles the trades among `out.events[start..]`, then brings every touched order's hold
    /// to what it still needs: released in full when the order is gone. `placed` is the order
    /// the command placed, which the engine may never have kept.
    fn settle_and_release(
        &mut self,
        start: usize,
        placed: Option<(MarketId, OrderId, Tracked)>,
        out: &mut Output,
    ) {
        let mut touched = std::mem::take(&mut self.touched);
        let mut trades = false;
        for event in &out.events[start..] {
            match *event {
                Event::Trade {
                    market,
                    maker,
                    taker,
                    ..
                } => {
                    trades = true;
                    touched.push((market, maker));
                    touched.push((market, taker));
                }
                // An accepted order holds exactly what it needs until a trade, a cancel, an
                // expiry, a trigger or a modify says otherwise, so acceptance alone needs no
                // reconciliation.
                Event::Cancelled { market, id, .. }
                | Event::Expired { market, id, .. }
                | Event::Triggered { market, id, .. }
                | Event::Modified { market, id, .. } => touched.push((market, id)),
                _ => {}
            }
        }
        if touched.is_empty() {
            // Nothing traded or left: every order holds what it needs.
            self.touched = touched;
            return;
        }
        touched.sort_unstable();
        touched.dedup();
        // What the orders that left the engine during the command had, market by market.
        let mut last_market = None;
        for &(market, _) in &touched {
            if last_market != Some(market) {
                last_market = Some(market);
                self.gone.extend(
                    self.engine
                        .departed(market)
                        .iter()
                        .map(|d| (market, d.id, Tracked::from_tag(d.user, d.tag))),
                );
            }
        }
        self.gone.extend(placed);
        if self.gone.len() > 1 {
            self.gone
                .sort_unstable_by_key(|&(market, id, _)| (market, id));
        }
        // Trades settle in the order they happened.
        if trades {
            for index in start..out.events.len() {
                if let Event::Trade {
                    market,
                    maker,
                    taker,
                    maker_user,
                    taker_user,
                    taker_side,
                    price,
                    qty,
                } = out.events[index]
                {
                    let (buyer, seller, buyer_is_taker) = match taker_side {
                        Side::Buy => ((taker, taker_user), (maker, maker_user), true),
                        Side::Sell => ((maker, maker_user), (taker, taker_user), false),
                    };
                    self.settle(market, buyer, seller, buyer_is_taker, price.0, qty.0, out);
                }
            }
        }
        for &(market, id) in &touched {
            self.release_excess(market, id, out);
        }
        touched.clear();
        if touched.capacity() <= limits::SCRATCH_KEPT_MAX {
            self.touched = touched;
        }
        if self.gone.capacity() > limits::SCRATCH_KEPT_MAX {
            self.gone = Vec::new();
        } else {
            self.gone.clear();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        market: MarketId,
        (buyer_order, buyer): (OrderId, UserId),
        (seller_order, seller): (OrderId, UserId),
        buyer_is_taker: bool,
        price: i64,
        qty: u64,
        out: &mut Output,
    ) {
        let config = self.markets[market.0 as usize].clone();
        let base = u128::from(qty) * config.base_per_qty;
        let quote = price as u128 * u128::from(qty) * config.quote_per_notional;
        let seller_hold = self
            .tracked(market, seller_order)
            .and_then(|tracked| tracked.hold)
            .expect("a selling order holds its base");
        match config.settlement {
            Settlement::Instant => {
                let buyer_hold = self
                    .tracked(market, buyer_order)
                    .and_then(|tracked| tracked.hold)
                    .expect("a buying order on an instant market holds its quote");
                let (buyer_bps, seller_bps) = if buyer_is_taker {
                    (config.taker_fee_bps, config.maker_fee_bps)
                } else {
                    (config.maker_fee_bps, config.taker_fee_bps)
                };
                // Fees are taken from what each side receives, rounded down.
                let buyer_fee = base * u128::from(buyer_bps) / 10_000;
                let seller_fee = quote * u128::from(seller_bps) / 10_000;
                let transfers = [
                    (seller_hold, Owner::User(buyer), base - buyer_fee),
                    (seller_hold, Owner::Fees, buyer_fee),
                    (buyer_hold, Owner::User(seller), quote - seller_fee),
                    (buyer_hold, Owner::Fees, seller_fee),
                ];
                for (hold, to, amount) in transfers {
                    if amount > 0 {
                        self.must(&Op::Settle { hold, to, amount }, out);
                    }
                }
            }
            Settlement::Escrow => {
                // The filled base stays held, now for this trade's escrow.
                let escrow = self.next_hold;
                self.next_hold += 1;
                self.must(
                    &Op::Release {
                        hold: seller_hold,
                        amount: base,
                    },
                    out,
                );
                self.must(
                    &Op::Hold {
                        hold: escrow,
                        owner: Owner::User(seller),
                        asset: config.base,
                        amount: base,
                        kind: HoldKind::Escrow,
                    },
                    out,
                );
                self.escrows.insert(
                    self.next_trade,
                    EscrowTrade {
                        market,
                        seller,
                        buyer,
                        hold: escrow,
                        base_amount: base,
                        quote_amount: quote,
                    },
                );
            }
        }
        self.next_trade += 1;
    }

    /// Shrinks an order's hold to what it still needs; when the order is gone, releases the
    /// hold and counts the order out.
    fn release_excess(&mut self, market: MarketId, id: OrderId, out: &mut Output) {
        let (tracked, needed) = match self.engine.order(market, id) {
            Some(order) => (
                Tracked::from_tag(order.user, order.tag),
                self.needed_by(market, &order),
            ),
            None => {
                let Some(tracked) = self.gone_tracked(market, id) else {
                    return;
                };
                if let Some(count) = self.open_orders.get_mut(&tracked.user) {
                    *count -= 1;
                    if *count == 0 {
                        self.open_orders.remove(&tracked.user);
                    }
                }
                (tracked, 0)
            }
        };
        let Some(hold) = tracked.hold else {
            return;
        };
        let held = self.ledger.hold(hold).map_or(0, |h| h.amount);
        if held > needed {
            self.must(
                &Op::Release {
                    hold,
                    amount: held - needed,
                },
                out,
            );
        }
    }

    fn needed_by(&self, market: MarketId, order: &OrderView) -> Amount {
        let config = &self.markets[market.0 as usize];
        State::requirement(config, order.side, order.price.0, order.remaining.0)
            .ok()
            .flatten()
            .map_or(0, |(_, amount)| amount)
    }

    /// Checks, from scratch, that every live order's hold is exactly what it needs, that no
    /// hold outlives its order, and the ledger's own invariants. For tests and `journal verify`.
    pub fn verify(&self) -> Result<(), String> {
        self.ledger.verify()?;
        if self.markets.len() != self.engine.markets().count() {
            return Err("the core and the engine disagree on the markets".into());
        }
        let mut counted: FxHashMap<UserId, u32> = FxHashMap::default();
        let mut order_holds: FxHashMap<HoldId, (MarketId, OrderId)> = FxHashMap::default();
        for market in self.engine.markets() {
            let config = &self.markets[market.0 as usize];
            for order in self.engine.orders(market) {
                let id = order.id;
                *counted.entry(order.user).or_insert(0) += 1;
                let tracked = Tracked::from_tag(order.user, order.tag);
                let holds_nothing =
                    order.side == Side::Buy && config.settlement == Settlement::Escrow;
                if holds_nothing != tracked.hold.is_none() {
                    return Err(format!(
                        "order {id} of market {} has a hold it should not have, or lacks one",
                        market.0
                    ));
                }
                if let Some(hold) = tracked.hold {
                    match self.ledger.hold(hold) {
                        Some(found)
                            if found.kind == HoldKind::Order
                                && found.owner == Owner::User(order.user) => {}
                        _ => {
                            return Err(format!(
                                "order {id} of market {} has no order hold {hold} of its owner",
                                market.0
                            ));
                        }
                    }
                    if order_holds.insert(hold, (market, id)).is_some() {
                        return Err(format!("hold {hold} backs two orders"));
                    }
                }
                let held = tracked
                    .hold
                    .and_then(|h| self.ledger.hold(h))
                    .map_or(0, |h| h.amount);
                let needed = self.needed_by(market, &order);
                if held != needed {
                    return Err(format!(
                        "order {id} of market {}: holds {held}, needs {needed}",
                        market.0
                    ));
                }
                if order.order_type == OrderType::Market {
                    return Err(format!("market order {id} rests"));
                }
            }
        }
        if counted != self.open_orders {
            return Err("the per-user open order counts disagree with the live orders".into());
        }
        for (hold, found) in self.ledger.holds() {
            if found.kind == HoldKind::Order && !order_holds.contains_key(&hold) {
                return Err(format!("order hold {hold} outlives its order"));
            }
        }
        for (id, &hold) in &self.withdrawals {
            match self.ledger.hold(hold) {
                Some(found) if found.kind == HoldKind::Withdrawal => {}
                _ => return Err(format!("withdrawal {id} has no withdrawal hold {hold}")),
            }
        }
        for (trade, escrow) in &self.escrows {
            match self.ledger.hold(escrow.hold) {
                Some(found)
                    if found.kind == HoldKind::Escrow && found.amount == escrow.base_amount => {}
                _ => return Err(format!("escrow trade {trade} has no matching escrow hold")),
            }
        }
        Ok(())
    }

    /// SHA-256 over the engine's and the ledger's state hashes and the core's own tables.
    ///
    /// The engine's digest and the ledger's read different data, so for a large state the
    /// engine's is computed on a second thread while this one computes the ledger's and
    /// sorts the tracked orders; they are combined in the same order either way.
    pub fn state_hash(&self) -> [u8; 32] {
        self.state_hash_with(EscrowParties::Hashed)
    }

    /// [`State::state_hash`], or the hash as it was before it covered each escrow's market,
    /// seller and buyer (what snapshots up to version 3 recorded).
    pub(crate) fn state_hash_with(&self, parties: EscrowParties) -> [u8; 32] {
        let orders: usize = self
            .engine
            .markets()
            .map(|market| self.engine.live_orders(market))
            .sum();
        let threads = if orders >= limits::PARALLEL_HASH_ORDERS_MIN {
            2
        } else {
            1
        };
        self.state_hash_on(threads, parties)
    }

    /// [`State::state_hash`] on one thread or two.
    fn state_hash_on(&self, threads: u32, parties: EscrowParties) -> [u8; 32] {
        let (engine, ledger, tracked) = if threads > 1 {
            std::thread::scope(|scope| {
                // A thread the system refuses to start leaves the work to this one.
                let engine = std::thread::Builder::new()
                    .name("state-hash".into())
                    .spawn_scoped(scope, || self.engine.state_hash());
                let ledger = self.ledger.state_hash();
                let tracked = self.tracked_orders();
                let engine = match engine {
                    Ok(thread) => thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(_) => self.engine.state_hash(),
                };
                (engine, ledger, tracked)
            })
        } else {
            (
                self.engine.state_hash(),
                self.ledger.state_hash(),
                self.tracked_orders(),
            )
        };
        let mut hasher = Sha256::new();
        hasher.update(engine);
        hasher.update(ledger);
        for config in &self.markets {
            hasher.update(config.base.to_le_bytes());
            hasher.update(config.quote.to_le_bytes());
            hasher.update(config.maker_fee_bps.to_le_bytes());
            hasher.update(config.taker_fee_bps.to_le_bytes());
            // Only when set, so that the hash of a state without halts is what it always was.
            if config.halted {
                hasher.update(b"halted");
            }
        }
        let mut reputations: Vec<_> = self.reputations.iter().collect();
        reputations.sort_unstable();
        for (user, reputation) in reputations {
            hasher.update(user.to_le_bytes());
            hasher.update(reputation.to_le_bytes());
        }
        for ((market, id), tracked) in tracked {
            hasher.update(market.0.to_le_bytes());
            hasher.update(id.to_le_bytes());
            hasher.update(tracked.user.to_le_bytes());
            hasher.update(tracked.hold.map_or(0, |h| h).to_le_bytes());
        }
        let mut withdrawals: Vec<_> = self.withdrawals.iter().collect();
        withdrawals.sort_unstable();
        for (id, hold) in withdrawals {
            hasher.update(id.to_le_bytes());
            hasher.update(hold.to_le_bytes());
        }
        for (trade, escrow) in &self.escrows {
            hasher.update(trade.to_le_bytes());
            hasher.update(escrow.hold.to_le_bytes());
            hasher.update(escrow.base_amount.to_le_bytes());
            hasher.update(escrow.quote_amount.to_le_bytes());
            if parties == EscrowParties::Hashed {
                hasher.update(escrow.market.0.to_le_bytes());
                hasher.update(escrow.seller.to_le_bytes());
                hasher.update(escrow.buyer.to_le_bytes());
            }
        }
        hasher.update(self.next_hold.to_le_bytes());
        hasher.update(self.next_trade.to_le_bytes());
        hasher.finalize().into()
    }
}

/// Whether the state hash covers each escrow's market, seller and buyer: it does since
/// snapshot version 4; the hashes recorded with older snapshots did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EscrowParties {
    Hashed,
    Unhashed,
}

#[cfg(test)]
mod tests {
    use book::{Price, Qty};

    use super::*;

    #[test]
    fn the_state_hash_on_two_threads_equals_the_hash_on_one() {
        let mut state = State::new();
        let mut out = Output::default();
        for command in workload::setup(4) {
            state.apply(&command, &mut out).unwrap();
        }
        let market = MarketId(0);
        // Resting orders on both sides, some crossed, with holds, trades and fees.
        for id in 1..=200u64 {
            let (side, price) = if id % 2 == 0 {
                (Side::Buy, 900 + (id % 50) as i64)
            } else {
                (Side::Sell, 940 + (id % 50) as i64)
            };
            let place = PlaceOrder::limit(market, id, id % 4 + 1, side, Price(price), Qty(id));
            state.apply(&CoreCommand::Place(place), &mut out).unwrap();
        }
        assert!(state.engine().live_orders(market) > 100);
        for parties in [EscrowParties::Hashed, EscrowParties::Unhashed] {
            assert_eq!(
                state.state_hash_on(2, parties),
                state.state_hash_on(1, parties)
            );
        }
        assert_eq!(
            state.state_hash(),
            state.state_hash_on(1, EscrowParties::Hashed)
        );
    }
}
