//! Market configuration: tick, lot, size and price limits, settlement and matching options.

use crate::limits;
use crate::types::{Qty, SelfTradePrevention, Settlement, Timestamp};

/// Milliseconds in a day, for DAY orders and daily candles.
pub const DAY_MS: i64 = 86_400_000;

/// Everything that defines a market. Only `symbol`, `tick` and `lot` are required; every other
/// field defaults to "no limit" or the documented default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarketSpec {
    /// `BASE-QUOTE`, for example `BTC-USDT`.
    pub symbol: String,
    /// Decimal places of one price unit; prices are integers in units of `10^-price_decimals`.
    pub price_decimals: u32,
    /// Decimal places of one quantity unit.
    pub qty_decimals: u32,
    /// Tick size in price units (at least 1): every price is a multiple of it.
    pub tick: i64,
    /// Lot size in quantity units (at least 1): every quantity is a multiple of it.
    pub lot: u64,
    /// Smallest order quantity, in quantity units.
    pub min_qty: Option<Qty>,
    /// Largest order quantity, in quantity units.
    pub max_qty: Option<Qty>,
    /// Smallest price times quantity, in units of `10^-(price_decimals + qty_decimals)`.
    pub min_notional: Option<u128>,
    /// Largest distance of a limit price from the last trade price, in basis points of the last
    /// trade price. Not checked before the market's first trade.
    pub price_band_bps: Option<u32>,
    /// How trades settle.
    pub settlement: Settlement,
    /// Self-trade prevention for orders that do not choose one.
    pub default_stp: SelfTradePrevention,
    /// DAY orders expire at this many milliseconds after midnight UTC (the daily cutoff).
    pub day_cutoff_ms: i64,
    /// Ascending reputation thresholds. When not empty, within a price level orders rank first by
    /// tier (the number of thresholds their reputation reaches, higher first), then by time.
    pub reputation_tiers: Vec<u32>,
    /// Payment method names orders may list; an order's set is a bitset over this list, so the
    /// position of a name is its bit. Empty: orders cannot restrict payment methods.
    pub payment_methods: Vec<String>,
}

impl MarketSpec {
    /// A market with the given symbol, decimals, tick and lot and no other limit.
    pub fn new(
        symbol: impl Into<String>,
        price_decimals: u32,
        qty_decimals: u32,
        tick: i64,
        lot: u64,
    ) -> MarketSpec {
        MarketSpec {
            symbol: symbol.into(),
            price_decimals,
            qty_decimals,
            tick,
            lot,
            min_qty: None,
            max_qty: None,
            min_notional: None,
            price_band_bps: None,
            settlement: Settlement::Instant,
            default_stp: SelfTradePrevention::CancelNewest,
            day_cutoff_ms: 0,
            reputation_tiers: Vec::new(),
            payment_methods: Vec::new(),
        }
    }

