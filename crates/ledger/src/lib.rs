//! Agora's ledger: double-entry balances per account and asset, with holds.
//!
//! Every account has an `available` and a `held` balance per asset. Funds move only by
//! operations ([`Op`]) whose postings balance: each posting changes one bucket (available, held,
//! or the asset's external counterpart for deposits and withdrawals) and the postings of an
//! operation sum to zero per asset. Holds reserve available funds for an order, an escrow or a
//! withdrawal; they are released back, settled to another account (a trade), or consumed by a
//! withdrawal leaving the system.
//!
//! The ledger is pure: no I/O, no clock, no randomness. A business refusal (insufficient funds,
//! unknown hold, …) is a [`Rejection`], returned as data, and changes nothing; a batch of
//! operations applies whole or not at all. The invariants (no negative balance, per-asset
//! totals equal deposits minus withdrawals, every operation balances) are checked after every
//! operation; a violation is a bug and panics, so the core stops rather than continue on bad
//! state.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};

/// A user id, as the matching engine knows it.
pub type UserId = u64;

/// An asset id, assigned by the caller when the asset is created.
pub type AssetId = u32;

/// A hold id, chosen by the caller and unique among live holds.
pub type HoldId = u64;

/// An amount in an asset's minor units (`10^-decimals` of one unit).
pub type Amount = u128;

/// Named bounds.
pub mod limits {
    /// Assets one ledger holds.
    pub const ASSETS_MAX: usize = 10_000;
    /// Decimal places of an asset's minor unit.
    pub const ASSET_DECIMALS_MAX: u32 = 18;
    /// Bytes in an asset symbol.
    pub const ASSET_SYMBOL_BYTES_MAX: usize = 16;
    /// Operations in one atomic batch.
    pub const BATCH_OPS_MAX: usize = 1_024;
    /// Largest balance of one bucket, so that sums over many accounts stay within `u128`.
    pub const BALANCE_MAX: u128 = 1 << 100;
}

/// Who owns an account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// A user.
    User(UserId),
    /// The exchange's fee account.
    Fees,
}

/// What a hold reserves funds for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldKind {
    /// An open order.
    Order,
    /// An escrow trade waiting for the off-platform payment.
    Escrow,
    /// A withdrawal waiting to be paid out.
    Withdrawal,
}

/// One operation on the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Register an asset.
    CreateAsset {
        /// Id.
        asset: AssetId,
        /// Symbol, such as `BTC`.
        symbol: String,
        /// Decimal places of the minor unit.
        decimals: u32,
    },
    /// Funds arrive from outside: credit `available`.
    Deposit {
        /// Receiving user.
        user: UserId,
        /// Asset.
        asset: AssetId,
        /// Amount.
        amount: Amount,
    },
    /// Reserve available funds under a new hold.
    Hold {
        /// New hold id.
        hold: HoldId,
        /// Owner of the funds.
        owner: Owner,
        /// Asset.
        asset: AssetId,
        /// Amount.
        amount: Amount,
        /// Purpose.
        kind: HoldKind,
    },
    /// Reserve more of the owner's available funds under an existing hold.
    Extend {
        /// Hold.
        hold: HoldId,
        /// Additional amount.
        amount: Amount,
    },
    /// Return part or all of a hold to its owner's available balance.
    Release {
        /// Hold.
        hold: HoldId,
        /// Amount.
        amount: Amount,
    },
    /// Pay part or all of a hold to another account's available balance (a trade, a fee, an
    /// escrow release).
    Settle {
        /// Hold paying.
        hold: HoldId,
        /// Receiving account.
        to: Owner,
        /// Amount.
        amount: Amount,
    },
    /// Funds leave the system out of a withdrawal hold.
    Withdraw {
        /// A hold of kind [`HoldKind::Withdrawal`].
        hold: HoldId,
        /// Amount.
        amount: Amount,
    },
    /// Move available funds between accounts.
    Transfer {
        /// Paying account.
        from: Owner,
        /// Receiving account.
        to: Owner,
        /// Asset.
        asset: AssetId,
        /// Amount.
        amount: Amount,
    },
}

/// Why an operation was refused. Refusals change nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The asset does not exist.
    UnknownAsset,
    /// An asset with this id or symbol exists.
    DuplicateAsset,
    /// The asset definition breaks a rule (symbol, decimals) or the ledger has the maximum
    /// number of assets.
    InvalidAsset,
    /// The amount is zero.
    ZeroAmount,
    /// The paying balance is smaller than the amount.
    InsufficientFunds,
    /// No live hold has this id.
    UnknownHold,
    /// A live hold already has this id.
    DuplicateHold,
    /// The amount is larger than what the hold has left.
    HoldExceeded,
    /// The hold is not of the kind the operation needs (withdrawals consume withdrawal holds).
    WrongHoldKind,
    /// A balance would pass [`limits::BALANCE_MAX`].
    BalanceOverflow,
    /// Paying and receiving accounts are the same.
    SameAccount,
    /// A batch is empty or longer than [`limits::BATCH_OPS_MAX`].
    InvalidBatch,
}

