//! `agora login` and `agora admin …`: the common administration of a running server (users,
//! API keys, assets, markets, deposits, the job queue's queues and dead jobs) over its HTTP
//! API, for operators who would otherwise write `curl` lines.
//!
//! Each subcommand is one or a few requests; it prints the server's JSON answer on one line
//! (so that it pipes into `jq` like `agora watch` and `agora book replay` do), and an error
//! answer becomes an error naming the server's code, message and field, which the binary
//! prints to stderr before exiting non-zero. Amounts, prices and quantities are passed on as
//! the decimal strings they were typed as: the server parses them and names the field it
//! refuses, so the command line never rounds anything.

use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::{Context, bail};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};

/// The server unless told otherwise.
pub const SERVER_DEFAULT: &str = "http://127.0.0.1:8080";
/// Users asked for per page when a user name is looked up (the server's page maximum).
pub const USERS_PAGE_MAX: usize = 1_000;
/// Dead jobs listed unless told otherwise (the server's own default).
pub const DEAD_JOBS_DEFAULT: usize = 100;
/// Longest password read from standard input, in bytes (the server refuses longer ones).
pub const PASSWORD_BYTES_MAX: usize = 256;

/// `agora login`: sign in and print the session token.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The server.
    #[arg(long, env = "AGORA_SERVER", default_value = SERVER_DEFAULT)]
    pub server: String,
    /// The user name.
    #[arg(long)]
    pub username: String,
    /// The password; without it (and without AGORA_PASSWORD), the first line of standard
    /// input.
    #[arg(long, env = "AGORA_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

/// `agora admin`: where the server is, who calls it, and what to do.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The server.
    #[arg(
        long,
        env = "AGORA_SERVER",
        default_value = SERVER_DEFAULT,
        global = true,
        help_heading = "Connection"
    )]
    pub server: String,
    /// A session token (`agora login` prints one).
    #[arg(
        long,
        env = "AGORA_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "Connection"
    )]
    pub token: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The administration subcommands.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Users (admin role).
    User {
        /// What to do with users.
        #[command(subcommand)]
        command: UserCommand,
    },
    /// The caller's own API keys, for signed requests.
    ApiKey {
        /// What to do with API keys.
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Assets (admin role).
    Asset {
        /// What to do with assets.
        #[command(subcommand)]
        command: AssetCommand,
    },
    /// Markets (admin role).
    Market {
        /// What to do with markets.
        #[command(subcommand)]
        command: MarketCommand,
    },
    /// Credit a deposit to a user's available balance (admin role).
    Deposit(DepositArgs),
    /// Users' withdrawals (admin role).
    Withdrawal {
        /// What to do with withdrawals.
        #[command(subcommand)]
        command: WithdrawalCommand,
    },
    /// Every queue of the job queue with its jobs counted by state (operator role).
    Queues,
    /// Dead jobs, newest death first (operator role).
    DeadJobs(DeadJobsArgs),
}

/// What to do with users.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user.
    Create {
        /// Letters, digits, `.`, `_` and `-`, 1 to 64.
        #[arg(long)]
        username: String,
        /// 8 to 256 bytes; without it, the first line of standard input.
        #[arg(long)]
        password: Option<String>,
        /// What the user may do.
        #[arg(long, value_enum, default_value_t = RoleName::User)]
        role: RoleName,
    },
    /// List users by id.
    List {
        /// Users with a larger id than this.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many, 1 to 1000 (the server's default: 100).
        #[arg(long)]
        limit: Option<usize>,
    },
}

/// A user's role.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleName {
    /// Trades on its own account.
    User,
    /// Also runs the job queue.
    Operator,
    /// Also manages users, assets, markets and funds.
    Admin,
}

impl RoleName {
    fn as_str(self) -> &'static str {
        match self {
            RoleName::User => "user",
            RoleName::Operator => "operator",
            RoleName::Admin => "admin",
        }
    }
}

/// What to do with the caller's API keys.
#[derive(Subcommand, Debug)]
pub enum ApiKeyCommand {
    /// Create an API key for the caller; its secret is in this answer only.
    Create {
        /// What the key is for, at most 64 characters.
        #[arg(long)]
        label: Option<String>,
    },
    /// The caller's API keys, without their secrets.
    List,
}