    /// Checks the specification, naming the first field that breaks a rule.
    pub fn validate(&self) -> Result<(), MarketSpecError> {
        let err = |field: &'static str, rule: &'static str| Err(MarketSpecError { field, rule });
        let symbol_ok = self.symbol.len() <= limits::SYMBOL_BYTES_MAX
            && self.symbol.split_once('-').is_some_and(|(base, quote)| {
                let part_ok = |part: &str| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                };
                part_ok(base) && part_ok(quote) && base != quote
            });
        if !symbol_ok {
            return err(
                "market",
                "symbol must be BASE-QUOTE in upper-case letters and digits, two different assets, at most 32 bytes",
            );
        }
        if self.price_decimals > limits::DECIMALS_MAX {
            return err("tick", "at most 12 decimal places");
        }
        if self.qty_decimals > limits::DECIMALS_MAX {
            return err("lot", "at most 12 decimal places");
        }
        if self.tick < 1 {
            return err("tick", "must be positive");
        }
        if self.lot < 1 {
            return err("lot", "must be positive");
        }
        if let Some(min) = self.min_qty
            && (min.0 == 0 || !min.0.is_multiple_of(self.lot))
        {
            return err("min_qty", "must be a positive multiple of the lot");
        }
        if let Some(max) = self.max_qty {
            if max.0 == 0 || !max.0.is_multiple_of(self.lot) {
                return err("max_qty", "must be a positive multiple of the lot");
            }
            if self.min_qty.is_some_and(|min| min > max) {
                return err("max_qty", "must not be below min_qty");
            }
        }
        if self.min_notional == Some(0) {
            return err("min_notional", "must be positive");
        }
        if self.price_band_bps == Some(0) {
            return err("price_band_bps", "must be positive");
        }
        if !(0..DAY_MS).contains(&self.day_cutoff_ms) {
            return err("day_cutoff", "must be within one day (0 to 86399999 ms)");
        }
        if self.reputation_tiers.len() > limits::REPUTATION_TIERS_MAX {
            return err("reputation_tiers", "at most 16 thresholds");
        }
        if self.reputation_tiers.windows(2).any(|w| w[0] >= w[1]) {
            return err("reputation_tiers", "thresholds must be strictly ascending");
        }
        if self.payment_methods.len() > limits::PAYMENT_METHODS_PER_MARKET_MAX {
            return err("payment_methods", "at most 64 names");
        }
        for (i, name) in self.payment_methods.iter().enumerate() {
            let name_ok = !name.is_empty()
                && name.len() <= limits::PAYMENT_METHOD_BYTES_MAX
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return err(
                    "payment_methods",
                    "names are 1 to 32 ASCII letters, digits, '_' or '-'",
                );
            }
            if self.payment_methods[..i].contains(name) {
                return err("payment_methods", "names must be distinct");
            }
        }
        Ok(())
    }

    /// The bitset of the named payment methods, or `None` when a name is not listed.
    pub fn payment_method_set<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Option<crate::PaymentMethods> {
        let mut bits = 0u64;
        for name in names {
            let position = self.payment_methods.iter().position(|m| m == name)?;
            bits |= 1 << position;
        }
        Some(crate::PaymentMethods(bits))
    }

    /// Whether an order may carry this payment method set.
    pub(crate) fn payment_methods_ok(&self, set: crate::PaymentMethods) -> bool {
        if set == crate::PaymentMethods::ANY {
            return true;
        }
        let known = self.payment_methods.len();
        set.0 != 0 && (known == 64 || set.0 >> known == 0)
    }

    /// The reputation tier of a user: how many thresholds their reputation reaches.
    pub(crate) fn tier_of(&self, reputation: u32) -> u8 {
        // At most 16 thresholds, so a linear count is as fast as a search and fits in u8.
        self.reputation_tiers
            .iter()
            .filter(|&&threshold| reputation >= threshold)
            .count() as u8
    }

    /// When a DAY order placed at `now` expires: the first daily cutoff strictly after `now`.
    pub(crate) fn next_cutoff(&self, now: Timestamp) -> Timestamp {
        let since_cutoff = (now - self.day_cutoff_ms).rem_euclid(DAY_MS);
        // Near the end of time the cutoff saturates to "never".
        (now - since_cutoff).saturating_add(DAY_MS)
    }
}

/// A market specification that breaks a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarketSpecError {
    /// The offending field, as named in the replay format.
    pub field: &'static str,
    /// The rule it breaks.
    pub rule: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_cutoff_is_strictly_after_now() {
        let mut spec = MarketSpec::new("BTC-USDT", 2, 4, 1, 1);
        assert_eq!(spec.next_cutoff(0), DAY_MS);
        assert_eq!(spec.next_cutoff(DAY_MS - 1), DAY_MS);
        assert_eq!(spec.next_cutoff(DAY_MS), 2 * DAY_MS);
        spec.day_cutoff_ms = 3_600_000;
        assert_eq!(spec.next_cutoff(0), 3_600_000);
        assert_eq!(spec.next_cutoff(3_600_000), 3_600_000 + DAY_MS);
        assert_eq!(spec.next_cutoff(-1), 3_600_000);
    }

    #[test]
    fn validation_names_the_field() {
        let mut spec = MarketSpec::new("BTC-USDT", 2, 4, 1, 1);
        assert!(spec.validate().is_ok());
        spec.symbol = "btc".into();
        assert_eq!(spec.validate().unwrap_err().field, "market");
        spec.symbol = "BTC-BTC".into();
        assert_eq!(spec.validate().unwrap_err().field, "market");
        spec.symbol = "BTC-USDT".into();
        spec.reputation_tiers = vec![5, 5];
        assert_eq!(spec.validate().unwrap_err().field, "reputation_tiers");
    }
}
