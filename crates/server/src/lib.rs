//! Agora's API server: REST under `/api/v1` over the core, the ledger and the job queue, with
//! sessions and signed requests, limits, health and metrics.
//!
//! [`Server::start`] opens the store the configuration names, recovers the core, catches the
//! read models up and listens; [`Server::shutdown`] stops taking connections, lets the ones in
//! flight finish, then lets the sequencer write and answer everything it accepted.
//!
//! **API boundary:** only this crate knows HTTP and the JSON wire formats; it reaches the
//! core through [`app::App::submit`] and [`app::App::read`], and storage through `store`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod admission;
pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod idempotency;
pub mod limit;
pub mod wire;
pub mod ws;

pub use app::{App, CreatedAdmin};
pub use config::Config;

/// A running server.
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The first administrator, when this start created one.
    pub created_admin: Option<CreatedAdmin>,
    app: Arc<App>,
    background: app::Background,
    stop: oneshot::Sender<()>,
    serving: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Opens everything and starts listening on `config.listen`.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        let (app, background, created_admin) = App::start(config).await?;
        let router = api::router(app.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Server {
            addr,
            created_admin,
            app,
            background,
            stop,
            serving,
        })
    }

    /// The shared state, for embedding programs and tests.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops listening, waits for requests in flight, then flushes the core.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        // WebSocket connections close themselves (1001) when told; then the server waits
        // for the requests in flight.
        self.app.closing.send_replace(true);
        let _ = self.stop.send(());
        self.serving.await??;
        self.background.stop(self.app).await;
        Ok(())
    }
}
