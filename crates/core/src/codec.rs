//! The journal's binary encoding of [`CoreCommand`]s: compact, versioned by a tag per command,
//! little-endian, and checked on the way back in (every read is bounds-checked, every enum
//! value and flag validated, so damaged bytes give an error with their offset, never a panic).

use book::{
    MarketId, MarketSpec, ModifyOrder, OrderType, PaymentMethods, PlaceOrder, Price, Qty,
    SelfTradePrevention, Settlement, Side, TimeInForce,
};

use crate::CoreCommand;

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Byte offset of the problem.
    pub offset: usize,
    /// What was wrong.
    pub problem: &'static str,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "undecodable command at byte {}: {}",
            self.offset, self.problem
        )
    }
}

impl std::error::Error for DecodeError {}

/// Longest string the codec accepts (symbols, payment method names).
const STRING_BYTES_MAX: usize = 256;
/// Most list items (tiers, payment methods) the codec accepts.
const LIST_ITEMS_MAX: usize = 64;

mod tag {
    pub const CREATE_ASSET: u8 = 1;
    pub const CREATE_MARKET: u8 = 2;
    pub const DEPOSIT: u8 = 3;
    pub const REQUEST_WITHDRAWAL: u8 = 4;
    pub const COMPLETE_WITHDRAWAL: u8 = 5;
    pub const CANCEL_WITHDRAWAL: u8 = 6;
    pub const SET_REPUTATION: u8 = 7;
    pub const PLACE: u8 = 8;
    pub const CANCEL: u8 = 9;
    pub const MODIFY: u8 = 10;
    pub const CANCEL_ALL: u8 = 11;
    pub const ADVANCE_TIME: u8 = 12;
    /// A withdrawal request with its destination; tag 4 (without one) is still read.
    pub const REQUEST_WITHDRAWAL_TO: u8 = 13;
    // 14 to 19 are left for withdrawal and settlement commands.
    pub const HALT_MARKET: u8 = 20;
    pub const RESUME_MARKET: u8 = 21;
    pub const SET_MARKET_FEES: u8 = 22;
}

