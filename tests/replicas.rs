//! Replicas on a real PostgreSQL (SPEC §12): one leader, one rollback per deployment, a kill -9
//! of the leader mid-breach handed over without a second rollback, the database going away
//! and coming back. Real processes, the real clock, the simulated Twilio.
//!
//! The database is `TRANSFER_GUARD_TEST_DATABASE_URL` (`. .ci/postgres` starts a private
//! cluster and sets it); each test makes a database of its own.
//! `TRANSFER_GUARD_FAILOVER_TRIALS` sets the kill -9 trials (2 by default; `benches/failover.sh`
//! runs 20).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::processes::{ZE, ZS, daemon, failures, rollback_config, serverless_history};
use common::*;
use tokio::process::Child;
use transfer_guard::clock::Clock;
use transfer_guard::sim::twilio::{Fault, SimTwilio};

/// Short, so a handover is quick to see: renewed every second, acted on for half of it.
const LEASE: Duration = Duration::from_secs(4);

/// A database of its own on the test cluster, or `None` (said, or a panic in CI) without one.
fn database(test: &str) -> Option<String> {
    let Ok(admin) = std::env::var("TRANSFER_GUARD_TEST_DATABASE_URL") else {
        let message = format!(
            "{test}: TRANSFER_GUARD_TEST_DATABASE_URL is not set; `. .ci/postgres` starts a private PostgreSQL (.ci/run does)"
        );
        if std::env::var("TRANSFER_GUARD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
            panic!("{message}");
        }
        eprintln!("SKIPPED {message}");
        return None;
    };
    let name = format!("tg_{:016x}", fastrand::u64(..));
    // The blocking client on a thread of its own: not inside the test's runtime.
    let create = format!("CREATE DATABASE {name}");
    let url = admin.clone();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client.batch_execute(&create).unwrap();
    })
    .join()
    .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

