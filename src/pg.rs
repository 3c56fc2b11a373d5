//! The PostgreSQL store (SPEC §12): replicas share the decision log (intents, switch states,
//! known builds) and pushed events, and one of them leads on a lease.
//!
//! Each connection belongs to a thread of its own, and callers hand it work and wait for the
//! answer: the daemon calls the log from blocking threads and from async tasks alike, as it
//! calls the file log, and a database that is away stalls only the calls that need it.
//!
//! Safety of actions, in three layers:
//! 1. a leader acts only while `lease / 2` has not passed since it sent its last successful
//!    renewal, and the database lets the lease be taken only `lease` after that renewal ran;
//! 2. every entry a leader writes is written only if the database still names it the holder
//!    (`fenced`): an intent that a deposed leader tries to write is refused, so nothing is sent;
//! 3. once per deployment is a unique index over rollback intents: even two leaders at once
//!    cannot both write one, and so cannot both fire.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::config;
use crate::decisions::{Entry, Health, LogError};

/// The schema this build writes. A database of a newer one is refused by name.
pub const SCHEMA_VERSION: i32 = 3;
/// How often the lease is renewed (every tick).
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// Each migration, in order; `tg_schema` says which ran.
const MIGRATIONS: [&str; 3] = [
    r#"
CREATE TABLE tg_lease (
    id integer PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE tg_decisions (
    seq bigserial PRIMARY KEY,
    replica text NOT NULL,
    cbo text NOT NULL,
    kind text NOT NULL,
    action text,
    integration text,
    deployment text,
    at_ms bigint NOT NULL,
    entry text NOT NULL
);
CREATE INDEX tg_decisions_by_cbo ON tg_decisions (cbo, seq);
CREATE INDEX tg_decisions_by_time ON tg_decisions (at_ms);
CREATE UNIQUE INDEX tg_once_per_deployment ON tg_decisions (cbo, deployment, integration)
    WHERE kind = 'intent' AND action = 'rollback' AND deployment IS NOT NULL;
CREATE TABLE tg_events (
    id bigserial PRIMARY KEY,
    received_ms bigint NOT NULL,
    replica text NOT NULL,
    record text NOT NULL
);
CREATE INDEX tg_events_by_time ON tg_events (received_ms);
"#,
    r#"
CREATE TABLE tg_validations (
    id text PRIMARY KEY,
    cbo text NOT NULL,
    start_ms bigint NOT NULL,
    body text NOT NULL
);
"#,
    r#"
CREATE TABLE tg_baselines (
    cbo text PRIMARY KEY,
    body text NOT NULL
);
"#,
];

/// Advisory locks: migrations, and appends to each ordered table (ids are then taken in
/// commit order, so a reader's cursor never passes a row that commits later).
const LOCK_MIGRATE: i64 = 0x7467_0001;
const LOCK_DECISIONS: i64 = 0x7467_0002;
const LOCK_EVENTS: i64 = 0x7467_0003;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store (PostgreSQL): {0}")]
    Unreachable(String),
    #[error(
        "the store's schema is version {found}, newer than this build's {ours}: run a newer transfer-guard"
    )]
    Newer { found: i32, ours: i32 },
}

fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                source = inner.source();
            }
            s
        }
    }
}

/// Connects as the URL says: TLS when it asks for it (`sslmode=require`), verified against the
/// web's root certificates; bounded waits so a database that went away is noticed.
fn connect(url: &str, name: &str) -> Result<Client, String> {
    let mut cfg: postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    cfg.tcp_user_timeout(Duration::from_secs(10));
    cfg.keepalives_idle(Duration::from_secs(10));
    cfg.application_name(&format!("transfer-guard {name}"));
    let client = match cfg.get_ssl_mode() {
        postgres::config::SslMode::Require => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        }
        _ => cfg.connect(NoTls),
    };
    client.map_err(|e| describe(&e))
}

type Job = Box<dyn FnOnce(Result<&mut Client, String>) + Send>;