impl Rejection {
    /// Stable upper-case code.
    pub fn code(self) -> &'static str {
        match self {
            Rejection::UnknownAsset => "UNKNOWN_ASSET",
            Rejection::DuplicateAsset => "DUPLICATE_ASSET",
            Rejection::InvalidAsset => "INVALID_ASSET",
            Rejection::ZeroAmount => "ZERO_AMOUNT",
            Rejection::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Rejection::UnknownHold => "UNKNOWN_HOLD",
            Rejection::DuplicateHold => "DUPLICATE_HOLD",
            Rejection::HoldExceeded => "HOLD_EXCEEDED",
            Rejection::WrongHoldKind => "WRONG_HOLD_KIND",
            Rejection::BalanceOverflow => "BALANCE_OVERFLOW",
            Rejection::SameAccount => "SAME_ACCOUNT",
            Rejection::InvalidBatch => "INVALID_BATCH",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A batch refusal: which operation of the batch failed and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRejection {
    /// Index of the refused operation in the batch.
    pub index: usize,
    /// Why.
    pub reason: Rejection,
}

/// Which balance a posting changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// An account's available balance.
    Available,
    /// An account's held balance.
    Held,
    /// The world outside the ledger: the other side of deposits and withdrawals.
    External,
}

/// One side of a double entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Posting {
    /// Account (ignored for [`Bucket::External`], where it names the user who deposited or
    /// withdrew).
    pub owner: Owner,
    /// Asset.
    pub asset: AssetId,
    /// Balance changed.
    pub bucket: Bucket,
    /// Signed change.
    pub delta: i128,
}

/// An account's balances in one asset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Balance {
    /// Free to use.
    pub available: Amount,
    /// Reserved by holds.
    pub held: Amount,
}

/// A live hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Owner of the reserved funds.
    pub owner: Owner,
    /// Asset.
    pub asset: AssetId,
    /// What is left of it.
    pub amount: Amount,
    /// Purpose.
    pub kind: HoldKind,
}

impl Balance {
    /// Moves one bucket by `delta`; the operation's checks have made it fit.
    fn change(&mut self, bucket: Bucket, delta: i128) {
        let slot = match bucket {
            Bucket::Available => &mut self.available,
            Bucket::Held => &mut self.held,
            Bucket::External => unreachable!("external postings have no account"),
        };
        *slot = slot
            .checked_add_signed(delta)
            .expect("validated postings keep balances within range");
    }
}

/// Moves `amount` between two buckets of one account on one look-up of it: refuses with
/// `short` when the source bucket holds less, and with `BalanceOverflow` when the target
/// would pass [`limits::BALANCE_MAX`]; otherwise records the undo entry and the two postings.
/// The asset's total does not move. A free function over the balances, so that a caller may
/// hold an entry of another map meanwhile.
fn move_within(
    balances: &mut FxHashMap<(Owner, AssetId), Balance>,
    (owner, asset): (Owner, AssetId),
    (from, to): (Bucket, Bucket),
    amount: Amount,
    short: Rejection,
    postings: &mut Vec<Posting>,
    undo: &mut Vec<Undo>,
) -> Result<(), Rejection> {
    let key = (owner, asset);
    // An account that does not exist holds nothing, and `amount` is never zero here.
    let Some(balance) = balances.get_mut(&key) else {
        return Err(short);
    };
    let bucket = |balance: &Balance, bucket| match bucket {
        Bucket::Available => balance.available,
        Bucket::Held => balance.held,
        Bucket::External => unreachable!("external postings have no account"),
    };
    if bucket(balance, from) < amount {
        return Err(short);
    }
    match bucket(balance, to).checked_add(amount) {
        Some(sum) if sum <= limits::BALANCE_MAX => {}
        _ => return Err(Rejection::BalanceOverflow),
    }
    undo.push(Undo::Balance(key, *balance));
    for (bucket, delta) in [(from, -(amount as i128)), (to, amount as i128)] {
        balance.change(bucket, delta);
        postings.push(Posting {
            owner,
            asset,
            bucket,
            delta,
        });
    }
    Ok(())
}

/// A registered asset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asset {
    /// Symbol.
    pub symbol: String,
    /// Decimal places of the minor unit.
    pub decimals: u32,
    /// Everything deposited minus everything withdrawn: the sum of all balances.
    pub supply: Amount,
}

/// The ledger state.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    assets: BTreeMap<AssetId, Asset>,
    balances: FxHashMap<(Owner, AssetId), Balance>,
    holds: Holds,
    /// Per asset, the running sum of every account's available plus held, kept to check the
    /// supply invariant in constant time after each operation.
    totals: FxHashMap<AssetId, Amount>,
    /// Scratch space for the undo log of the operation in progress (empty between operations).
    undo: Vec<Undo>,
}

/// Live holds by id, in [`HOLD_SHARDS`] tables picked by the id's low bits. A hash table grows
/// all at once (a larger table, every entry moved), which with a million holds stalls one
/// operation for milliseconds; split in sixteen, each table grows on its own, a sixteenth of
/// the work at a time, and holds made one after the other land in turn in every table.
#[derive(Clone, Debug, Default)]
struct Holds([HashMap<HoldId, Hold, BuildHasherDefault<SequentialIds>>; HOLD_SHARDS]);

