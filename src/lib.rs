//! transfer-guard: watches ConnieRTC conversation transfers per CBO. `App::start` wires the pieces together.

pub mod actions;
pub mod api;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decisions;
pub mod demo;
pub mod event;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod reconcile;
pub mod rules;
pub mod server;
pub mod sid;
pub mod sim;
pub mod sources;
pub mod state;
pub mod store;
pub mod systemd;
pub mod tracker;
pub mod twilio;
pub mod validation;
pub mod window;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::Fleet;

/// How often open transfers are checked for their timeout and the rules are evaluated.
pub const TICK: Duration = Duration::from_secs(1);

/// What every handler and task shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub fleet: Fleet,
    pub clock: Clock,
    pub ready: AtomicBool,
    /// CBOs whose first poll has not finished; `/readyz` waits for them.
    pub awaiting_first_poll: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub engine: std::sync::Mutex<rules::Engine>,
    pub actions: Arc<actions::Actions>,
    pub validations: validation::Validations,
    /// Baselines and known problems per CBO, kept across restarts.
    pub remembered: store::RememberedStore,
}

impl Shared {
    pub fn engine(&self) -> std::sync::MutexGuard<'_, rules::Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn poll_done(&self, key: &str) {
        self.awaiting_first_poll
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// What `/readyz` still waits for; empty when ready. A decision log that cannot be
    /// written is among them: a guard that cannot record cannot act.
    pub fn not_ready(&self) -> Vec<String> {
        if !self.ready.load(Ordering::Acquire) {
            return vec!["start".into()];
        }
        let mut waiting: Vec<String> = self
            .awaiting_first_poll
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|k| format!("first TaskRouter poll of cbo {k}"))
            .collect();
        if let Some(why) = self.actions.log.health.broken() {
            waiting.push(format!("a writable decision log ({why})"));
        }
        waiting
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state_dir: {0}")]
    State(#[from] decisions::LogError),
    #[error("state_dir: {0}")]
    Validations(#[from] validation::ValidationError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running daemon.
pub struct App {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl App {
    /// Binds the listen address and starts the HTTP server, the timeout ticker and the file sources.
    pub async fn start(config: Config) -> Result<App, StartError> {
        App::start_with_clock(config, Clock::new()).await
    }

    pub async fn start_with_clock(config: Config, clock: Clock) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new());
        let fleet = Fleet::new(&config, &metrics);
        let addr = config.server.listen;
        let config = Arc::new(config);
        let log = Arc::new(decisions::DecisionLog::open(&config.server.state_dir)?);
        metrics.watch_log(log.health.clone());
        let clients = sources::poll::clients(&config, clock);
        let actions = Arc::new(actions::Actions::new(
            config.clone(),
            log,
            metrics.clone(),
            clock,
            clients.clone(),
        ));
        let validations = validation::Validations::open(
            &config.server.state_dir,
            clock.now_ms(),
            metrics.clone(),
        )?;
        let shared = Arc::new(Shared {
            remembered: store::RememberedStore::open(&config.server.state_dir),
            validations,
            engine: std::sync::Mutex::new(rules::Engine::new(&config, clock.now_ms())),
            config,
            metrics,
            fleet,
            clock,
            ready: AtomicBool::new(false),
            awaiting_first_poll: Default::default(),
            actions,
        });
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let router = api::router(shared.clone());
        let server = &shared.config.server;
        let limits = server::Limits {
            header_read_timeout: server.header_read_timeout,
            request_timeout: server.request_timeout,
            max_connections: server.max_connections,
            drain: server.drain,
        };
        tasks.spawn(server::serve(listener, router, limits, stopped.clone()));

        let ticker_shared = shared.clone();
        let mut until = stopped.clone();
        let start = tokio::time::Instant::now();
        tasks.spawn(async move {
            let mut memory = guard::Memory::default();
            // The watchdog is fed by the tick itself: a tick that hangs stops feeding it.
            let watchdog = systemd::watchdog_every();
            let mut fed = tokio::time::Instant::now();
            // Sweeps on whole ticks from start (not an interval that drifts after a stall),
            // so a transfer times out at the first tick at or after its deadline.
            loop {
                let ticks = start.elapsed().as_millis() / TICK.as_millis() + 1;
                let next = start + TICK * ticks as u32;
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {
                        guard::tick(&ticker_shared, &mut memory, ticker_shared.clock.now_ms());
                        if watchdog.is_some_and(|every| fed.elapsed() >= every) {
                            systemd::notify("WATCHDOG=1");
                            fed = tokio::time::Instant::now();
                        }
                    }
                    _ = until.changed() => break,
                }
            }
        });

        for cbo in &shared.config.cbos {
            let mut poller = sources::poll::Poller::new(&shared.config, cbo, &clients);
            let key = cbo.key.to_string();
            if let Some(r) = shared.remembered.get(&key) {
                poller.remember(r);
            }
            if !poller.pollable() {
                // Nothing to ask Twilio; what the config alone says is all there is, and it is
                // the guard's own configuration (config_mismatch), never a rollback trigger.
                let state = shared.fleet.get(&key).expect("every cbo");
                let mut tr = state.taskrouter();
                tr.problems = poller.config_problems().to_vec();
                tr.mismatch = tr.problems.clone();
                if let Some(m) = shared.metrics.cbo(&key) {
                    m.set_config_mismatch(!tr.mismatch.is_empty());
                }
                continue;
            }
            shared
                .awaiting_first_poll
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
            tasks.spawn(sources::poll::run(
                shared.clone(),
                poller,
                key,
                stopped.clone(),
            ));
        }

        for cbo in &shared.config.cbos {
            let key = cbo.key.to_string();
            if let Some(prober) = sources::probe::Prober::new(&shared, &key, &clients) {
                tasks.spawn(sources::probe::run(
                    shared.clone(),
                    prober,
                    key,
                    stopped.clone(),
                ));
            }
        }

        // Twilio's own record of each CBO's transfers (SPEC §2b).
        let record = &shared.config.record;
        if record.taskrouter_events || record.serverless_logs || record.twilio_alerts {
            for cbo in &shared.config.cbos {
                if let Some(poller) = sources::record::RecordPoller::new(&shared, cbo, &clients) {
                    tasks.spawn(sources::record::run(
                        shared.clone(),
                        poller,
                        stopped.clone(),
                    ));
                }
            }
        }

        // Intents written before a restart, without a result: ask Twilio what became of them.
        tasks.spawn(shared.actions.clone().settle(stopped.clone()));

        for source in shared.config.file_sources.clone() {
            tasks.spawn(sources::file::run(shared.clone(), source, stopped.clone()));
        }

        shared.ready.store(true, Ordering::Release);
        tracing::info!(%addr, cbos = shared.config.cbos.len(), "transfer-guard listening");
        Ok(App {
            addr,
            shared,
            stop,
            tasks,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets requests in flight finish, and stops every task; actions being
    /// carried out get `server.drain` to finish (their intents are on record either way).
    pub async fn shutdown(mut self) {
        self.shared.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let drain = self.shared.config.server.drain;
        if !self.shared.actions.finish_in_flight(drain).await {
            tracing::warn!(
                in_flight = self.shared.actions.in_flight(),
                "actions still in flight at the stop: their intents are settled with Twilio at the next start"
            );
        }
        tracing::info!("transfer-guard stopped");
    }
}

/// Resolves when the process is asked to stop (SIGTERM or SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
