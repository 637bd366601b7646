//! Market data kept as trades happen: last price, candles per interval and the rolling 24 hours.

use std::collections::VecDeque;

use crate::limits;
use crate::market::DAY_MS;
use crate::types::{Price, Qty, Timestamp};

/// Candle intervals the engine keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Interval {
    /// One minute.
    M1,
    /// Five minutes.
    M5,
    /// One hour.
    H1,
    /// One day (UTC).
    D1,
}

impl Interval {
    /// All intervals, shortest first.
    pub const ALL: [Interval; 4] = [Interval::M1, Interval::M5, Interval::H1, Interval::D1];

    /// Length in milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            Interval::M1 => 60_000,
            Interval::M5 => 300_000,
            Interval::H1 => 3_600_000,
            Interval::D1 => DAY_MS,
        }
    }

    /// Stable name (`1m`, `5m`, `1h`, `1d`).
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::M1 => "1m",
            Interval::M5 => "5m",
            Interval::H1 => "1h",
            Interval::D1 => "1d",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Open, high, low, close and volume of the trades in one interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candle {
    /// Start of the interval (a multiple of its length since the epoch).
    pub open_time: Timestamp,
    /// First trade price.
    pub open: Price,
    /// Highest trade price.
    pub high: Price,
    /// Lowest trade price.
    pub low: Price,
    /// Last trade price.
    pub close: Price,
    /// Traded quantity, in quantity units.
    pub volume: u128,
    /// Traded price times quantity, in units of `10^-(price_decimals + qty_decimals)`.
    pub quote_volume: u128,
    /// Number of trades.
    pub trades: u64,
}

impl Candle {
    fn new(open_time: Timestamp, price: i64) -> Candle {
        Candle {
            open_time,
            open: Price(price),
            high: Price(price),
            low: Price(price),
            close: Price(price),
            volume: 0,
            quote_volume: 0,
            trades: 0,
        }
    }

    #[inline]
    fn add(&mut self, price: i64, qty: u64) {
        let price_value = Price(price);
        if price_value > self.high {
            self.high = price_value;
        }
        if price_value < self.low {
            self.low = price_value;
        }
        self.close = price_value;
        // Statistics saturate rather than wrap: they are reports, not balances.
        self.volume = self.volume.saturating_add(u128::from(qty));
        self.quote_volume = self
            .quote_volume
            .saturating_add(price as u128 * u128::from(qty));
        self.trades += 1;
    }
}

/// Statistics of the trades in the rolling 24 hours, at one-minute resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats24h {
    /// First trade price in the window.
    pub open: Option<Price>,
    /// Highest trade price.
    pub high: Option<Price>,
    /// Lowest trade price.
    pub low: Option<Price>,
    /// Last trade price in the window.
    pub close: Option<Price>,
    /// Traded quantity.
    pub volume: u128,
    /// Traded notional.
    pub quote_volume: u128,
    /// Number of trades.
    pub trades: u64,
}

/// Incrementally kept market data of one market.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MarketData {
    /// Price of the last trade.
    pub(crate) last_price: Option<i64>,
    /// Time of the last trade.
    pub(crate) last_trade_at: Option<Timestamp>,
    /// Quantity of the last trade.
    pub(crate) last_qty: Option<Qty>,
    /// Candles per interval, oldest first; the last one is current.
    pub(crate) candles: [VecDeque<Candle>; 4],
    /// End of the current one-minute candle: until then every current candle takes the trade.
    minute_end: Timestamp,
}

impl MarketData {
    /// Adds a trade at `now`.
    #[inline]
    pub(crate) fn record_trade(&mut self, now: Timestamp, price: i64, qty: u64) {
        self.last_price = Some(price);
        self.last_trade_at = Some(now);
        self.last_qty = Some(Qty(qty));
        // Intervals nest (each longer one is a multiple of the shorter, all aligned to the
        // epoch), so while the one-minute candle is current, all current candles are.
        if now < self.minute_end && !self.candles[0].is_empty() {
            for series in &mut self.candles {
                if let Some(candle) = series.back_mut() {
                    candle.add(price, qty);
                }
            }
            return;
        }
        for interval in Interval::ALL {
            let length = interval.millis();
            let open_time = now - now.rem_euclid(length);
            let series = &mut self.candles[interval.index()];
            match series.back_mut() {
                Some(candle) if candle.open_time == open_time => candle.add(price, qty),
                _ => {
                    if series.len() == limits::CANDLES_KEPT_MAX {
                        series.pop_front();
                    }
                    let mut candle = Candle::new(open_time, price);
                    candle.add(price, qty);
                    series.push_back(candle);
                }
            }
        }
        self.minute_end =
            (now - now.rem_euclid(Interval::M1.millis())).saturating_add(Interval::M1.millis());
    }

    /// The last `count` candles of an interval, oldest first.
    pub(crate) fn candles(&self, interval: Interval, count: usize) -> Vec<Candle> {
        let series = &self.candles[interval.index()];
        let skip = series.len().saturating_sub(count);
        series.iter().skip(skip).copied().collect()
    }

    /// Statistics of the one-minute candles that overlap the 24 hours up to `now`.
    pub(crate) fn stats_24h(&self, now: Timestamp) -> Stats24h {
        let minute = Interval::M1.millis();
        let window_start = now - now.rem_euclid(minute) - (DAY_MS - minute);
        let mut stats = Stats24h::default();
        for candle in self.candles[Interval::M1.index()]
            .iter()
            .filter(|c| c.open_time >= window_start && c.open_time <= now)
        {
            stats.open.get_or_insert(candle.open);
            stats.high = Some(stats.high.map_or(candle.high, |h| h.max(candle.high)));
            stats.low = Some(stats.low.map_or(candle.low, |l| l.min(candle.low)));
            stats.close = Some(candle.close);
            stats.volume = stats.volume.saturating_add(candle.volume);
            stats.quote_volume = stats.quote_volume.saturating_add(candle.quote_volume);
            stats.trades += candle.trades;
        }
        stats
    }

    /// Rebuilds the derived fast-path marker after a restore.
    pub(crate) fn restore_marker(&mut self) {
        self.minute_end = match self.candles[0].back() {
            Some(candle) => candle.open_time.saturating_add(Interval::M1.millis()),
            None => 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candles_roll_and_24h_window_slides() {
        let mut data = MarketData::default();
        data.record_trade(0, 100, 1);
        data.record_trade(59_999, 105, 2);
        data.record_trade(60_000, 95, 3);
        let m1 = data.candles(Interval::M1, 10);
        assert_eq!(m1.len(), 2);
        assert_eq!(
            (m1[0].open, m1[0].high, m1[0].close),
            (Price(100), Price(105), Price(105))
        );
        assert_eq!(m1[0].volume, 3);
        let h1 = data.candles(Interval::H1, 10);
        assert_eq!(h1.len(), 1);
        assert_eq!((h1[0].low, h1[0].trades), (Price(95), 3));
        let stats = data.stats_24h(60_000);
        assert_eq!(
            (stats.open, stats.close, stats.trades),
            (Some(Price(100)), Some(Price(95)), 3)
        );
        // A day later the first minute has left the 1440-minute window, the second has not.
        let later = DAY_MS;
        let stats = data.stats_24h(later);
        assert_eq!(
            (stats.open, stats.trades, stats.volume),
            (Some(Price(95)), 1, 3)
        );
        assert_eq!(data.stats_24h(later + 60_000), Stats24h::default());
    }
}
