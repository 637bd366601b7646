//! The running server's shared state and its life: opening the store, recovering the core,
//! catching the read models up, creating the first administrator, the clock and projector
//! tasks, and the one path every command takes to the sequencer.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agora_core::projector::Projector;
use agora_core::sequencer::{Ack, Sequencer, SequencerOptions, SubmitError, Tasks};
use agora_core::{CoreCommand, CoreRejection, State};
use axum::http::StatusCode;
use book::RejectReason;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use store::{Durability, Store, StoreOptions};
use tokio::sync::{Notify, watch};

use crate::auth::{self, Authenticator, Role};
use crate::config::Config;
use crate::error::ApiError;

/// Named bounds.
pub mod limits {
    /// How long a read waits for the read models to include the caller's last command.
    pub const PROJECTION_WAIT_MS: u64 = 2_000;
    /// How long the projector sleeps when nothing wakes it.
    pub const PROJECTOR_IDLE_MS: u64 = 200;
    /// How long the projector waits after a failure before trying again.
    pub const PROJECTOR_RETRY_MS: u64 = 1_000;
    /// How often expired idempotency keys are deleted.
    pub const PURGE_EVERY_MS: i64 = 60_000;
}

/// What every handler shares.
pub struct App {
    /// The configuration in effect.
    pub config: Config,
    /// The store.
    pub store: Arc<Store>,
    /// The core's single writer.
    pub sequencer: Sequencer,
    /// Sessions and signatures.
    pub auth: Authenticator,
    /// The job queue.
    pub queue: queue::Queue,
    /// Prometheus rendering of every metric of the process.
    pub metrics: PrometheusHandle,
    next_order_id: AtomicU64,
    next_withdrawal_id: AtomicU64,
    last_acked: AtomicU64,
    projector_wake: Notify,
    /// A read is waiting for the read models: the projector does not linger.
    projection_wanted: Notify,
    /// The highest sequence number a read has waited for: the projector does not linger
    /// before it has projected that far, even when the wake-up was spent on an earlier step.
    projection_wanted_seq: AtomicU64,
    projected: watch::Receiver<u64>,
    /// Set when the server begins to shut down: long-lived connections end.
    pub closing: watch::Sender<bool>,
    /// Durable events in journal order, and the shared book and ticker fan-out, for
    /// WebSocket subscribers.
    pub feed: crate::ws::Feed,
    /// Idempotency keys and objects with a command in flight.
    pub in_flight: crate::idempotency::InFlight,
    /// Rate limits per address and per user.
    pub rate_limits: crate::limit::RateLimits,
    /// Requests in flight, admitted by priority class.
    pub requests: crate::admission::InFlightRequests,
    /// The HTTP metrics' handles by route, method and status.
    pub http_metrics: crate::api::HttpMetrics,
    /// Every market's spec, by id. Specs never change once created, so this is filled from
    /// the state on a miss and never invalidated.
    markets: std::sync::RwLock<Vec<book::MarketSpec>>,
    /// Serializes the admin commands that choose ids from the state (assets).
    pub admin_lock: tokio::sync::Mutex<()>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The process's metrics recorder, installed once.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .expect("buckets are not empty")
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        agora_core::names::BATCH_COMMANDS.into(),
                    ),
                    &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 8192.0],
                )
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program's); then the
            // handle renders only what this recorder sees, which is nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The background parts of a started app, stopped by [`Background::stop`].
pub struct Background {
    tasks: Tasks,
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// Stops the clock and the projector, then waits for the sequencer to write and answer
    /// everything it accepted. The caller drops its last [`App`] before this returns.
    pub async fn stop(self, app: Arc<App>) {
        let _ = self.stop.send(true);
        app.projector_wake.notify_one();
        for handle in self.handles {
            let _ = handle.await;
        }
        let store = app.store.clone();
        drop(app);
        self.tasks.join().await;
        store.close().await;
    }
}

/// A first administrator created at start, to be told to the operator.
pub struct CreatedAdmin {
    /// Name.
    pub username: String,
    /// Password, when it was generated (not taken from the configuration).
    pub generated_password: Option<String>,
}

