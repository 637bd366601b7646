//! The API's wire formats: decimal strings at the edge, integers inside. Every conversion
//! names the field it reads, so a bad value is reported against it.

use std::str::FromStr;

use book::{MarketSpec, OrderType, Price, Qty, SelfTradePrevention, Side, TimeInForce};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// Longest decimal string accepted.
pub const DECIMAL_CHARS_MAX: usize = 40;

/// Parses a plain decimal string: digits with at most one point, no sign, no exponent.
pub fn decimal(field: &str, text: &str) -> Result<Decimal, ApiError> {
    let plain = !text.is_empty()
        && text.len() <= DECIMAL_CHARS_MAX
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1
        && text.bytes().any(|b| b.is_ascii_digit());
    // `Decimal::from_str` keeps the places written (trailing zeros too) and rounds away
    // those it cannot hold (more than 28, or more digits than its 96 bits): a value with
    // fewer places than the text was rounded.
    let places = text
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.len());
    plain
        .then(|| Decimal::from_str(text).ok())
        .flatten()
        .filter(|value| value.scale() as usize == places)
        .ok_or_else(|| {
            ApiError::invalid(
                "INVALID_DECIMAL",
                field,
                format!(
                    "{field} must be a non-negative decimal string such as \"12.5\", not {text:?}"
                ),
            )
        })
}

/// A decimal as a count of `10^-decimals` units; `None` when it has more places or does not
/// fit.
pub fn to_units(value: Decimal, decimals: u32) -> Option<u128> {
    let value = value.normalize();
    if value.scale() > decimals {
        return None;
    }
    let factor = 10i128.checked_pow(decimals - value.scale())?;
    value
        .mantissa()
        .checked_mul(factor)
        .and_then(|units| u128::try_from(units).ok())
}

/// Units back to a decimal string.
pub fn from_units(units: u128, decimals: u32) -> String {
    match i128::try_from(units)
        .ok()
        .and_then(|units| Decimal::try_from_i128_with_scale(units, decimals).ok())
    {
        Some(value) => value.to_string(),
        // Beyond 96 bits only; written as integer units with their exponent.
        None => format!("{units}e-{decimals}"),
    }
}

/// An amount of an asset with `decimals` places.
pub fn amount(field: &str, text: &str, decimals: u32) -> Result<u128, ApiError> {
    let value = decimal(field, text)?;
    to_units(value, decimals).ok_or_else(|| {
        ApiError::invalid(
            "INVALID_AMOUNT",
            field,
            format!("{field} has more than {decimals} decimal places or is too large"),
        )
    })
}

/// A price of a market.
pub fn price(spec: &MarketSpec, field: &str, text: &str) -> Result<Price, ApiError> {
    let value = decimal(field, text)?;
    let units = to_units(value, spec.price_decimals).ok_or_else(|| {
        ApiError::invalid(
            "BAD_TICK",
            field,
            format!(
                "{field} has more than {} decimal places",
                spec.price_decimals
            ),
        )
    })?;
    i64::try_from(units)
        .map(Price)
        .map_err(|_| ApiError::invalid("INVALID_PRICE", field, format!("{field} is too large")))
}

/// A quantity of a market.
pub fn qty(spec: &MarketSpec, field: &str, text: &str) -> Result<Qty, ApiError> {
    let value = decimal(field, text)?;
    let units = to_units(value, spec.qty_decimals).ok_or_else(|| {
        ApiError::invalid(
            "BAD_LOT",
            field,
            format!("{field} has more than {} decimal places", spec.qty_decimals),
        )
    })?;
    u64::try_from(units)
        .map(Qty)
        .map_err(|_| ApiError::invalid("INVALID_QUANTITY", field, format!("{field} is too large")))
}

/// A market's price as text.
pub fn price_text(spec: &MarketSpec, price: Price) -> String {
    from_units(price.0.max(0) as u128, spec.price_decimals)
}

/// A market's quantity as text.
pub fn qty_text(spec: &MarketSpec, qty: Qty) -> String {
    from_units(u128::from(qty.0), spec.qty_decimals)
}

/// Buy or sell.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SideName {
    /// Buy the base asset.
    Buy,
    /// Sell the base asset.
    Sell,
}

impl From<SideName> for Side {
    fn from(side: SideName) -> Side {
        match side {
            SideName::Buy => Side::Buy,
            SideName::Sell => Side::Sell,
        }
    }
}

