//! The matching benchmark: three workloads run through Agora's engine and through the Rust
//! order books a user would otherwise pick, each checked for correct trades against the naive
//! reference model before its speed counts. Prints a table of commands per second, latency
//! percentiles, memory per resting order and Agora's ratio to each peer.
//!
//! Run with `cargo bench -p book` (`-- --quick` for a short run). Environment knobs:
//! `AGORA_BENCH_OPS` (commands in workloads 1 and 2), `AGORA_BENCH_DEEP` (resting orders in
//! workload 3), `AGORA_BENCH_RUNS` (timed repetitions; the median counts),
//! `AGORA_BENCH_ENGINES` (comma-separated name prefixes, e.g. `agora,matchcore`).

// The counting allocator below needs `unsafe impl GlobalAlloc`; nothing else here is unsafe.
#![allow(unsafe_code)]
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use book::{Command, Engine, Event, MarketId, MarketSpec, ModifyOrder, PlaceOrder, Price, Qty};

#[path = "../tests/it/model.rs"]
mod model;
mod peers;

use peers::{Fill, PeerBook, Side};

// ----- memory accounting ------------------------------------------------------------------

/// Counts live heap bytes so memory per resting order can be measured for every engine alike.
struct Counting;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocated() -> isize {
    ALLOCATED.load(Ordering::Relaxed)
}

// ----- Agora behind the common trait --------------------------------------------------------

const MARKET: MarketId = MarketId(0);

struct Agora {
    engine: Engine,
    events: Vec<Event>,
}

impl Agora {
    fn new() -> Agora {
        let mut engine = Engine::new();
        let mut events = Vec::new();
        engine.create_market(MarketSpec::new("BTC-USD", 0, 0, 1, 1), &mut events);
        Agora {
            engine,
            events: Vec::with_capacity(256),
        }
    }

    #[inline]
    fn drain(&mut self, fills: &mut Vec<Fill>) {
        for event in &self.events {
            if let Event::Trade {
                maker,
                taker,
                price,
                qty,
                ..
            } = *event
            {
                fills.push(Fill {
                    maker,
                    taker,
                    price: price.0,
                    qty: qty.0,
                });
            }
        }
        self.events.clear();
    }
}

fn side_of(side: Side) -> book::Side {
    match side {
        Side::Buy => book::Side::Buy,
        Side::Sell => book::Side::Sell,
    }
}

impl PeerBook for Agora {
    fn name(&self) -> &'static str {
        "agora"
    }

    #[inline]
    fn place_gtc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        // Each order gets its own user, so self-trade prevention never applies.
        let order = PlaceOrder::limit(MARKET, id, id, side_of(side), Price(price), Qty(qty));
        self.engine.place(&order, &mut self.events);
        self.drain(fills);
    }

    #[inline]
    fn place_ioc(&mut self, id: u64, side: Side, price: i64, qty: u64, fills: &mut Vec<Fill>) {
        let mut order = PlaceOrder::limit(MARKET, id, id, side_of(side), Price(price), Qty(qty));
        order.tif = book::TimeInForce::Ioc;
        self.engine.place(&order, &mut self.events);
        self.drain(fills);
    }

    #[inline]
    fn place_market(&mut self, id: u64, side: Side, qty: u64, fills: &mut Vec<Fill>) {
        let order = PlaceOrder::market(MARKET, id, id, side_of(side), Qty(qty));
        self.engine.place(&order, &mut self.events);
        self.drain(fills);
    }

    #[inline]
    fn cancel(&mut self, id: u64) -> bool {
        self.engine.cancel(MARKET, id, id, &mut self.events);
        let ok = !matches!(self.events.first(), Some(Event::Rejected { .. }));
        self.events.clear();
        ok
    }

    #[inline]
    fn move_order(&mut self, id: u64, new_price: i64, fills: &mut Vec<Fill>) -> bool {
        let modify = ModifyOrder {
            market: MARKET,
            id,
            user: id,
            price: Some(Price(new_price)),
            qty: None,
        };
        self.engine.modify(&modify, &mut self.events);
        let ok = !matches!(self.events.first(), Some(Event::Rejected { .. }));
        self.drain(fills);
        ok
    }
}

