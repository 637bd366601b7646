//! `agora book replay`: drive the matching engine with JSON-lines commands, emit JSON-lines
//! events. This is the engine's decimal edge: prices and quantities arrive and leave as decimal
//! strings and become integers in each market's units here. Every malformed line becomes a
//! `rejected` event naming the line and the field; nothing reaches the engine from it.

use std::io::{self, BufRead, Write};
use std::str::FromStr;

use book::{
    Command, Engine, Event, Interval, MarketId, MarketSpec, ModifyOrder, OrderType, PaymentMethods,
    PlaceOrder, Price, Qty, SelfTradePrevention, Settlement, Side, TimeInForce,
};
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};

/// Longest accepted input line, in bytes; longer lines are rejected whole.
pub const LINE_BYTES_MAX: usize = 64 * 1024;

/// Most payment method names one order may list.
pub const ORDER_PAYMENT_METHODS_MAX: usize = 64;

/// Most candles one `candles` query returns.
pub const CANDLES_QUERY_MAX: usize = 1_440;

/// A line that cannot become a command: the reason code, the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// Stable upper-case code.
    pub reason: &'static str,
    /// The offending field, when one is to blame.
    pub field: Option<String>,
    /// A sentence for people.
    pub message: String,
    /// The order id, when the line named one.
    pub id: Option<u64>,
}

impl LineError {
    fn new(reason: &'static str, field: &str, message: impl Into<String>) -> LineError {
        LineError {
            reason,
            field: Some(field.to_string()),
            message: message.into(),
            id: None,
        }
    }
}

/// A decoded input line: an engine command or a read-only query.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A command for the engine.
    Command(Command),
    /// L2 depth of a market.
    Depth {
        /// Market.
        market: MarketId,
        /// Levels per side.
        levels: usize,
    },
    /// Last price, best bid and ask, rolling 24 h and liquidity near the mid price.
    Stats {
        /// Market.
        market: MarketId,
    },
    /// The latest candles of an interval.
    Candles {
        /// Market.
        market: MarketId,
        /// Interval.
        interval: Interval,
        /// How many.
        count: usize,
    },
    /// What taking a notional amount from one side would do.
    Impact {
        /// Market.
        market: MarketId,
        /// Side of the hypothetical taker.
        side: Side,
        /// Notional in the market's notional units.
        notional: u128,
    },
    /// The engine's state hash.
    Hash,
}

/// One replay session: an engine plus the line counter.
#[derive(Default)]
pub struct Session {
    engine: Engine,
    line: u64,
    events: Vec<Event>,
}

/// Fields of an object, consumed one by one so that leftovers are reported as unknown.
struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, LineError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(LineError::new(
                "INVALID_FIELD",
                name,
                format!("{name} must be a string"),
            )),
        }
    }

    fn required_string(&mut self, name: &str) -> Result<String, LineError> {
        self.string(name)?.ok_or_else(|| missing(name))
    }

    fn unsigned(&mut self, name: &str) -> Result<Option<u64>, LineError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                LineError::new(
                    "INVALID_FIELD",
                    name,
                    format!("{name} must be an integer from 0 to 18446744073709551615"),
                )
            }),
            Some(_) => Err(LineError::new(
                "INVALID_FIELD",
                name,
                format!("{name} must be a non-negative integer"),
            )),
        }
    }

    fn required_unsigned(&mut self, name: &str) -> Result<u64, LineError> {
        self.unsigned(name)?.ok_or_else(|| missing(name))
    }

    fn signed(&mut self, name: &str) -> Result<Option<i64>, LineError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
                LineError::new(
                    "INVALID_FIELD",
                    name,
                    format!("{name} must be a 64-bit integer"),
                )
            }),
            Some(_) => Err(LineError::new(
                "INVALID_FIELD",
                name,
                format!("{name} must be an integer"),
            )),
        }
    }

    fn u32(&mut self, name: &str) -> Result<Option<u32>, LineError> {
        match self.unsigned(name)? {
            None => Ok(None),
            Some(v) => u32::try_from(v).map(Some).map_err(|_| {
                LineError::new(
                    "INVALID_FIELD",
                    name,
                    format!("{name} must be at most 4294967295"),
                )
            }),
        }
    }

    fn bool(&mut self, name: &str) -> Result<bool, LineError> {
        match self.take(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(LineError::new(
                "INVALID_FIELD",
                name,
                format!("{name} must be true or false"),
            )),
        }
    }

    fn strings(&mut self, name: &str, max: usize) -> Result<Option<Vec<String>>, LineError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(items)) if items.len() <= max => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(LineError::new(
                        "INVALID_FIELD",
                        name,
                        format!("{name} must be an array of strings"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(LineError::new(
                "INVALID_FIELD",
                name,
                format!("{name} must be an array of at most {max} strings"),
            )),
        }
    }

    fn finish(self) -> Result<(), LineError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(name) => Err(LineError::new(
                "UNKNOWN_FIELD",
                name,
                format!("unknown field {name}"),
            )),
        }
    }
}

