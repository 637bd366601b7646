//! `agora serve`: logs, the server, and a graceful stop on Ctrl-C or SIGTERM.

use server::{Config, Server};

/// Runs the server until it is told to stop.
pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGORA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let database = config.database_url();
    let server = Server::start(config).await?;
    println!(
        "agora listening on http://{} (database {database})",
        server.addr
    );
    if let Some(admin) = &server.created_admin {
        match &admin.generated_password {
            Some(password) => println!(
                "created the administrator {:?} with the password {password:?}; it is shown only now.\n\
                 sign in: curl -s http://{}/api/v1/auth/login -H 'content-type: application/json' \
                 -d '{{\"username\":\"{}\",\"password\":\"{password}\"}}'",
                admin.username, server.addr, admin.username
            ),
            None => println!(
                "created the administrator {:?} with the configured password",
                admin.username
            ),
        }
    }
    shutdown_signal().await;
    println!("stopping: finishing requests in flight and flushing the journal");
    server.shutdown().await?;
    println!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler works");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