/// What to do with assets.
#[derive(Subcommand, Debug)]
pub enum AssetCommand {
    /// Register an asset.
    Create {
        /// 1 to 12 upper-case letters or digits, such as BTC.
        #[arg(long)]
        symbol: String,
        /// Decimal places of its minor unit, 0 to 18.
        #[arg(long)]
        decimals: u32,
    },
}

/// What to do with markets.
#[derive(Subcommand, Debug)]
pub enum MarketCommand {
    /// Create a market between two registered assets.
    Create(MarketArgs),
    /// Stop a market taking new or modified orders; cancels still go through (operator role).
    Halt {
        /// The market, BASE-QUOTE.
        symbol: String,
    },
    /// Let a halted market trade again (operator role).
    Resume {
        /// The market, BASE-QUOTE.
        symbol: String,
    },
    /// Change a market's fees, from its next trade on.
    Fees {
        /// The market, BASE-QUOTE.
        symbol: String,
        /// The resting side's fee in basis points.
        #[arg(long)]
        maker_fee_bps: Option<u32>,
        /// The incoming side's fee in basis points.
        #[arg(long)]
        taker_fee_bps: Option<u32>,
    },
}

/// What to do with withdrawals.
#[derive(Subcommand, Debug)]
pub enum WithdrawalCommand {
    /// Withdrawals, newest first.
    List {
        /// Only this user's (by id).
        #[arg(long)]
        user: Option<u64>,
        /// Only those in this state: pending, completed or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// At most this many (the server's default: 100).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Record that a pending withdrawal was paid out: its held funds leave the ledger.
    Complete {
        /// Withdrawal id.
        id: u64,
    },
    /// Cancel a pending withdrawal: its held funds return to the user.
    Cancel {
        /// Withdrawal id.
        id: u64,
    },
}

/// A new market; options left out take the server's defaults.
#[derive(Args, Debug)]
pub struct MarketArgs {
    /// BASE-QUOTE, such as BTC-USDT; both assets must be registered.
    #[arg(long)]
    pub symbol: String,
    /// Price step, such as 0.01.
    #[arg(long)]
    pub tick: String,
    /// Quantity step, such as 0.0001.
    #[arg(long)]
    pub lot: String,
    /// How trades settle (the server's default: instant).
    #[arg(long, value_enum)]
    pub settlement: Option<SettlementName>,
    /// The resting side's fee in basis points (default 0).
    #[arg(long)]
    pub maker_fee_bps: Option<u32>,
    /// The incoming side's fee in basis points (default 0).
    #[arg(long)]
    pub taker_fee_bps: Option<u32>,
    /// Smallest order quantity.
    #[arg(long)]
    pub min_qty: Option<String>,
    /// Largest order quantity.
    #[arg(long)]
    pub max_qty: Option<String>,
    /// Largest distance of a limit price from the last trade, basis points.
    #[arg(long)]
    pub price_band_bps: Option<u32>,
    /// Default self-trade prevention.
    #[arg(long, value_enum)]
    pub stp: Option<StpName>,
    /// A payment method orders may name (escrow markets); repeat or separate with commas.
    #[arg(long = "payment-method", value_delimiter = ',')]
    pub payment_methods: Vec<String>,
}

/// How trades of a market settle.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SettlementName {
    /// Both sides are paid on the platform when the trade happens.
    Instant,
    /// The seller's asset is held in escrow while the buyer pays off-platform.
    Escrow,
}

/// Self-trade prevention.
#[derive(Clone, Copy, Debug, ValueEnum)]
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

/// A deposit to credit.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("who").required(true).args(["user", "username"])))]
pub struct DepositArgs {
    /// The user credited, by id.
    #[arg(long)]
    pub user: Option<u64>,
    /// The user credited, by name (looked up in the list of users).
    #[arg(long)]
    pub username: Option<String>,
    /// Asset symbol.
    #[arg(long)]
    pub asset: String,
    /// Amount, a decimal such as 0.5, with at most the asset's decimal places. Passed to the
    /// server as written (a negative one too), which validates it.
    #[arg(long, allow_hyphen_values = true)]
    pub amount: String,
}