/// log2 of [`HOLD_SHARDS`].
const HOLD_SHARD_BITS: u32 = 4;
/// Tables of the hold index.
const HOLD_SHARDS: usize = 1 << HOLD_SHARD_BITS;

impl Holds {
    #[inline]
    fn table(&self, id: HoldId) -> &HashMap<HoldId, Hold, BuildHasherDefault<SequentialIds>> {
        &self.0[(id as usize) & (HOLD_SHARDS - 1)]
    }

    #[inline]
    fn table_mut(
        &mut self,
        id: HoldId,
    ) -> &mut HashMap<HoldId, Hold, BuildHasherDefault<SequentialIds>> {
        &mut self.0[(id as usize) & (HOLD_SHARDS - 1)]
    }

    #[inline]
    fn get(&self, id: &HoldId) -> Option<&Hold> {
        self.table(*id).get(id)
    }

    #[inline]
    fn insert(&mut self, id: HoldId, hold: Hold) -> Option<Hold> {
        self.table_mut(id).insert(id, hold)
    }

    #[inline]
    fn remove(&mut self, id: &HoldId) -> Option<Hold> {
        self.table_mut(*id).remove(id)
    }

    #[inline]
    fn entry(&mut self, id: HoldId) -> Entry<'_, HoldId, Hold> {
        self.table_mut(id).entry(id)
    }

    /// Makes room for `holds` more, as a restore does before adding them.
    fn reserve(&mut self, holds: usize) {
        // The core's ids run in sequence, so the tables share them evenly.
        for table in &mut self.0 {
            table.reserve(holds / HOLD_SHARDS + 16);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&HoldId, &Hold)> {
        self.0.iter().flat_map(HashMap::iter)
    }

    fn values(&self) -> impl Iterator<Item = &Hold> {
        self.0.iter().flat_map(HashMap::values)
    }
}

/// The hasher of the hold tables. Callers hand hold ids out in sequence, and an order's hold
/// is mostly touched again soon after it was made. So the hash keeps the id's bits above the
/// table-picking ones as they are (a table's bucket index comes from the hash's low bits: the
/// holds made one after the other sit in neighbouring buckets, in memory the cache already
/// holds) and mixes only the top seven (the tag a table compares before keys). Hold ids are
/// never chosen by users, so the absence of mixing offers nothing to an attacker.
#[derive(Clone, Copy, Debug, Default)]
struct SequentialIds(u64);

impl SequentialIds {
    /// The bits a table uses as a tag: the top seven of a 64-bit hash.
    const TAG: u64 = !0 << 57;
    const MIX: u64 = 0x9E37_79B9_7F4A_7C15;
}

impl Hasher for SequentialIds {
    #[inline]
    fn write_u64(&mut self, id: u64) {
        self.0 = ((id >> HOLD_SHARD_BITS) & !Self::TAG) ^ (id.wrapping_mul(Self::MIX) & Self::TAG);
    }

    /// Any other key shape (never a hold id): multiply and rotate, byte by byte.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(Self::MIX);
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// What an applied operation did, to undo it when a later operation of its batch is refused.
#[derive(Clone, Debug)]
enum Undo {
    Asset(AssetId),
    Balance((Owner, AssetId), Balance),
    Hold(HoldId, Option<Hold>),
    Supply(AssetId, Amount),
    Total(AssetId, Amount),
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Balances of an account in an asset (zero when it never moved).
    pub fn balance(&self, owner: Owner, asset: AssetId) -> Balance {
        self.balances
            .get(&(owner, asset))
            .copied()
            .unwrap_or_default()
    }

    /// A live hold.
    pub fn hold(&self, hold: HoldId) -> Option<Hold> {
        self.holds.get(&hold).copied()
    }

    /// Every live hold, in no particular order.
    pub fn holds(&self) -> impl Iterator<Item = (HoldId, &Hold)> {
        self.holds.iter().map(|(&id, hold)| (id, hold))
    }

    /// A registered asset.
    pub fn asset(&self, asset: AssetId) -> Option<&Asset> {
        self.assets.get(&asset)
    }

    /// Every registered asset, by id.
    pub fn assets(&self) -> impl Iterator<Item = (AssetId, &Asset)> {
        self.assets.iter().map(|(&id, asset)| (id, asset))
    }

    /// Applies one operation, appending its postings, or refuses it and changes nothing.
    pub fn apply(&mut self, op: &Op, postings: &mut Vec<Posting>) -> Result<(), Rejection> {
        let mut undo = std::mem::take(&mut self.undo);
        let start = postings.len();
        let result = match self.apply_inner(op, postings, &mut undo) {
            Ok(()) => {
                self.check_after(&postings[start..]);
                Ok(())
            }
            Err(reason) => {
                postings.truncate(start);
                self.rollback(&mut undo);
                Err(reason)
            }
        };
        undo.clear();
        self.undo = undo;
        result
    }

