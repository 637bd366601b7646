//! The projector: turns the journal into read models (orders, trades, balance changes,
//! withdrawals) and the hash-chained audit trail, exactly once.
//!
//! It keeps its own copy of the state, replaying the journal as the sequencer did, so it needs
//! nothing from the sequencer and can run behind it, after it, or alone to rebuild the tables.
//! Each journal batch's rows are written in one transaction together with the projection's
//! offset; a batch that does not start right after the stored offset is refused, so a command
//! is never projected twice, and after a crash projecting resumes where the offset says.

use std::sync::Arc;

use book::{Event, MarketId, OrderId, Side};
use ledger::{Bucket, Owner};
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};
use store::{
    AuditRow, BalanceRow, OrderRow, ProjectionBatch, Store, TradeRow, WithdrawalRow, audit_hash,
};

use crate::codec;
use crate::sequencer::RecoveryError;
use crate::{CoreCommand, Output, State, names};

/// The name of the projection's offset.
pub const PROJECTION: &str = "read_models";

/// Journal batches read per step.
const BATCHES_PER_READ: usize = 64;

/// Commands written in one projection transaction at most. A projector that is behind (the
/// journal commits batches faster than it writes them) merges consecutive journal batches
/// into one transaction up to this many commands: one commit instead of several, and each
/// table page written once per transaction instead of once per batch.
const COMMANDS_PER_WRITE_MAX: u64 = 4_096;

/// What the projector tracks of a live order to write its row.
#[derive(Clone, Debug)]
struct OrderTrack {
    row: OrderRow,
}

/// Called with each command the projector writes, in journal order, after its batch's rows
/// are committed: its sequence number, the command and what it did.
pub type Listener = Box<dyn FnMut(u64, &CoreCommand, &Output) + Send>;

/// Projects the journal into the read models.
pub struct Projector {
    listener: Option<Listener>,
    store: Arc<Store>,
    state: State,
    seq: u64,
    orders: FxHashMap<(MarketId, OrderId), OrderTrack>,
    /// Pending withdrawals' rows, to write again when they complete or are cancelled.
    withdrawals: FxHashMap<u64, WithdrawalRow>,
    audit_head: [u8; 32],
    /// The last run failed after its state moved past the stored offset.
    stale: bool,
}

fn command_kind(command: &CoreCommand) -> &'static str {
    match command {
        CoreCommand::CreateAsset { .. } => "create_asset",
        CoreCommand::CreateMarket { .. } => "create_market",
        CoreCommand::Deposit { .. } => "deposit",
        CoreCommand::RequestWithdrawal { .. } => "request_withdrawal",
        CoreCommand::CompleteWithdrawal { .. } => "complete_withdrawal",
        CoreCommand::CancelWithdrawal { .. } => "cancel_withdrawal",
        CoreCommand::SetReputation { .. } => "set_reputation",
        CoreCommand::Place(_) => "place",
        CoreCommand::Cancel { .. } => "cancel",
        CoreCommand::Modify(_) => "modify",
        CoreCommand::CancelAll { .. } => "cancel_all",
        CoreCommand::AdvanceTime { .. } => "time",
        CoreCommand::HaltMarket { .. } => "halt_market",
        CoreCommand::ResumeMarket { .. } => "resume_market",
        CoreCommand::SetMarketFees { .. } => "set_market_fees",
    }
}