impl App {
    /// Opens everything `config` names and starts the background tasks.
    pub async fn start(
        config: Config,
    ) -> anyhow::Result<(Arc<App>, Background, Option<CreatedAdmin>)> {
        // Before the sequencer and projector start: they take their metric handles once.
        let metrics = metrics_handle();
        let options = StoreOptions {
            durability: if config.durability == "normal" {
                Durability::Normal
            } else {
                Durability::Full
            },
            pg_schema: config.database_schema.clone(),
            ..StoreOptions::default()
        };
        let url = config.database_url();
        let store = Arc::new(Store::open(&url, &options).await?);
        let (sequencer, tasks, recovery) = Sequencer::start(
            store.clone(),
            SequencerOptions {
                snapshot_every_commands: config.snapshot_every_commands,
                ..SequencerOptions::default()
            },
        )
        .await?;
        tracing::info!(
            seq = recovery.seq,
            replayed = recovery.replayed_commands,
            "core recovered"
        );
        let mut projector = Projector::start(store.clone()).await?;
        projector.catch_up().await?;
        let live_max = sequencer
            .read(|state: &State| {
                let engine = state.engine();
                engine
                    .markets()
                    .flat_map(|m| engine.orders(m).into_iter().map(|o| o.id))
                    .max()
                    .unwrap_or(0)
            })
            .await?;
        // Above every id in the journal and every id a pending idempotency key holds.
        let next_order_id = store
            .max_order_id()
            .await?
            .max(live_max)
            .max(store.max_pending_order_id().await?)
            + 1;
        // The projector has caught up, so the read model holds every journaled withdrawal.
        let next_withdrawal_id = store.max_withdrawal_id().await? + 1;
        let secret = jwt_secret(&config)?;
        let auth = Authenticator::new(
            &secret,
            &config.auth.audience,
            config.auth.session_ttl_s,
            config.auth.signature_window_s,
        );
        let created = bootstrap_admin(&store, &config).await?;
        let (projected_tx, projected) = watch::channel(projector.seq());
        let (stop, stopped) = watch::channel(false);
        let app = Arc::new(App {
            queue: queue::Queue::new(store.clone()),
            rate_limits: crate::limit::RateLimits::new(&config.limits),
            requests: crate::admission::InFlightRequests::default(),
            http_metrics: crate::api::HttpMetrics::default(),
            in_flight: Default::default(),
            closing: watch::channel(false).0,
            feed: crate::ws::Feed::new(),
            config,
            store,
            sequencer,
            auth,
            metrics,
            next_order_id: AtomicU64::new(next_order_id),
            next_withdrawal_id: AtomicU64::new(next_withdrawal_id),
            last_acked: AtomicU64::new(recovery.seq),
            projector_wake: Notify::new(),
            projection_wanted: Notify::new(),
            projection_wanted_seq: AtomicU64::new(0),
            projected,
            admin_lock: tokio::sync::Mutex::new(()),
            markets: std::sync::RwLock::new(Vec::new()),
        });
        let handles = vec![
            // The projector replays and encodes thousands of commands per step without
            // yielding: on its own thread, not on one of the runtime's workers, whose other
            // tasks (sockets, requests) would wait behind it. It still uses the runtime's
            // timers and I/O.
            {
                let runtime = tokio::runtime::Handle::current();
                let projecting =
                    project_loop(app.clone(), projector, projected_tx, stopped.clone());
                tokio::task::spawn_blocking(move || runtime.block_on(projecting))
            },
            tokio::spawn(crate::ws::fan_out(app.clone(), stopped.clone())),
            tokio::spawn(clock_loop(app.clone(), stopped)),
        ];
        Ok((
            app,
            Background {
                tasks,
                stop,
                handles,
            },
            created,
        ))
    }