    /// Applies a batch whole, or refuses it (naming the first refused operation) and changes
    /// nothing.
    pub fn apply_batch(
        &mut self,
        ops: &[Op],
        postings: &mut Vec<Posting>,
    ) -> Result<(), BatchRejection> {
        if ops.is_empty() || ops.len() > limits::BATCH_OPS_MAX {
            return Err(BatchRejection {
                index: 0,
                reason: Rejection::InvalidBatch,
            });
        }
        let mut undo = std::mem::take(&mut self.undo);
        let start = postings.len();
        let mut result = Ok(());
        for (index, op) in ops.iter().enumerate() {
            let before = postings.len();
            if let Err(reason) = self.apply_inner(op, postings, &mut undo) {
                postings.truncate(start);
                self.rollback(&mut undo);
                result = Err(BatchRejection { index, reason });
                break;
            }
            self.check_after(&postings[before..]);
        }
        undo.clear();
        self.undo = undo;
        result
    }

    fn rollback(&mut self, undo: &mut Vec<Undo>) {
        for entry in undo.drain(..).rev() {
            match entry {
                Undo::Asset(asset) => {
                    self.assets.remove(&asset);
                    self.totals.remove(&asset);
                }
                Undo::Balance(key, balance) => {
                    if balance == Balance::default() {
                        self.balances.remove(&key);
                    } else {
                        self.balances.insert(key, balance);
                    }
                }
                Undo::Hold(id, hold) => match hold {
                    Some(hold) => {
                        self.holds.insert(id, hold);
                    }
                    None => {
                        self.holds.remove(&id);
                    }
                },
                Undo::Supply(asset, supply) => {
                    if let Some(entry) = self.assets.get_mut(&asset) {
                        entry.supply = supply;
                    }
                }
                Undo::Total(asset, total) => {
                    self.totals.insert(asset, total);
                }
            }
        }
    }

    fn known_asset(&self, asset: AssetId) -> Result<(), Rejection> {
        if self.assets.contains_key(&asset) {
            Ok(())
        } else {
            Err(Rejection::UnknownAsset)
        }
    }

    fn live_hold(&self, hold: HoldId, amount: Amount) -> Result<Hold, Rejection> {
        if amount == 0 {
            return Err(Rejection::ZeroAmount);
        }
        let found = self
            .holds
            .get(&hold)
            .copied()
            .ok_or(Rejection::UnknownHold)?;
        if amount > found.amount {
            return Err(Rejection::HoldExceeded);
        }
        Ok(found)
    }

    /// Changes one account's bucket by `delta`, recording the undo entry and the posting.
    fn post(
        &mut self,
        owner: Owner,
        asset: AssetId,
        bucket: Bucket,
        delta: i128,
        postings: &mut Vec<Posting>,
        undo: &mut Vec<Undo>,
    ) {
        let key = (owner, asset);
        let balance = self.balances.entry(key).or_default();
        undo.push(Undo::Balance(key, *balance));
        balance.change(bucket, delta);
        if *balance == Balance::default() {
            self.balances.remove(&key);
        }
        let total = self.totals.entry(asset).or_default();
        undo.push(Undo::Total(asset, *total));
        *total = total
            .checked_add_signed(delta)
            .expect("the sum of balances stays within range");
        postings.push(Posting {
            owner,
            asset,
            bucket,
            delta,
        });
    }

    /// Moves `amount` of `asset` from a bucket of one account to a bucket of another: the two
    /// balanced postings of every movement between accounts (`move_within` serves one account).
    fn shift(
        &mut self,
        asset: AssetId,
        from: (Owner, Bucket),
        to: (Owner, Bucket),
        amount: Amount,
        postings: &mut Vec<Posting>,
        undo: &mut Vec<Undo>,
    ) {
        debug_assert_ne!(
            from.0, to.0,
            "moves within one account go through move_within"
        );
        self.post(from.0, asset, from.1, -(amount as i128), postings, undo);
        self.post(to.0, asset, to.1, amount as i128, postings, undo);
    }

    /// Moves the asset's supply by an external flow (deposit or withdrawal); the matching
    /// account posting moves the running total.
    fn external(
        &mut self,
        owner: Owner,
        asset: AssetId,
        delta: i128,
        postings: &mut Vec<Posting>,
        undo: &mut Vec<Undo>,
    ) {
        let entry = self.assets.get_mut(&asset).expect("validated asset");
        undo.push(Undo::Supply(asset, entry.supply));
        entry.supply = entry
            .supply
            .checked_add_signed(delta)
            .expect("validated supply change");
        postings.push(Posting {
            owner,
            asset,
            bucket: Bucket::External,
            delta: -delta,
        });
    }

    fn room_for(
        &self,
        owner: Owner,
        asset: AssetId,
        bucket: Bucket,
        amount: Amount,
    ) -> Result<(), Rejection> {
        let balance = self.balance(owner, asset);
        let current = match bucket {
            Bucket::Available => balance.available,
            Bucket::Held => balance.held,
            Bucket::External => 0,
        };
        match current.checked_add(amount) {
            Some(sum) if sum <= limits::BALANCE_MAX => Ok(()),
            _ => Err(Rejection::BalanceOverflow),
        }
    }