fn command_detail(command: &CoreCommand) -> String {
    match command {
        CoreCommand::CreateAsset {
            asset,
            symbol,
            decimals,
        } => format!("asset {asset} {symbol} ({decimals} decimals)"),
        CoreCommand::CreateMarket {
            spec, base, quote, ..
        } => format!("market {} base {base} quote {quote}", spec.symbol),
        CoreCommand::Deposit {
            user,
            asset,
            amount,
        } => format!("user {user} asset {asset} amount {amount}"),
        CoreCommand::RequestWithdrawal {
            id,
            user,
            asset,
            amount,
            ..
        } => {
            format!("withdrawal {id} user {user} asset {asset} amount {amount}")
        }
        CoreCommand::CompleteWithdrawal { id } | CoreCommand::CancelWithdrawal { id } => {
            format!("withdrawal {id}")
        }
        CoreCommand::SetReputation { user, reputation } => {
            format!("user {user} reputation {reputation}")
        }
        CoreCommand::Place(place) => format!(
            "market {} order {} user {} {} {} qty {}",
            place.market.0,
            place.id,
            place.user,
            place.side.as_str(),
            place.order_type.as_str(),
            place.qty.0
        ),
        CoreCommand::Cancel { market, id, user } => {
            format!("market {} order {id} user {user}", market.0)
        }
        CoreCommand::Modify(modify) => format!(
            "market {} order {} user {}",
            modify.market.0, modify.id, modify.user
        ),
        CoreCommand::CancelAll { market, user } => {
            format!("market {:?} user {:?}", market.map(|m| m.0), user)
        }
        CoreCommand::AdvanceTime { now } => format!("now {now}"),
        CoreCommand::HaltMarket { market } | CoreCommand::ResumeMarket { market } => {
            format!("market {}", market.0)
        }
        CoreCommand::SetMarketFees {
            market,
            maker_fee_bps,
            taker_fee_bps,
        } => format!(
            "market {} maker {maker_fee_bps} bps taker {taker_fee_bps} bps",
            market.0
        ),
    }
}

/// SHA-256 of a command's journal encoding.
pub fn command_digest(command: &CoreCommand) -> [u8; 32] {
    let mut bytes = Vec::new();
    codec::encode(command, &mut bytes);
    Sha256::digest(&bytes).into()
}

impl Projector {
    /// Catches its private state up to the stored offset (without writing), ready to project
    /// what follows.
    ///
    /// Read models that are ahead of the journal are emptied and rebuilt from it. On SQLite
    /// they live in a file of their own, committed without an fsync, beside a journal that
    /// may itself be committed without one (`synchronous=NORMAL`): after a power loss the two
    /// files can disagree, and the journal is the truth.
    pub async fn start(store: Arc<Store>) -> Result<Projector, RecoveryError> {
        let mut offset = store.projection_offset(PROJECTION).await?;
        // Read after the offset, from the database: a server writing the same store from
        // another process may have appended and projected since this store was opened.
        let journal_end = store.journal_end().await?;
        if offset > journal_end {
            tracing::warn!(
                projected = offset,
                journal_end,
                "the read models are ahead of the journal; rebuilding them from the journal"
            );
            store.reset_projection(PROJECTION).await?;
            offset = 0;
        }
        let stored_head = store.audit_head().await?;
        let mut projector = Projector {
            listener: None,
            store,
            state: State::new(),
            seq: 0,
            orders: FxHashMap::default(),
            withdrawals: FxHashMap::default(),
            audit_head: [0; 32],
            stale: false,
        };
        // Replays the already-projected commands to rebuild the state, the live orders and the
        // audit chain; their rows are dropped, as the tables hold them already.
        projector.run(Some(offset), usize::MAX).await?;
        if projector.audit_head != stored_head {
            return Err(RecoveryError::Store(store::StoreError::Corrupt {
                what: "audit entry",
                position: offset,
                problem: "the stored audit chain does not match the journal".into(),
            }));
        }
        Ok(projector)
    }

    /// Tells `listener` about every command projected from now on (the feed of durable events
    /// that the server's WebSocket subscriptions follow).
    pub fn set_listener(&mut self, listener: Listener) {
        self.listener = Some(listener);
    }

    /// The last command projected.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Projects every journal batch not projected yet; returns the commands projected.
    ///
    /// After a failure (a write that did not commit, say) the private state is ahead of the
    /// stored offset: the next call first starts again from the stored offset, so the
    /// commands whose rows were not written are projected, not skipped.
    pub async fn catch_up(&mut self) -> Result<u64, RecoveryError> {
        self.advance(usize::MAX).await
    }

    /// Like [`Projector::catch_up`], but projects only the journal batches committed when it
    /// starts (one read, at most [`COMMANDS_PER_WRITE_MAX`] commands a transaction) and
    /// returns: a caller that waits between steps lets batches gather into fewer, larger
    /// transactions.
    pub async fn step(&mut self) -> Result<u64, RecoveryError> {
        self.advance(1).await
    }