/// Which dead jobs to list.
#[derive(Args, Debug)]
pub struct DeadJobsArgs {
    /// Only this queue's; without it, every queue's.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only jobs that died of this error category (timeout, network, validation, …).
    #[arg(long)]
    pub category: Option<String>,
    /// At most this many, 1 to 1000.
    #[arg(long, default_value_t = DEAD_JOBS_DEFAULT)]
    pub limit: usize,
}

/// Signs in and writes the session token, alone on a line, to `out`.
pub async fn login(args: LoginArgs, mut out: impl Write) -> anyhow::Result<()> {
    let password = match args.password {
        Some(password) => password,
        None => password_from_stdin()?,
    };
    let client = Client::new(&args.server, None)?;
    let session = client
        .call(
            Method::POST,
            &["auth", "login"],
            &[],
            Some(json!({"username": args.username, "password": password})),
        )
        .await?;
    let token = session["token"]
        .as_str()
        .context("the server's login answer has no token")?;
    writeln!(out, "{token}")?;
    Ok(())
}

/// Runs one administration subcommand and writes the server's answer to `out` as one JSON
/// line (nothing for an answer without a body).
pub async fn run(args: AdminArgs, mut out: impl Write) -> anyhow::Result<()> {
    let Some(token) = args.token else {
        bail!("no session token: pass --token or set AGORA_TOKEN (`agora login` prints one)");
    };
    let client = Client::new(&args.server, Some(token))?;
    let answer = match args.command {
        AdminCommand::User {
            command:
                UserCommand::Create {
                    username,
                    password,
                    role,
                },
        } => {
            let password = match password {
                Some(password) => password,
                None => password_from_stdin()?,
            };
            let body = json!({"username": username, "password": password, "role": role.as_str()});
            client
                .call(Method::POST, &["admin", "users"], &[], Some(body))
                .await?
        }
        AdminCommand::User {
            command: UserCommand::List { after, limit },
        } => {
            let mut query = Vec::new();
            if let Some(after) = after {
                query.push(("after", after.to_string()));
            }
            if let Some(limit) = limit {
                query.push(("limit", limit.to_string()));
            }
            client
                .call(Method::GET, &["admin", "users"], &query, None)
                .await?
        }
        AdminCommand::ApiKey {
            command: ApiKeyCommand::Create { label },
        } => {
            let mut body = Map::new();
            if let Some(label) = label {
                body.insert("label".into(), label.into());
            }
            client
                .call(Method::POST, &["api-keys"], &[], Some(body.into()))
                .await?
        }
        AdminCommand::ApiKey {
            command: ApiKeyCommand::List,
        } => client.call(Method::GET, &["api-keys"], &[], None).await?,
        AdminCommand::Asset {
            command: AssetCommand::Create { symbol, decimals },
        } => {
            let body = json!({"symbol": symbol, "decimals": decimals});
            client
                .call(Method::POST, &["admin", "assets"], &[], Some(body))
                .await?
        }
        AdminCommand::Market {
            command: MarketCommand::Create(market),
        } => {
            client
                .call(
                    Method::POST,
                    &["admin", "markets"],
                    &[],
                    Some(market_body(market)),
                )
                .await?
        }
        AdminCommand::Market {
            command: MarketCommand::Halt { symbol },
        } => {
            client
                .call(
                    Method::POST,
                    &["admin", "markets", &symbol, "halt"],
                    &[],
                    None,
                )
                .await?
        }
        AdminCommand::Market {
            command: MarketCommand::Resume { symbol },
        } => {
            client
                .call(
                    Method::POST,
                    &["admin", "markets", &symbol, "resume"],
                    &[],
                    None,
                )
                .await?
        }
        AdminCommand::Market {
            command:
                MarketCommand::Fees {
                    symbol,
                    maker_fee_bps,
                    taker_fee_bps,
                },
        } => {
            let mut body = Map::new();
            if let Some(bps) = maker_fee_bps {
                body.insert("maker_fee_bps".into(), bps.into());
            }
            if let Some(bps) = taker_fee_bps {
                body.insert("taker_fee_bps".into(), bps.into());
            }
            client
                .call(
                    Method::PATCH,
                    &["admin", "markets", &symbol],
                    &[],
                    Some(body.into()),
                )
                .await?
        }
        AdminCommand::Withdrawal {
            command:
                WithdrawalCommand::List {
                    user,
                    status,
                    limit,
                },
        } => {
            let mut query = Vec::new();
            if let Some(user) = user {
                query.push(("user_id", user.to_string()));
            }
            if let Some(status) = status {
                query.push(("status", status));
            }
            if let Some(limit) = limit {
                query.push(("limit", limit.to_string()));
            }
            client
                .call(Method::GET, &["admin", "withdrawals"], &query, None)
                .await?
        }
        AdminCommand::Withdrawal {
            command: WithdrawalCommand::Complete { id },
        } => {
            let id = id.to_string();
            client
                .call(
                    Method::POST,
                    &["admin", "withdrawals", &id, "complete"],
                    &[],
                    None,
                )
                .await?
        }
        AdminCommand::Withdrawal {
            command: WithdrawalCommand::Cancel { id },
        } => {
            let id = id.to_string();
            client
                .call(
                    Method::POST,
                    &["admin", "withdrawals", &id, "cancel"],
                    &[],
                    None,
                )
                .await?
        }
        AdminCommand::Deposit(deposit) => {
            let user = match (deposit.user, deposit.username) {
                (Some(id), _) => id,
                (None, Some(name)) => client.user_id(&name).await?,
                (None, None) => unreachable!("clap requires --user or --username"),
            };
            let body = json!({"user_id": user, "asset": deposit.asset, "amount": deposit.amount});
            client
                .call(Method::POST, &["admin", "deposits"], &[], Some(body))
                .await?
        }
        AdminCommand::Queues => client.call(Method::GET, &["queues"], &[], None).await?,
        AdminCommand::DeadJobs(dead) => dead_jobs(&client, dead).await?,
    };
    if !answer.is_null() {
        writeln!(out, "{answer}")?;
    }
    Ok(())
}