    fn apply_inner(
        &mut self,
        op: &Op,
        postings: &mut Vec<Posting>,
        undo: &mut Vec<Undo>,
    ) -> Result<(), Rejection> {
        match *op {
            Op::CreateAsset {
                asset,
                ref symbol,
                decimals,
            } => {
                let symbol_ok = !symbol.is_empty()
                    && symbol.len() <= limits::ASSET_SYMBOL_BYTES_MAX
                    && symbol
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
                if !symbol_ok
                    || decimals > limits::ASSET_DECIMALS_MAX
                    || self.assets.len() >= limits::ASSETS_MAX
                {
                    return Err(Rejection::InvalidAsset);
                }
                if self.assets.contains_key(&asset)
                    || self.assets.values().any(|a| &a.symbol == symbol)
                {
                    return Err(Rejection::DuplicateAsset);
                }
                self.assets.insert(
                    asset,
                    Asset {
                        symbol: symbol.clone(),
                        decimals,
                        supply: 0,
                    },
                );
                self.totals.insert(asset, 0);
                undo.push(Undo::Asset(asset));
            }
            Op::Deposit {
                user,
                asset,
                amount,
            } => {
                self.known_asset(asset)?;
                if amount == 0 {
                    return Err(Rejection::ZeroAmount);
                }
                let owner = Owner::User(user);
                self.room_for(owner, asset, Bucket::Available, amount)?;
                let supply = self.assets[&asset].supply;
                if supply.checked_add(amount).is_none() {
                    return Err(Rejection::BalanceOverflow);
                }
                self.external(owner, asset, amount as i128, postings, undo);
                self.post(
                    owner,
                    asset,
                    Bucket::Available,
                    amount as i128,
                    postings,
                    undo,
                );
            }
            Op::Hold {
                hold,
                owner,
                asset,
                amount,
                kind,
            } => {
                self.known_asset(asset)?;
                if amount == 0 {
                    return Err(Rejection::ZeroAmount);
                }
                let Entry::Vacant(slot) = self.holds.entry(hold) else {
                    return Err(Rejection::DuplicateHold);
                };
                move_within(
                    &mut self.balances,
                    (owner, asset),
                    (Bucket::Available, Bucket::Held),
                    amount,
                    Rejection::InsufficientFunds,
                    postings,
                    undo,
                )?;
                undo.push(Undo::Hold(hold, None));
                slot.insert(Hold {
                    owner,
                    asset,
                    amount,
                    kind,
                });
            }
            Op::Extend { hold, amount } => {
                if amount == 0 {
                    return Err(Rejection::ZeroAmount);
                }
                let Entry::Occupied(mut slot) = self.holds.entry(hold) else {
                    return Err(Rejection::UnknownHold);
                };
                let found = *slot.get();
                move_within(
                    &mut self.balances,
                    (found.owner, found.asset),
                    (Bucket::Available, Bucket::Held),
                    amount,
                    Rejection::InsufficientFunds,
                    postings,
                    undo,
                )?;
                undo.push(Undo::Hold(hold, Some(found)));
                slot.get_mut().amount += amount;
            }
            Op::Release { hold, amount } => {
                // `live_hold`'s checks, in its order, on the one look-up of the hold.
                if amount == 0 {
                    return Err(Rejection::ZeroAmount);
                }
                let Entry::Occupied(mut slot) = self.holds.entry(hold) else {
                    return Err(Rejection::UnknownHold);
                };
                let found = *slot.get();
                if amount > found.amount {
                    return Err(Rejection::HoldExceeded);
                }
                // The owner's held balance covers every hold of theirs, this one included.
                move_within(
                    &mut self.balances,
                    (found.owner, found.asset),
                    (Bucket::Held, Bucket::Available),
                    amount,
                    Rejection::HoldExceeded,
                    postings,
                    undo,
                )?;
                undo.push(Undo::Hold(hold, Some(found)));
                if amount == found.amount {
                    slot.remove();
                } else {
                    slot.get_mut().amount -= amount;
                }
            }
            Op::Settle { hold, to, amount } => {
                let found = self.live_hold(hold, amount)?;
                if to == found.owner {
                    return Err(Rejection::SameAccount);
                }
                self.room_for(to, found.asset, Bucket::Available, amount)?;
                self.shift(
                    found.asset,
                    (found.owner, Bucket::Held),
                    (to, Bucket::Available),
                    amount,
                    postings,
                    undo,
                );
                self.shrink_hold(hold, found, amount, undo);
            }
            Op::Withdraw { hold, amount } => {
                let found = self.live_hold(hold, amount)?;
                if found.kind != HoldKind::Withdrawal {
                    return Err(Rejection::WrongHoldKind);
                }
                self.post(
                    found.owner,
                    found.asset,
                    Bucket::Held,
                    -(amount as i128),
                    postings,
                    undo,
                );
                self.external(found.owner, found.asset, -(amount as i128), postings, undo);
                self.shrink_hold(hold, found, amount, undo);
            }
            Op::Transfer {
                from,
                to,
                asset,
                amount,
            } => {
                self.known_asset(asset)?;
                if amount == 0 {
                    return Err(Rejection::ZeroAmount);
                }
                if from == to {
                    return Err(Rejection::SameAccount);
                }
                if self.balance(from, asset).available < amount {
                    return Err(Rejection::InsufficientFunds);
                }
                self.room_for(to, asset, Bucket::Available, amount)?;
                self.shift(
                    asset,
                    (from, Bucket::Available),
                    (to, Bucket::Available),
                    amount,
                    postings,
                    undo,
                );
            }
        }
        Ok(())
    }