    async fn advance(&mut self, reads: usize) -> Result<u64, RecoveryError> {
        if self.stale {
            let mut fresh = Projector::start(self.store.clone()).await?;
            fresh.listener = self.listener.take();
            *self = fresh;
        }
        let before = self.seq;
        if let Err(error) = self.run(None, reads).await {
            self.stale = true;
            return Err(error);
        }
        Ok(self.seq - before)
    }

    /// Replays journal batches after `self.seq`: up to `silent_until` without writing, then
    /// writing them, consecutive batches merged into one projection transaction of at most
    /// [`COMMANDS_PER_WRITE_MAX`] commands (a batch is never split); after `reads` reads of the
    /// journal, or when it has no more batches.
    async fn run(&mut self, silent_until: Option<u64>, reads: usize) -> Result<(), RecoveryError> {
        let mut next_batch = match self.seq {
            0 => 1,
            seq => match self.store.batch_containing(seq).await? {
                Some(batch) => batch + 1,
                None => return Ok(()),
            },
        };
        let tell = silent_until.is_none() && self.listener.is_some();
        for _ in 0..reads {
            let batches = self.store.read(next_batch, BATCHES_PER_READ).await?;
            let Some(last) = batches.last() else {
                return Ok(());
            };
            next_batch = last.batch + 1;
            let mut rows = ProjectionBatch::default();
            // What the listener hears once the rows are written.
            let mut told: Vec<(CoreCommand, Output)> = Vec::new();
            for batch in batches {
                if silent_until.is_some_and(|until| batch.first_seq > until) {
                    return Ok(());
                }
                let commands =
                    codec::decode_all(&batch.payload).map_err(|error| RecoveryError::Decode {
                        batch: batch.batch,
                        error,
                    })?;
                if rows.first_seq == 0 {
                    rows.first_seq = batch.first_seq;
                }
                rows.last_seq = batch.last_seq();
                for command in commands {
                    let output = self.project(&command, &mut rows)?;
                    if tell {
                        told.push((command, output));
                    }
                }
                if silent_until.is_some() {
                    // Already in the tables: only the state, live orders and chain matter.
                    rows = ProjectionBatch::default();
                } else if rows.last_seq + 1 - rows.first_seq >= COMMANDS_PER_WRITE_MAX {
                    self.write(&mut rows, &mut told).await?;
                }
            }
            if rows.first_seq != 0 {
                self.write(&mut rows, &mut told).await?;
            }
        }
        Ok(())
    }

    /// Writes the rows gathered (one transaction with the new offset), then tells the listener
    /// about their commands; both are left empty.
    async fn write(
        &mut self,
        rows: &mut ProjectionBatch,
        told: &mut Vec<(CoreCommand, Output)>,
    ) -> Result<(), RecoveryError> {
        let rows = std::mem::take(rows);
        let started = std::time::Instant::now();
        self.store.write_projection(PROJECTION, &rows).await?;
        metrics::histogram!(names::PROJECTION_WRITE_SECONDS).record(started.elapsed());
        metrics::gauge!(names::PROJECTED_SEQ).set(rows.last_seq as f64);
        if let Some(listener) = self.listener.as_mut() {
            for (offset, (command, output)) in told.drain(..).enumerate() {
                listener(rows.first_seq + offset as u64, &command, &output);
            }
        }
        Ok(())
    }

