//! The `agora` binary.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the server frees on one thread what another
/// allocated (requests, answers, journal batches), where glibc's allocator spent about a
/// sixth of the REST benchmark's CPU (see docs/performance.md). With the crate's `override`
/// feature it also replaces `malloc` and `free` for the C code linked in, SQLite above all.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Agora: a peer-to-peer exchange and settlement server.
#[derive(Parser)]
#[command(name = "agora", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the server: the API on the embedded SQLite store in ./agora-data/ unless told
    /// otherwise (see docs/configuration.md).
    Serve {
        /// A TOML configuration file.
        #[arg(long, env = "AGORA_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the file and AGORA_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// `sqlite://PATH` or `postgres://…` (overrides the file and AGORA_DATABASE).
        #[arg(long)]
        database: Option<String>,
        /// Directory for the embedded database and generated secrets.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print the messages of WebSocket channels of a running server, one JSON line each.
    Watch {
        /// Channels: book.MARKET, trades.MARKET, ticker.MARKET; with --token also orders,
        /// fills and balances.
        #[arg(required = true)]
        channels: Vec<String>,
        /// The server.
        #[arg(long, env = "AGORA_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// A session token (from POST /api/v1/auth/login), for the private channels.
        #[arg(long, env = "AGORA_TOKEN")]
        token: Option<String>,
        /// Stop after this many messages (0: until the server closes).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Sign in to a running server and print a session token (for AGORA_TOKEN).
    Login(cli::admin::LoginArgs),
    /// Administer a running server: users, API keys, assets, markets, deposits, queues.
    Admin(cli::admin::AdminArgs),
    /// The matching engine on its own.
    Book {
        #[command(subcommand)]
        command: BookCommands,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommands,
    },
    /// The durable journal.
    Journal {
        #[command(subcommand)]
        command: JournalCommands,
    },
}

#[derive(Subcommand)]
enum BenchCommands {
    /// Durable commands per second, acknowledgement latency, replay and snapshot cost, each
    /// against the disk's own limit (see docs/performance.md).
    Core {
        /// Commands in the throughput run.
        #[arg(long, default_value_t = 300_000)]
        commands: u64,
        /// Concurrent submitters.
        #[arg(long, default_value_t = 2_048)]
        submitters: u64,
        /// Offered load of the latency run, commands per second.
        #[arg(long, default_value_t = 50_000)]
        offered: u64,
        /// Seconds of the latency run.
        #[arg(long, default_value_t = 3)]
        latency_seconds: u64,
        /// Resting orders in the snapshot run.
        #[arg(long, default_value_t = 1_000_000)]
        snapshot_orders: u64,
        /// PostgreSQL server to measure too.
        #[arg(long, env = "AGORA_BENCH_POSTGRES_URL")]
        postgres: Option<String>,
    },
    /// Orders placed and cancelled over REST by many keep-alive connections against `agora
    /// serve` in a child process, with latency percentiles and CPU (see docs/performance.md).
    Api {
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 256)]
        connections: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// SQLite durability: full or normal.
        #[arg(long, default_value = "full")]
        durability: String,
        /// Open loop: requests per second offered on a fixed schedule, latency counted from
        /// when each was due (without it, each connection sends as soon as it is answered).
        #[arg(long)]
        rate: Option<u64>,
    },
    /// The WebSocket API against `agora serve` in a child process: order commands with many
    /// in flight per connection, then thousands of book subscribers while orders flow (delivery
    /// lag, server memory; see docs/performance.md).
    Ws {
        /// Orders run: signed-in connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Orders run: place/cancel commands each connection keeps in flight.
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        /// Subscribers run: clients subscribed to the book channel.
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// Subscribers run: the driver's order commands per second (over REST).
        #[arg(long, default_value_t = 200)]
        driver_rate: u64,
        /// Seconds of load in each run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// SQLite durability: full or normal.
        #[arg(long, default_value = "full")]
        durability: String,
        /// Only one run: orders or subscribers.
        #[arg(long)]
        only: Option<String>,
    },
    /// The job queue end to end, adds and add-to-start latency on each backend, against
    /// BullMQ and graphile-worker in the same run (see docs/performance.md).
    Queue {
        /// No-op jobs in the end-to-end and bulk-add runs.
        #[arg(long, default_value_t = 20_000)]
        jobs: u64,
        /// Jobs added one at a time.
        #[arg(long, default_value_t = 5_000)]
        single: u64,
        /// Add-to-start latency samples.
        #[arg(long, default_value_t = 500)]
        samples: u64,
        /// PostgreSQL server to measure too.
        #[arg(long, env = "AGORA_BENCH_POSTGRES_URL")]
        postgres: Option<String>,
        /// The peers' benchmark script; `none` to skip the peers.
        #[arg(long, default_value = "bench/peers/run.sh")]
        peers: String,
    },
}