    fn shrink_hold(&mut self, id: HoldId, hold: Hold, amount: Amount, undo: &mut Vec<Undo>) {
        undo.push(Undo::Hold(id, Some(hold)));
        let left = hold.amount - amount;
        if left == 0 {
            self.holds.remove(&id);
        } else {
            self.holds.insert(
                id,
                Hold {
                    amount: left,
                    ..hold
                },
            );
        }
    }

    /// The invariants that are cheap enough for every operation: its postings balance per
    /// asset, and each touched asset's running total equals its supply (a move within one
    /// account cannot change a total, so there it is not looked up again). Balances are unsigned,
    /// so "no negative balance" holds by construction (a negative result panics in `post`).
    fn check_after(&self, postings: &[Posting]) {
        // Every kind of operation moves one asset: one pass, one look-up. The scan below
        // stays for postings of several assets.
        if let Some(first) = postings.first()
            && postings.iter().all(|p| p.asset == first.asset)
        {
            let sum: i128 = postings.iter().map(|p| p.delta).sum();
            assert_eq!(sum, 0, "postings of asset {} do not balance", first.asset);
            // A move between two buckets of one account (a hold made, released or extended)
            // leaves the asset's total where the previous operation's check found it.
            let within_one_account = postings
                .iter()
                .all(|p| p.owner == first.owner && p.bucket != Bucket::External);
            if !within_one_account {
                self.check_total(first.asset);
            }
            return;
        }
        // An operation posts a handful of entries, so a quadratic scan beats a map here.
        for (index, posting) in postings.iter().enumerate() {
            let asset = posting.asset;
            if postings[..index].iter().any(|p| p.asset == asset) {
                continue;
            }
            let sum: i128 = postings[index..]
                .iter()
                .filter(|p| p.asset == asset)
                .map(|p| p.delta)
                .sum();
            assert_eq!(sum, 0, "postings of asset {asset} do not balance");
            self.check_total(asset);
        }
    }

    fn check_total(&self, asset: AssetId) {
        assert_eq!(
            self.totals.get(&asset).copied().unwrap_or(0),
            self.assets[&asset].supply,
            "asset {asset}: balances do not add up to deposits minus withdrawals"
        );
    }

    /// Recomputes every invariant from scratch: per asset, the sum of all balances equals the
    /// supply; every hold is covered by its owner's held balance; held balances equal the sum of
    /// their holds. Returns the first violation found.
    pub fn verify(&self) -> Result<(), String> {
        let mut sums: BTreeMap<AssetId, Amount> = BTreeMap::new();
        for (&(owner, asset), balance) in &self.balances {
            if !self.assets.contains_key(&asset) {
                return Err(format!("{owner:?} holds unknown asset {asset}"));
            }
            let sum = sums.entry(asset).or_default();
            *sum = balance
                .available
                .checked_add(balance.held)
                .and_then(|both| sum.checked_add(both))
                .ok_or_else(|| format!("asset {asset}: balances overflow at {owner:?}"))?;
        }
        for (&asset, entry) in &self.assets {
            let sum = sums.get(&asset).copied().unwrap_or(0);
            if sum != entry.supply {
                return Err(format!(
                    "asset {asset}: balances sum to {sum}, supply is {}",
                    entry.supply
                ));
            }
        }
        let mut held: BTreeMap<(Owner, AssetId), Amount> = BTreeMap::new();
        for hold in self.holds.values() {
            let sum = held.entry((hold.owner, hold.asset)).or_default();
            *sum = sum.checked_add(hold.amount).ok_or_else(|| {
                format!("{:?}: holds of asset {} overflow", hold.owner, hold.asset)
            })?;
        }
        for (&key, balance) in &self.balances {
            let by_holds = held.get(&key).copied().unwrap_or(0);
            if by_holds != balance.held {
                return Err(format!(
                    "{key:?}: held balance {} but holds add up to {by_holds}",
                    balance.held
                ));
            }
        }
        for (key, amount) in held {
            if !self.balances.contains_key(&key) && amount > 0 {
                return Err(format!("{key:?}: holds of {amount} with no held balance"));
            }
        }
        Ok(())
    }