/// Appends the encoding of `command` to `out`.
pub fn encode(command: &CoreCommand, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    match command {
        CoreCommand::CreateAsset {
            asset,
            symbol,
            decimals,
        } => {
            w.u8(tag::CREATE_ASSET);
            w.u32(*asset);
            w.str(symbol);
            w.u32(*decimals);
        }
        CoreCommand::CreateMarket {
            spec,
            base,
            quote,
            maker_fee_bps,
            taker_fee_bps,
        } => {
            w.u8(tag::CREATE_MARKET);
            w.str(&spec.symbol);
            w.u32(spec.price_decimals);
            w.u32(spec.qty_decimals);
            w.i64(spec.tick);
            w.u64(spec.lot);
            w.opt_u64(spec.min_qty.map(|q| q.0));
            w.opt_u64(spec.max_qty.map(|q| q.0));
            w.opt_u128(spec.min_notional);
            w.opt_u64(spec.price_band_bps.map(u64::from));
            w.u8(match spec.settlement {
                Settlement::Instant => 0,
                Settlement::Escrow => 1,
            });
            w.u8(spec.default_stp as u8);
            w.i64(spec.day_cutoff_ms);
            w.u32(spec.reputation_tiers.len() as u32);
            for tier in &spec.reputation_tiers {
                w.u32(*tier);
            }
            w.u32(spec.payment_methods.len() as u32);
            for name in &spec.payment_methods {
                w.str(name);
            }
            w.u32(*base);
            w.u32(*quote);
            w.u32(*maker_fee_bps);
            w.u32(*taker_fee_bps);
        }
        CoreCommand::Deposit {
            user,
            asset,
            amount,
        } => {
            w.u8(tag::DEPOSIT);
            w.u64(*user);
            w.u32(*asset);
            w.u128(*amount);
        }
        CoreCommand::RequestWithdrawal {
            id,
            user,
            asset,
            amount,
            destination,
        } => {
            // Without a destination, the older tag: every command encodes back to the bytes
            // it was read from, so the audit chain's digests of old journals still match.
            let with_destination = !destination.is_empty();
            w.u8(if with_destination {
                tag::REQUEST_WITHDRAWAL_TO
            } else {
                tag::REQUEST_WITHDRAWAL
            });
            w.u64(*id);
            w.u64(*user);
            w.u32(*asset);
            w.u128(*amount);
            if with_destination {
                w.str(destination);
            }
        }
        CoreCommand::CompleteWithdrawal { id } => {
            w.u8(tag::COMPLETE_WITHDRAWAL);
            w.u64(*id);
        }
        CoreCommand::CancelWithdrawal { id } => {
            w.u8(tag::CANCEL_WITHDRAWAL);
            w.u64(*id);
        }
        CoreCommand::SetReputation { user, reputation } => {
            w.u8(tag::SET_REPUTATION);
            w.u64(*user);
            w.u32(*reputation);
        }
        CoreCommand::Place(place) => {
            w.u8(tag::PLACE);
            w.u32(place.market.0);
            w.u64(place.id);
            w.u64(place.user);
            w.u8(place.side as u8);
            w.u8(place.order_type as u8);
            w.opt_i64(place.price.map(|p| p.0));
            w.opt_i64(place.stop_price.map(|p| p.0));
            w.u64(place.qty.0);
            w.u8(place.tif as u8);
            w.u8(u8::from(place.post_only));
            w.opt_i64(place.expire_at);
            w.u64(place.payment_methods.0);
            w.u32(place.min_reputation);
            w.u32(place.reputation);
            w.opt_u64(place.min_fill.map(|q| q.0));
            w.opt_u64(place.max_fill.map(|q| q.0));
            match place.stp {
                Some(stp) => w.u8(1 + stp as u8),
                None => w.u8(0),
            }
        }
        CoreCommand::Cancel { market, id, user } => {
            w.u8(tag::CANCEL);
            w.u32(market.0);
            w.u64(*id);
            w.u64(*user);
        }
        CoreCommand::Modify(modify) => {
            w.u8(tag::MODIFY);
            w.u32(modify.market.0);
            w.u64(modify.id);
            w.u64(modify.user);
            w.opt_i64(modify.price.map(|p| p.0));
            w.opt_u64(modify.qty.map(|q| q.0));
        }
        CoreCommand::CancelAll { market, user } => {
            w.u8(tag::CANCEL_ALL);
            w.opt_u64(market.map(|m| u64::from(m.0)));
            w.opt_u64(*user);
        }
        CoreCommand::AdvanceTime { now } => {
            w.u8(tag::ADVANCE_TIME);
            w.i64(*now);
        }
        CoreCommand::HaltMarket { market } => {
            w.u8(tag::HALT_MARKET);
            w.u32(market.0);
        }
        CoreCommand::ResumeMarket { market } => {
            w.u8(tag::RESUME_MARKET);
            w.u32(market.0);
        }
        CoreCommand::SetMarketFees {
            market,
            maker_fee_bps,
            taker_fee_bps,
        } => {
            w.u8(tag::SET_MARKET_FEES);
            w.u32(market.0);
            w.u32(*maker_fee_bps);
            w.u32(*taker_fee_bps);
        }
    }
}

/// Decodes every command in `bytes`, which must hold whole commands only.
pub fn decode_all(bytes: &[u8]) -> Result<Vec<CoreCommand>, DecodeError> {
    decode_each(bytes).collect()
}

/// Decodes the commands in `bytes` one at a time, without collecting them; the first error
/// ends the iteration.
pub fn decode_each(bytes: &[u8]) -> impl Iterator<Item = Result<CoreCommand, DecodeError>> + '_ {
    let mut reader = Reader { bytes, at: 0 };
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || reader.at >= reader.bytes.len() {
            return None;
        }
        let next = reader.command();
        failed = next.is_err();
        Some(next)
    })
}

pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
            None => self.u8(0),
        }
    }
    pub(crate) fn opt_i64(&mut self, v: Option<i64>) {
        self.opt_u64(v.map(|v| v as u64));
    }
    pub(crate) fn opt_u128(&mut self, v: Option<u128>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u128(v);
            }
            None => self.u8(0),
        }
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) at: usize,
}

const SIDES: [Side; 2] = [Side::Buy, Side::Sell];
const TYPES: [OrderType; 6] = [
    OrderType::Limit,
    OrderType::Market,
    OrderType::StopMarket,
    OrderType::StopLimit,
    OrderType::TakeProfitMarket,
    OrderType::TakeProfitLimit,
];
const TIFS: [TimeInForce; 5] = [
    TimeInForce::Gtc,
    TimeInForce::Ioc,
    TimeInForce::Fok,
    TimeInForce::Day,
    TimeInForce::Gtd,
];
const STPS: [SelfTradePrevention; 4] = [
    SelfTradePrevention::CancelNewest,
    SelfTradePrevention::CancelOldest,
    SelfTradePrevention::CancelBoth,
    SelfTradePrevention::Decrement,
];

impl<'a> Reader<'a> {
    pub(crate) fn error(&self, problem: &'static str) -> DecodeError {
        DecodeError {
            offset: self.at,
            problem,
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.error("truncated"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(crate) fn u128(&mut self) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.array()?))
    }
    pub(crate) fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.error("bad flag")),
        }
    }
    pub(crate) fn opt_u64(&mut self) -> Result<Option<u64>, DecodeError> {
        Ok(if self.flag()? {
            Some(self.u64()?)
        } else {
            None
        })
    }
    pub(crate) fn opt_i64(&mut self) -> Result<Option<i64>, DecodeError> {
        Ok(self.opt_u64()?.map(|v| v as i64))
    }
    pub(crate) fn opt_u128(&mut self) -> Result<Option<u128>, DecodeError> {
        Ok(if self.flag()? {
            Some(self.u128()?)
        } else {
            None
        })
    }
    pub(crate) fn str(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > STRING_BYTES_MAX {
            return Err(self.error("string too long"));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("string is not UTF-8"))
    }
    pub(crate) fn list_len(&mut self) -> Result<usize, DecodeError> {
        let len = self.u32()? as usize;
        if len > LIST_ITEMS_MAX {
            return Err(self.error("list too long"));
        }
        Ok(len)
    }
    pub(crate) fn pick<T: Copy>(
        &mut self,
        table: &[T],
        what: &'static str,
    ) -> Result<T, DecodeError> {
        let code = self.u8()?;
        table
            .get(usize::from(code))
            .copied()
            .ok_or_else(|| self.error(what))
    }

    fn command(&mut self) -> Result<CoreCommand, DecodeError> {
        let start = self.at;
        let command = match self.u8()? {
            tag::CREATE_ASSET => CoreCommand::CreateAsset {
                asset: self.u32()?,
                symbol: self.str()?,
                decimals: self.u32()?,
            },
            tag::CREATE_MARKET => {
                let symbol = self.str()?;
                let price_decimals = self.u32()?;
                let qty_decimals = self.u32()?;
                let tick = self.i64()?;
                let lot = self.u64()?;
                let mut spec = MarketSpec::new(symbol, price_decimals, qty_decimals, tick, lot);
                spec.min_qty = self.opt_u64()?.map(Qty);
                spec.max_qty = self.opt_u64()?.map(Qty);
                spec.min_notional = self.opt_u128()?;
                spec.price_band_bps = match self.opt_u64()? {
                    None => None,
                    Some(band) => Some(
                        u32::try_from(band).map_err(|_| self.error("price band out of range"))?,
                    ),
                };
                spec.settlement =
                    self.pick(&[Settlement::Instant, Settlement::Escrow], "bad settlement")?;
                spec.default_stp = self.pick(&STPS, "bad self-trade mode")?;
                spec.day_cutoff_ms = self.i64()?;
                for _ in 0..self.list_len()? {
                    spec.reputation_tiers.push(self.u32()?);
                }
                for _ in 0..self.list_len()? {
                    spec.payment_methods.push(self.str()?);
                }
                CoreCommand::CreateMarket {
                    spec,
                    base: self.u32()?,
                    quote: self.u32()?,
                    maker_fee_bps: self.u32()?,
                    taker_fee_bps: self.u32()?,
                }
            }
            tag::DEPOSIT => CoreCommand::Deposit {
                user: self.u64()?,
                asset: self.u32()?,
                amount: self.u128()?,
            },
            tag::REQUEST_WITHDRAWAL => CoreCommand::RequestWithdrawal {
                id: self.u64()?,
                user: self.u64()?,
                asset: self.u32()?,
                amount: self.u128()?,
                destination: String::new(),
            },
            tag::REQUEST_WITHDRAWAL_TO => CoreCommand::RequestWithdrawal {
                id: self.u64()?,
                user: self.u64()?,
                asset: self.u32()?,
                amount: self.u128()?,
                destination: self.str()?,
            },
            tag::COMPLETE_WITHDRAWAL => CoreCommand::CompleteWithdrawal { id: self.u64()? },
            tag::CANCEL_WITHDRAWAL => CoreCommand::CancelWithdrawal { id: self.u64()? },
            tag::SET_REPUTATION => CoreCommand::SetReputation {
                user: self.u64()?,
                reputation: self.u32()?,
            },
            tag::PLACE => CoreCommand::Place(PlaceOrder {
                market: MarketId(self.u32()?),
                id: self.u64()?,
                user: self.u64()?,
                side: self.pick(&SIDES, "bad side")?,
                order_type: self.pick(&TYPES, "bad order type")?,
                price: self.opt_i64()?.map(Price),
                stop_price: self.opt_i64()?.map(Price),
                qty: Qty(self.u64()?),
                tif: self.pick(&TIFS, "bad time in force")?,
                post_only: self.flag()?,
                expire_at: self.opt_i64()?,
                payment_methods: PaymentMethods(self.u64()?),
                min_reputation: self.u32()?,
                reputation: self.u32()?,
                min_fill: self.opt_u64()?.map(Qty),
                max_fill: self.opt_u64()?.map(Qty),
                stp: match self.u8()? {
                    0 => None,
                    code => Some(
                        *STPS
                            .get(usize::from(code - 1))
                            .ok_or_else(|| self.error("bad self-trade mode"))?,
                    ),
                },
            }),
            tag::CANCEL => CoreCommand::Cancel {
                market: MarketId(self.u32()?),
                id: self.u64()?,
                user: self.u64()?,
            },
            tag::MODIFY => CoreCommand::Modify(ModifyOrder {
                market: MarketId(self.u32()?),
                id: self.u64()?,
                user: self.u64()?,
                price: self.opt_i64()?.map(Price),
                qty: self.opt_u64()?.map(Qty),
            }),
            tag::CANCEL_ALL => CoreCommand::CancelAll {
                market: match self.opt_u64()? {
                    None => None,
                    Some(m) => Some(MarketId(
                        u32::try_from(m).map_err(|_| self.error("market out of range"))?,
                    )),
                },
                user: self.opt_u64()?,
            },
            tag::ADVANCE_TIME => CoreCommand::AdvanceTime { now: self.i64()? },
            tag::HALT_MARKET => CoreCommand::HaltMarket {
                market: MarketId(self.u32()?),
            },
            tag::RESUME_MARKET => CoreCommand::ResumeMarket {
                market: MarketId(self.u32()?),
            },
            tag::SET_MARKET_FEES => CoreCommand::SetMarketFees {
                market: MarketId(self.u32()?),
                maker_fee_bps: self.u32()?,
                taker_fee_bps: self.u32()?,
            },
            _ => {
                self.at = start;
                return Err(self.error("unknown command tag"));
            }
        };
        Ok(command)
    }
}