fn missing(name: &str) -> LineError {
    LineError::new("MISSING_FIELD", name, format!("{name} is required"))
}

/// Parses a plain decimal string (digits, one optional point, optional leading minus).
fn decimal(field: &str, text: &str) -> Result<Decimal, LineError> {
    let plain = !text.is_empty()
        && text.len() <= 40
        && text
            .strip_prefix('-')
            .unwrap_or(text)
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1
        && text.bytes().any(|b| b.is_ascii_digit());
    let parsed = plain.then(|| Decimal::from_str(text).ok()).flatten();
    parsed.ok_or_else(|| {
        LineError::new(
            "INVALID_DECIMAL",
            field,
            format!("{field} must be a decimal string such as \"12.5\", not {text:?}"),
        )
    })
}

/// Converts a decimal to an integer count of `10^-decimals` units, or `None` when it has more
/// decimal places than that or does not fit.
fn to_units(value: Decimal, decimals: u32) -> Option<i128> {
    let value = value.normalize();
    if value.scale() > decimals {
        return None;
    }
    let factor = 10i128.checked_pow(decimals - value.scale())?;
    value.mantissa().checked_mul(factor)
}

fn from_units(units: i128, decimals: u32) -> String {
    match Decimal::try_from_i128_with_scale(units, decimals) {
        Ok(value) => value.to_string(),
        // Only reachable for notional sums beyond 96 bits; print the integer units instead.
        Err(_) => format!("{units}e-{decimals}"),
    }
}

fn side_name(text: &str) -> Result<Side, LineError> {
    match text {
        "buy" => Ok(Side::Buy),
        "sell" => Ok(Side::Sell),
        _ => Err(LineError::new(
            "INVALID_FIELD",
            "side",
            "side must be buy or sell",
        )),
    }
}

fn stp_name(text: &str) -> Result<SelfTradePrevention, LineError> {
    match text {
        "cancel_newest" => Ok(SelfTradePrevention::CancelNewest),
        "cancel_oldest" => Ok(SelfTradePrevention::CancelOldest),
        "cancel_both" => Ok(SelfTradePrevention::CancelBoth),
        "decrement" => Ok(SelfTradePrevention::Decrement),
        _ => Err(LineError::new(
            "INVALID_FIELD",
            "stp",
            "stp must be cancel_newest, cancel_oldest, cancel_both or decrement",
        )),
    }
}

impl Session {
    /// A session with an empty engine.
    pub fn new() -> Session {
        Session::default()
    }

