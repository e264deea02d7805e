//! Assembles a running process: store (migrated), policy, engine, router and background workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::callbacks::CallbackGuard;
use crate::channels::slack::SlackChannel;
use crate::channels::teams::TeamsChannel;
use crate::channels::{ChatChannel, ChatChannels};
use crate::config::Config;
use crate::engine::{load_policy, Clock, Engine, SystemClock};
use crate::http::{router, AppState};
use crate::quota::Quotas;
use crate::store;
use crate::workers::{Delivery, Workers};

/// Opens and migrates the database and loads the policy: what every command that decides needs.
pub async fn build_engine(config: &Config) -> anyhow::Result<Engine> {
    let policy = load_policy(&config.policy)?;
    let store = store::connect(config).await?;
    store
        .migrate()
        .await
        .context("applying database migrations")?;
    let callbacks = CallbackGuard::new(config.callback_networks()?);
    Ok(Engine::new(store, policy)
        .with_callback_guard(callbacks)
        .with_quotas(Quotas::from_config(config)))
}

/// The HTTP client for chat platforms (Slack response URLs, the Bot Framework): no redirects, so a receiver cannot bounce us
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
    shutdown: CancellationToken,
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
            _ = shutdown.cancelled() => break,
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

/// What a server runs beyond its config: the clock, extra chat channels, and whether the
/// background loops run (tests drive the workers' steps themselves).
pub struct ServerOptions {
    pub clock: Arc<dyn Clock>,
    /// Registered after the configured ones (a test's recording channel, say).
    pub channels: Vec<Arc<dyn ChatChannel>>,
    /// Run the delivery and sweeper loops. Off, nothing is delivered or swept until
    /// `RunningServer::deliver_due` / `sweep_once` is called. The watcher always runs.
    pub background_workers: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            channels: Vec::new(),
            background_workers: true,
        }
    }
}

/// A server listening and its background workers.
pub struct RunningServer {
    address: SocketAddr,
    engine: Engine,
    config: Arc<Config>,
    delivery: Arc<Delivery>,
    workers: Workers,
}

impl RunningServer {
    /// Binds `config.listen` (port 0 picks a free port), migrates, and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        Self::start_with(config, ServerOptions::default()).await
    }

    pub async fn start_with(config: Config, options: ServerOptions) -> anyhow::Result<Self> {
        // Installed before anything records, so no early sample is lost.
        crate::telemetry::prometheus();
        let engine = build_engine(&config).await?.with_clock(options.clock);
        let listener = TcpListener::bind(config.listen_address()?)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let address = listener.local_addr()?;
        let config = Arc::new(config);
        let http = http_client()?;
        // The chat platforms this server runs: one line each.
        let mut channels = ChatChannels::default();
        if let Some(slack) = SlackChannel::configured(&config, http.clone())? {
            channels.register(slack);
        }
        if let Some(teams) = TeamsChannel::configured(&config, http, &engine)? {
            channels.register(teams);
        }
        for channel in options.channels {
            channels.register(channel);
        }
        let state = AppState {
            engine: engine.clone(),
            config: config.clone(),
        };
        let app = router(state, channels.routes(&engine, config.max_body_bytes));
        let webhooks = engine
            .callback_guard()
            .webhook_client()
            .context("building the webhook client")?;
        let delivery = Arc::new(
            Delivery::new(engine.clone(), channels, webhooks).with_lease(config.outbox_lease()),
        );
        let workers = Workers::default();
        workers.spawn(serve(
            listener,
            app,
            config.header_read_timeout(),
            workers.cancellation(),
        ));
        if options.background_workers {
            workers.spawn(crate::workers::sweeper::run(
                engine.clone(),
                config.sweep_interval(),
                workers.cancellation(),
            ));
            workers.spawn(delivery.clone().run(workers.cancellation()));
        }
        workers.spawn(crate::workers::watcher::run(
            engine.clone(),
            config.watch_interval(),
            workers.cancellation(),
        ));
        tracing::info!(%address, policy_hash = engine.policy().hash(), "signoff listening");
        Ok(Self {
            address,
            engine,
            config,
            delivery,
            workers,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The outbox worker, for driving it one step at a time.
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    pub fn reload_policy(&self) -> anyhow::Result<()> {
        self.engine.reload_policy(&self.config.policy).map(|_| ())
    }

    /// Stops accepting, lets in-flight requests finish (up to `grace`), stops the workers
    /// between rows.
    pub async fn shutdown(self, grace: Duration) {
        self.engine.begin_shutdown();
        self.workers.stop(grace).await;
    }
}