// ----- workloads ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Op {
    Gtc {
        id: u64,
        side: Side,
        price: i64,
        qty: u64,
    },
    Ioc {
        id: u64,
        side: Side,
        price: i64,
        qty: u64,
    },
    Market {
        id: u64,
        side: Side,
        qty: u64,
    },
    Cancel {
        id: u64,
    },
    Move {
        id: u64,
        price: i64,
    },
}

impl Op {
    fn has_cancel(&self) -> bool {
        matches!(self, Op::Cancel { .. } | Op::Move { .. })
    }

    fn command(&self) -> Command {
        let side = |s: Side| side_of(s);
        match *self {
            Op::Gtc {
                id,
                side: s,
                price,
                qty,
            } => Command::Place(PlaceOrder::limit(
                MARKET,
                id,
                id,
                side(s),
                Price(price),
                Qty(qty),
            )),
            Op::Ioc {
                id,
                side: s,
                price,
                qty,
            } => {
                let mut order = PlaceOrder::limit(MARKET, id, id, side(s), Price(price), Qty(qty));
                order.tif = book::TimeInForce::Ioc;
                Command::Place(order)
            }
            Op::Market { id, side: s, qty } => {
                Command::Place(PlaceOrder::market(MARKET, id, id, side(s), Qty(qty)))
            }
            Op::Cancel { id } => Command::Cancel {
                market: MARKET,
                id,
                user: id,
            },
            Op::Move { id, price } => Command::Modify(ModifyOrder {
                market: MARKET,
                id,
                user: id,
                price: Some(Price(price)),
                qty: None,
            }),
        }
    }
}

#[inline]
fn apply<B: PeerBook>(book: &mut B, op: &Op, fills: &mut Vec<Fill>) {
    match *op {
        Op::Gtc {
            id,
            side,
            price,
            qty,
        } => book.place_gtc(id, side, price, qty, fills),
        Op::Ioc {
            id,
            side,
            price,
            qty,
        } => book.place_ioc(id, side, price, qty, fills),
        Op::Market { id, side, qty } => book.place_market(id, side, qty, fills),
        Op::Cancel { id } => {
            book.cancel(id);
        }
        Op::Move { id, price } => {
            book.move_order(id, price, fills);
        }
    }
}

/// A small deterministic generator (SplitMix64), so every run and every engine sees the same
/// stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn side(&mut self) -> Side {
        if self.next() & 1 == 0 {
            Side::Buy
        } else {
            Side::Sell
        }
    }
}

const CENTER: i64 = 1_000_000;

/// Live orders of the generator's shadow engine, with O(1) random pick and removal.
struct LiveSet {
    ids: Vec<u64>,
    position: std::collections::HashMap<u64, usize>,
}

impl LiveSet {
    fn new() -> LiveSet {
        LiveSet {
            ids: Vec::new(),
            position: std::collections::HashMap::new(),
        }
    }
    fn insert(&mut self, id: u64) {
        if !self.position.contains_key(&id) {
            self.position.insert(id, self.ids.len());
            self.ids.push(id);
        }
    }
    fn remove(&mut self, id: u64) {
        if let Some(index) = self.position.remove(&id) {
            self.ids.swap_remove(index);
            if index < self.ids.len() {
                self.position.insert(self.ids[index], index);
            }
        }
    }
    fn pick(&self, rng: &mut Rng) -> Option<u64> {
        (!self.ids.is_empty()).then(|| self.ids[rng.below(self.ids.len() as u64) as usize])
    }
}

