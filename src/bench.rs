//! `transfer-guard bench`: on-demand measurements (never assertions) of the in-process pipeline, memory, scrape cost and detection latency; figures for BENCHMARKS.md.

use std::time::Instant;

use crate::config::{Config, check_str};
use crate::event::parse_line;
use crate::metrics::Metrics;
use crate::sim::traffic::{Generator, Profile};
use crate::state::{Fleet, Rejection};

/// A config of `cbos` CBOs (no Twilio), for the in-process benchmarks.
pub fn config(cbos: usize) -> Config {
    let mut text = String::from("[server]\nlisten = \"127.0.0.1:0\"\n");
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
    );
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
            );
            until = now_ms - 50 * 60 * 1000;
        }
    }
    out.truncate(n);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Resident memory of this process in bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
/// simulated: every CBO sends a transfer a second (about five events), the clock moves one
/// second per round, and transfers are swept every ten simulated seconds, as the daemon does.
pub fn memory(total: usize, cbos: usize, marks: &[usize]) -> Vec<(usize, u64)> {
    let start = chrono::Utc::now().timestamp_millis();
    let config = config(cbos);
    let metrics = std::sync::Arc::new(Metrics::new());
    let fleet = Fleet::new(&config, &metrics);
    let states: Vec<_> = fleet.iter().cloned().collect();
    let mut generators: Vec<Generator> = (0..cbos)
        .map(|i| {
            Generator::new(
                Profile {
                    rate: 1.0,
                    ..Profile::default()
                },
                i as u64,
                start,
            )
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
            let lines = g.due(now);
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
                out.push((fed, rss_bytes().unwrap_or(0)));
            }
        }
        if (now - start) % 10_000 == 0 {
            fleet.sweep(now);
        }
        rejected.clear();
    }
    out
}

/// `/metrics` rendering with `cbos` CBOs that all have traffic: median milliseconds of `runs`.
pub fn scrape(cbos: usize, runs: usize) -> (f64, usize) {
    let now = chrono::Utc::now().timestamp_millis();
    let config = config(cbos);
    let metrics = std::sync::Arc::new(Metrics::new());
    let fleet = Fleet::new(&config, &metrics);
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
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..runs {
        let start = Instant::now();
        fleet.refresh_gauges(now);
        size = metrics.render().len();
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    (median(times), size)
}