    /// A fresh order id, never used before.
    pub fn next_order_id(&self) -> u64 {
        self.next_order_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh withdrawal id, never used before.
    pub fn next_withdrawal_id(&self) -> u64 {
        self.next_withdrawal_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sequences a command: durable when this returns `Ok`.
    pub async fn submit(&self, command: CoreCommand) -> Result<Ack, ApiError> {
        match self.sequencer.submit(command).await {
            Ok(ack) => {
                self.acknowledged(ack.seq);
                Ok(ack)
            }
            Err(SubmitError::Rejected(reason)) => Err(rejection(reason)),
            Err(SubmitError::Stopped(reason)) => Err(ApiError::unavailable(
                "SEQUENCER_STOPPED",
                format!("the core has stopped and takes no commands: {reason}"),
            )),
        }
    }

    /// Notes an acknowledged command: reads wait for the read models to reach it, and the
    /// projector is woken to get there.
    fn acknowledged(&self, seq: u64) {
        self.last_acked.fetch_max(seq, Ordering::Relaxed);
        self.projector_wake.notify_one();
    }

    /// Runs a query on the core's state.
    pub async fn read<R: Send + 'static>(
        &self,
        query: impl FnOnce(&State) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        self.sequencer.read(query).await.map_err(|e| {
            ApiError::unavailable("SEQUENCER_STOPPED", format!("the core is not running: {e}"))
        })
    }

    /// Reads every market's spec from the state into the cache.
    async fn refresh_markets(&self) -> Result<Vec<book::MarketSpec>, ApiError> {
        let specs = self
            .read(|state| {
                let engine = state.engine();
                engine
                    .markets()
                    .filter_map(|m| engine.market_spec(m).cloned())
                    .collect::<Vec<_>>()
            })
            .await?;
        *self.markets.write().expect("market cache lock") = specs.clone();
        Ok(specs)
    }

    /// The market with this symbol; 404 `UNKNOWN_MARKET` naming the field `market`.
    pub async fn market_by_symbol(
        &self,
        symbol: &str,
    ) -> Result<(book::MarketId, book::MarketSpec), ApiError> {
        let find = |specs: &[book::MarketSpec]| {
            specs
                .iter()
                .position(|s| s.symbol == symbol)
                .map(|i| (book::MarketId(i as u32), specs[i].clone()))
        };
        if let Some(found) = find(&self.markets.read().expect("market cache lock")) {
            return Ok(found);
        }
        find(&self.refresh_markets().await?)
            .ok_or_else(|| ApiError::not_found("UNKNOWN_MARKET", "no such market").field("market"))
    }

    /// Every market's spec, by id, including at least the markets `ids` names.
    pub async fn market_specs(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<book::MarketSpec>, ApiError> {
        let needed = ids.into_iter().max().map_or(0, |id| id as usize + 1);
        let cached = self.markets.read().expect("market cache lock").clone();
        if cached.len() >= needed {
            return Ok(cached);
        }
        self.refresh_markets().await
    }

    /// One market's spec by id.
    pub async fn market_spec(&self, id: book::MarketId) -> Result<book::MarketSpec, ApiError> {
        self.market_specs([id.0])
            .await?
            .get(id.0 as usize)
            .cloned()
            .ok_or_else(|| ApiError::not_found("UNKNOWN_MARKET", "no such market"))
    }

    /// Waits until the read models include every command acknowledged so far, so a caller
    /// reads its own writes.
    pub async fn caught_up(&self) -> Result<(), ApiError> {
        let target = self.last_acked.load(Ordering::Relaxed);
        let mut projected = self.projected.clone();
        if *projected.borrow() < target {
            self.projection_wanted_seq
                .fetch_max(target, Ordering::Relaxed);
            self.projection_wanted.notify_one();
        }
        let wait = projected.wait_for(|seq| *seq >= target);
        match tokio::time::timeout(Duration::from_millis(limits::PROJECTION_WAIT_MS), wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ApiError::unavailable(
                "READ_MODELS_BEHIND",
                "the read models are behind the core; retry shortly",
            )),
        }
    }

    /// The projector's position and the core's, for readiness.
    pub fn positions(&self) -> (u64, u64) {
        (
            *self.projected.borrow(),
            self.last_acked.load(Ordering::Relaxed),
        )
    }
}

/// The HTTP form of a core refusal.
pub fn rejection(reason: CoreRejection) -> ApiError {
    let (status, message, field) = match reason {
        CoreRejection::Book(book) => {
            let status = match book {
                RejectReason::UnknownMarket | RejectReason::UnknownOrder => StatusCode::NOT_FOUND,
                RejectReason::NotOwner => StatusCode::NOT_FOUND,
                RejectReason::DuplicateMarket | RejectReason::DuplicateOrderId => {
                    StatusCode::CONFLICT
                }
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            (status, book.message().to_string(), book.field())
        }
        CoreRejection::Ledger(ledger) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the ledger refused: {}",
                ledger.code().to_lowercase().replace('_', " ")
            ),
            None,
        ),
        CoreRejection::MarketHalted => (
            StatusCode::CONFLICT,
            "the market is halted: it takes cancels but no new or modified orders until an operator resumes it".to_string(),
            None,
        ),
        CoreRejection::UnknownWithdrawal => (
            StatusCode::NOT_FOUND,
            "unknown withdrawal".to_string(),
            None,
        ),
        CoreRejection::DuplicateWithdrawal => (
            StatusCode::CONFLICT,
            "duplicate withdrawal".to_string(),
            None,
        ),
        other => (
            StatusCode::UNPROCESSABLE_ENTITY,
            other.code().to_lowercase().replace('_', " "),
            None,
        ),
    };
    // An order of another user is reported as unknown: its existence is not the caller's
    // business.
    let code = match reason {
        CoreRejection::Book(RejectReason::NotOwner) => "UNKNOWN_ORDER",
        _ => reason.code(),
    };
    let mut error = ApiError::new(status, code, message);
    error.field = field.map(str::to_string);
    error
}