    /// The engine, for inspection.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn market(&self, fields: &mut Fields) -> Result<(MarketId, &MarketSpec), LineError> {
        let symbol = fields.required_string("market")?;
        let market = self.engine.market_id(&symbol).ok_or_else(|| LineError {
            reason: "UNKNOWN_MARKET",
            field: Some("market".into()),
            message: format!("no market {symbol}"),
            id: None,
        })?;
        let spec = self
            .engine
            .market_spec(market)
            .expect("an id from market_id exists");
        Ok((market, spec))
    }

    fn price(spec: &MarketSpec, field: &str, text: &str) -> Result<Price, LineError> {
        let value = decimal(field, text)?;
        let units = to_units(value, spec.price_decimals).ok_or_else(|| {
            LineError::new(
                "BAD_TICK",
                field,
                format!(
                    "{field} {text} is not a multiple of the tick ({} decimal places at most)",
                    spec.price_decimals
                ),
            )
        })?;
        i64::try_from(units).map(Price).map_err(|_| {
            LineError::new(
                "INVALID_PRICE",
                field,
                format!("{field} {text} is out of range"),
            )
        })
    }

    fn qty(spec: &MarketSpec, field: &str, text: &str) -> Result<Qty, LineError> {
        let value = decimal(field, text)?;
        if value.is_sign_negative() && !value.is_zero() {
            return Err(LineError::new(
                "INVALID_QUANTITY",
                field,
                format!("{field} must not be negative"),
            ));
        }
        let units = to_units(value, spec.qty_decimals).ok_or_else(|| {
            LineError::new(
                "BAD_LOT",
                field,
                format!(
                    "{field} {text} is not a multiple of the lot ({} decimal places at most)",
                    spec.qty_decimals
                ),
            )
        })?;
        u64::try_from(units).map(Qty).map_err(|_| {
            LineError::new(
                "INVALID_QUANTITY",
                field,
                format!("{field} {text} is out of range"),
            )
        })
    }

    fn opt_price(
        spec: &MarketSpec,
        fields: &mut Fields,
        name: &str,
    ) -> Result<Option<Price>, LineError> {
        fields
            .string(name)?
            .map(|text| Session::price(spec, name, &text))
            .transpose()
    }

    fn opt_qty(
        spec: &MarketSpec,
        fields: &mut Fields,
        name: &str,
    ) -> Result<Option<Qty>, LineError> {
        fields
            .string(name)?
            .map(|text| Session::qty(spec, name, &text))
            .transpose()
    }

    /// Decodes one line into a request, without changing anything.
    pub fn decode(&self, line: &str) -> Result<Request, LineError> {
        let value: Value = serde_json::from_str(line).map_err(|e| LineError {
            reason: "MALFORMED_JSON",
            field: None,
            message: format!("not a JSON object: {e}"),
            id: None,
        })?;
        let Value::Object(map) = value else {
            return Err(LineError {
                reason: "MALFORMED_JSON",
                field: None,
                message: "each line must be one JSON object".into(),
                id: None,
            });
        };
        let mut fields = Fields { map };
        // The id, when present and well-formed, is echoed in any rejection of this line.
        let id = fields.map.get("id").and_then(Value::as_u64);
        let cmd = fields.required_string("cmd")?;
        let request = self.decode_fields(&cmd, &mut fields).map_err(|mut e| {
            e.id = e.id.or(id);
            e
        })?;
        fields.finish().map_err(|mut e| {
            e.id = id;
            e
        })?;
        Ok(request)
    }

    fn decode_fields(&self, cmd: &str, fields: &mut Fields) -> Result<Request, LineError> {
        let command = match cmd {
            "market" => Command::CreateMarket(self.decode_market(fields)?),
            "place" => Command::Place(self.decode_place(fields)?),
            "cancel" => {
                let (market, _) = self.market(fields)?;
                Command::Cancel {
                    market,
                    id: fields.required_unsigned("id")?,
                    user: fields.required_unsigned("user")?,
                }
            }
            "modify" => {
                let (market, spec) = self.market(fields)?;
                Command::Modify(ModifyOrder {
                    market,
                    id: fields.required_unsigned("id")?,
                    user: fields.required_unsigned("user")?,
                    price: Session::opt_price(spec, fields, "price")?,
                    qty: Session::opt_qty(spec, fields, "qty")?,
                })
            }
            "cancel_all" => {
                let market = match fields.map.contains_key("market") {
                    true => Some(self.market(fields)?.0),
                    false => None,
                };
                Command::CancelAll {
                    market,
                    user: fields.unsigned("user")?,
                }
            }
            "time" => Command::AdvanceTime {
                now: fields.signed("now")?.ok_or_else(|| missing("now"))?,
            },
            "depth" => {
                let (market, _) = self.market(fields)?;
                let levels = fields.unsigned("levels")?.unwrap_or(10);
                return Ok(Request::Depth {
                    market,
                    levels: levels.min(book::limits::DEPTH_LEVELS_MAX as u64) as usize,
                });
            }
            "stats" => {
                let (market, _) = self.market(fields)?;
                return Ok(Request::Stats { market });
            }
            "candles" => {
                let (market, _) = self.market(fields)?;
                let interval = match fields.required_string("interval")?.as_str() {
                    "1m" => Interval::M1,
                    "5m" => Interval::M5,
                    "1h" => Interval::H1,
                    "1d" => Interval::D1,
                    _ => {
                        return Err(LineError::new(
                            "INVALID_FIELD",
                            "interval",
                            "interval must be 1m, 5m, 1h or 1d",
                        ));
                    }
                };
                let count = fields.unsigned("count")?.unwrap_or(60);
                return Ok(Request::Candles {
                    market,
                    interval,
                    count: count.min(CANDLES_QUERY_MAX as u64) as usize,
                });
            }
            "impact" => {
                let (market, spec) = self.market(fields)?;
                let side = side_name(&fields.required_string("side")?)?;
                let text = fields.required_string("notional")?;
                let value = decimal("notional", &text)?;
                let notional = to_units(value, spec.price_decimals + spec.qty_decimals)
                    .and_then(|units| u128::try_from(units).ok())
                    .ok_or_else(|| {
                        LineError::new(
                            "INVALID_FIELD",
                            "notional",
                            "notional must be a non-negative amount in the quote asset's precision",
                        )
                    })?;
                return Ok(Request::Impact {
                    market,
                    side,
                    notional,
                });
            }
            "hash" => return Ok(Request::Hash),
            other => {
                return Err(LineError::new(
                    "UNKNOWN_COMMAND",
                    "cmd",
                    format!(
                        "unknown command {other:?}; expected market, place, cancel, modify, cancel_all, time, depth, stats, candles, impact or hash"
                    ),
                ));
            }
        };
        Ok(Request::Command(command))
    }

    fn decode_market(&self, fields: &mut Fields) -> Result<MarketSpec, LineError> {
        let symbol = fields.required_string("market")?;
        let tick_text = fields.required_string("tick")?;
        let lot_text = fields.required_string("lot")?;
        let tick = decimal("tick", &tick_text)?.normalize();
        let lot = decimal("lot", &lot_text)?.normalize();
        let positive = |field: &str, value: Decimal| {
            if value.is_sign_positive() && !value.is_zero() {
                Ok(())
            } else {
                Err(LineError::new(
                    "INVALID_MARKET",
                    field,
                    format!("{field} must be positive"),
                ))
            }
        };
        positive("tick", tick)?;
        positive("lot", lot)?;
        let too_fine = |field: &str| {
            LineError::new(
                "INVALID_MARKET",
                field,
                format!(
                    "{field} has more than {} decimal places",
                    book::limits::DECIMALS_MAX
                ),
            )
        };
        if tick.scale() > book::limits::DECIMALS_MAX {
            return Err(too_fine("tick"));
        }
        if lot.scale() > book::limits::DECIMALS_MAX {
            return Err(too_fine("lot"));
        }
        let tick_units = i64::try_from(tick.mantissa())
            .map_err(|_| LineError::new("INVALID_MARKET", "tick", "tick is too large"))?;
        let lot_units = u64::try_from(lot.mantissa())
            .map_err(|_| LineError::new("INVALID_MARKET", "lot", "lot is too large"))?;
        let mut spec = MarketSpec::new(symbol, tick.scale(), lot.scale(), tick_units, lot_units);
        spec.min_qty = Session::opt_qty(&spec, fields, "min_qty")?;
        spec.max_qty = Session::opt_qty(&spec, fields, "max_qty")?;
        if let Some(text) = fields.string("min_notional")? {
            let value = decimal("min_notional", &text)?;
            let units = to_units(value, spec.price_decimals + spec.qty_decimals)
                .and_then(|u| u128::try_from(u).ok())
                .ok_or_else(|| {
                    LineError::new(
                        "INVALID_MARKET",
                        "min_notional",
                        "min_notional must be a non-negative amount with no more decimal places than tick and lot together",
                    )
                })?;
            spec.min_notional = Some(units);
        }
        spec.price_band_bps = fields.u32("price_band_bps")?;
        if let Some(settlement) = fields.string("settlement")? {
            spec.settlement = match settlement.as_str() {
                "instant" => Settlement::Instant,
                "escrow" => Settlement::Escrow,
                _ => {
                    return Err(LineError::new(
                        "INVALID_MARKET",
                        "settlement",
                        "settlement must be instant or escrow",
                    ));
                }
            };
        }
        if let Some(stp) = fields.string("stp")? {
            spec.default_stp = stp_name(&stp)?;
        }
        if let Some(cutoff) = fields.string("day_cutoff")? {
            spec.day_cutoff_ms = parse_cutoff(&cutoff)?;
        }
        if let Some(tiers) = fields.take("reputation_tiers") {
            let bad = || {
                LineError::new(
                    "INVALID_MARKET",
                    "reputation_tiers",
                    "reputation_tiers must be an array of integers",
                )
            };
            let Value::Array(items) = tiers else {
                return Err(bad());
            };
            if items.len() > book::limits::REPUTATION_TIERS_MAX {
                return Err(LineError::new(
                    "INVALID_MARKET",
                    "reputation_tiers",
                    "at most 16 thresholds",
                ));
            }
            spec.reputation_tiers = items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(bad)
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(methods) = fields.strings(
            "payment_methods",
            book::limits::PAYMENT_METHODS_PER_MARKET_MAX,
        )? {
            spec.payment_methods = methods;
        }
        if let Err(e) = spec.validate() {
            return Err(LineError::new(
                "INVALID_MARKET",
                e.field,
                format!("{}: {}", e.field, e.rule),
            ));
        }
        Ok(spec)
    }

    fn decode_place(&self, fields: &mut Fields) -> Result<PlaceOrder, LineError> {
        let (market, spec) = self.market(fields)?;
        let id = fields.required_unsigned("id")?;
        let user = fields.required_unsigned("user")?;
        let side = side_name(&fields.required_string("side")?)?;
        let order_type = match fields.string("type")?.as_deref() {
            None | Some("limit") => OrderType::Limit,
            Some("market") => OrderType::Market,
            Some("stop_market") => OrderType::StopMarket,
            Some("stop_limit") => OrderType::StopLimit,
            Some("take_profit_market") => OrderType::TakeProfitMarket,
            Some("take_profit_limit") => OrderType::TakeProfitLimit,
            Some(_) => {
                return Err(LineError::new(
                    "INVALID_FIELD",
                    "type",
                    "type must be limit, market, stop_market, stop_limit, take_profit_market or take_profit_limit",
                ));
            }
        };
        let tif = match fields.string("tif")?.as_deref() {
            None if order_type.is_market_like() => TimeInForce::Ioc,
            None | Some("GTC") => TimeInForce::Gtc,
            Some("IOC") => TimeInForce::Ioc,
            Some("FOK") => TimeInForce::Fok,
            Some("DAY") => TimeInForce::Day,
            Some("GTD") => TimeInForce::Gtd,
            Some(_) => {
                return Err(LineError::new(
                    "INVALID_FIELD",
                    "tif",
                    "tif must be GTC, IOC, FOK, DAY or GTD",
                ));
            }
        };
        let payment_methods = match fields.strings("payment_methods", ORDER_PAYMENT_METHODS_MAX)? {
            None => PaymentMethods::ANY,
            Some(names) if names.is_empty() => PaymentMethods::ANY,
            Some(names) => spec
                .payment_method_set(names.iter().map(String::as_str))
                .ok_or_else(|| {
                    LineError::new(
                        "UNKNOWN_PAYMENT_METHOD",
                        "payment_methods",
                        format!(
                            "payment methods must be among the market's: {}",
                            spec.payment_methods.join(", ")
                        ),
                    )
                })?,
        };
        Ok(PlaceOrder {
            market,
            id,
            user,
            side,
            order_type,
            price: Session::opt_price(spec, fields, "price")?,
            stop_price: Session::opt_price(spec, fields, "stop_price")?,
            qty: Session::opt_qty(spec, fields, "qty")?.ok_or_else(|| missing("qty"))?,
            tif,
            post_only: fields.bool("post_only")?,
            expire_at: fields.signed("expire_at")?,
            payment_methods,
            min_reputation: fields.u32("min_reputation")?.unwrap_or(0),
            reputation: fields.u32("reputation")?.unwrap_or(0),
            min_fill: Session::opt_qty(spec, fields, "min_fill")?,
            max_fill: Session::opt_qty(spec, fields, "max_fill")?,
            stp: fields.string("stp")?.map(|s| stp_name(&s)).transpose()?,
        })
    }

    /// Handles one input line: appends its output lines (events, then `done`) to `out`.
    /// Blank lines are skipped without output.
    pub fn handle_line(&mut self, line: &str, out: &mut Vec<Value>) {
        if line.trim().is_empty() {
            return;
        }
        self.line += 1;
        match self.decode(line) {
            Ok(request) => self.execute(request, out),
            Err(error) => out.push(self.rejection_json(error)),
        }
        out.push(json!({"event": "done", "seq": self.line}));
    }

    fn rejection_json(&self, error: LineError) -> Value {
        let mut event = json!({
            "event": "rejected",
            "line": self.line,
            "reason": error.reason,
            "message": error.message,
        });
        if let Some(field) = error.field {
            event["field"] = json!(field);
        }
        if let Some(id) = error.id {
            event["id"] = json!(id);
        }
        event
    }

    fn execute(&mut self, request: Request, out: &mut Vec<Value>) {
        match request {
            Request::Command(command) => {
                let mut events = std::mem::take(&mut self.events);
                events.clear();
                self.engine.apply(&command, &mut events);
                for event in &events {
                    out.push(self.event_json(event));
                }
                self.events = events;
            }
            Request::Depth { market, levels } => {
                let spec = self.spec(market);
                let depth = self.engine.depth(market, levels).unwrap_or_default();
                let side = |levels: &[book::LevelView]| -> Vec<Value> {
                    levels
                        .iter()
                        .map(|l| {
                            json!({
                                "price": price_text(spec, l.price),
                                "qty": qty_text(spec, l.qty),
                                "orders": l.orders,
                            })
                        })
                        .collect()
                };
                out.push(json!({
                    "event": "depth",
                    "market": spec.symbol,
                    "bids": side(&depth.bids),
                    "asks": side(&depth.asks),
                }));
            }
            Request::Stats { market } => out.push(self.stats_json(market)),
            Request::Candles {
                market,
                interval,
                count,
            } => {
                let spec = self.spec(market);
                let candles: Vec<Value> = self
                    .engine
                    .candles(market, interval, count)
                    .iter()
                    .map(|c| {
                        json!({
                            "open_time": c.open_time,
                            "open": price_text(spec, c.open),
                            "high": price_text(spec, c.high),
                            "low": price_text(spec, c.low),
                            "close": price_text(spec, c.close),
                            "volume": from_units(c.volume as i128, spec.qty_decimals),
                            "quote_volume": notional_text(spec, c.quote_volume),
                            "trades": c.trades,
                        })
                    })
                    .collect();
                out.push(json!({
                    "event": "candles",
                    "market": spec.symbol,
                    "interval": interval.as_str(),
                    "candles": candles,
                }));
            }
            Request::Impact {
                market,
                side,
                notional,
            } => {
                let spec = self.spec(market);
                let impact = self
                    .engine
                    .price_impact(market, side, notional)
                    .expect("decoded markets exist");
                out.push(json!({
                    "event": "impact",
                    "market": spec.symbol,
                    "side": side.as_str(),
                    "notional": notional_text(spec, notional),
                    "filled_qty": from_units(impact.filled_qty as i128, spec.qty_decimals),
                    "filled_notional": notional_text(spec, impact.filled_notional),
                    "best_price": impact.best_price.map(|p| price_text(spec, p)),
                    "worst_price": impact.worst_price.map(|p| price_text(spec, p)),
                    "complete": impact.complete,
                    "impact_bps": impact.impact_bps.map(|b| b.to_string()),
                }));
            }
            Request::Hash => {
                let hash: String = self
                    .engine
                    .state_hash()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                out.push(json!({"event": "hash", "hash": hash}));
            }
        }
    }

    fn spec(&self, market: MarketId) -> &MarketSpec {
        self.engine
            .market_spec(market)
            .expect("events and queries name existing markets")
    }

    fn stats_json(&self, market: MarketId) -> Value {
        let spec = self.spec(market);
        let stats = self.engine.stats_24h(market).unwrap_or_default();
        let (bid, ask) = self.engine.best_bid_ask(market).unwrap_or((None, None));
        let level = |l: Option<book::LevelView>| {
            l.map(|l| json!({"price": price_text(spec, l.price), "qty": qty_text(spec, l.qty)}))
        };
        let liquidity: Vec<Value> = [100u32, 500, 1_000]
            .iter()
            .filter_map(|&bps| self.engine.liquidity(market, bps))
            .map(|l| {
                json!({
                    "band_bps": l.band_bps,
                    "bid_qty": from_units(l.bid_qty as i128, spec.qty_decimals),
                    "bid_notional": notional_text(spec, l.bid_notional),
                    "ask_qty": from_units(l.ask_qty as i128, spec.qty_decimals),
                    "ask_notional": notional_text(spec, l.ask_notional),
                })
            })
            .collect();
        let opt_price = |p: Option<Price>| p.map(|p| price_text(spec, p));
        json!({
            "event": "stats",
            "market": spec.symbol,
            "last_price": opt_price(self.engine.last_price(market)),
            "best_bid": level(bid),
            "best_ask": level(ask),
            "open_24h": opt_price(stats.open),
            "high_24h": opt_price(stats.high),
            "low_24h": opt_price(stats.low),
            "close_24h": opt_price(stats.close),
            "volume_24h": from_units(stats.volume as i128, spec.qty_decimals),
            "quote_volume_24h": notional_text(spec, stats.quote_volume),
            "trades_24h": stats.trades,
            "liquidity": liquidity,
        })
    }

    fn symbol(&self, market: MarketId) -> &str {
        &self.spec(market).symbol
    }

    fn event_json(&self, event: &Event) -> Value {
        match *event {
            Event::MarketCreated { market } => {
                json!({"event": "market_created", "market": self.symbol(market)})
            }
            Event::Rejected { market, id, reason } => {
                let mut value = json!({
                    "event": "rejected",
                    "line": self.line,
                    "reason": reason.code(),
                    "message": reason.message(),
                });
                if let Some(field) = reason.field() {
                    value["field"] = json!(field);
                }
                if id != 0 || market.is_some() {
                    value["id"] = json!(id);
                }
                value
            }
            Event::Accepted {
                market,
                id,
                user,
                side,
                order_type,
                qty,
            } => json!({
                "event": "accepted",
                "market": self.symbol(market),
                "id": id,
                "user": user,
                "side": side.as_str(),
                "type": order_type.as_str(),
                "qty": qty_text(self.spec(market), qty),
            }),
            Event::Trade {
                market,
                maker,
                taker,
                maker_user,
                taker_user,
                taker_side,
                price,
                qty,
            } => json!({
                "event": "trade",
                "market": self.symbol(market),
                "maker": maker,
                "taker": taker,
                "maker_user": maker_user,
                "taker_user": taker_user,
                "taker_side": taker_side.as_str(),
                "price": price_text(self.spec(market), price),
                "qty": qty_text(self.spec(market), qty),
            }),
            Event::Cancelled {
                market,
                id,
                user,
                remaining,
                open,
                cause,
            } => {
                let mut value = json!({
                    "event": "cancelled",
                    "market": self.symbol(market),
                    "id": id,
                    "user": user,
                    "remaining": qty_text(self.spec(market), remaining),
                    "cause": cause.as_str(),
                });
                if open.0 > 0 {
                    value["open"] = json!(qty_text(self.spec(market), open));
                }
                value
            }
            Event::Expired {
                market,
                id,
                user,
                remaining,
            } => json!({
                "event": "expired",
                "market": self.symbol(market),
                "id": id,
                "user": user,
                "remaining": qty_text(self.spec(market), remaining),
            }),
            Event::Triggered {
                market,
                id,
                user,
                last_price,
            } => json!({
                "event": "triggered",
                "market": self.symbol(market),
                "id": id,
                "user": user,
                "last_price": price_text(self.spec(market), last_price),
            }),
            Event::Modified {
                market,
                id,
                user,
                price,
                qty,
                priority_kept,
            } => json!({
                "event": "modified",
                "market": self.symbol(market),
                "id": id,
                "user": user,
                "price": (price.0 != 0).then(|| price_text(self.spec(market), price)),
                "qty": qty_text(self.spec(market), qty),
                "priority_kept": priority_kept,
            }),
            Event::Book {
                market,
                side,
                price,
                qty,
                orders,
            } => json!({
                "event": "book",
                "market": self.symbol(market),
                "side": side.as_str(),
                "price": price_text(self.spec(market), price),
                "qty": qty_text(self.spec(market), qty),
                "orders": orders,
            }),
        }
    }
}

