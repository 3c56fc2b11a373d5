//! transfer-guard: watches ConnieRTC conversation transfers per CBO. `App::start` wires the pieces together.

pub mod actions;
pub mod api;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decisions;
pub mod demo;
pub mod event;
pub mod guard;
pub mod health;
pub mod journal;
pub mod metrics;
pub mod net;
pub mod pg;
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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::config::Config;

/// Runs `a` here and `b` on a thread of its own, and returns both results: the two halves of
/// work split over the machine's two cores (a backlog's parsing, a scrape's blocks).
pub(crate) fn join<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    std::thread::scope(|scope| {
        let other = scope.spawn(b);
        let here = a();
        match other.join() {
            Ok(there) => (here, there),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
use crate::metrics::Metrics;
use crate::state::Fleet;

/// How often open transfers are checked for their timeout and the rules are evaluated.
pub const TICK: Duration = Duration::from_secs(1);

/// One Twilio client per account (see `sources::poll::clients`).
pub type Clients = std::collections::HashMap<sid::AccountSid, twilio::TwilioClient>;

/// The configuration in force and its Twilio clients; a reload (SIGHUP) swaps both at once.
/// Readers take a snapshot (`config()`), so one request or one action sees one configuration.
pub struct Live {
    current: std::sync::RwLock<Current>,
}

struct Current {
    config: Arc<Config>,
    clients: Arc<Clients>,
    tokens: Arc<Tokens>,
}

/// Who each bearer token is, keyed by the token's SHA-256: a lookup costs the same at 1 CBO
/// and at 5,000, and says nothing about how close a wrong token came.
pub struct Tokens {
    by_digest: std::collections::HashMap<[u8; 32], (config::Secret, api::Caller)>,
}

impl Tokens {
    fn of(config: &Config) -> Tokens {
        let mut by_digest = std::collections::HashMap::new();
        for cbo in &config.cbos {
            if let Some(t) = &cbo.ingest_token {
                let who = api::Caller::Cbo(cbo.key.to_string());
                by_digest.insert(Tokens::digest(t.expose().as_bytes()), (t.clone(), who));
            }
        }
        // The admin token last: it is what an equal CBO token would be (a configuration
        // refuses that anyway).
        if let Some(t) = &config.admin_token {
            let who = api::Caller::Admin;
            by_digest.insert(Tokens::digest(t.expose().as_bytes()), (t.clone(), who));
        }
        Tokens { by_digest }
    }

    fn digest(token: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token).into()
    }

    /// Who `token` is, if anyone.
    pub fn who(&self, token: &[u8]) -> Option<api::Caller> {
        let (secret, who) = self.by_digest.get(&Tokens::digest(token))?;
        secret.matches(token).then(|| who.clone())
    }
}

impl Live {
    pub fn new(config: Arc<Config>, clients: Clients) -> Live {
        Live {
            current: std::sync::RwLock::new(Current {
                tokens: Arc::new(Tokens::of(&config)),
                config,
                clients: Arc::new(clients),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> Arc<Config> {
        self.read().config.clone()
    }

    pub fn clients(&self) -> Arc<Clients> {
        self.read().clients.clone()
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        self.read().tokens.clone()
    }

    fn replace(&self, config: Arc<Config>, clients: Arc<Clients>) {
        let tokens = Arc::new(Tokens::of(&config));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current {
            config,
            clients,
            tokens,
        };
    }
}

/// What every handler and task shares.
pub struct Shared {
    pub live: Arc<Live>,
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
    /// The journal and checkpoint a restart resumes from.
    pub checkpoints: Arc<checkpoint::Checkpoints>,
}

impl Shared {
    /// `share` on a blocking thread, for request handlers and async tasks: an error names why
    /// nothing was taken.
    pub async fn share_off_worker(
        self: &Arc<Self>,
        records: Vec<journal::Record>,
    ) -> Result<(), String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.share(records))
            .await
            .unwrap_or_else(|e| Err(format!("the task taking it ended: {e}")))
    }

    /// What was pushed to this process (events a Twilio push brought, an agent's report, a
    /// test transfer's result), as journal records: taken here at once; with replicas, stored
    /// for every replica to take (this one too). Blocking. An error names why the store could
    /// not be written: nothing was taken, and the sender should send it again.
    pub fn share(&self, records: Vec<journal::Record>) -> Result<(), String> {
        match self.actions.log.store() {
            None => {
                for record in records {
                    if let Some(state) = self.fleet.get(&record.cbo) {
                        let cbo = record.cbo.clone();
                        if let Err(e) = state.replay(record) {
                            tracing::warn!(cbo, error = %e, "a pushed record not taken");
                        }
                    }
                }
                Ok(())
            }
            Some(store) => {
                let lines = records
                    .iter()
                    .map(|r| {
                        let mut line = Vec::new();
                        journal::encode(r, &mut line);
                        line.pop();
                        String::from_utf8_lossy(&line).into_owned()
                    })
                    .collect();
                store.push_events(lines, self.clock.now_ms())
            }
        }
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }

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
    #[error("state_dir {dir}: cannot open the journal: {source}")]
    Journal {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] pg::StoreError),
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
    /// The pollers, prober and file followers, by what they were started for.
    groups: BTreeMap<String, Group>,
}

/// What one group of tasks was started with: one CBO's pollers and prober, or one log file.
/// A reload restarts a group only when this changed.
#[derive(Debug, Clone, PartialEq)]
enum GroupSpec {
    Cbo {
        cbo: Box<config::Cbo>,
        twilio: config::TwilioSection,
        record: config::TwilioSources,
        timeout: Duration,
        /// CBOs on the same Twilio account (whether debugger alerts are this CBO's alone).
        sharing: usize,
    },
    File(config::FileSource),
}

struct Group {
    spec: GroupSpec,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Group {
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

fn group_specs(config: &Config) -> BTreeMap<String, GroupSpec> {
    let mut per_account = std::collections::HashMap::new();
    for account in config.cbos.iter().filter_map(|c| c.account_sid) {
        *per_account.entry(account).or_insert(0usize) += 1;
    }
    let mut specs = BTreeMap::new();
    for cbo in &config.cbos {
        let sharing = cbo
            .account_sid
            .and_then(|a| per_account.get(&a).copied())
            .unwrap_or(0);
        specs.insert(
            format!("cbo {}", cbo.key),
            GroupSpec::Cbo {
                cbo: Box::new(config::Cbo {
                    // What only the rules, actions and ingest read: changing it restarts no poller.
                    ingest_token: None,
                    rules: Default::default(),
                    rollback: Vec::new(),
                    disable: Vec::new(),
                    disable_features: Vec::new(),
                    ..cbo.clone()
                }),
                twilio: config.twilio.clone(),
                record: config.record.clone(),
                timeout: config.transfers.timeout,
                sharing,
            },
        );
    }
    for source in &config.file_sources {
        specs.insert(
            format!("file {} of {}", source.path.display(), source.cbo),
            GroupSpec::File(source.clone()),
        );
    }
    specs
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Groups of tasks restarted because what they were started with changed.
    pub restarted: Vec<String>,
}

/// Why a reload was refused (the configuration in force is kept).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] config::ConfigError),
    #[error("{} change only at a restart: nothing was reloaded", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
}

/// Settings a running daemon cannot take over: the socket and its limits, where state lives,
/// and the transfer tracking every CBO's state was built with.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &new.server);
    [
        ("server.listen", o.listen != n.listen),
        ("server.state_dir", o.state_dir != n.state_dir),
        (
            "server.header_read_timeout",
            o.header_read_timeout != n.header_read_timeout,
        ),
        (
            "server.request_timeout",
            o.request_timeout != n.request_timeout,
        ),
        (
            "server.max_connections",
            o.max_connections != n.max_connections,
        ),
        ("transfers", old.transfers != new.transfers),
        ("store", old.store != new.store),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(name, _)| name)
    .collect()
}

impl App {
    /// Binds the listen address and starts the HTTP server, the timeout ticker and the file sources.
    pub async fn start(config: Config) -> Result<App, StartError> {
        App::start_with_clock(config, Clock::new()).await
    }

    pub async fn start_with_clock(config: Config, clock: Clock) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new());
        let state_dir = &config.server.state_dir;
        let journal =
            Arc::new(
                journal::Journal::open(state_dir).map_err(|source| StartError::Journal {
                    dir: state_dir.clone(),
                    source,
                })?,
            );
        // Replicas: the store, and the events pushed to it that the windows still reach.
        let (store, pushed) = match &config.store {
            None => (None, Vec::new()),
            Some(cfg) => {
                let store = pg::Store::open(cfg, Arc::default())?;
                let since = clock.now_ms() - checkpoint::retained(&config).as_millis() as i64;
                let backlog = store
                    .events_since(since)
                    .map_err(pg::StoreError::Unreachable)?;
                store.cursor.store(backlog.cursor, Ordering::Release);
                let pushed = backlog
                    .rows
                    .into_iter()
                    .filter_map(|(id, text)| match serde_json::from_str(&text) {
                        Ok(record) => Some(record),
                        Err(e) => {
                            tracing::warn!(id, error = %e, "skipping an unreadable pushed event in the store");
                            None
                        }
                    })
                    .collect();
                metrics.watch_pg(store.clone());
                metrics.set_leader(false);
                (Some(store), pushed)
            }
        };
        // The windows, open transfers and joins of before the restart, before anything new.
        let (fleet, checkpoints, restored) =
            checkpoint::Checkpoints::restore(&config, journal, &metrics, clock.now_ms(), pushed);
        let checkpoints = Arc::new(checkpoints);
        metrics.watch_store(checkpoints.clone());
        let addr = config.server.listen;
        let config = Arc::new(config);
        let log = Arc::new(match &store {
            None => decisions::DecisionLog::open(&config.server.state_dir)?,
            Some(store) => decisions::DecisionLog::in_store(store.clone()),
        });
        metrics.watch_log(log.health.clone());
        let live = Arc::new(Live::new(
            config.clone(),
            sources::poll::clients(&config, clock),
        ));
        // What the log says: read once, for the rules and for the actions.
        let replayed = log.replayed()?;
        let mut engine = rules::Engine::new(&config, clock.now_ms());
        let resumed = engine.resume(replayed.rule_states());
        // Conditions that held before the restart keep their `for` timers.
        let timers = restored.timers.iter();
        let timed = engine.resume_timers(
            timers.map(|t| (t.cbo.as_str(), t.rule.as_str(), t.since_ms)),
            clock.now_ms(),
        );
        for (cbo, rule, state) in resumed.into_iter().chain(timed) {
            if let Some(m) = metrics.cbo(&cbo) {
                m.set_rule_state(rule, state);
            }
        }
        let actions = Arc::new(actions::Actions::new(
            live.clone(),
            log,
            replayed,
            metrics.clone(),
            clock,
        ));
        let validations = validation::Validations::open(
            &config.server.state_dir,
            clock.now_ms(),
            restored.whole_since_ms,
            metrics.clone(),
            store.clone(),
        )?;
        let shared = Arc::new(Shared {
            remembered: store::RememberedStore::open(&config.server.state_dir, store.clone()),
            validations,
            engine: std::sync::Mutex::new(engine),
            live,
            metrics,
            fleet,
            clock,
            ready: AtomicBool::new(false),
            awaiting_first_poll: Default::default(),
            actions,
            checkpoints,
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
        let server = &config.server;
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
                        // On a blocking thread: a tick over thousands of CBOs, or one waiting
                        // on a CBO's lock, never holds an async worker (requests, polls).
                        let shared = ticker_shared.clone();
                        let ticked = tokio::task::spawn_blocking(move || {
                            shared.actions.in_one_commit(|| {
                                guard::tick(&shared, &mut memory, shared.clock.now_ms())
                            });
                            memory
                        })
                        .await;
                        memory = match ticked {
                            Ok(m) => m,
                            // A tick that panicked: its memory of notifications is lost, not
                            // the guard.
                            Err(e) => {
                                tracing::error!(error = %e, "a tick failed");
                                guard::Memory::default()
                            }
                        };
                        if watchdog.is_some_and(|every| fed.elapsed() >= every) {
                            systemd::notify("WATCHDOG=1");
                            fed = tokio::time::Instant::now();
                        }
                    }
                    _ = until.changed() => break,
                }
            }
        });

        tasks.spawn(checkpoint_every_second(shared.clone(), stopped.clone()));
        if store.is_some() {
            tasks.spawn(take_pushed_events(shared.clone(), stopped.clone()));
        }

        // Intents written before a restart, without a result: ask Twilio what became of them.
        tasks.spawn(shared.actions.clone().settle(stopped.clone()));

        let groups = group_specs(&config)
            .into_iter()
            .map(|(name, spec)| {
                let group = spawn_group(&shared, spec, true);
                (name, group)
            })
            .collect();

        shared.ready.store(true, Ordering::Release);
        tracing::info!(%addr, cbos = config.cbos.len(), "transfer-guard listening");
        Ok(App {
            addr,
            shared,
            stop,
            tasks,
            groups,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Takes a new configuration without a restart: rules, thresholds, tokens, actions and
    /// CBOs added or removed. Every CBO kept keeps its transfers, windows, rule states and
    /// switch; only the pollers whose settings changed start again. A configuration that
    /// changes what only a restart can change is refused whole, and the one in force stays.
    pub async fn reload(&mut self, config: Config) -> Result<Reloaded, ReloadError> {
        let shared = self.shared.clone();
        let old = shared.config();
        let fixed = restart_only(&old, &config);
        if !fixed.is_empty() {
            return Err(ReloadError::NeedsRestart(fixed));
        }
        let now_ms = shared.clock.now_ms();
        let clients = sources::poll::clients_after(
            &config,
            shared.clock,
            Some((&old, &shared.live.clients())),
        );
        let config = Arc::new(config);
        // New CBOs get their state before any request can name them; removed ones lose theirs
        // only once no request can.
        let added = shared.fleet.add(&config, &shared.metrics);
        shared.engine().reconfigure(&config, now_ms);
        shared.actions.reconfigure(&config);
        shared.live.replace(config.clone(), Arc::new(clients));
        let removed = shared.fleet.retain(&config, &shared.metrics);
        for cbo in &removed {
            shared
                .validations
                .withdraw(cbo, "its cbo was removed from the configuration", now_ms);
            shared.poll_done(cbo);
        }

        let wanted = group_specs(&config);
        let mut restarted = Vec::new();
        let stale: Vec<String> = self
            .groups
            .iter()
            .filter(|(name, g)| wanted.get(*name) != Some(&g.spec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(group) = self.groups.remove(&name) {
                group.stop().await;
                if wanted.contains_key(&name) {
                    restarted.push(name);
                }
            }
        }
        for (name, spec) in wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.groups.entry(name) {
                slot.insert(spawn_group(&shared, spec, false));
            }
        }
        Ok(Reloaded {
            added,
            removed,
            restarted,
        })
    }

    /// Reads `path` again and takes it (SIGHUP): a file that cannot be read, is invalid, or
    /// changes what only a restart can is refused with the reason logged and counted, and the
    /// configuration in force stays.
    pub async fn reload_file(&mut self, path: &std::path::Path) -> Result<Reloaded, ReloadError> {
        let result = match Config::load(path) {
            Ok((config, problems)) => {
                for p in problems {
                    tracing::warn!(problem = %p, "configuration");
                }
                self.reload(config).await
            }
            Err(e) => Err(e.into()),
        };
        self.shared.metrics.reloaded(result.is_ok());
        match &result {
            Ok(r) => tracing::info!(
                path = %path.display(),
                added = ?r.added,
                removed = ?r.removed,
                restarted = ?r.restarted,
                "configuration reloaded"
            ),
            Err(e) => tracing::error!(
                path = %path.display(),
                error = %e,
                "configuration reload refused: the configuration in force is kept"
            ),
        }
        result
    }

    /// Stops accepting, lets requests in flight finish, and stops every task; actions being
    /// carried out get `server.drain` to finish (their intents are on record either way).
    pub async fn shutdown(mut self) {
        self.shared.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        for group in std::mem::take(&mut self.groups).into_values() {
            let _ = group.stop.send(true);
            self.tasks.spawn(async move { group.stop().await });
        }
        while self.tasks.join_next().await.is_some() {}
        let drain = self.shared.config().server.drain;
        if !self.shared.actions.finish_in_flight(drain).await {
            tracing::warn!(
                in_flight = self.shared.actions.in_flight(),
                "actions still in flight at the stop: their intents are settled with Twilio at the next start"
            );
        }
        // Another replica leads at once, without waiting for the lease to run out.
        if let Some(store) = self.shared.actions.log.store().cloned() {
            self.shared.metrics.set_leader(false);
            let _ = tokio::task::spawn_blocking(move || store.stop()).await;
        }
        // The next start reads the snapshot, not the history.
        let log = self.shared.actions.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.checkpoint()).await;
        // And resumes the windows, timers and file positions of this instant.
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || save_checkpoint(&shared)).await;
        tracing::info!("transfer-guard stopped");
    }
}