/// Order types.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderTypeName {
    /// At a limit price or better.
    #[default]
    Limit,
    /// At the best prices available, within a protection price.
    Market,
    /// A market order armed until the last price reaches `stop_price`.
    StopMarket,
    /// A limit order armed until the last price reaches `stop_price`.
    StopLimit,
    /// A market order armed until the price moves in its favour to `stop_price`.
    TakeProfitMarket,
    /// A limit order armed until the price moves in its favour to `stop_price`.
    TakeProfitLimit,
}

impl From<OrderTypeName> for OrderType {
    fn from(name: OrderTypeName) -> OrderType {
        match name {
            OrderTypeName::Limit => OrderType::Limit,
            OrderTypeName::Market => OrderType::Market,
            OrderTypeName::StopMarket => OrderType::StopMarket,
            OrderTypeName::StopLimit => OrderType::StopLimit,
            OrderTypeName::TakeProfitMarket => OrderType::TakeProfitMarket,
            OrderTypeName::TakeProfitLimit => OrderType::TakeProfitLimit,
        }
    }
}

/// Time in force.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema)]
pub enum TifName {
    /// Good till cancelled.
    #[serde(rename = "GTC")]
    Gtc,
    /// Immediate or cancel.
    #[serde(rename = "IOC")]
    Ioc,
    /// Fill or kill.
    #[serde(rename = "FOK")]
    Fok,
    /// Until the market's daily cut-off.
    #[serde(rename = "DAY")]
    Day,
    /// Good till `expire_at`.
    #[serde(rename = "GTD")]
    Gtd,
}

impl From<TifName> for TimeInForce {
    fn from(name: TifName) -> TimeInForce {
        match name {
            TifName::Gtc => TimeInForce::Gtc,
            TifName::Ioc => TimeInForce::Ioc,
            TifName::Fok => TimeInForce::Fok,
            TifName::Day => TimeInForce::Day,
            TifName::Gtd => TimeInForce::Gtd,
        }
    }
}

/// Self-trade prevention.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StpName {
    /// Cancel the incoming order.
    CancelNewest,
    /// Cancel the resting order.
    CancelOldest,
    /// Cancel both.
    CancelBoth,
    /// Reduce both by the overlap.
    Decrement,
}

impl From<StpName> for SelfTradePrevention {
    fn from(name: StpName) -> SelfTradePrevention {
        match name {
            StpName::CancelNewest => SelfTradePrevention::CancelNewest,
            StpName::CancelOldest => SelfTradePrevention::CancelOldest,
            StpName::CancelBoth => SelfTradePrevention::CancelBoth,
            StpName::Decrement => SelfTradePrevention::Decrement,
        }
    }
}

/// How trades of a market settle.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SettlementName {
    /// Both sides are paid on the platform when the trade happens.
    #[default]
    Instant,
    /// The seller's asset is held in escrow while the buyer pays off-platform.
    Escrow,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_convert_exactly() {
        let cases = [
            ("1", 2, Some(100)),
            ("0.5", 1, Some(5)),
            ("0.55", 1, None),
            ("12.3400", 2, Some(1234)),
        ];
        for (text, decimals, units) in cases {
            assert_eq!(
                to_units(decimal("x", text).unwrap(), decimals),
                units,
                "{text}"
            );
        }
        for bad in ["", "-1", "1e5", "1.2.3", ".", "abc", " 1"] {
            assert!(decimal("x", bad).is_err(), "{bad:?}");
        }
        // Digits a decimal cannot hold are refused, not rounded away (29 places and more, or
        // more significant digits than 96 bits).
        for rounded in [
            "1.99999999999999999999999999999",
            "0.000000000000000000000000000001",
            "79228162514264337593543950335.5",
        ] {
            assert!(decimal("x", rounded).is_err(), "{rounded:?}");
        }
        for (exact, written) in [
            ("007.50", "7.5"),
            (
                "0.0000000000000000000000000001",
                "0.0000000000000000000000000001",
            ),
            ("10.", "10"),
            (".5", "0.5"),
            ("0", "0"),
        ] {
            let value = decimal("x", exact).unwrap();
            assert_eq!(value.normalize().to_string(), written, "{exact:?}");
        }
        assert_eq!(from_units(1234, 2), "12.34");
        assert_eq!(from_units(5, 0), "5");
    }
}