/// Workload 1, after exchange-core's benchmark mix: about 1,000 live orders over about 750
/// price levels (bids below the centre, asks above, 375 levels each); 9% GTC, 3% IOC that
/// cross, 6% cancel, 82% move to another price of the same side. The mix bends towards GTC or
/// cancel to keep the live count near 1,000.
fn workload_mix(ops: usize, seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut shadow = Agora::new();
    let mut live = LiveSet::new();
    let mut stream = Vec::with_capacity(ops);
    let mut fills = Vec::new();
    let mut next_id = 1;
    let mut sides = std::collections::HashMap::new();
    let price_on = |rng: &mut Rng, side: Side| {
        let offset = 1 + rng.below(375) as i64;
        match side {
            Side::Buy => CENTER - offset,
            Side::Sell => CENTER + offset,
        }
    };
    while stream.len() < ops {
        let roll = rng.below(100);
        let count = live.ids.len();
        let op = if count < 900 || (roll < 9 && count < 1_100) {
            let side = rng.side();
            let id = next_id;
            next_id += 1;
            sides.insert(id, side);
            Op::Gtc {
                id,
                side,
                price: price_on(&mut rng, side),
                qty: 1 + rng.below(100),
            }
        } else if roll < 12 {
            let side = rng.side();
            let id = next_id;
            next_id += 1;
            let reach = rng.below(10) as i64;
            let price = match side {
                Side::Buy => CENTER + reach,
                Side::Sell => CENTER - reach,
            };
            Op::Ioc {
                id,
                side,
                price,
                qty: 1 + rng.below(50),
            }
        } else if roll < 18 || count > 1_100 {
            Op::Cancel {
                id: live.pick(&mut rng).unwrap(),
            }
        } else {
            let id = live.pick(&mut rng).unwrap();
            Op::Move {
                id,
                price: price_on(&mut rng, sides[&id]),
            }
        };
        fills.clear();
        apply(&mut shadow, &op, &mut fills);
        track(&shadow, &op, &fills, &mut live);
        stream.push(op);
    }
    stream
}

/// Keeps the generator's live set in step with its shadow engine.
fn track(shadow: &Agora, op: &Op, fills: &[Fill], live: &mut LiveSet) {
    for fill in fills {
        if shadow.engine.order(MARKET, fill.maker).is_none() {
            live.remove(fill.maker);
        }
    }
    match *op {
        Op::Gtc { id, .. } if shadow.engine.order(MARKET, id).is_some() => live.insert(id),
        Op::Cancel { id } => live.remove(id),
        Op::Move { id, .. } if shadow.engine.order(MARKET, id).is_none() => live.remove(id),
        _ => {}
    }
}

/// Workload 2: random GTC limit orders of either side within a 10-tick band, so most cross.
fn workload_band(ops: usize, seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    (0..ops as u64)
        .map(|i| {
            let side = rng.side();
            Op::Gtc {
                id: i + 1,
                side,
                price: CENTER - 5 + rng.below(10) as i64,
                qty: 1 + rng.below(10),
            }
        })
        .collect()
}

/// Workload 3: `resting` GTC orders on 10,000 levels per side (set up, timed separately), then
/// market orders that each sweep about 100 resting orders, until a tenth of the book is gone.
fn workload_deep(resting: usize, seed: u64) -> (Vec<Op>, Vec<Op>) {
    let mut rng = Rng(seed);
    let levels = 10_000u64.min(resting as u64 / 4).max(1);
    let build: Vec<Op> = (0..resting as u64)
        .map(|i| {
            let side = if i % 2 == 0 { Side::Buy } else { Side::Sell };
            let offset = 1 + rng.below(levels) as i64;
            let price = match side {
                Side::Buy => CENTER - offset,
                Side::Sell => CENTER + offset,
            };
            Op::Gtc {
                id: i + 1,
                side,
                price,
                qty: 1 + rng.below(20),
            }
        })
        .collect();
    // Orders average 10.5 lots: a sweep of 1,050 lots takes about 100 of them.
    let sweeps = (resting / 10 / 100).max(1) as u64;
    let sweep: Vec<Op> = (0..sweeps)
        .map(|i| Op::Market {
            id: resting as u64 + 1 + i,
            side: if i % 2 == 0 { Side::Buy } else { Side::Sell },
            qty: 1_050,
        })
        .collect();
    (build, sweep)
}