/// How often a replica reads the events pushed to the store.
const PULL_EVERY: Duration = Duration::from_millis(100);

/// Replicas: takes the events pushed to the store by any replica, in the order they were
/// stored, until `stop`; the leader also deletes those no window reaches any more.
async fn take_pushed_events(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(PULL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned_ms = 0;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => break,
        }
        let shared = shared.clone();
        let prune = shared.clock.now_ms() - pruned_ms >= 60_000;
        if prune {
            pruned_ms = shared.clock.now_ms();
        }
        let _ = tokio::task::spawn_blocking(move || pull_pushed(&shared, prune)).await;
    }
}

/// One read of the store's pushed events (all of them, page by page).
fn pull_pushed(shared: &Shared, prune: bool) {
    let Some(store) = shared.actions.log.store() else {
        return;
    };
    loop {
        let after = store.cursor.load(Ordering::Acquire);
        let Ok(rows) = store.events_after(after, 10_000) else {
            return;
        };
        let n = rows.len();
        for (id, text) in rows {
            match serde_json::from_str::<journal::Record>(&text) {
                Ok(record) => {
                    if let Some(state) = shared.fleet.get(&record.cbo)
                        && let Err(e) = state.take_stored(record)
                    {
                        tracing::warn!(id, error = %e, "a pushed event in the store not taken");
                    }
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "skipping an unreadable pushed event in the store")
                }
            }
            store.cursor.store(id, Ordering::Release);
        }
        if n < 10_000 {
            break;
        }
    }
    if prune && store.leading() {
        let keep = checkpoint::retained(&shared.config()).as_millis() as i64;
        store.prune_events(shared.clock.now_ms() - keep);
    }
}