#[derive(Subcommand)]
enum JournalCommands {
    /// Check the journal's checksum chain, the snapshots, recovery against a replay from zero,
    /// and the invariants; exits non-zero on any problem.
    Verify {
        /// The database: sqlite://PATH or postgres://…
        #[arg(
            long,
            env = "AGORA_DATABASE",
            default_value = "sqlite://agora-data/agora.db"
        )]
        database: String,
    },
    /// Bring the read models (orders, trades, balance changes, audit) up to the journal;
    /// with --rebuild, empty them first and rebuild them from the first command.
    Project {
        /// The database: sqlite://PATH or postgres://…
        #[arg(
            long,
            env = "AGORA_DATABASE",
            default_value = "sqlite://agora-data/agora.db"
        )]
        database: String,
        /// Empty the read models and rebuild them from the journal.
        #[arg(long)]
        rebuild: bool,
    },
}

#[derive(Subcommand)]
enum BookCommands {
    /// Read commands as JSON lines, write events as JSON lines (see docs/replay.md).
    Replay {
        /// Read commands from this file instead of standard input.
        #[arg(long, short)]
        input: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    cli::without_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Commands::Login(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::admin::login(args, io::stdout().lock()))?;
        }
        Commands::Admin(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::admin::run(args, io::stdout().lock()))?;
        }
        Commands::Watch {
            channels,
            server,
            token,
            count,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::watch::run(
                cli::watch::WatchOptions {
                    server,
                    token,
                    channels,
                    count,
                },
                io::stdout().lock(),
            ))?;
        }
        Commands::Serve {
            config,
            listen,
            database,
            data_dir,
        } => {
            let mut config = server::Config::load(config.as_deref(), std::env::vars())?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(database) = database {
                config.database = Some(database);
            }
            if let Some(data_dir) = data_dir {
                config.data_dir = data_dir;
            }
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::serve::run(config))?;
        }
        Commands::Bench {
            command:
                BenchCommands::Core {
                    commands,
                    submitters,
                    offered,
                    latency_seconds,
                    snapshot_orders,
                    postgres,
                },
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::bench::run(cli::bench::BenchOptions {
                commands,
                submitters: submitters.max(1),
                offered_per_second: offered.max(1),
                latency_run: std::time::Duration::from_secs(latency_seconds.max(1)),
                snapshot_orders,
                postgres_url: postgres,
            }))?;
        }
        Commands::Bench {
            command:
                BenchCommands::Api {
                    connections,
                    seconds,
                    durability,
                    rate,
                },
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::bench_api::run(cli::bench_api::ApiBenchOptions {
                connections: connections.max(1),
                duration: std::time::Duration::from_secs(seconds.max(1)),
                durability,
                rate,
            }))?;
        }
        Commands::Bench {
            command:
                BenchCommands::Ws {
                    connections,
                    in_flight,
                    subscribers,
                    driver_rate,
                    seconds,
                    durability,
                    only,
                },
        } => {
            anyhow::ensure!(
                matches!(only.as_deref(), None | Some("orders" | "subscribers")),
                "--only takes orders or subscribers"
            );
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::bench_ws::run(cli::bench_ws::WsBenchOptions {
                connections: connections.max(1),
                in_flight: in_flight.max(1),
                subscribers: subscribers.max(1),
                driver_rate: driver_rate.max(1),
                duration: std::time::Duration::from_secs(seconds.max(1)),
                durability,
                orders: only.as_deref() != Some("subscribers"),
                subscribers_run: only.as_deref() != Some("orders"),
            }))?;
        }
        Commands::Bench {
            command:
                BenchCommands::Queue {
                    jobs,
                    single,
                    samples,
                    postgres,
                    peers,
                },
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::bench_queue::run(cli::bench_queue::QueueBenchOptions {
                jobs: jobs.max(1),
                single: single.max(1),
                samples: samples.max(1),
                postgres_url: postgres,
                peers_script: (peers != "none").then(|| peers.into()),
            }))?;
        }
        Commands::Journal {
            command: JournalCommands::Project { database, rebuild },
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            let projected = runtime.block_on(cli::journal::project(&database, rebuild))?;
            println!("projected {projected} commands");
        }
        Commands::Journal {
            command: JournalCommands::Verify { database },
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(cli::journal::verify(&database))?;
            for line in &report.lines {
                println!("{line}");
            }
            if !report.ok {
                std::process::exit(1);
            }
        }
        Commands::Book {
            command: BookCommands::Replay { input },
        } => {
            let stdout = io::stdout().lock();
            match input {
                Some(path) => {
                    let file = File::open(&path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    cli::replay::run(BufReader::new(file), stdout)?;
                }
                None => {
                    cli::replay::run(io::stdin().lock(), stdout)?;
                }
            }
        }
    }
    Ok(())
}
