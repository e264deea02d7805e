//! Assembles a running process: store (migrated), policy, engine, router and background workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::callbacks::CallbackGuard;
use crate::channels::{self, slack::SlackChannel};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::engine::{load_policy, Engine};
use crate::http::{router, AppState};
use crate::quota::Quotas;
use crate::store;

/// Opens and migrates the database and loads the policy: what every command that decides needs.
pub async fn build_engine(config: &Config) -> anyhow::Result<Engine> {
    let policy = load_policy(&config.policy)?;
    let store = store::connect(config).await?;
    store
        .migrate()
        .await
        .context("applying database migrations")?;
    // Cards are written for every chat destination whatever this process's own config says:
    // a vote cast from the CLI must still update the cards the servers posted. A server
    // without that channel configured leaves the message to one that has it.
    let callbacks = CallbackGuard::new(config.callback_networks()?);
    Ok(Engine::new(store, policy)
        .with_card_channels(vec![channels::SLACK])
        .with_callback_guard(callbacks)
        .with_quotas(Quotas::from_config(config)))
}

/// The HTTP client for Slack response URLs: no redirects, so a receiver cannot bounce us
/// elsewhere. Webhooks have their own (`CallbackGuard::webhook_client`), whose resolver
/// enforces `callback_allowed_networks`.
fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("signoff/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")
}

/// axum's accept loop, on hyper's HTTP/1 connection builder because that one can time out
/// header reads (connections that send no headers within 10 s are dropped; axum's
/// `serve` offers no such setting). HTTP/1 only: the HTTP/2 detection of hyper-util's
/// automatic builder waits for a client's first bytes with no timeout at all.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    use tower::Service as _;
    let mut make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, typically: give connections a moment to close.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => break,
        };
        let Ok(service) = make_service.call(remote).await;
        let service = hyper_util::service::TowerToHyperService::new(service);
        let connection = graceful.watch(
            // No upgrades: nothing here speaks WebSocket.
            builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service),
        );
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
    // Stop accepting, then let the requests in flight finish.
    drop(listener);
    graceful.shutdown().await;
}

/// A server listening and its background workers.
pub struct RunningServer {
    address: SocketAddr,
    engine: Engine,
    config: Arc<Config>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Binds `config.listen` (port 0 picks a free port), migrates, and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        // Installed before anything records, so no early sample is lost.
        crate::telemetry::prometheus();
        let engine = build_engine(&config).await?;
        let listener = TcpListener::bind(config.listen_address()?)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let address = listener.local_addr()?;
        let config = Arc::new(config);
        let (shutdown, shutdown_signal) = watch::channel(false);
        let state = AppState {
            engine: engine.clone(),
            config: config.clone(),
        };
        let http = http_client()?;
        let slack = if config.slack_enabled() {
            Some(Arc::new(SlackChannel::from_config(&config.slack, http)?))
        } else {
            None
        };
        let channel_routes = match &slack {
            Some(slack) => {
                channels::slack::router(engine.clone(), slack.clone(), config.max_body_bytes)
            }
            None => axum::Router::new(),
        };
        let app = router(state, channel_routes);
        let webhooks = engine
            .callback_guard()
            .webhook_client()
            .context("building the webhook client")?;
        let delivery = Arc::new(
            Delivery::new(engine.clone(), slack, webhooks).with_lease(config.outbox_lease()),
        );
        let http = tokio::spawn(serve(
            listener,
            app,
            config.header_read_timeout(),
            shutdown_signal.clone(),
        ));
        let sweeper = tokio::spawn(crate::sweeper::run_sweeper(
            engine.clone(),
            config.sweep_interval(),
            shutdown_signal.clone(),
        ));
        let watcher = tokio::spawn(crate::watcher::run_decision_watcher(
            engine.clone(),
            config.watch_interval(),
            shutdown_signal.clone(),
        ));
        let delivery = tokio::spawn(delivery.run(shutdown_signal));
        tracing::info!(%address, policy_hash = engine.policy().hash(), "signoff listening");
        Ok(Self {
            address,
            engine,
            config,
            shutdown,
            tasks: vec![http, sweeper, watcher, delivery],
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn reload_policy(&self) -> anyhow::Result<()> {
        self.engine.reload_policy(&self.config.policy).map(|_| ())
    }

    /// Stops accepting, lets in-flight requests finish (up to `grace`), stops the workers
    /// between rows.
    pub async fn shutdown(self, grace: Duration) {
        self.engine.begin_shutdown();
        let _ = self.shutdown.send(true);
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("shutdown grace period over; abandoning unfinished work");
        }
    }
}