/// The body of `POST /admin/markets`: only the options given, so the server's defaults
/// apply to the rest.
fn market_body(market: MarketArgs) -> Value {
    let mut body = Map::new();
    body.insert("symbol".into(), market.symbol.into());
    body.insert("tick".into(), market.tick.into());
    body.insert("lot".into(), market.lot.into());
    if let Some(settlement) = market.settlement {
        let name = match settlement {
            SettlementName::Instant => "instant",
            SettlementName::Escrow => "escrow",
        };
        body.insert("settlement".into(), name.into());
    }
    if let Some(bps) = market.maker_fee_bps {
        body.insert("maker_fee_bps".into(), bps.into());
    }
    if let Some(bps) = market.taker_fee_bps {
        body.insert("taker_fee_bps".into(), bps.into());
    }
    if let Some(qty) = market.min_qty {
        body.insert("min_qty".into(), qty.into());
    }
    if let Some(qty) = market.max_qty {
        body.insert("max_qty".into(), qty.into());
    }
    if let Some(bps) = market.price_band_bps {
        body.insert("price_band_bps".into(), bps.into());
    }
    if let Some(stp) = market.stp {
        let name = match stp {
            StpName::CancelNewest => "cancel_newest",
            StpName::CancelOldest => "cancel_oldest",
            StpName::CancelBoth => "cancel_both",
            StpName::Decrement => "decrement",
        };
        body.insert("stp".into(), name.into());
    }
    if !market.payment_methods.is_empty() {
        body.insert("payment_methods".into(), market.payment_methods.into());
    }
    body.into()
}