async fn project_loop(
    app: Arc<App>,
    mut projector: Projector,
    projected: watch::Sender<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    // After a pass that wrote something the projector lets journal batches gather: under load
    // one projection transaction then covers many batches, and the pages every transaction
    // changes (the ends of the tables and of their indexes) are written once for all of them.
    // A read waiting for its own writes cuts the pause short.
    let linger = Duration::from_millis(app.config.projector_linger_ms);
    let feed = app.feed.clone();
    projector.set_listener(Box::new(move |seq, _command, output| {
        feed.publish(seq, output);
    }));
    loop {
        if *stopped.borrow() {
            return;
        }
        match projector.step().await {
            Ok(written) => {
                projected.send_replace(projector.seq());
                // A step reads a bounded part of the journal: one that wrote but stopped
                // short of what a waiting read needs goes on at once (the read's wake-up may
                // have started this very step).
                if written > 0
                    && projector.seq() < app.projection_wanted_seq.load(Ordering::Relaxed)
                {
                    continue;
                }
                if written > 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(linger) => {}
                        _ = app.projection_wanted.notified() => {}
                        _ = stopped.changed() => {}
                    }
                    continue;
                }
                tokio::select! {
                    _ = app.projector_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(limits::PROJECTOR_IDLE_MS)) => {}
                    _ = stopped.changed() => {}
                }
            }
            Err(error) => {
                tracing::error!(%error, "projecting the journal failed; retrying");
                tokio::time::sleep(Duration::from_millis(limits::PROJECTOR_RETRY_MS)).await;
            }
        }
    }
}

/// Moves the core's clock forward: expiries, day cut-offs and 24 h windows follow it.
async fn clock_loop(app: Arc<App>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.config.clock_tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge = now_ms();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        if now_ms() - last_purge >= limits::PURGE_EVERY_MS {
            last_purge = now_ms();
            if let Err(error) = app
                .store
                .purge_idempotency(last_purge, crate::idempotency::PURGE_ROWS_MAX)
                .await
            {
                tracing::warn!(%error, "purging expired idempotency keys failed");
            }
        }
        // A refusal means the core's clock is already later (a clock step back): skip it.
        match app
            .sequencer
            .submit(CoreCommand::AdvanceTime { now: now_ms() })
            .await
        {
            Ok(ack) => app.acknowledged(ack.seq),
            Err(SubmitError::Rejected(_)) => {}
            Err(SubmitError::Stopped(_)) => return,
        }
    }
}

/// The session-signing secret: configured, or generated once and kept in the data directory.
fn jwt_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = &config.auth.jwt_secret {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = config.data_dir.join("jwt.secret");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => anyhow::bail!("{} is shorter than 32 characters", path.display()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&config.data_dir)?;
            let secret = auth::encode_hex(&auth::random_bytes::<32>());
            write_private(&path, &secret)?;
            Ok(secret.into_bytes())
        }
        Err(error) => Err(anyhow::anyhow!("cannot read {}: {error}", path.display())),
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Creates the first administrator when there are no users yet.
async fn bootstrap_admin(store: &Store, config: &Config) -> anyhow::Result<Option<CreatedAdmin>> {
    if store.user_count().await? > 0 {
        return Ok(None);
    }
    let (password, generated) = match &config.auth.admin_password {
        Some(password) => (password.clone(), None),
        None => {
            let password = auth::encode_hex(&auth::random_bytes::<12>());
            (password.clone(), Some(password))
        }
    };
    auth::check_password(&password)
        .map_err(|e| anyhow::anyhow!("admin password: {}", e.message))?;
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await?
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let username = config.auth.admin_username.clone();
    store
        .create_user(&username, &hash, Role::Admin.as_str(), now_ms())
        .await?;
    Ok(Some(CreatedAdmin {
        username,
        generated_password: generated,
    }))
}