fn price_text(spec: &MarketSpec, price: Price) -> String {
    from_units(i128::from(price.0), spec.price_decimals)
}

fn qty_text(spec: &MarketSpec, qty: Qty) -> String {
    from_units(i128::from(qty.0), spec.qty_decimals)
}

fn notional_text(spec: &MarketSpec, notional: u128) -> String {
    match i128::try_from(notional) {
        Ok(units) => from_units(units, spec.price_decimals + spec.qty_decimals),
        Err(_) => format!("{notional}e-{}", spec.price_decimals + spec.qty_decimals),
    }
}

/// Parses `HH:MM` (UTC) into milliseconds after midnight.
fn parse_cutoff(text: &str) -> Result<i64, LineError> {
    let bad = || {
        LineError::new(
            "INVALID_MARKET",
            "day_cutoff",
            "day_cutoff must be HH:MM in UTC, 00:00 to 23:59",
        )
    };
    let (hours, minutes) = text.split_once(':').ok_or_else(bad)?;
    if hours.len() != 2 || minutes.len() != 2 {
        return Err(bad());
    }
    let hours: i64 = hours.parse().map_err(|_| bad())?;
    let minutes: i64 = minutes.parse().map_err(|_| bad())?;
    if !(0..24).contains(&hours) || !(0..60).contains(&minutes) {
        return Err(bad());
    }
    Ok((hours * 60 + minutes) * 60_000)
}