// ----- correctness -------------------------------------------------------------------------

/// Fills the reference model produces for a stream, op by op.
fn reference_fills(ops: &[Op]) -> Vec<Vec<Fill>> {
    let mut model = model::Model::default();
    let mut events = Vec::new();
    model.apply(
        &Command::CreateMarket(MarketSpec::new("BTC-USD", 0, 0, 1, 1)),
        &mut events,
    );
    ops.iter()
        .map(|op| {
            events.clear();
            model.apply(&op.command(), &mut events);
            events
                .iter()
                .filter_map(|e| match *e {
                    Event::Trade {
                        maker,
                        taker,
                        price,
                        qty,
                        ..
                    } => Some(Fill {
                        maker,
                        taker,
                        price: price.0,
                        qty: qty.0,
                    }),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// `None` when the engine agrees with the reference on every op; otherwise the first mismatch.
fn check<B: PeerBook>(mut book: B, ops: &[Op], expected: &[Vec<Fill>]) -> Option<String> {
    let mut fills = Vec::new();
    for (index, (op, want)) in ops.iter().zip(expected).enumerate() {
        fills.clear();
        apply(&mut book, op, &mut fills);
        if &fills != want {
            return Some(format!("op {index} {op:?}: got {fills:?}, want {want:?}"));
        }
    }
    None
}

// ----- timing ------------------------------------------------------------------------------

struct Measured {
    ops_per_second: f64,
    p50: Duration,
    p99: Duration,
    p9999: Duration,
}

fn throughput<B: PeerBook>(make: &dyn Fn() -> B, setup: &[Op], ops: &[Op], runs: usize) -> f64 {
    let mut rates = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut book = make();
        let mut fills = Vec::with_capacity(4_096);
        for op in setup {
            apply(&mut book, op, &mut fills);
            fills.clear();
        }
        let mut traded = 0usize;
        let start = Instant::now();
        for op in ops {
            apply(&mut book, black_box(op), &mut fills);
            traded += fills.len();
            fills.clear();
        }
        let elapsed = start.elapsed();
        black_box(traded);
        rates.push(ops.len() as f64 / elapsed.as_secs_f64());
        drop(book);
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn latencies<B: PeerBook>(
    make: &dyn Fn() -> B,
    setup: &[Op],
    ops: &[Op],
) -> (Duration, Duration, Duration) {
    let mut book = make();
    let mut fills = Vec::with_capacity(4_096);
    for op in setup {
        apply(&mut book, op, &mut fills);
        fills.clear();
    }
    let mut samples = Vec::with_capacity(ops.len());
    for op in ops {
        let start = Instant::now();
        apply(&mut book, black_box(op), &mut fills);
        samples.push(start.elapsed());
        fills.clear();
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.50), at(0.99), at(0.9999))
}

fn measure<B: PeerBook>(make: &dyn Fn() -> B, setup: &[Op], ops: &[Op], runs: usize) -> Measured {
    let ops_per_second = throughput(make, setup, ops, runs);
    let (p50, p99, p9999) = latencies(make, setup, ops);
    Measured {
        ops_per_second,
        p50,
        p99,
        p9999,
    }
}

/// Heap bytes per resting order after placing `build` into a fresh book.
fn memory_per_order<B: PeerBook>(make: &dyn Fn() -> B, build: &[Op]) -> f64 {
    let before = allocated();
    let mut book = make();
    let mut fills = Vec::new();
    for op in build {
        apply(&mut book, op, &mut fills);
        fills.clear();
    }
    drop(fills);
    let after = allocated();
    black_box(&book);
    (after - before) as f64 / build.len() as f64
}

/// The Instant::now() pair overhead, which every latency sample includes.
fn timer_overhead() -> Duration {
    let mut samples: Vec<Duration> = (0..100_000)
        .map(|_| {
            let start = Instant::now();
            start.elapsed()
        })
        .collect();
    samples.sort_unstable();
    samples[samples.len() / 2]
}

// ----- the run -----------------------------------------------------------------------------

struct Row {
    workload: &'static str,
    engine: &'static str,
    result: Result<Measured, String>,
}

/// One workload as every engine runs it: a prefix checked against the reference model, then
/// the timed stream.
struct Case<'a> {
    workload: &'static str,
    /// Ops applied before the checked ones (their fills are not compared).
    check_setup: &'a [Op],
    check_ops: &'a [Op],
    expected: &'a [Vec<Fill>],
    /// Ops applied, untimed, before the timed ones.
    setup: &'a [Op],
    ops: &'a [Op],
    runs: usize,
}

fn run_engine<B: PeerBook>(rows: &mut Vec<Row>, case: &Case<'_>, make: &dyn Fn() -> B) {
    let Case {
        workload,
        check_setup,
        check_ops,
        expected,
        setup,
        ops,
        runs,
    } = *case;
    let probe = make();
    let name = probe.name();
    if !selected(name) {
        return;
    }
    let needs_cancel = check_ops.iter().chain(ops).any(Op::has_cancel);
    if needs_cancel && !probe.supports_cancel() {
        rows.push(Row {
            workload,
            engine: name,
            result: Err("left out: its cancel is wrong (see docs/performance.md)".into()),
        });
        return;
    }
    drop(probe);
    let all: Vec<Op> = check_setup.iter().chain(check_ops).copied().collect();
    let mut wanted: Vec<Vec<Fill>> = vec![Vec::new(); check_setup.len()];
    wanted.extend_from_slice(expected);
    if let Some(mismatch) = check(make(), &all, &wanted) {
        rows.push(Row {
            workload,
            engine: name,
            result: Err(format!("wrong trades, not timed: {mismatch}")),
        });
        return;
    }
    eprintln!("  {workload}: {name} agrees with the reference; timing…");
    rows.push(Row {
        workload,
        engine: name,
        result: Ok(measure(make, setup, ops, runs)),
    });
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; nothing else is expected.
    let ops = env_usize("AGORA_BENCH_OPS", if quick { 200_000 } else { 2_000_000 });
    let deep = env_usize("AGORA_BENCH_DEEP", if quick { 100_000 } else { 1_000_000 });
    let runs = env_usize("AGORA_BENCH_RUNS", if quick { 3 } else { 5 }).max(1);
    let check_ops = 20_000.min(ops);
    eprintln!(
        "timer overhead (Instant pair, median): {:?}",
        timer_overhead()
    );

    let mut rows = Vec::new();

    // Workload 1.
    eprintln!("workload 1: exchange-core mix, {ops} commands");
    let mix = workload_mix(ops, 1);
    let expected = reference_fills(&mix[..check_ops]);
    let w1 = "1 mix (GTC/IOC/cancel/move)";
    let all_engines = |rows: &mut Vec<Row>, case: Case<'_>| {
        run_engine(rows, &case, &Agora::new);
        run_engine(rows, &case, &peers::matchcore_peer::MatchcoreBook::new);
        run_engine(rows, &case, &peers::orderbook_rs_peer::OrderbookRsBook::new);
        run_engine(rows, &case, &peers::nanobook_peer::NanobookBook::new);
    };
    all_engines(
        &mut rows,
        Case {
            workload: w1,
            check_setup: &[],
            check_ops: &mix[..check_ops],
            expected: &expected,
            setup: &[],
            ops: &mix,
            runs,
        },
    );
    drop(mix);

    // Workload 2.
    eprintln!("workload 2: crossing limit orders in a 10-tick band, {ops} commands");
    let band = workload_band(ops, 2);
    let expected = reference_fills(&band[..check_ops]);
    all_engines(
        &mut rows,
        Case {
            workload: "2 crossing band",
            check_setup: &[],
            check_ops: &band[..check_ops],
            expected: &expected,
            setup: &[],
            ops: &band,
            runs,
        },
    );
    drop(band);

    // Workload 3: correctness on a small deep book, speed on the full one.
    eprintln!("workload 3: deep book of {deep} resting orders, then sweeps");
    let (small_build, small_sweep) = workload_deep(20_000, 3);
    let model_ops: Vec<Op> = small_build.iter().chain(&small_sweep).copied().collect();
    let expected_all = reference_fills(&model_ops);
    let expected_sweep = expected_all[small_build.len()..].to_vec();
    let (build, sweep) = workload_deep(deep, 3);
    all_engines(
        &mut rows,
        Case {
            workload: "3a deep book: build",
            check_setup: &[],
            check_ops: &small_build,
            expected: &expected_all[..small_build.len()],
            setup: &[],
            ops: &build,
            runs,
        },
    );
    all_engines(
        &mut rows,
        Case {
            workload: "3b deep book: sweeps",
            check_setup: &small_build,
            check_ops: &small_sweep,
            expected: &expected_sweep,
            setup: &build,
            ops: &sweep,
            runs,
        },
    );

    // Memory per resting order on the deep book.
    let mut memory = Vec::new();
    memory_row(&mut memory, &Agora::new, &build);
    memory_row(
        &mut memory,
        &peers::matchcore_peer::MatchcoreBook::new,
        &build,
    );
    memory_row(
        &mut memory,
        &peers::orderbook_rs_peer::OrderbookRsBook::new,
        &build,
    );
    memory_row(
        &mut memory,
        &peers::nanobook_peer::NanobookBook::new,
        &build,
    );

    report(&rows, &memory, ops, deep, runs);
}

fn selected(name: &str) -> bool {
    std::env::var("AGORA_BENCH_ENGINES")
        .map(|only| only.split(',').any(|e| name.starts_with(e)))
        .unwrap_or(true)
}

fn memory_row<B: PeerBook>(
    memory: &mut Vec<(&'static str, f64)>,
    make: &dyn Fn() -> B,
    build: &[Op],
) {
    let name = make().name();
    if selected(name) {
        memory.push((name, memory_per_order(make, build)));
    }
}

fn report(rows: &[Row], memory: &[(&str, f64)], ops: usize, deep: usize, runs: usize) {
    println!();
    println!(
        "Matching benchmark: {ops} commands in workloads 1 and 2, {deep} resting orders in workload 3, median of {runs} runs, one thread."
    );
    println!();
    println!("| workload | engine | commands/s | p50 | p99 | p99.99 | Agora ÷ engine |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut workloads: Vec<&str> = rows.iter().map(|r| r.workload).collect();
    workloads.dedup();
    for workload in workloads {
        let agora = rows
            .iter()
            .find(|r| r.workload == workload && r.engine == "agora")
            .and_then(|r| r.result.as_ref().ok())
            .map(|m| m.ops_per_second);
        for row in rows.iter().filter(|r| r.workload == workload) {
            match &row.result {
                Ok(m) => {
                    let ratio = match (agora, row.engine) {
                        (_, "agora") => "1.00".to_string(),
                        (Some(a), _) => format!("{:.2}", a / m.ops_per_second),
                        (None, _) => "-".to_string(),
                    };
                    println!(
                        "| {workload} | {} | {} | {} | {} | {} | {ratio} |",
                        row.engine,
                        rate(m.ops_per_second),
                        nanos(m.p50),
                        nanos(m.p99),
                        nanos(m.p9999),
                    );
                }
                Err(why) => {
                    let short: String = why.chars().take(160).collect();
                    println!("| {workload} | {} | {short} | | | | |", row.engine);
                }
            }
        }
    }
    println!();
    println!("| engine | heap bytes per resting order ({deep} orders) |");
    println!("|---|---:|");
    for (engine, bytes) in memory {
        println!("| {engine} | {bytes:.0} |");
    }
}

fn rate(per_second: f64) -> String {
    if per_second >= 1e6 {
        format!("{:.2}M", per_second / 1e6)
    } else {
        format!("{:.1}K", per_second / 1e3)
    }
}

fn nanos(d: Duration) -> String {
    format!("{} ns", d.as_nanos())
}