/// One connection on a thread of its own, connected on first use and again after a failure.
struct Conn {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Conn {
    fn spawn(url: String, name: &'static str) -> Conn {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("store-{name}"))
            .spawn(move || {
                let mut client: Option<Client> = None;
                while let Ok(job) = rx.recv() {
                    if client.as_ref().is_some_and(Client::is_closed) {
                        client = None;
                    }
                    if client.is_none() {
                        match connect(&url, name) {
                            Ok(c) => client = Some(c),
                            Err(e) => {
                                job(Err(e));
                                continue;
                            }
                        }
                    }
                    job(Ok(client.as_mut().expect("connected")));
                }
            })
            .expect("a thread starts");
        Conn {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on the connection and waits for its answer.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, CallError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let r = match c {
                Ok(c) => f(c).map_err(|e| {
                    let unique = e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION);
                    if unique {
                        CallError::Unique(describe(&e))
                    } else {
                        CallError::Failed(describe(&e))
                    }
                }),
                Err(e) => Err(CallError::Failed(format!("cannot connect: {e}"))),
            };
            let _ = tx.send(r);
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        if sent.is_err() {
            return Err(CallError::Failed("the connection's thread ended".into()));
        }
        rx.recv()
            .unwrap_or_else(|_| Err(CallError::Failed("the connection's thread ended".into())))
    }
}

#[derive(Debug)]
enum CallError {
    Unique(String),
    Failed(String),
}

/// The lease as this replica holds it.
#[derive(Default)]
struct Lease {
    /// Acting is allowed until then (half the lease after the renewal was sent).
    until: Mutex<Option<Instant>>,
    /// The lease's epoch when last renewed (it grows each time the lease changes hands).
    epoch: AtomicI64,
    /// The epoch the decision log was last read up to while holding it: a new leader acts
    /// only once it has read what the one before wrote.
    caught_up: AtomicI64,
}

pub struct Store {
    /// This replica's name in the lease and on what it writes.
    pub me: String,
    lease_len: Duration,
    log: Conn,
    events: Conn,
    lease: Arc<Lease>,
    pub health: Arc<Health>,
    /// Failed calls to the database since start (`store_errors_total{op="store"}`).
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// The newest pushed event this replica has taken.
    pub cursor: AtomicI64,
    /// The newest decision log entry this replica has read.
    pub log_seq: AtomicU64,
}

/// What a start reads back from the store's pushed events.
pub struct Backlog {
    pub rows: Vec<(i64, String)>,
    /// Every row up to this id was visible to the read: the cursor to go on from.
    pub cursor: i64,
}

impl Store {
    /// Connects, runs the migrations this build knows (under a lock, so replicas starting
    /// together run each once), and starts renewing the lease.
    pub fn open(cfg: &config::Store, health: Arc<Health>) -> Result<Arc<Store>, StoreError> {
        let url = cfg.url.expose().to_string();
        // On the connection's own thread: a start runs inside the async runtime.
        let log = Conn::spawn(url.clone(), "log");
        match log.call(migrate) {
            Ok(Ok(())) => {}
            Ok(Err(newer)) => return Err(newer),
            Err(CallError::Unique(why) | CallError::Failed(why)) => {
                return Err(StoreError::Unreachable(why));
            }
        }
        let me = format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            fastrand::u32(..)
        );
        let store = Arc::new(Store {
            me,
            lease_len: cfg.lease,
            log,
            events: Conn::spawn(url.clone(), "events"),
            lease: Arc::new(Lease::default()),
            health,
            errors: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            cursor: AtomicI64::new(0),
            log_seq: AtomicU64::new(0),
        });
        let this = store.clone();
        std::thread::Builder::new()
            .name("store-lease".into())
            .spawn(move || this.renew_loop(url))
            .expect("a thread starts");
        Ok(store)
    }

    /// Renews (or tries to take) the lease every second until stopped; on a clean stop, gives
    /// it up so another replica leads at once.
    fn renew_loop(self: Arc<Self>, url: String) {
        let mut client: Option<Client> = None;
        while !self.stop.load(Ordering::Acquire) {
            let sent = Instant::now();
            if client.as_ref().is_some_and(Client::is_closed) {
                client = None;
            }
            if client.is_none() {
                client = connect(&url, "lease")
                    .map_err(|e| self.failed("lease", &format!("cannot connect: {e}")))
                    .ok();
            }
            if let Some(c) = client.as_mut() {
                match renew(c, &self.me, self.lease_len) {
                    // Stopped meanwhile: not leading again (the lease is given up below).
                    Ok(Some(_)) if self.stop.load(Ordering::Acquire) => break,
                    Ok(Some(epoch)) => {
                        *self.lease.until.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(sent + self.lease_len / 2);
                        let before = self.lease.epoch.swap(epoch, Ordering::AcqRel);
                        if before != epoch {
                            tracing::warn!(replica = %self.me, epoch, "this replica took the lease: it leads once it has read the decision log");
                        }
                    }
                    Ok(None) => {
                        let mut until = self.lease.until.lock().unwrap_or_else(|p| p.into_inner());
                        if until.take().is_some() {
                            tracing::warn!(replica = %self.me, "another replica holds the lease: this one follows");
                        }
                    }
                    Err(e) => {
                        // The lease runs out by itself (`until`): nothing to undo here.
                        self.failed("lease", &describe(&e));
                        client = None;
                    }
                }
            }
            let spent = sent.elapsed();
            if spent < RENEW_EVERY {
                std::thread::sleep(RENEW_EVERY - spent);
            }
        }
        *self.lease.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // A renewal may have run after `stop` gave the lease up: give it up again.
        if let Some(c) = client.as_mut() {
            let _ = release(c, &self.me);
        }
    }