/// Writes the journal out every second and a checkpoint every `checkpoint::EVERY`, on a
/// blocking thread, until `stop`.
async fn checkpoint_every_second(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => break,
        }
        n += 1;
        let shared = shared.clone();
        let whole = n.is_multiple_of(checkpoint::EVERY.as_secs());
        let _ = tokio::task::spawn_blocking(move || {
            if whole {
                save_checkpoint(&shared)
            } else {
                shared.checkpoints.flush()
            }
        })
        .await;
    }
}

fn save_checkpoint(shared: &Shared) {
    let retain = checkpoint::retained(&shared.config());
    let timers = shared.engine().timers();
    let _ = shared
        .checkpoints
        .save(timers, shared.clock.now_ms(), retain);
}

/// Starts one group's tasks. `at_start`: `/readyz` waits for the CBO's first poll (a reload
/// never makes a running daemon unready).
fn spawn_group(shared: &Arc<Shared>, spec: GroupSpec, at_start: bool) -> Group {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let config = shared.config();
    let clients = shared.live.clients();
    match &spec {
        GroupSpec::File(source) => {
            tasks.spawn(sources::file::run(
                shared.clone(),
                source.clone(),
                stopped.clone(),
            ));
        }
        GroupSpec::Cbo { cbo, record, .. } => {
            let key = cbo.key.to_string();
            let mut poller = sources::poll::Poller::new(&config, cbo, &clients);
            if let Some(r) = shared.remembered.get(&key) {
                poller.remember(r);
            }
            if poller.pollable() {
                if at_start {
                    shared
                        .awaiting_first_poll
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone());
                }
                tasks.spawn(sources::poll::run(
                    shared.clone(),
                    poller,
                    key.clone(),
                    stopped.clone(),
                ));
            } else if let Some(state) = shared.fleet.get(&key) {
                // Nothing to ask Twilio; what the config alone says is all there is, and it is
                // the guard's own configuration (config_mismatch), never a rollback trigger.
                let mut tr = state.taskrouter();
                tr.problems = poller.config_problems().to_vec();
                tr.mismatch = tr.problems.clone();
                if let Some(m) = shared.metrics.cbo(&key) {
                    m.set_config_mismatch(!tr.mismatch.is_empty());
                }
            }
            if let Some(prober) = sources::probe::Prober::new(&config, cbo, &clients) {
                tasks.spawn(sources::probe::run(
                    shared.clone(),
                    prober,
                    key.clone(),
                    stopped.clone(),
                ));
            }
            // Twilio's own record of the CBO's transfers (SPEC §2b).
            let wanted = record.taskrouter_events || record.serverless_logs || record.twilio_alerts;
            if wanted
                && let Some(poller) = sources::record::RecordPoller::new(&config, cbo, &clients)
            {
                tasks.spawn(sources::record::run(shared.clone(), poller, stopped));
            }
        }
    }
    Group { spec, stop, tasks }
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

/// Tells systemd the daemon serves, and what it guards.
fn notify_ready(app: &App) {
    let cbos = app.shared.config().cbos.len();
    systemd::notify(&format!(
        "READY=1\nSTATUS=guarding {cbos} CBOs on {}",
        app.addr
    ));
}

/// The signals `run` answers, listened for from before the daemon starts: a SIGHUP (a
/// `systemctl reload`) that arrives while it is still starting is a reload once it serves, never
/// the default action, which would end the process.
#[cfg(unix)]
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Says READY to systemd, runs `app` until SIGTERM or SIGINT, reloading `path` at each SIGHUP;
/// then stops it.
#[cfg(unix)]
pub async fn serve_until_stopped(mut app: App, path: &std::path::Path, mut signals: Signals) {
    notify_ready(&app);
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => {
                systemd::notify("RELOADING=1");
                // Refused or applied, it is logged and counted; the daemon goes on either way.
                let _ = app.reload_file(path).await;
                notify_ready(&app);
            }
        }
    }
    tracing::info!("shutting down");
    systemd::notify("STOPPING=1");
    app.shutdown().await;
}