/// One replica's configuration: its own port and state dir, the shared store in `TG_DB`.
fn replica_config(dir: &Path, name: &str, twilio: &str, port: u16) -> PathBuf {
    let text = rollback_config(&dir.join(name), twilio, port)
        + &format!(
            "\n[store]\nurl_env = \"TG_DB\"\nlease = \"{}\"\n",
            humantime::format_duration(LEASE)
        );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

struct Replica {
    url: String,
    child: Child,
}

async fn replica(dir: &Path, name: &str, twilio: &str, db: &str) -> Replica {
    let port = free_port();
    let config = replica_config(dir, name, twilio, port);
    let url = format!("http://127.0.0.1:{port}");
    let child = daemon(&config, &url, &[("TG_DB", db)]).await;
    Replica { url, child }
}

/// Two replicas on the store `db`, before any traffic, and the simulated Twilio they poll
/// (`serverless_history`: its good build, and how many deployments it has).
struct Pair {
    sim: SimTwilio,
    good: String,
    before: usize,
    _dir: tempfile::TempDir,
    a: Replica,
    b: Replica,
}

async fn pair(db: &str) -> Pair {
    let sim = SimTwilio::start(Clock::new()).await;
    let good = serverless_history(&sim);
    let before = sim.deployments(AC_A, ZS, ZE).len();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a", &sim.url(), db).await;
    let b = replica(dir.path(), "b", &sim.url(), db).await;
    Pair {
        sim,
        good,
        before,
        _dir: dir,
        a,
        b,
    }
}

async fn scrape(url: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

async fn leads(url: &str) -> Option<bool> {
    scrape(url)
        .await
        .and_then(|m| metric(&m, "transfer_guard_leader"))
        .map(|v| v == 1.0)
}

/// Waits until `ok` holds, or `within` passes: how long it took.
async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    mut ok: impl FnMut() -> F,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if ok().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// `GET {url}{path}` with the admin token, as JSON.
async fn admin_get(url: &str, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn decisions(url: &str) -> Vec<serde_json::Value> {
    let body = admin_get(url, "/v1/decisions?cbo=a&limit=1000").await;
    body["decisions"]
        .as_array()
        .or_else(|| body.as_array())
        .cloned()
        .unwrap_or_default()
}

fn fired_rollbacks(entries: &[serde_json::Value]) -> usize {
    entries
        .iter()
        .filter(|e| {
            e["kind"] == "action"
                && e["action"] == "rollback"
                && e["integration"] == "serverless"
                && e["result"] == "fired"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_one_breach_fire_one_rollback_and_both_read_it() {
    let Some(db) = database("two_replicas_and_one_breach_fire_one_rollback_and_both_read_it")
    else {
        return;
    };
    let Pair {
        sim,
        good,
        before,
        _dir,
        mut a,
        mut b,
    } = pair(&db).await;
    // Exactly one leads.
    let one = until(Duration::from_secs(10), || async {
        let (la, lb) = (leads(&a.url).await, leads(&b.url).await);
        matches!(
            (la, lb),
            (Some(true), Some(false)) | (Some(false), Some(true))
        )
    })
    .await;
    assert!(one.is_some(), "never exactly one leader");
    // A pipeline opens a validation window through one replica (whichever the load balancer
    // picks)...
    let window: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/validations", b.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"cbo": "a", "deployment": "release-42", "duration": "10m"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = window["id"].as_str().unwrap().to_string();
    // Failures pushed to both; every replica takes every event from the store.
    let feeder = failures(vec![a.url.clone(), b.url.clone()]);
    let landed = until(Duration::from_secs(20), || async {
        sim.deployments(AC_A, ZS, ZE).len() > before
    })
    .await;
    assert!(landed.is_some(), "no rollback within 20 s");
    // The breach stands on both for a while longer: still one rollback.
    tokio::time::sleep(Duration::from_secs(6)).await;
    feeder.abort();
    let after = sim.deployments(AC_A, ZS, ZE);
    assert_eq!(after.len() - before, 1, "rollbacks: {:?}", &after[before..]);
    assert_eq!(after.last().unwrap().build_sid, good);
    // Both judged with the same events: each saw Bad Requests it was not sent.
    for r in [&a, &b] {
        let m = scrape(&r.url).await.unwrap();
        let ingested = metric_sum(&m, "transfer_guard_events_ingested_total", &["cbo=\"a\""]);
        assert!(ingested >= 40.0, "{}: {ingested} events", r.url);
    }
    // The decision is readable on both, the same.
    let (da, db_) = (decisions(&a.url).await, decisions(&b.url).await);
    assert_eq!(fired_rollbacks(&da), 1, "{da:#?}");
    assert_eq!(fired_rollbacks(&db_), 1);
    let seqs = |d: &[serde_json::Value]| d.iter().map(|e| e["seq"].clone()).collect::<Vec<_>>();
    assert_eq!(seqs(&da), seqs(&db_));
    // ...and polls it through the other: the same window, failed by the rollback trigger.
    for r in [&a, &b] {
        let v = admin_get(&r.url, &format!("/v1/validations/{id}")).await;
        assert_eq!(v["state"], "failed", "{}: {v:#}", r.url);
        assert_eq!(v["deployment"], "release-42");
    }
    for r in [&mut a, &mut b] {
        r.child.start_kill().unwrap();
        let _ = r.child.wait().await;
    }
}

/// One trial: the leader killed mid-breach (`kill_after` after the failures start), Twilio
/// applying the rollback and answering late. The follower must take over within twice the
/// lease and never roll back a second time. Returns how long the handover took.
async fn failover(
    db: &str,
    kill_after: Duration,
    answer_after: Duration,
) -> Result<Duration, String> {
    let sim = SimTwilio::start(Clock::new()).await;
    let good = serverless_history(&sim);
    let before = sim.deployments(AC_A, ZS, ZE).len();
    sim.inject_on(
        "POST",
        "/Deployments",
        Fault::ApplyThenDelay(answer_after),
        Some(1),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut first = replica(dir.path(), "first", &sim.url(), db).await;
    if until(Duration::from_secs(10), || async {
        leads(&first.url).await == Some(true)
    })
    .await
    .is_none()
    {
        return Err("the first replica never led".into());
    }
    let mut second = replica(dir.path(), "second", &sim.url(), db).await;
    let feeder = failures(vec![second.url.clone()]);
    tokio::time::sleep(kill_after).await;
    first.child.start_kill().unwrap(); // SIGKILL
    let _ = first.child.wait().await;
    let handover = until(LEASE * 3, || async {
        leads(&second.url).await == Some(true)
    })
    .await;
    // Long enough for a whole rollback from scratch after the handover.
    tokio::time::sleep(Duration::from_secs(8)).await;
    feeder.abort();
    let entries = decisions(&second.url).await;
    second.child.start_kill().unwrap();
    let _ = second.child.wait().await;
    let after = sim.deployments(AC_A, ZS, ZE);
    let created = after.len() - before;
    let intents: Vec<_> = entries.iter().filter(|e| e["kind"] == "intent").collect();
    let unsettled = intents
        .iter()
        .filter(|i| {
            !entries.iter().any(|r| {
                r["kind"] == "action"
                    && r["key"] == i["key"]
                    && matches!(r["result"].as_str(), Some("fired" | "failed"))
            })
        })
        .count();
    let live = after.last().map(|d| d.build_sid.clone());
    let Some(handover) = handover else {
        return Err(format!(
            "killed after {kill_after:?}: the second replica did not lead within {:?}",
            LEASE * 3
        ));
    };
    if created != 1 || unsettled != 0 || live.as_deref() != Some(good.as_str()) {
        return Err(format!(
            "killed after {kill_after:?}, Twilio answering after {answer_after:?}: {created} deployments created, {unsettled} intents without a result, live build {live:?} (good {good})"
        ));
    }
    if handover > LEASE * 2 {
        return Err(format!(
            "handover took {handover:?}, more than twice the lease ({LEASE:?})"
        ));
    }
    Ok(handover)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_mid_breach_hands_over_without_a_second_rollback() {
    let Some(db) = database("kill_9_of_the_leader_mid_breach_hands_over_without_a_second_rollback")
    else {
        return;
    };
    let trials: usize = std::env::var("TRANSFER_GUARD_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut handovers = Vec::new();
    let mut failed = Vec::new();
    for _ in 0..trials {
        // Each trial on a database of its own: a fresh lease and log.
        let db = if handovers.is_empty() && failed.is_empty() {
            db.clone()
        } else {
            database("failover").unwrap()
        };
        // Before the breach, around the intent, while Twilio holds its answer, after.
        let kill_after = Duration::from_millis(fastrand::u64(0..4_000));
        let answer_after = Duration::from_millis(fastrand::u64(1_200..3_000));
        match failover(&db, kill_after, answer_after).await {
            Ok(d) => handovers.push(d),
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {trials} trials:\n{}",
        failed.len(),
        failed.join("\n")
    );
    handovers.sort();
    println!(
        "{trials} handovers after kill -9 (lease {LEASE:?}): 0 second rollbacks; median {:?}, max {:?}",
        handovers[handovers.len() / 2],
        handovers.last().unwrap()
    );
}

/// A TCP proxy to the database that can be cut: every connection closed, new ones refused.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy to the database of the URL `db`, and the URL that goes through it.
    async fn before(db: &str) -> (Proxy, String) {
        let cfg: postgres::Config = db.parse().unwrap();
        let host = match &cfg.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("{other:?}"),
        };
        let pg_port = cfg.get_ports()[0];
        let proxy = Proxy::start(format!("{host}:{pg_port}").parse().unwrap()).await;
        let proxied = db.replacen(&format!(":{pg_port}/"), &format!(":{}/", proxy.port), 1);
        (proxy, proxied)
    }

    async fn start(to: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let flag = down.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if flag.load(Ordering::Acquire) {
                    continue; // dropped: refused
                }
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let cut = async {
                        while !flag.load(Ordering::Acquire) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Proxy { port, down }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_stops_actions_and_pages_and_its_return_resumes_them() {
    let Some(db) =
        database("the_database_going_away_stops_actions_and_pages_and_its_return_resumes_them")
    else {
        return;
    };
    let (proxy, proxied) = Proxy::before(&db).await;
    let Pair {
        sim,
        good,
        before,
        _dir,
        mut a,
        mut b,
    } = pair(&proxied).await;
    let led = until(Duration::from_secs(10), || async {
        leads(&a.url).await == Some(true) || leads(&b.url).await == Some(true)
    })
    .await;
    assert!(led.is_some(), "nobody led");

    proxy.down.store(true, Ordering::Release);
    // Within half the lease and a tick, nobody acts, and each replica says why.
    let stopped = until(LEASE, || async {
        leads(&a.url).await == Some(false) && leads(&b.url).await == Some(false)
    })
    .await;
    assert!(
        stopped.is_some(),
        "a replica still leads with the database away"
    );
    for r in [&a, &b] {
        let ready = reqwest::get(format!("{}/readyz", r.url)).await.unwrap();
        assert_eq!(ready.status(), 503, "{}", r.url);
        let m = scrape(&r.url).await.unwrap();
        assert_eq!(
            metric(&m, "transfer_guard_decision_log_writable{}"),
            Some(0.0)
        );
        assert!(
            metric(&m, "transfer_guard_store_errors_total{op=\"store\"}").unwrap_or(0.0) > 0.0,
            "{}",
            r.url
        );
    }
    // Failures sent meanwhile are refused, not lost silently: the sender is told to send again.
    let now = Clock::new().now_ms();
    let refused = post_ndjson(
        &a.url,
        TOKEN_A,
        &[event(
            "failed",
            now - 100,
            9_999,
            r#","error":{"status":400,"message":"TaskRouter error: Bad Request"}"#,
        )],
    )
    .await;
    assert_eq!(refused.status(), 503);
    let why = refused.text().await.unwrap();
    assert!(why.contains("send it again"), "{why}");
    assert_eq!(
        sim.deployments(AC_A, ZS, ZE).len(),
        before,
        "an action while away"
    );

    // Back: a leader again, and the breach that follows is acted on.
    proxy.down.store(false, Ordering::Release);
    let back = until(LEASE * 3, || async {
        leads(&a.url).await == Some(true) || leads(&b.url).await == Some(true)
    })
    .await;
    assert!(back.is_some(), "nobody led after the database came back");
    let feeder = failures(vec![a.url.clone(), b.url.clone()]);
    let landed = until(Duration::from_secs(20), || async {
        sim.deployments(AC_A, ZS, ZE).len() > before
    })
    .await;
    feeder.abort();
    assert!(landed.is_some(), "no rollback after the database came back");
    assert_eq!(
        sim.deployments(AC_A, ZS, ZE).last().unwrap().build_sid,
        good
    );
    for r in [&mut a, &mut b] {
        r.child.start_kill().unwrap();
        let _ = r.child.wait().await;
    }
}

/// The store of `db` as one replica opens it, with a short lease.
fn open_store(db: &str) -> Arc<transfer_guard::pg::Store> {
    let cfg = transfer_guard::config::Store {
        url: transfer_guard::config::Secret::new(db.to_string()),
        lease: LEASE,
    };
    transfer_guard::pg::Store::open(&cfg, Arc::default()).unwrap()
}

fn rollback_intent(deployment: &str) -> transfer_guard::decisions::Entry {
    use transfer_guard::decisions::{Entry, Kind};
    let mut e = Entry::new("a", Kind::Intent, Clock::new().now_ms());
    e.action = Some("rollback".into());
    e.integration = Some("serverless".into());
    e.deployment = Some(deployment.into());
    e.key = Some(format!("a-rollback-serverless-{}", fastrand::u64(..)));
    e
}

/// Blocking work on a thread of its own (the store's calls block).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_was_taken_writes_nothing_and_a_deployment_is_rolled_back_once() {
    use transfer_guard::decisions::LogError;
    let Some(db) = database(
        "a_leader_whose_lease_was_taken_writes_nothing_and_a_deployment_is_rolled_back_once",
    ) else {
        return;
    };
    let store = open_store(&db);
    let s = store.clone();
    let led = until(Duration::from_secs(5), || {
        let s = s.clone();
        async move {
            // The tick marks the log read; here nothing else wrote to it.
            s.caught_up(s.epoch());
            s.leading()
        }
    })
    .await;
    assert!(led.is_some(), "the only replica never led");
    // Once per deployment, even for a leader: the second intent is refused by the database.
    let s = store.clone();
    let (first, second) = blocking(move || {
        (
            s.append(vec![rollback_intent("release-1")], true),
            s.append(vec![rollback_intent("release-1")], true),
        )
    })
    .await;
    assert!(first.is_ok(), "{first:?}");
    assert!(
        matches!(&second, Err(LogError::Refused(why)) if why.contains("once per deployment")),
        "{second:?}"
    );
    // Another replica takes the lease while this one still believes it leads (a pause, a
    // clock that ran slow): its writes are refused in the database.
    let url = db.clone();
    blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.execute(
            "UPDATE tg_lease SET holder = 'another-replica', epoch = epoch + 1, expires_at = now() + interval '1 minute'",
            &[],
        )
        .unwrap();
    })
    .await;
    let s = store.clone();
    let deposed = blocking(move || s.append(vec![rollback_intent("release-2")], true)).await;
    assert!(matches!(deposed, Err(LogError::NotLeader)), "{deposed:?}");
    // And within a renewal it knows it no longer leads.
    let s = store.clone();
    let follows = until(Duration::from_secs(3), || {
        let s = s.clone();
        async move { !s.leading() }
    })
    .await;
    assert!(follows.is_some(), "still leading after its lease was taken");
    store.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_a_newer_build_is_refused_by_name() {
    let Some(db) = database("a_store_written_by_a_newer_build_is_refused_by_name") else {
        return;
    };
    drop(open_store(&db));
    let url = db.clone();
    blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.execute("INSERT INTO tg_schema (version) VALUES (99)", &[])
            .unwrap();
    })
    .await;
    let cfg = transfer_guard::config::Store {
        url: transfer_guard::config::Secret::new(db.clone()),
        lease: LEASE,
    };
    let refused = transfer_guard::pg::Store::open(&cfg, Arc::default())
        .err()
        .expect("a newer schema was taken");
    let why = refused.to_string();
    assert!(
        why.contains("version 99") && why.contains(&transfer_guard::pg::SCHEMA_VERSION.to_string()),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_cleanly_gives_the_lease_up_at_once() {
    let Some(db) = database("a_leader_stopped_cleanly_gives_the_lease_up_at_once") else {
        return;
    };
    let Pair { mut a, mut b, .. } = pair(&db).await;
    let one = until(Duration::from_secs(10), || async {
        leads(&a.url).await == Some(true) || leads(&b.url).await == Some(true)
    })
    .await;
    assert!(one.is_some(), "nobody led");
    let (leader, follower) = if leads(&a.url).await == Some(true) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    // SIGTERM: a clean stop.
    let pid = leader.child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = leader.child.wait().await;
    let stopped = Instant::now();
    let took = until(LEASE, || async { leads(&follower.url).await == Some(true) })
        .await
        .map(|_| stopped.elapsed());
    // Without the lease given up, the follower would wait for it to run out (the whole lease).
    assert!(
        took.is_some_and(|t| t < LEASE / 2),
        "the follower led after {took:?}"
    );
    follower.child.start_kill().unwrap();
    let _ = follower.child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_starts_knows_the_problems_another_already_saw() {
    use transfer_guard::sources::poll::Remembered;
    use transfer_guard::store::RememberedStore;
    let Some(db) = database("a_replica_that_starts_knows_the_problems_another_already_saw") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seen = Remembered {
        baseline: None,
        known_problems: ["workflow_sid_mismatch".to_string()].into(),
    };
    let (first, second) = (open_store(&db), open_store(&db));
    let (d, s) = (dir.path().to_path_buf(), seen.clone());
    let got = blocking(move || {
        RememberedStore::open(&d.join("one"), Some(first.clone())).save("a", &s);
        first.stop();
        // Another replica, its own (empty) state dir.
        let other = RememberedStore::open(&d.join("two"), Some(second.clone()));
        second.stop();
        other.get("a")
    })
    .await;
    assert_eq!(got, Some(seen));
    assert!(!dir.path().join("one").join("baselines.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_store_did_not_take_is_settled_with_twilio_when_it_answers_again() {
    let Some(db) =
        database("a_result_the_store_did_not_take_is_settled_with_twilio_when_it_answers_again")
    else {
        return;
    };
    let (proxy, proxied) = Proxy::before(&db).await;
    let sim = SimTwilio::start(Clock::new()).await;
    let good = serverless_history(&sim);
    let before = sim.deployments(AC_A, ZS, ZE).len();
    // Twilio takes 4 s to answer the rollback (applied at once): the store goes away meanwhile.
    sim.inject_on(
        "POST",
        "/Deployments",
        Fault::Delay(Duration::from_secs(4)),
        Some(1),
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = replica_config(dir.path(), "only", &sim.url(), port);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "request_timeout = \"1s\"",
        "request_timeout = \"10s\"",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut only = daemon(&config, &url, &[("TG_DB", &proxied)]).await;
    let feeder = failures(vec![url.clone()]);
    let intent = until(Duration::from_secs(20), || async {
        decisions(&url).await.iter().any(|e| e["kind"] == "intent")
    })
    .await;
    assert!(intent.is_some(), "no rollback intent");
    proxy.down.store(true, Ordering::Release);
    feeder.abort();
    // Twilio answers while the store is away: the result cannot be written.
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.down.store(false, Ordering::Release);
    // Back: this replica leads again and settles its own intent by asking Twilio.
    let settled = until(Duration::from_secs(20), || async {
        decisions(&url).await.iter().any(|e| {
            e["kind"] == "action"
                && e["integration"] == "serverless"
                && e["result"] == "fired"
                && e["detail"].as_str().unwrap_or("").contains("took effect")
        })
    })
    .await;
    let entries = decisions(&url).await;
    assert!(settled.is_some(), "never settled: {entries:#?}");
    let after = sim.deployments(AC_A, ZS, ZE);
    assert_eq!(
        after.len() - before,
        1,
        "sent again: {:?}",
        &after[before..]
    );
    assert_eq!(after.last().unwrap().build_sid, good);
    only.start_kill().unwrap();
    let _ = only.wait().await;
}