    /// SHA-256 over every asset, balance and hold in a canonical order.
    pub fn state_hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for (asset, entry) in &self.assets {
            hasher.update(asset.to_le_bytes());
            hasher.update((entry.symbol.len() as u32).to_le_bytes());
            hasher.update(entry.symbol.as_bytes());
            hasher.update(entry.decimals.to_le_bytes());
            hasher.update(entry.supply.to_le_bytes());
        }
        let mut balances: Vec<_> = self.balances.iter().collect();
        balances.sort_unstable_by_key(|(key, _)| **key);
        for ((owner, asset), balance) in balances {
            hash_owner(&mut hasher, *owner);
            hasher.update(asset.to_le_bytes());
            hasher.update(balance.available.to_le_bytes());
            hasher.update(balance.held.to_le_bytes());
        }
        let mut holds: Vec<_> = self.holds.iter().collect();
        holds.sort_unstable_by_key(|(id, _)| **id);
        for (id, hold) in holds {
            hasher.update(id.to_le_bytes());
            hash_owner(&mut hasher, hold.owner);
            hasher.update(hold.asset.to_le_bytes());
            hasher.update(hold.amount.to_le_bytes());
            hasher.update([hold.kind as u8]);
        }
        hasher.finalize().into()
    }
}

fn hash_owner(hasher: &mut Sha256, owner: Owner) {
    match owner {
        Owner::User(user) => {
            hasher.update([0]);
            hasher.update(user.to_le_bytes());
        }
        Owner::Fees => hasher.update([1]),
    }
}

/// Why a ledger snapshot could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotError {
    /// Byte offset of the problem, or the length for a failed consistency check.
    pub offset: usize,
    /// What was wrong.
    pub problem: String,
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid ledger snapshot at byte {}: {}",
            self.offset, self.problem
        )
    }
}

impl std::error::Error for SnapshotError {}

const SNAPSHOT_MAGIC: &[u8; 4] = b"AGLG";
const SNAPSHOT_VERSION: u32 = 1;

fn put_owner(out: &mut Vec<u8>, owner: Owner) {
    match owner {
        Owner::User(user) => {
            out.push(0);
            out.extend_from_slice(&user.to_le_bytes());
        }
        Owner::Fees => out.push(1),
    }
}

impl Ledger {
    /// The whole ledger in a canonical binary form (sorted by key), to store as a snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.assets.len() as u64).to_le_bytes());
        for (asset, entry) in &self.assets {
            out.extend_from_slice(&asset.to_le_bytes());
            out.extend_from_slice(&(entry.symbol.len() as u32).to_le_bytes());
            out.extend_from_slice(entry.symbol.as_bytes());
            out.extend_from_slice(&entry.decimals.to_le_bytes());
            out.extend_from_slice(&entry.supply.to_le_bytes());
        }
        let mut balances: Vec<_> = self.balances.iter().collect();
        balances.sort_unstable_by_key(|(key, _)| **key);
        out.extend_from_slice(&(balances.len() as u64).to_le_bytes());
        for ((owner, asset), balance) in balances {
            put_owner(&mut out, *owner);
            out.extend_from_slice(&asset.to_le_bytes());
            out.extend_from_slice(&balance.available.to_le_bytes());
            out.extend_from_slice(&balance.held.to_le_bytes());
        }
        let mut holds: Vec<_> = self.holds.iter().collect();
        holds.sort_unstable_by_key(|(id, _)| **id);
        out.extend_from_slice(&(holds.len() as u64).to_le_bytes());
        for (id, hold) in holds {
            out.extend_from_slice(&id.to_le_bytes());
            put_owner(&mut out, hold.owner);
            out.extend_from_slice(&hold.asset.to_le_bytes());
            out.extend_from_slice(&hold.amount.to_le_bytes());
            out.push(hold.kind as u8);
        }
        out
    }

    /// Rebuilds a ledger from [`Ledger::snapshot`] bytes, checking every field and then every
    /// invariant ([`Ledger::verify`]).
    pub fn restore(bytes: &[u8]) -> Result<Ledger, SnapshotError> {
        let mut r = SnapshotReader { bytes, at: 0 };
        if r.take(4)? != SNAPSHOT_MAGIC {
            return Err(r.error("not a ledger snapshot"));
        }
        if r.u32()? != SNAPSHOT_VERSION {
            return Err(r.error("unsupported version"));
        }
        let mut ledger = Ledger::new();
        for _ in 0..r.count(limits::ASSETS_MAX)? {
            let asset = r.u32()?;
            let len = r.u32()? as usize;
            if len > limits::ASSET_SYMBOL_BYTES_MAX {
                return Err(r.error("symbol too long"));
            }
            let symbol = String::from_utf8(r.take(len)?.to_vec())
                .map_err(|_| r.error("symbol is not UTF-8"))?;
            let decimals = r.u32()?;
            if decimals > limits::ASSET_DECIMALS_MAX {
                return Err(r.error("too many decimals"));
            }
            let supply = r.u128()?;
            if ledger
                .assets
                .insert(
                    asset,
                    Asset {
                        symbol,
                        decimals,
                        supply,
                    },
                )
                .is_some()
            {
                return Err(r.error("duplicate asset"));
            }
            ledger.totals.insert(asset, 0);
        }
        let entries = r.count(usize::MAX)?;
        ledger
            .balances
            .reserve(entries.min(r.left() / BALANCE_BYTES_MIN));
        for _ in 0..entries {
            let owner = r.owner()?;
            let asset = r.u32()?;
            let balance = Balance {
                available: r.u128()?,
                held: r.u128()?,
            };
            let total = ledger
                .totals
                .get_mut(&asset)
                .ok_or_else(|| r.error("balance in an unknown asset"))?;
            *total = balance
                .available
                .checked_add(balance.held)
                .and_then(|sum| total.checked_add(sum))
                .ok_or_else(|| r.error("balances overflow"))?;
            if ledger.balances.insert((owner, asset), balance).is_some() {
                return Err(r.error("duplicate balance"));
            }
        }
        let holds = r.count(usize::MAX)?;
        // Room for as many holds as the bytes left can hold at most, so that a false count
        // cannot make the tables reserve more than the snapshot's size warrants.
        ledger.holds.reserve(holds.min(r.left() / HOLD_BYTES_MIN));
        for _ in 0..holds {
            let id = r.u64()?;
            let hold = Hold {
                owner: r.owner()?,
                asset: r.u32()?,
                amount: r.u128()?,
                kind: match r.u8()? {
                    0 => HoldKind::Order,
                    1 => HoldKind::Escrow,
                    2 => HoldKind::Withdrawal,
                    _ => return Err(r.error("bad hold kind")),
                },
            };
            if hold.amount == 0 {
                return Err(r.error("empty hold"));
            }
            if ledger.holds.insert(id, hold).is_some() {
                return Err(r.error("duplicate hold"));
            }
        }
        if r.at != bytes.len() {
            return Err(r.error("trailing bytes"));
        }
        ledger.verify().map_err(|problem| SnapshotError {
            offset: bytes.len(),
            problem,
        })?;
        Ok(ledger)
    }
}