/// One queue's dead-letter queue as the server answers it; without a queue, every queue's
/// with dead jobs, merged newest death first and cut to the limit.
async fn dead_jobs(client: &Client, dead: DeadJobsArgs) -> anyhow::Result<Value> {
    let mut query = vec![("limit", dead.limit.to_string())];
    if let Some(category) = dead.category {
        query.push(("category", category));
    }
    if let Some(queue) = dead.queue {
        return client
            .call(Method::GET, &["queues", &queue, "dead"], &query, None)
            .await;
    }
    let queues = client.call(Method::GET, &["queues"], &[], None).await?;
    let mut jobs = Vec::new();
    for queue in queues
        .as_array()
        .context("the queue list is not an array")?
    {
        let has_dead = queue["counts"]["dead"].as_u64().is_some_and(|n| n > 0);
        let Some(name) = queue["name"].as_str().filter(|_| has_dead) else {
            continue;
        };
        match client
            .call(Method::GET, &["queues", name, "dead"], &query, None)
            .await?
        {
            Value::Array(page) => jobs.extend(page),
            _ => bail!("the dead jobs of queue {name} are not an array"),
        }
    }
    // Newest death first, as within one queue; the id breaks ties so the order is stable.
    jobs.sort_by_key(|job| std::cmp::Reverse((job["finished_ms"].as_i64(), job["id"].as_i64())));
    jobs.truncate(dead.limit);
    Ok(Value::Array(jobs))
}

/// Reads a password from the first line of standard input, prompting on a terminal.
fn password_from_stdin() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        // No echo control without another dependency: the prompt says so rather than hide it.
        eprint!("password (shown as typed; pipe it in or use --password to avoid that): ");
        std::io::stderr().flush()?;
    }
    let mut line = String::new();
    stdin
        .lock()
        .take(PASSWORD_BYTES_MAX as u64 + 2)
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("no password: pass --password, set AGORA_PASSWORD or write it to standard input");
    }
    Ok(password.to_string())
}

/// An HTTP client of one server's `/api/v1`, signed in with a session token or not at all.
struct Client {
    http: reqwest::Client,
    /// The server's `/api/v1`, without a trailing slash.
    api: Url,
    token: Option<String>,
}

impl Client {
    fn new(server: &str, token: Option<String>) -> anyhow::Result<Client> {
        let mut api = Url::parse(server).with_context(|| {
            format!("--server {server:?} is not a URL such as {SERVER_DEFAULT}")
        })?;
        if api.cannot_be_a_base() {
            bail!("--server {server:?} is not a URL such as {SERVER_DEFAULT}");
        }
        api.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("--server {server:?} cannot have a path"))?
            .pop_if_empty()
            .extend(["api", "v1"]);
        Ok(Client {
            http: reqwest::Client::new(),
            api,
            token,
        })
    }

    /// One request to `/api/v1/<segments>?<query>`: the answer's JSON (null when it has no
    /// body), or an error with the server's code, message and field.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut url = self.api.clone();
        // Segments are escaped one by one, so a queue or key named with odd characters
        // cannot change the route.
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("the server URL cannot have a path"))?
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the server: {method} {url}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("cannot read the answer to {method} {url}"))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text)
                .with_context(|| format!("the answer to {method} {url} is not JSON: {text}"));
        }
        Err(server_error(status, &text))
    }

    /// The id of the user with this name, looked up page by page.
    async fn user_id(&self, username: &str) -> anyhow::Result<u64> {
        let mut after = 0;
        loop {
            let query = [
                ("after", after.to_string()),
                ("limit", USERS_PAGE_MAX.to_string()),
            ];
            let page = self
                .call(Method::GET, &["admin", "users"], &query, None)
                .await?;
            let users = page.as_array().context("the user list is not an array")?;
            for user in users {
                let id = user["id"].as_u64().context("a listed user has no id")?;
                if user["username"] == username {
                    return Ok(id);
                }
                after = after.max(id);
            }
            if users.len() < USERS_PAGE_MAX {
                bail!("UNKNOWN_USER: no user named {username:?}");
            }
        }
    }
}

/// An error answer as an error: `CODE: message (field F, HTTP status)`, or the status and
/// the text when the answer is not the server's error body (a proxy's page, say).
fn server_error(status: StatusCode, text: &str) -> anyhow::Error {
    let body: Option<Value> = serde_json::from_str(text).ok();
    let error = body.as_ref().map(|b| &b["error"]);
    match error.and_then(|e| Some((e["code"].as_str()?, e["message"].as_str()?))) {
        Some((code, message)) => match error.and_then(|e| e["field"].as_str()) {
            Some(field) => anyhow::anyhow!("{code}: {message} (field {field}, HTTP {status})"),
            None => anyhow::anyhow!("{code}: {message} (HTTP {status})"),
        },
        None => anyhow::anyhow!("HTTP {status}: {}", text.trim()),
    }
}
