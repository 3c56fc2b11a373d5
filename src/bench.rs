//! `transfer-guard bench`: on-demand measurements (never assertions) of the in-process pipeline, memory, scrape cost and detection latency; figures for BENCHMARKS.md.

use std::time::Instant;

use crate::config::{Config, check_str};
use crate::event::parse_line;
use crate::metrics::Metrics;
use crate::sim::traffic::{Generator, Profile};
use crate::state::{Fleet, Rejection};

/// A `[server]` section on a loopback port with a fresh, empty state directory of its own
/// (never the system's `/var/lib/transfer-guard`: one bench's decisions are not another's
/// start-up cost).
pub fn server_section() -> String {
    server_section_in(&fresh_state_dir())
}

fn server_section_in(dir: &std::path::Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n",
        dir.display()
    )
}

/// Removes this process's bench state directories when dropped (`bench` holds one while it
/// runs): a daemon of 5,000 CBOs leaves over a gigabyte of journal, and a few runs of
/// `bench scrape` filled the disk.
pub struct StateDirs;

impl Drop for StateDirs {
    fn drop(&mut self) {
        let pid = std::process::id();
        let (runs, poller) = (format!("tg-bench-{pid}-"), format!("tg-bench-poller-{pid}"));
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&runs) || name == poller {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A state directory no other bench run uses, empty.
fn fresh_state_dir() -> std::path::PathBuf {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tg-bench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A config of `cbos` CBOs (no Twilio), for the in-process benchmarks.
pub fn config(cbos: usize) -> Config {
    let mut text = server_section();
    for i in 0..cbos {
        text += &format!("[[cbo]]\nkey = \"c{i}\"\n");
    }
    let checked = check_str(&text, &|_| None);
    checked.config.expect("the bench config parses")
}

/// `n` typical NDJSON event lines (the traffic generator's), spread over the last 50 minutes.
pub fn lines(n: usize, now_ms: i64) -> Vec<String> {
    let mut g = Generator::new(
        Profile {
            rate: 50.0,
            ..Profile::default()
        },
        1,
        now_ms - 50 * 60 * 1000,
    )
    .plugin_only();
    let mut out = Vec::with_capacity(n);
    let mut until = now_ms - 50 * 60 * 1000;
    while out.len() < n {
        until += 1000;
        g.start_until(until);
        out.extend(g.due(until));
        if until > now_ms {
            // Wrap around: the same shapes again, fresh transfer ids.
            g = Generator::new(
                Profile {
                    rate: 50.0,
                    ..Profile::default()
                },
                out.len() as u64,
                now_ms - 50 * 60 * 1000,
            )
            .plugin_only();
            until = now_ms - 50 * 60 * 1000;
        }
    }
    out.truncate(n);
    out
}

/// Writes `lines` into files of `per_file` lines under `dir`; with `log_lines`, in the
/// plugin's `[ConversationTransfer] <event>: {json}` form.
pub fn write_lines(
    lines: &[String],
    per_file: usize,
    dir: &std::path::Path,
    log_lines: bool,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (n, chunk) in lines.chunks(per_file.max(1)).enumerate() {
        let mut text = String::new();
        for l in chunk {
            if log_lines {
                let v: serde_json::Value = serde_json::from_str(l).expect("generated JSON");
                let kind = v["event"].as_str().unwrap_or("initiated").to_string();
                let mut v = v;
                v.as_object_mut().expect("an object").remove("event");
                text += &format!("[ConversationTransfer] {kind}: {v}\n");
            } else {
                text += l;
                text.push('\n');
            }
        }
        std::fs::write(dir.join(format!("{n:06}.ndjson")), text)?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Resident memory of this process in bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident memory of this process so far (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kb| kb * 1024)
}

/// A `kB` field of `/proc/self/status`.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The `q` quantile (0 = first, 1 = last) of `sorted`, by nearest rank; NaN when empty.
/// `p50 …, p99 …, max … ms` of sorted milliseconds, with `decimals` places.
pub fn spread(sorted: &[f64], decimals: usize) -> String {
    let at = |q: f64| quantile(sorted, q);
    format!(
        "p50 {:.decimals$} ms, p99 {:.decimals$} ms, max {:.decimals$} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len().max(1) - 1;
    sorted
        .get((last as f64 * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Parsing alone and tracking alone, events per second (median of `runs`): where the time goes.
pub fn phases(events: usize, runs: usize) -> (f64, f64) {
    let now = chrono::Utc::now().timestamp_millis();
    let lines = lines(events, now);
    let mut parse_rates = Vec::new();
    let mut track_rates = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let parsed: Vec<_> = lines.iter().filter_map(|l| parse_line(l).ok()).collect();
        parse_rates.push(events as f64 / start.elapsed().as_secs_f64());
        let config = config(1);
        let metrics = std::sync::Arc::new(Metrics::new());
        let fleet = Fleet::new(&config, &metrics);
        let cbo = fleet.get("c0").expect("one cbo");
        let mut rejected = Vec::new();
        let start = Instant::now();
        let mut it = parsed.into_iter().enumerate();
        loop {
            let batch: Vec<_> = it.by_ref().take(1000).collect();
            if batch.is_empty() {
                break;
            }
            cbo.ingest(batch, now, &mut rejected);
        }
        track_rates.push(events as f64 / start.elapsed().as_secs_f64());
    }
    (median(parse_rates), median(track_rates))
}

/// Parse + track + window on one thread, in batches of 1,000 lines: events per second (median of `runs`).
pub fn pipeline(events: usize, runs: usize) -> (f64, f64) {
    let now = chrono::Utc::now().timestamp_millis();
    let lines = lines(events, now);
    let avg_len = lines.iter().map(|l| l.len()).sum::<usize>() as f64 / lines.len() as f64;
    let mut rates = Vec::new();
    for _ in 0..runs {
        let config = config(1);
        let metrics = std::sync::Arc::new(Metrics::new());
        let fleet = Fleet::new(&config, &metrics);
        let cbo = fleet.get("c0").expect("one cbo");
        let mut rejected: Vec<Rejection> = Vec::new();
        let start = Instant::now();
        for batch in lines.chunks(1000) {
            let events = batch
                .iter()
                .enumerate()
                .filter_map(|(i, l)| parse_line(l).ok().map(|e| (i, e)));
            cbo.ingest(events, now, &mut rejected);
        }
        rates.push(events as f64 / start.elapsed().as_secs_f64());
        assert!(
            rejected.is_empty(),
            "bench lines are valid: {:?}",
            rejected.first()
        );
    }
    (median(rates), avg_len)
}

/// RSS after feeding `total` events over `cbos` CBOs, sampled at each of `marks`. Time is
/// simulated: every CBO starts `rate` transfers a second (about four events each; Poisson
/// arrivals), the clock moves one
/// second per round, and transfers are swept every ten simulated seconds, as the daemon does.
/// A transfer's events are handed over as soon as it starts (stamped up to 25 s ahead, inside
/// the 60 s tolerance), so the generators hold nothing and the RSS is the daemon's state.
pub fn memory(total: usize, cbos: usize, rate: f64, marks: &[usize]) -> Vec<(usize, u64, i64)> {
    let start = chrono::Utc::now().timestamp_millis();
    let config = config(cbos);
    let metrics = std::sync::Arc::new(Metrics::new());
    let fleet = Fleet::new(&config, &metrics);
    let states: Vec<_> = fleet.iter().collect();
    let mut generators: Vec<Generator> = (0..cbos)
        .map(|i| {
            Generator::new(
                Profile {
                    rate,
                    ..Profile::default()
                },
                i as u64,
                start,
            )
            .plugin_only()
        })
        .collect();
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    let mut fed = 0;
    let mut now = start;
    while fed < total {
        now += 1000;
        for (g, cbo) in generators.iter_mut().zip(&states) {
            g.start_until(now);
            let lines = g.due(i64::MAX);
            let before = fed;
            fed += lines.len();
            cbo.ingest(
                lines
                    .iter()
                    .enumerate()
                    .filter_map(|(j, l)| parse_line(l).ok().map(|e| (j, e))),
                now,
                &mut rejected,
            );
            if marks.iter().any(|m| fed >= *m && before < *m) {
                out.push((fed, rss_bytes().unwrap_or(0), (now - start) / 1000));
            }
        }
        if (now - start) % 10_000 == 0 {
            fleet.sweep(now);
        }
        rejected.clear();
    }
    out
}

/// Gives each CBO of `fleet` 1,000 typical events (a different stretch of one stream each).
fn fill(fleet: &Fleet, now: i64) {
    let template = lines(20_000, now);
    let mut rejected = Vec::new();
    for (i, cbo) in fleet.iter().enumerate() {
        let chunk = &template[(i * 20) % 19_000..(i * 20) % 19_000 + 1000];
        cbo.ingest(
            chunk
                .iter()
                .enumerate()
                .filter_map(|(j, l)| parse_line(l).ok().map(|e| (j, e))),
            now,
            &mut rejected,
        );
    }
}

/// `/healthz` of the daemon at `url`, asked every 10 ms until the sender is told to stop; the
/// round trips in ms, sorted, from the handle.
fn sample_healthz(
    url: &str,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Vec<f64>>,
) {
    let (done, mut stopped) = tokio::sync::watch::channel(false);
    let health = format!("{url}/healthz");
    let probe = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut ms = Vec::new();
        while !*stopped.borrow_and_update() {
            let asked = Instant::now();
            let answered = http.get(&health).send().await;
            if answered.is_ok_and(|r| r.status().is_success()) {
                ms.push(asked.elapsed().as_secs_f64() * 1000.0);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        ms
    });
    (done, probe)
}

/// What `bench scrape` measured in process (median milliseconds of the runs).
pub struct ScrapeReport {
    pub bytes: usize,
    pub gzipped: usize,
    /// The text, written whole.
    pub render_ms: f64,
    /// That text gzipped as one stream (what the scrape cost before its cache).
    pub gzip_ms: f64,
    /// `render_gzip` after every CBO's every family changed (the worst case).
    pub all_changed_ms: f64,
    /// `render_gzip` after one scrape interval at a CBO's volume (`interval`).
    pub interval_ms: f64,
    /// `render_gzip` with nothing changed.
    pub unchanged_ms: f64,
}

/// What changes in one 15-second scrape interval across a fleet at a CBO's volume: every
/// CBO's pollers ran once (TaskRouter, and the three sources of Twilio's record), and one
/// CBO in fifty had a transfer end.
pub fn interval(metrics: &Metrics, keys: &[String]) {
    use crate::event::{EventKind, TargetType, TransferType};
    for (i, key) in keys.iter().enumerate() {
        let Some(c) = metrics.cbo(key) else { continue };
        c.poll(crate::twilio::PollResult::Ok, 0.18);
        for source in crate::metrics::POLLED_SOURCES {
            c.source_poll(source, crate::twilio::PollResult::Ok);
        }
        if i % 50 == 0 {
            c.tallied(|t| {
                t.ingested(EventKind::Completed);
                t.completion(TransferType::Cold, 3.2);
                t.transfer(
                    Some(TransferType::Cold),
                    Some(TargetType::Queue),
                    crate::tracker::Outcome::Completed,
                );
            });
        }
    }
}

/// A change to every family of every CBO (the scrape cache's worst case).
fn everything(metrics: &Metrics, keys: &[String], round: usize) {
    for key in keys {
        let Some(c) = metrics.cbo(key) else { continue };
        c.tallied(|t| t.ingested(crate::event::EventKind::Initiated));
        c.set_open(round);
        interval(metrics, std::slice::from_ref(key));
    }
}

/// `/metrics` rendering with `cbos` CBOs that all have traffic.
pub fn scrape(cbos: usize, runs: usize) -> ScrapeReport {
    let now = chrono::Utc::now().timestamp_millis();
    let config = config(cbos);
    let keys: Vec<String> = config.cbos.iter().map(|c| c.key.to_string()).collect();
    let metrics = std::sync::Arc::new(Metrics::new());
    let fleet = Fleet::new(&config, &metrics);
    fill(&fleet, now);
    fleet.refresh_gauges(now);
    let timed = |f: &mut dyn FnMut() -> usize| {
        let start = Instant::now();
        let n = f();
        (start.elapsed().as_secs_f64() * 1000.0, n)
    };
    let (mut render, mut gzip, mut all, mut each, mut none) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut bytes, mut gzipped) = (0, 0);
    for round in 0..runs {
        let mut text = String::new();
        let (ms, n) = timed(&mut || {
            text = metrics.render();
            text.len()
        });
        bytes = n;
        render.push(ms);
        gzip.push(timed(&mut || crate::metrics::gzip(text.as_bytes()).len()).0);
        everything(&metrics, &keys, round);
        all.push(timed(&mut || metrics.render_gzip().len()).0);
        interval(&metrics, &keys);
        let (ms, n) = timed(&mut || metrics.render_gzip().len());
        gzipped = n;
        each.push(ms);
        none.push(timed(&mut || metrics.render_gzip().len()).0);
    }
    ScrapeReport {
        bytes,
        gzipped,
        render_ms: median(render),
        gzip_ms: median(gzip),
        all_changed_ms: median(all),
        interval_ms: median(each),
        unchanged_ms: median(none),
    }
}

/// The same through a running daemon: `GET /metrics` over loopback, request to last byte,
/// median milliseconds of `runs`; and `/healthz` round trips (ms, sorted) sampled meanwhile.
/// Between two scrapes, one scrape interval at a CBO's volume (`interval`) changes the series.
pub async fn scrape_http(cbos: usize, runs: usize, gzip: bool) -> (f64, usize, Vec<f64>) {
    let config = config(cbos);
    let keys: Vec<String> = config.cbos.iter().map(|c| c.key.to_string()).collect();
    let app = crate::App::start(config).await.expect("starts");
    fill(&app.shared.fleet, app.shared.clock.now_ms());
    // The fill journaled 5 M events (1.3 GB at 5,000 CBOs): on the disk before the timed
    // scrapes, which would otherwise share the two cores with writing it back.
    let shared = app.shared.clone();
    tokio::task::spawn_blocking(move || shared.checkpoints.journal.flush(true))
        .await
        .expect("the journal is written out");
    let (done, healthz) = sample_healthz(&app.url());
    let http = reqwest::Client::new();
    let url = format!("{}/metrics", app.url());
    let mut times = Vec::new();
    let mut size = 0;
    // One scrape before the timed ones: Prometheus scrapes all the time, the cache is warm.
    for run in 0..=runs {
        interval(&app.shared.metrics, &keys);
        let start = Instant::now();
        let body = http
            .get(&url)
            .header(
                reqwest::header::ACCEPT_ENCODING,
                if gzip { "gzip" } else { "identity" },
            )
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("/metrics answers");
        size = body.bytes().await.expect("the body arrives").len();
        if run > 0 {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let _ = done.send(true);
    let healthz = healthz.await.unwrap_or_default();
    app.shutdown().await;
    (median(times), size, healthz)
}

/// Detection latency: from posting the event that completes a breach (a Bad Request with
/// `bad_requests` at one minute) to the rollback's `POST …/Deployments` reaching the simulated
/// Twilio, once per CBO, `trials` CBOs in turn.
/// A daemon of `trials` CBOs on a simulated Twilio, each with a known-good build and a bad one
/// live, rolling back (not dry run) on one Bad Request: detection's and the storm's setup.
async fn rollback_fleet(trials: usize) -> (crate::App, crate::sim::twilio::SimTwilio) {
    use crate::App;
    use crate::clock::Clock;
    use crate::sim::twilio::SimTwilio;
    // Twilio is elsewhere in production: the simulated one answers from a runtime (and thread)
    // of its own, so its work is not the daemon's async workers' work.
    let twilio = Box::leak(Box::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the simulated Twilio"),
    ));
    let sim = twilio
        .spawn(SimTwilio::start(Clock::new()))
        .await
        .expect("the simulated Twilio starts");
    let mut text = server_section()
        + &format!(
            "[twilio]\ntaskrouter_url = \"{url}\"\nserverless_url = \"{url}\"\nflex_url = \"{url}\"\nmonitor_url = \"{url}\"\n[actions]\ndry_run = false\n",
            url = sim.url()
        );
    for i in 0..trials {
        let (ac, ws, ww, zs, ze) = (
            format!("AC{i:032x}"),
            format!("WS{i:032x}"),
            format!("WW{i:032x}"),
            format!("ZS{i:032x}"),
            format!("ZE{i:032x}"),
        );
        sim.add_account(&ac, "bench");
        sim.add_workflow(&ac, &ws, &ww);
        sim.add_service(&ac, &zs, &ze, &ww);
        // The first build ran for hours (a known-good target), the second is the one breaking.
        sim.age_history(&ac, std::time::Duration::from_secs(3 * 3600));
        sim.deploy(&ac, &zs, &ze, None);
        text += &format!(
            "[[cbo]]\nkey = \"c{i}\"\ningest_token_env = \"T\"\naccount_sid = \"{ac}\"\nauth_token_env = \"A\"\nworkspace_sid = \"{ws}\"\nworkflow_sid = \"{ww}\"\nserverless_service_sid = \"{zs}\"\nserverless_environment_sid = \"{ze}\"\nrollback = [\"serverless\"]\n[cbo.rules.bad_requests]\nminutes = 1\n"
        );
    }
    // One ingest token shared by every CBO would be ambiguous; the admin token names the CBO.
    let text = text.replace("ingest_token_env = \"T\"\n", "");
    let text = text.replacen("[server]\n", "[server]\nadmin_token_env = \"ADMIN\"\n", 1);
    let env = |k: &str| match k {
        "ADMIN" => Some("bench-admin".to_string()),
        "A" => Some("bench".to_string()),
        _ => None,
    };
    let checked = check_str(&text, &env);
    assert!(
        !checked.problems.iter().any(|p| p.fatal),
        "{:?}",
        checked.problems
    );
    let app = App::start(checked.config.expect("bench config"))
        .await
        .expect("starts");
    while !app.shared.not_ready().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (app, sim)
}

/// CBO `c{i}`'s transfer failing with a Bad Request, as two NDJSON lines for the admin token.
fn breach(i: usize, ts: &str) -> String {
    format!(
        "{{\"cbo\":\"c{i}\",\"event\":\"initiated\",\"timestamp\":\"{ts}\",\"conversation_sid\":\"CH{i:032x}\",\"transfer_type\":\"cold\",\"target_type\":\"queue\"}}\n{{\"cbo\":\"c{i}\",\"event\":\"failed\",\"timestamp\":\"{ts}\",\"conversation_sid\":\"CH{i:032x}\",\"error\":{{\"status\":400}}}}"
    )
}

/// Posts NDJSON `body` with the bench's admin token; it must be accepted.
async fn post_as_admin(http: &reqwest::Client, app: &crate::App, body: String) {
    let resp = http
        .post(format!("{}/v1/events", app.url()))
        .bearer_auth("bench-admin")
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(resp.status().as_u16(), 202);
}

/// Detection latency: one breach at a time, the event to the rollback request.
pub async fn detection(trials: usize) -> Vec<std::time::Duration> {
    let (app, sim) = rollback_fleet(trials).await;
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for i in 0..trials {
        // A random phase against the 1 s tick.
        tokio::time::sleep(std::time::Duration::from_millis(fastrand::u64(0..1000))).await;
        let now = chrono::Utc::now();
        let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let sent = tokio::time::Instant::now();
        post_as_admin(&http, &app, breach(i, &ts)).await;
        let service = format!("ZS{i:032x}");
        loop {
            let hit = sim.requests().into_iter().find(|r| {
                r.method == "POST" && r.path.contains(&service) && r.path.ends_with("/Deployments")
            });
            if let Some(r) = hit {
                out.push(r.at.saturating_duration_since(sent));
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    app.shutdown().await;
    out
}

/// Reads a log file as a `[[sources.file]]` source does (follower, parse, track, windows) into
/// one CBO: lines per second and how many lines were taken.
pub fn logfile(path: &std::path::Path) -> std::io::Result<(f64, usize)> {
    let now = chrono::Utc::now().timestamp_millis();
    let config = config(1);
    let metrics = std::sync::Arc::new(Metrics::new());
    let fleet = Fleet::new(&config, &metrics);
    let cbo = fleet.get("c0").expect("one cbo");
    let start = Instant::now();
    let mut follower = crate::sources::file::Follower::new(path, true);
    let read = follower.poll()?;
    let lines: Vec<&str> = read.iter().collect();
    let mut rejected = Vec::new();
    let mut taken = 0;
    for batch in lines.chunks(1000) {
        let events: Vec<_> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, l)| parse_line(l).ok().map(|e| (i, e)))
            .collect();
        taken += cbo.ingest(events, now, &mut rejected);
    }
    Ok((lines.len() as f64 / start.elapsed().as_secs_f64(), taken))
}

/// What the Events-poller benchmark measured.
#[derive(Debug)]
pub struct PollerReport {
    pub cbos: usize,
    pub seconds: f64,
    /// TaskRouter events recorded at the simulated Twilio, and those taken as transfers' events.
    pub recorded: u64,
    pub taken: u64,
    /// Transfers recorded, and those the daemon counted (each once).
    pub transfers: u64,
    pub counted: u64,
    /// CPU seconds of the daemon's one thread, and of wall time.
    pub cpu: f64,
    /// Requests per CBO per minute, by kind (Events, Logs, Alerts, the configuration polls).
    pub per_cbo_minute: Vec<(String, f64)>,
    /// Time from the last recorded event to the daemon having taken every one.
    pub drained_after: Option<f64>,
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The daemon, on one thread (a current-thread runtime), polling `cbos` CBOs' Twilio record
/// every `interval` for `seconds` while each CBO's transfers (`rate` a second, three TaskRouter
/// events each) are recorded at a simulated Twilio running on other threads.
pub async fn events_poller(
    cbos: usize,
    seconds: u64,
    rate: f64,
    interval: std::time::Duration,
) -> PollerReport {
    use crate::App;
    use crate::clock::Clock;
    use crate::sim::twilio::SimTwilio;
    use std::sync::Arc;
    use std::time::Duration;

    let sim = Arc::new(SimTwilio::start(Clock::new()).await);
    let dir = std::env::temp_dir().join(format!("tg-bench-poller-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[twilio]\ntaskrouter_url = \"{url}\"\nserverless_url = \"{url}\"\nflex_url = \"{url}\"\nmonitor_url = \"{url}\"\npoll_interval = \"{}\"\nmax_concurrent_requests = 4\n[sources.twilio]\nfirst_read = \"1m\"\n",
        dir.display(),
        humantime::format_duration(interval),
        url = sim.url()
    );
    let ids = |i: usize| {
        (
            format!("AC{i:032x}"),
            format!("WS{i:032x}"),
            format!("WW{i:032x}"),
            format!("ZS{i:032x}"),
            format!("ZE{i:032x}"),
        )
    };
    for i in 0..cbos {
        let (ac, ws, ww, zs, ze) = ids(i);
        sim.add_account(&ac, "bench");
        sim.add_workflow(&ac, &ws, &ww);
        sim.add_service(&ac, &zs, &ze, &ww);
        text += &format!(
            "[[cbo]]\nkey = \"c{i}\"\naccount_sid = \"{ac}\"\nauth_token_env = \"A\"\nworkspace_sid = \"{ws}\"\nworkflow_sid = \"{ww}\"\nserverless_service_sid = \"{zs}\"\nserverless_environment_sid = \"{ze}\"\n"
        );
    }
    let checked = check_str(&text, &|k| (k == "A").then(|| "bench".to_string()));
    let config = checked.config.expect("the bench config parses");

    // The daemon on its own thread and runtime: one core.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(u64, u64, f64)>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (taken_tx, taken_rx) = tokio::sync::watch::channel(0u64);
    let daemon = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let cpu0 = thread_cpu_seconds();
            let app = App::start(config).await.expect("the daemon starts");
            let seen = |app: &App| {
                let text = app.shared.metrics.render();
                let sum = |name: &str, label: &str| -> u64 {
                    text.lines()
                        .filter(|l| l.starts_with(name) && l.contains(label))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum::<f64>() as u64
                };
                (
                    sum(
                        "transfer_guard_transfers_seen_total{",
                        "source=\"taskrouter_events\"",
                    ),
                    sum("transfer_guard_transfers_total{", ""),
                )
            };
            let mut stop_rx = stop_rx;
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        let _ = taken_tx.send(seen(&app).0);
                    }
                }
            }
            let (taken, counted) = seen(&app);
            let cpu = thread_cpu_seconds() - cpu0;
            app.shutdown().await;
            let _ = done_tx.send((taken, counted, cpu));
        });
    });

    // Transfers at `rate` a second per CBO, recorded as they happen.
    let started = std::time::Instant::now();
    let mut transfers = 0u64;
    let mut due = 0.0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        due += rate * cbos as f64;
        let now = sim.now_ms();
        while due >= 1.0 {
            due -= 1.0;
            let i = (transfers as usize) % cbos;
            let (ac, ws, ww, _, _) = ids(i);
            let task = format!("WT{transfers:032x}");
            let attrs = serde_json::json!({
                "transferTargetType": "queue",
                "transferQueueName": "support",
                "conversations": {"conversation_id": format!("CH{transfers:032x}")},
            });
            for (ty, dt) in [
                ("task.created", 0),
                ("reservation.created", 1_000),
                ("reservation.accepted", 3_000),
            ] {
                sim.taskrouter_event(&ac, &ws, &ww, ty, now - 3_000 + dt, &task, &attrs, None);
            }
            transfers += 1;
        }
    }
    let recorded = transfers * 3;
    let last = std::time::Instant::now();
    // Until every event was taken, or three intervals pass.
    let mut taken_rx = taken_rx;
    let mut drained_after = None;
    while last.elapsed() < interval * 3 + Duration::from_secs(5) {
        if *taken_rx.borrow() >= transfers {
            drained_after = Some(last.elapsed().as_secs_f64());
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), taken_rx.changed()).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let (taken_transfers, counted, cpu) = tokio::task::spawn_blocking(move || {
        let r = done_rx.recv().expect("the daemon reports");
        let _ = daemon.join();
        r
    })
    .await
    .expect("joined");
    let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
    for r in sim.requests() {
        let kind = if r.path.ends_with("/Events") {
            "TaskRouter Events"
        } else if r.path.ends_with("/Logs") {
            "functions' Logs"
        } else if r.path.ends_with("/Alerts") {
            "debugger Alerts"
        } else {
            "configuration polls (workflow, statistics, variables, deployments, releases)"
        };
        *kinds.entry(kind.to_string()).or_default() += 1;
    }
    let minutes = wall / 60.0;
    let _ = std::fs::remove_dir_all(&dir);
    PollerReport {
        cbos,
        seconds: wall,
        recorded,
        taken: taken_transfers * 3,
        transfers,
        counted,
        cpu,
        per_cbo_minute: kinds
            .into_iter()
            .map(|(k, n)| (k, n as f64 / cbos as f64 / minutes))
            .collect(),
        drained_after,
    }
}

/// Resident memory of the daemon before and while `connections` idle sockets are open against
/// it, how many it closed at once (over `server.max_connections`), and how soon `/healthz`
/// answered: (RSS before, RSS with them, closed at once, /healthz answered, ms until it did).
pub async fn idle(connections: usize) -> (u64, u64, usize, bool, f64) {
    use tokio::io::AsyncReadExt;
    let app = crate::App::start(config(1)).await.expect("starts");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let before = rss_bytes().unwrap_or(0);
    let mut open = Vec::new();
    for _ in 0..connections {
        match tokio::net::TcpStream::connect(app.addr).await {
            Ok(s) => open.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut closed = 0;
    for s in &mut open {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(std::time::Duration::from_millis(1), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    let with = rss_bytes().unwrap_or(0);
    // Until /healthz answers: at the cap, after header_read_timeout closes the idle ones.
    let start = Instant::now();
    let mut health = false;
    while !health && start.elapsed() < std::time::Duration::from_secs(30) {
        health = reqwest::Client::new()
            .get(format!("{}/healthz", app.url()))
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !health {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(open);
    app.shutdown().await;
    (before, with, closed, health, ms)
}

/// Single-event ingest requests per second against a daemon of `cbos` CBOs, each with its own
/// token, sending with the last CBO's token from `clients` keep-alive connections for
/// `seconds`: what token lookup costs as the fleet grows.
pub async fn single_event_ingest(cbos: usize, clients: usize, seconds: f64) -> f64 {
    let mut text = server_section();
    for i in 0..cbos {
        text += &format!("[[cbo]]\nkey = \"c{i}\"\ningest_token_env = \"T{i}\"\n");
    }
    let env = |k: &str| k.strip_prefix('T').map(|i| format!("bench-token-{i}"));
    let checked = check_str(&text, &env);
    let app = crate::App::start(checked.config.expect("the bench config parses"))
        .await
        .expect("starts");
    let url = format!("{}/v1/events", app.url());
    let token = format!("bench-token-{}", cbos - 1);
    let until = Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (url, token) = (url.clone(), token.clone());
        tasks.spawn(async move {
            let http = reqwest::Client::new();
            let mut sent = 0u64;
            while Instant::now() < until {
                let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let body = format!(
                    "{{\"event\":\"initiated\",\"timestamp\":\"{ts}\",\"conversation_sid\":\"CH{c:08x}{sent:024x}\",\"transfer_type\":\"cold\",\"target_type\":\"queue\"}}"
                );
                let resp = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("ingest answers");
                assert_eq!(resp.status().as_u16(), 202);
                sent += 1;
            }
            sent
        });
    }
    let started = Instant::now();
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.expect("a client");
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    app.shutdown().await;
    rate
}

/// What `run` with a `[[sources.file]]` made of a backlog.
#[derive(Debug)]
pub struct BacklogReport {
    pub lines: u64,
    pub seconds: f64,
    pub peak_rss: u64,
    /// `/healthz` round trips sampled every 10 ms while the backlog was read, in ms.
    pub healthz_ms: Vec<f64>,
}

/// Starts the daemon with `path` as a file source read from its beginning (as `run` does) and
/// waits until every line is taken: lines per second, peak RSS, `/healthz` meanwhile.
pub async fn backlog(path: &std::path::Path) -> std::io::Result<BacklogReport> {
    use std::io::Read;
    // The lines to wait for, counted without holding the file.
    let mut lines = 0u64;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
    drop(buf);
    let text = server_section()
        + &format!(
            "[[cbo]]\nkey = \"c0\"\n[[sources.file]]\npath = \"{}\"\ncbo = \"c0\"\nfrom_beginning = true\n",
            path.display()
        );
    let checked = check_str(&text, &|_| None);
    let start = Instant::now();
    let app = crate::App::start(checked.config.expect("the bench config parses"))
        .await
        .expect("starts");
    let (done, healthz) = sample_healthz(&app.url());
    let taken = |app: &crate::App| {
        let text = app.shared.metrics.render();
        text.lines()
            .filter(|l| {
                (l.starts_with("transfer_guard_events_ingested_total{")
                    || l.starts_with("transfer_guard_events_rejected_total{"))
                    && l.contains("cbo=\"c0\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    while taken(&app) < lines {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = done.send(true);
    let healthz_ms = healthz.await.unwrap_or_default();
    let peak_rss = peak_rss_bytes().unwrap_or(0);
    app.shutdown().await;
    Ok(BacklogReport {
        lines,
        seconds,
        peak_rss,
        healthz_ms,
    })
}

/// A breach storm: one Bad Request on each of `cbos` CBOs in one request, so all breach in one
/// tick; for each rollback request at the simulated Twilio, its delay from the ingest, sorted;
/// and how many commits the decision log made for the intents and results.
pub async fn storm(cbos: usize, settle_secs: u64) -> (Vec<std::time::Duration>, u64, Vec<f64>) {
    let (app, sim) = rollback_fleet(cbos).await;
    // The fleet's start (first polls, a validation window per deployment seen) is over
    // before the storm, so the figures are the storm's own.
    tokio::time::sleep(std::time::Duration::from_secs(settle_secs)).await;
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let body: String = (0..cbos).map(|i| breach(i, &ts) + "\n").collect();
    let commits_before = app.shared.actions.log.commits();
    let (done, probe) = sample_healthz(&app.url());
    let sent = tokio::time::Instant::now();
    post_as_admin(&reqwest::Client::new(), &app, body).await;
    let deadline = sent + std::time::Duration::from_secs(60);
    let out = loop {
        let hits: Vec<_> = sim
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/Deployments"))
            .map(|r| r.at.saturating_duration_since(sent))
            .collect();
        if hits.len() >= cbos || tokio::time::Instant::now() > deadline {
            break hits;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let commits = app.shared.actions.log.commits() - commits_before;
    let _ = done.send(true);
    let healthz = probe.await.unwrap_or_default();
    app.shutdown().await;
    let mut out = out;
    out.sort();
    (out, commits, healthz)
}

/// What `bench decisions` measured.
pub struct DecisionsReport {
    pub entries: usize,
    pub bytes: u64,
    /// Opening the log when it has no index or snapshot yet (the first start after an upgrade).
    pub first_open_ms: f64,
    /// Opening it again (index and snapshot in place), each run.
    pub open_ms: Vec<f64>,
    /// A daemon of the bench's CBOs on that state directory: `App::start` until it listens.
    pub start_ms: Vec<f64>,
    /// `GET /v1/decisions?cbo=X&limit=100` over HTTP: the first page of a random CBO.
    pub first_page_ms: Vec<f64>,
    /// The same from a cursor halfway through the history.
    pub middle_page_ms: Vec<f64>,
    pub rss_after_open: u64,
}

/// A decision log of `entries` typical entries over `cbos` CBOs (rule states with their
/// evidence, alerts, actions with a plan, acks, notes; about 500 bytes each), then: its first
/// open, reopening it, starting a daemon on it, and reading one CBO's page over HTTP.
pub async fn decisions(
    entries: usize,
    cbos: usize,
    runs: usize,
) -> std::io::Result<DecisionsReport> {
    use crate::decisions::{DecisionLog, Entry, FILE_NAME, INDEX_FILE, Kind, SNAPSHOT_FILE};
    let dir = fresh_state_dir();
    let section = server_section_in(&dir);
    let to_io = |e: crate::decisions::LogError| std::io::Error::other(e.to_string());
    let now = chrono::Utc::now().timestamp_millis();
    {
        let log = DecisionLog::open(&dir).map_err(to_io)?;
        let mut batch = Vec::with_capacity(10_000);
        for i in 0..entries {
            let cbo = format!("c{}", fastrand::usize(..cbos));
            let at = now - (entries - i) as i64 * 10;
            let mut e = match i % 10 {
                0 => {
                    let mut e = Entry::new(&cbo, Kind::Action, at);
                    e.action = Some("alert".into());
                    e.integration = Some("alertmanager".into());
                    e.result = Some("fired".into());
                    e
                }
                1 => {
                    let mut e = Entry::new(&cbo, Kind::Ack, at);
                    e.rule = Some("success_rate".into());
                    e
                }
                _ => {
                    let mut e = Entry::new(&cbo, Kind::State, at);
                    e.rule = Some(["success_rate", "bad_requests", "history_loss"][i % 3].into());
                    e.from = Some("ok".into());
                    e.to = Some(["pending", "ok", "inconclusive"][i % 3].into());
                    e
                }
            };
            e.deployment = Some(format!("ZD{:032x}", i / 1000));
            e.evidence = serde_json::json!({
                "measured": {"success_rate": 0.91, "transfers": 57, "failed": 5, "window": "15m",
                    "wilson_upper": 0.962, "bad_requests": 3},
                "params": {"threshold": 0.95, "window": "15m", "for": "2m", "min_samples": 20,
                    "action": "rollback", "confidence": 0.95},
                "failing": [format!("CH{i:032x}")],
            });
            batch.push(e);
            if batch.len() == 10_000 {
                log.append_all(std::mem::take(&mut batch)).map_err(to_io)?;
            }
        }
        log.append_all(batch).map_err(to_io)?;
    }
    let bytes = std::fs::metadata(dir.join(FILE_NAME))?.len();
    let _ = std::fs::remove_file(dir.join(INDEX_FILE));
    let _ = std::fs::remove_file(dir.join(SNAPSHOT_FILE));
    let timed = |dir: &std::path::Path| -> std::io::Result<f64> {
        let started = Instant::now();
        let log = DecisionLog::open(dir).map_err(to_io)?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        drop(log);
        Ok(ms)
    };
    let first_open_ms = timed(&dir)?;
    let mut open_ms = Vec::new();
    for _ in 0..runs {
        open_ms.push(timed(&dir)?);
    }
    let rss_before = rss_bytes().unwrap_or(0);
    let kept = DecisionLog::open(&dir).map_err(to_io)?;
    let rss_after_open = rss_bytes().unwrap_or(0).saturating_sub(rss_before);
    let middle = kept.last_seq() / 2;
    drop(kept);

    let mut text = section.replacen("[server]\n", "[server]\nadmin_token_env = \"ADMIN\"\n", 1);
    for i in 0..cbos {
        text += &format!("[[cbo]]\nkey = \"c{i}\"\n");
    }
    let env = |k: &str| (k == "ADMIN").then(|| "bench-admin".to_string());
    let config = check_str(&text, &env)
        .config
        .expect("the bench config parses");
    let http = reqwest::Client::new();
    let (mut start_ms, mut first_page_ms, mut middle_page_ms) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        let app = crate::App::start(config.clone())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        start_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        for _ in 0..50 {
            for (after, out) in [(0, &mut first_page_ms), (middle, &mut middle_page_ms)] {
                let url = format!(
                    "{}/v1/decisions?cbo=c{}&limit=100&after={after}",
                    app.url(),
                    fastrand::usize(..cbos)
                );
                let asked = Instant::now();
                let resp = http.get(&url).bearer_auth("bench-admin").send().await;
                let body = match resp {
                    Ok(r) if r.status().is_success() => {
                        r.bytes().await.map_err(std::io::Error::other)?
                    }
                    Ok(r) => return Err(std::io::Error::other(format!("{url}: {}", r.status()))),
                    Err(e) => return Err(std::io::Error::other(e)),
                };
                out.push(asked.elapsed().as_secs_f64() * 1000.0);
                let page: serde_json::Value = serde_json::from_slice(&body)?;
                assert_eq!(
                    page["decisions"].as_array().map(Vec::len),
                    Some(100),
                    "a full page"
                );
            }
        }
        app.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DecisionsReport {
        entries,
        bytes,
        first_open_ms,
        open_ms,
        start_ms,
        first_page_ms,
        middle_page_ms,
        rss_after_open,
    })
}

/// What `bench checkpoint` measured.
pub struct CheckpointReport {
    pub events: usize,
    /// Taking the events (parsed) on one thread: events/s without a journal, with one.
    pub plain_rate: f64,
    pub journaled_rate: f64,
    pub journal_bytes: u64,
    /// A checkpoint (journal fsynced, old segments pruned, `checkpoint.json` written), each run.
    pub save_ms: Vec<f64>,
    /// A start's restore: reading the journal and replaying it into the fleet, each run.
    pub restore_ms: Vec<f64>,
    pub records: u64,
}

/// The embedded default's restart state at `cbos` CBOs, each with `per_hour` transfers over the
/// last hour (three events each): the journal's cost on the ingest path, a checkpoint's cost, and
/// a start's restore. The restored windows are checked against the ones they were built from.
pub fn checkpoint(cbos: usize, per_hour: usize, runs: usize) -> std::io::Result<CheckpointReport> {
    use crate::checkpoint::Checkpoints;
    use crate::journal::Journal;
    let now = chrono::Utc::now().timestamp_millis();
    let dir = fresh_state_dir();
    let mut text = server_section_in(&dir);
    for i in 0..cbos {
        text += &format!("[[cbo]]\nkey = \"c{i}\"\n");
    }
    let config = check_str(&text, &|_| None)
        .config
        .expect("the bench config parses");
    // Every CBO's transfers, spread over the hour, in the order they happen.
    let mut events = Vec::with_capacity(cbos * per_hour * 3);
    for c in 0..cbos {
        for k in 0..per_hour {
            let start =
                now - 3_600_000 + ((k * 3_600_000 / per_hour + c * 7_919) % 3_590_000) as i64;
            let sid = format!("CH{:016x}{:016x}", c, k);
            let ts = |ms: i64| {
                chrono::DateTime::from_timestamp_millis(ms)
                    .expect("a valid instant")
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            };
            let end = if k % 20 == 0 {
                r#""event":"failed","error":{"code":20001}"#
            } else {
                r#""event":"completed","history_preserved":true"#
            };
            for (at, body) in [
                (
                    start,
                    r#""event":"initiated","transfer_type":"cold","target_type":"queue""#,
                ),
                (start + 1_200, r#""event":"notified""#),
                (start + 4_000, end),
            ] {
                let line = format!(
                    r#"{{{body},"timestamp":"{}","conversation_sid":"{sid}"}}"#,
                    ts(at)
                );
                events.push((at, c, parse_line(&line).expect("a bench event parses")));
            }
        }
    }
    events.sort_by_key(|(at, c, _)| (*at, *c));
    let metrics = std::sync::Arc::new(Metrics::new());
    let take = |fleet: &Fleet| {
        let states: Vec<_> = (0..cbos)
            .map(|c| fleet.get(&format!("c{c}")).expect("configured"))
            .collect();
        let mut rejected = Vec::new();
        let started = Instant::now();
        for (at, c, e) in &events {
            states[*c].ingest([(0, e.clone())], at + 500, &mut rejected);
        }
        assert!(rejected.is_empty(), "{:?}", rejected.first());
        events.len() as f64 / started.elapsed().as_secs_f64()
    };
    let plain_rate = take(&Fleet::new(&config, &metrics));
    let journal = std::sync::Arc::new(Journal::open(&dir)?);
    let fleet = Fleet::journaled(&config, &metrics, Some(journal.clone()));
    let journaled_rate = take(&fleet);
    journal.flush(true);
    let journal_bytes = std::fs::read_dir(dir.join(crate::journal::DIR))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let engine = crate::rules::Engine::new(&config, now);
    let retain = crate::checkpoint::retained(&config);
    let (_, checkpoints, _) =
        Checkpoints::restore(&config, journal.clone(), &metrics, now, Vec::new());
    let mut save_ms = Vec::new();
    let mut restore_ms = Vec::new();
    let mut records = 0;
    for _ in 0..runs {
        let started = Instant::now();
        checkpoints.save(engine.timers(), now, retain)?;
        save_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let (restored_fleet, _, restored) =
            Checkpoints::restore(&config, journal.clone(), &metrics, now, Vec::new());
        restore_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        records = restored.records;
        for c in 0..cbos {
            let key = format!("c{c}");
            let window = std::time::Duration::from_secs(3600);
            let was = fleet.get(&key).expect("configured").stats(now, window);
            let is = restored_fleet
                .get(&key)
                .expect("configured")
                .stats(now, window);
            assert_eq!(was, is, "cbo {key}: the restored windows differ");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(CheckpointReport {
        events: events.len(),
        plain_rate,
        journaled_rate,
        journal_bytes,
        save_ms,
        restore_ms,
        records,
    })
}