struct SnapshotReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// The fewest bytes a balance entry of a ledger snapshot takes: owner (the fee account: one
/// byte), asset, available and held.
const BALANCE_BYTES_MIN: usize = 1 + 4 + 16 + 16;
/// The fewest bytes a hold of a ledger snapshot takes: id, owner, asset, amount and kind.
const HOLD_BYTES_MIN: usize = 8 + 1 + 4 + 16 + 1;

impl<'a> SnapshotReader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn error(&self, problem: &str) -> SnapshotError {
        SnapshotError {
            offset: self.at,
            problem: problem.to_string(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.error("truncated"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn u128(&mut self) -> Result<u128, SnapshotError> {
        Ok(u128::from_le_bytes(self.array()?))
    }
    /// A count of entries, each at least one byte, so a count beyond the bytes left is
    /// refused before anything is allocated for it.
    fn count(&mut self, max: usize) -> Result<usize, SnapshotError> {
        let count = self.u64()?;
        if count > self.left() as u64 || count > max as u64 {
            return Err(self.error("count larger than the snapshot"));
        }
        Ok(count as usize)
    }
    fn owner(&mut self) -> Result<Owner, SnapshotError> {
        match self.u8()? {
            0 => Ok(Owner::User(self.u64()?)),
            1 => Ok(Owner::Fees),
            _ => Err(self.error("bad owner")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, BuildHasherDefault};

    use super::{
        BALANCE_BYTES_MIN, HOLD_BYTES_MIN, HOLD_SHARDS, HoldId, HoldKind, Ledger, Op, Owner,
        SequentialIds,
    };

    /// A user's balance entry and hold take the fewest bytes plus the user id the fee
    /// account's would not carry: the bounds a restore reserves by are never above the truth.
    #[test]
    fn snapshot_entries_take_at_least_their_minimum() {
        let mut ledger = Ledger::new();
        let mut postings = Vec::new();
        let ops = [
            Op::CreateAsset {
                asset: 1,
                symbol: "USD".into(),
                decimals: 2,
            },
            Op::Deposit {
                user: 7,
                asset: 1,
                amount: 100,
            },
        ];
        ledger.apply(&ops[0], &mut postings).unwrap();
        let before = ledger.snapshot().len();
        ledger.apply(&ops[1], &mut postings).unwrap();
        let with_balance = ledger.snapshot().len();
        assert_eq!(with_balance - before, BALANCE_BYTES_MIN + 8);
        let hold = Op::Hold {
            hold: 1,
            owner: Owner::User(7),
            asset: 1,
            amount: 10,
            kind: HoldKind::Order,
        };
        ledger.apply(&hold, &mut postings).unwrap();
        assert_eq!(ledger.snapshot().len() - with_balance, HOLD_BYTES_MIN + 8);
    }

    /// Hold ids that follow each other in one table keep consecutive low bits (the table's
    /// bucket index), while the top seven bits (the tag compared before keys) still differ
    /// from id to id.
    #[test]
    fn hold_ids_keep_their_neighbours_and_get_mixed_tags() {
        let hasher = BuildHasherDefault::<SequentialIds>::default();
        let hash = |id: HoldId| hasher.hash_one(id);
        let low = |h: u64| h & ((1 << 57) - 1);
        for id in [1_u64, 1_000, 1 << 40] {
            assert_eq!(low(hash(id + HOLD_SHARDS as u64)), low(hash(id)) + 1);
        }
        let tags: std::collections::BTreeSet<u64> = (1..=64).map(|id| hash(id) >> 57).collect();
        assert!(tags.len() > 32, "only {} distinct tags", tags.len());
    }
}