    /// Applies one journaled command to the private state and adds its rows; returns what the
    /// command did.
    fn project(
        &mut self,
        command: &CoreCommand,
        rows: &mut ProjectionBatch,
    ) -> Result<Output, RecoveryError> {
        self.seq += 1;
        let seq = self.seq;
        let mut out = Output::default();
        self.state
            .apply(command, &mut out)
            .map_err(|reason| RecoveryError::Diverged { seq, reason })?;
        let mut touched: Vec<(MarketId, OrderId)> = Vec::new();
        let mut trades = 0u32;
        for event in &out.events {
            match *event {
                Event::Accepted {
                    market,
                    id,
                    user,
                    side,
                    order_type,
                    qty,
                } => {
                    self.orders.insert(
                        (market, id),
                        OrderTrack {
                            row: OrderRow {
                                market: market.0,
                                order_id: id,
                                accepted_seq: seq,
                                user,
                                side: side.as_str(),
                                order_type: order_type.as_str(),
                                price: match command {
                                    CoreCommand::Place(place) if place.id == id => {
                                        place.price.map(|p| p.0)
                                    }
                                    _ => None,
                                },
                                qty: qty.0,
                                filled: 0,
                                open_qty: qty.0,
                                status: "open",
                                updated_seq: seq,
                            },
                        },
                    );
                    touched.push((market, id));
                }
                Event::Trade {
                    market,
                    maker,
                    taker,
                    maker_user,
                    taker_user,
                    taker_side,
                    price,
                    qty,
                } => {
                    for id in [maker, taker] {
                        if let Some(track) = self.orders.get_mut(&(market, id)) {
                            track.row.filled += qty.0;
                            track.row.open_qty -= qty.0;
                            if track.row.open_qty == 0 {
                                track.row.status = "filled";
                            }
                        }
                        touched.push((market, id));
                    }
                    rows.trades.push(TradeRow {
                        seq,
                        n: trades,
                        market: market.0,
                        maker,
                        taker,
                        maker_user,
                        taker_user,
                        taker_side: match taker_side {
                            Side::Buy => "buy",
                            Side::Sell => "sell",
                        },
                        price: price.0,
                        qty: qty.0,
                    });
                    trades += 1;
                }
                Event::Cancelled {
                    market, id, open, ..
                } => {
                    if let Some(track) = self.orders.get_mut(&(market, id)) {
                        track.row.open_qty = open.0;
                        if open.0 == 0 {
                            track.row.status = "cancelled";
                        }
                    }
                    touched.push((market, id));
                }
                Event::Expired { market, id, .. } => {
                    if let Some(track) = self.orders.get_mut(&(market, id)) {
                        track.row.open_qty = 0;
                        track.row.status = "expired";
                    }
                    touched.push((market, id));
                }
                Event::Modified {
                    market,
                    id,
                    qty,
                    price,
                    ..
                } => {
                    if let Some(track) = self.orders.get_mut(&(market, id)) {
                        // A zero price in the event means the order has none.
                        if price.0 != 0 {
                            track.row.price = Some(price.0);
                        }
                        // The committed quantity follows the new open quantity.
                        track.row.qty = track.row.qty - track.row.open_qty + qty.0;
                        track.row.open_qty = qty.0;
                    }
                    touched.push((market, id));
                }
                _ => {}
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for key in touched {
            let Some(track) = self.orders.get_mut(&key) else {
                continue;
            };
            track.row.updated_seq = seq;
            rows.orders.push(track.row.clone());
            if track.row.open_qty == 0 {
                self.orders.remove(&key);
            }
        }
        for (n, posting) in out.postings.iter().enumerate() {
            rows.balances.push(BalanceRow {
                seq,
                n: n as u32,
                owner: match posting.owner {
                    Owner::User(user) => format!("user:{user}"),
                    Owner::Fees => "fees".into(),
                },
                asset: posting.asset,
                bucket: match posting.bucket {
                    Bucket::Available => "available",
                    Bucket::Held => "held",
                    Bucket::External => "external",
                },
                delta: posting.delta,
            });
        }
        match command {
            CoreCommand::RequestWithdrawal {
                id,
                user,
                asset,
                amount,
                destination,
            } => {
                let row = WithdrawalRow {
                    id: *id,
                    user: *user,
                    asset: *asset,
                    amount: *amount,
                    destination: destination.clone(),
                    status: "pending",
                    requested_seq: seq,
                    updated_seq: seq,
                };
                rows.withdrawals.push(row.clone());
                self.withdrawals.insert(*id, row);
            }
            CoreCommand::CompleteWithdrawal { id } | CoreCommand::CancelWithdrawal { id } => {
                // The core accepted it, so the withdrawal was pending.
                if let Some(mut row) = self.withdrawals.remove(id) {
                    row.status = match command {
                        CoreCommand::CompleteWithdrawal { .. } => "completed",
                        _ => "cancelled",
                    };
                    row.updated_seq = seq;
                    rows.withdrawals.push(row);
                }
            }
            _ => {}
        }
        let kind = command_kind(command);
        let detail = command_detail(command);
        let digest = command_digest(command);
        let hash = audit_hash(&self.audit_head, seq, kind, &detail, &digest);
        rows.audit.push(AuditRow {
            seq,
            kind: kind.into(),
            detail,
            command_digest: digest,
            hash,
        });
        self.audit_head = hash;
        Ok(out)
    }
}