    /// A call that failed: counted, and the store marked unwritable (`/readyz` 503, actions
    /// held) until a probe or a write succeeds; logged once per spell.
    fn failed(&self, what: &str, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self.health.writable() {
            tracing::error!(replica = %self.me, what, error = why, "the store cannot be reached: this replica acts on nothing until it can");
        } else {
            tracing::debug!(replica = %self.me, what, error = why, "the store still cannot be reached");
        }
        self.health
            .set(Some(format!("the store cannot be reached ({what}): {why}")));
    }

    /// Stops acting and renewing, and gives the lease up so another replica leads within a
    /// second (a clean stop). Blocking.
    pub fn stop(&self) {
        *self.lease.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.stop.store(true, Ordering::Release);
        let me = self.me.clone();
        if let Err(CallError::Unique(why) | CallError::Failed(why)) =
            self.log.call(move |c| release(c, &me))
        {
            tracing::warn!(
                error = why,
                "cannot give the lease up: another replica leads once it runs out"
            );
        }
    }

    /// Whether this replica leads now: its lease is current and it has read what the leader
    /// before it wrote.
    pub fn leading(&self) -> bool {
        let current = self
            .lease
            .until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|u| Instant::now() < u);
        let epoch = self.lease.epoch.load(Ordering::Acquire);
        current && epoch != 0 && self.lease.caught_up.load(Ordering::Acquire) == epoch
    }

    /// The epoch of the lease this replica last held (0: never).
    pub fn epoch(&self) -> i64 {
        self.lease.epoch.load(Ordering::Acquire)
    }

    /// The decision log has been read to its end since `epoch` was taken (read before the
    /// log was): true when that is news, i.e. this replica just became the leader.
    pub fn caught_up(&self, epoch: i64) -> bool {
        epoch != 0 && self.lease.caught_up.swap(epoch, Ordering::AcqRel) != epoch
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn broke(&self, why: &str) -> LogError {
        self.failed("decision log", why);
        LogError::Store(why.to_string())
    }

    /// Appends entries in one transaction, numbered in commit order. `fenced`: only while the
    /// database names this replica the leader (else `NotLeader`, nothing written). A second
    /// rollback intent for one deployment is `Refused`.
    pub fn append(&self, entries: Vec<Entry>, fenced: bool) -> Result<Vec<Entry>, LogError> {
        if entries.is_empty() {
            return Ok(entries);
        }
        let me = self.me.clone();
        let rows: Vec<Row> = entries.iter().map(Row::of).collect();
        let answer = self.log.call(move |c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_DECISIONS])?;
            if fenced {
                let held = tx.query_opt(
                    "SELECT 1 FROM tg_lease WHERE id = 1 AND holder = $1 AND expires_at > now()",
                    &[&me],
                )?;
                if held.is_none() {
                    return Ok(None);
                }
            }
            let stmt = tx.prepare(
                "INSERT INTO tg_decisions (replica, cbo, kind, action, integration, deployment, at_ms, entry) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq",
            )?;
            let mut seqs = Vec::with_capacity(rows.len());
            for r in &rows {
                let row = tx.query_one(
                    &stmt,
                    &[&me, &r.cbo, &r.kind, &r.action, &r.integration, &r.deployment, &r.at_ms, &r.entry],
                )?;
                seqs.push(row.get::<_, i64>(0));
            }
            tx.commit()?;
            Ok(Some(seqs))
        });
        match answer {
            Ok(Some(seqs)) => {
                self.health.set(None);
                Ok(entries
                    .into_iter()
                    .zip(seqs)
                    .map(|(mut e, s)| {
                        e.seq = s as u64;
                        e
                    })
                    .collect())
            }
            Ok(None) => {
                self.health.set(None);
                Err(LogError::NotLeader)
            }
            Err(CallError::Unique(why)) => {
                self.health.set(None);
                Err(LogError::Refused(format!(
                    "once per deployment: a rollback of this deployment was already intended ({why})"
                )))
            }
            Err(CallError::Failed(why)) => Err(self.broke(&why)),
        }
    }

    /// Entries after `seq`, oldest first, at most `limit`, optionally of one CBO and since a
    /// time; `others` leaves out this replica's own.
    pub fn read(
        &self,
        cbo: Option<&str>,
        since_ms: Option<i64>,
        after: u64,
        limit: usize,
        others: bool,
    ) -> Result<Vec<Entry>, LogError> {
        let (cbo, me) = (cbo.map(str::to_string), self.me.clone());
        let limit = limit.min(i64::MAX as usize) as i64;
        let after = after as i64;
        let since = since_ms.unwrap_or(i64::MIN);
        let rows = self
            .counted(&self.log, "decision log", move |c| {
                c.query(
                    "SELECT seq, entry FROM tg_decisions WHERE seq > $1 AND ($2::text IS NULL OR cbo = $2) \
                     AND at_ms >= $3 AND (NOT $4 OR replica <> $5) ORDER BY seq LIMIT $6",
                    &[&after, &cbo, &since, &others, &me, &limit],
                )
            })
            .map_err(LogError::Store)?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let seq: i64 = r.get(0);
                let text: String = r.get(1);
                match serde_json::from_str::<Entry>(&text) {
                    Ok(mut e) => {
                        e.seq = seq as u64;
                        Some(e)
                    }
                    Err(e) => {
                        tracing::warn!(seq, error = %e, "skipping an unreadable decision in the store");
                        None
                    }
                }
            })
            .collect())
    }

    /// `f` on `conn`; a failure counted, logged once per spell and named as `what`'s.
    fn counted<T: Send + 'static>(
        &self,
        conn: &Conn,
        what: &str,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, String> {
        conn.call(f)
            .map_err(|(CallError::Unique(why) | CallError::Failed(why))| {
                self.failed(what, &why);
                why
            })
    }

    /// Stores pushed events (journal records, one a line) for every replica to take; `Ok` once
    /// committed.
    pub fn push_events(&self, records: Vec<String>, received_ms: i64) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        let me = self.me.clone();
        self.counted(&self.events, "events", move |c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_EVENTS])?;
            tx.execute(
                "INSERT INTO tg_events (received_ms, replica, record) SELECT $1, $2, r FROM unnest($3::text[]) WITH ORDINALITY AS u(r, n) ORDER BY n",
                &[&received_ms, &me, &records],
            )?;
            tx.commit()
        })
    }

    /// Pushed events after id `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: i64, limit: i64) -> Result<Vec<(i64, String)>, String> {
        let rows = self.counted(&self.events, "events", move |c| {
            c.query(
                "SELECT id, record FROM tg_events WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &limit],
            )
        })?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Pushed events received at or after `since_ms` (a start's windows), and the cursor to
    /// follow from.
    pub fn events_since(&self, since_ms: i64) -> Result<Backlog, String> {
        self.counted(&self.events, "events", move |c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let rows = tx.query(
                "SELECT id, record FROM tg_events WHERE received_ms >= $1 ORDER BY id",
                &[&since_ms],
            )?;
            let cursor: i64 = tx
                .query_one("SELECT coalesce(max(id), 0) FROM tg_events", &[])?
                .get(0);
            tx.commit()?;
            Ok(Backlog {
                rows: rows.into_iter().map(|r| (r.get(0), r.get(1))).collect(),
                cursor,
            })
        })
    }

    /// Deletes pushed events received before `before_ms` (no window reaches them).
    pub fn prune_events(&self, before_ms: i64) {
        let _ = self.counted(&self.events, "events", move |c| {
            c.execute(
                "DELETE FROM tg_events WHERE received_ms < $1",
                &[&before_ms],
            )
        });
    }

    /// Writes validation windows (id, cbo, start, the window as JSON), each replacing the one
    /// of its id.
    pub fn save_validations(&self, rows: Vec<(String, String, i64, String)>) -> Result<(), String> {
        if rows.is_empty() {
            return Ok(());
        }
        self.counted(&self.log, "validations", move |c| {
            let mut tx = c.transaction()?;
            let stmt = tx.prepare(
                "INSERT INTO tg_validations (id, cbo, start_ms, body) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET cbo = EXCLUDED.cbo, start_ms = EXCLUDED.start_ms, body = EXCLUDED.body",
            )?;
            for (id, cbo, start_ms, body) in &rows {
                tx.execute(&stmt, &[id, cbo, start_ms, body])?;
            }
            tx.commit()
        })
    }

    /// Every validation window started since `since_ms`, as JSON.
    pub fn load_validations(&self, since_ms: i64) -> Result<Vec<String>, String> {
        let rows = self.counted(&self.log, "validations", move |c| {
            c.query(
                "SELECT body FROM tg_validations WHERE start_ms >= $1 ORDER BY start_ms",
                &[&since_ms],
            )
        })?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Every CBO's remembered baseline (what polling last saw), as JSON.
    pub fn load_baselines(&self) -> Result<Vec<(String, String)>, String> {
        let rows = self.counted(&self.log, "baselines", |c| {
            c.query("SELECT cbo, body FROM tg_baselines", &[])
        })?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Replaces one CBO's remembered baseline.
    pub fn save_baseline(&self, cbo: String, body: String) -> Result<(), String> {
        self.counted(&self.log, "baselines", move |c| {
            c.execute(
                "INSERT INTO tg_baselines (cbo, body) VALUES ($1, $2) ON CONFLICT (cbo) DO UPDATE SET body = EXCLUDED.body",
                &[&cbo, &body],
            )
            .map(|_| ())
        })
    }

    /// Whether the database answers (for the probe of a broken store).
    pub fn ping(&self) -> Result<(), String> {
        self.counted(&self.log, "decision log", |c| {
            c.simple_query("SELECT 1").map(|_| ())
        })
    }
}

/// An entry's columns.
struct Row {
    cbo: String,
    kind: String,
    action: Option<String>,
    integration: Option<String>,
    deployment: Option<String>,
    at_ms: i64,
    entry: String,
}

impl Row {
    fn of(e: &Entry) -> Row {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Row {
            cbo: e.cbo.clone(),
            kind,
            action: e.action.clone(),
            integration: e.integration.clone(),
            deployment: e.deployment.clone(),
            at_ms: e.at_ms,
            entry: serde_json::to_string(e).expect("an entry serializes"),
        }
    }
}

/// Ends this replica's lease now, if it holds it.
fn release(c: &mut Client, me: &str) -> Result<(), postgres::Error> {
    c.execute(
        "UPDATE tg_lease SET expires_at = now() WHERE id = 1 AND holder = $1",
        &[&me],
    )
    .map(|_| ())
}

/// Takes or renews the lease: `Some(epoch)` when this replica holds it now.
fn renew(c: &mut Client, me: &str, lease: Duration) -> Result<Option<i64>, postgres::Error> {
    let ms = lease.as_millis() as i64;
    let row = c.query_opt(
        "INSERT INTO tg_lease (id, holder, epoch, expires_at) VALUES (1, $1, 1, now() + $2::bigint * interval '1 millisecond') \
         ON CONFLICT (id) DO UPDATE SET \
           epoch = CASE WHEN tg_lease.holder = EXCLUDED.holder THEN tg_lease.epoch ELSE tg_lease.epoch + 1 END, \
           holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
         WHERE tg_lease.holder = EXCLUDED.holder OR tg_lease.expires_at < now() \
         RETURNING epoch",
        &[&me, &ms],
    )?;
    Ok(row.map(|r| r.get(0)))
}

/// Runs the migrations not yet run, in one transaction under a lock (replicas starting
/// together run each once); a database written by a newer build is refused (`Ok(Err)`).
fn migrate(c: &mut Client) -> Result<Result<(), StoreError>, postgres::Error> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_MIGRATE])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tg_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM tg_schema", &[])?
        .get(0);
    if found > SCHEMA_VERSION {
        return Ok(Err(StoreError::Newer {
            found,
            ours: SCHEMA_VERSION,
        }));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql)?;
        tx.execute("INSERT INTO tg_schema (version) VALUES ($1)", &[&version])?;
        tracing::info!(version, "store schema migrated");
    }
    tx.commit()?;
    Ok(Ok(()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into())
}