/// Reads commands from `input` line by line and writes events to `output`, flushing after each
/// command so a driving program sees its events before it sends the next line.
pub fn run(input: impl BufRead, mut output: impl Write) -> io::Result<u64> {
    let mut session = Session::new();
    let mut input = input;
    let mut buffer = Vec::with_capacity(1024);
    let mut values = Vec::new();
    loop {
        buffer.clear();
        let read =
            io::Read::take(&mut input, LINE_BYTES_MAX as u64 + 1).read_until(b'\n', &mut buffer)?;
        if read == 0 {
            break;
        }
        values.clear();
        if buffer.len() > LINE_BYTES_MAX && buffer.last() != Some(&b'\n') {
            // Skip the rest of the oversized line, then reject it whole.
            let mut rest = Vec::new();
            input.read_until(b'\n', &mut rest)?;
            session.line += 1;
            values.push(session.rejection_json(LineError {
                reason: "LINE_TOO_LONG",
                field: None,
                message: format!("lines are limited to {LINE_BYTES_MAX} bytes"),
                id: None,
            }));
            values.push(json!({"event": "done", "seq": session.line}));
        } else {
            match std::str::from_utf8(&buffer) {
                Ok(line) => session.handle_line(line, &mut values),
                Err(_) => {
                    session.line += 1;
                    values.push(session.rejection_json(LineError {
                        reason: "MALFORMED_JSON",
                        field: None,
                        message: "the line is not UTF-8".into(),
                        id: None,
                    }));
                    values.push(json!({"event": "done", "seq": session.line}));
                }
            }
        }
        for value in &values {
            serde_json::to_writer(&mut output, value)?;
            output.write_all(b"\n")?;
        }
        output.flush()?;
    }
    Ok(session.line)
}
