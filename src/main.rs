//! The command line (clap): run, demo, check, ingest.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use transfer_guard::config::{Config, Secret};
use transfer_guard::{App, cli, demo};

#[derive(Parser)]
#[command(
    version,
    about = "Post-deploy guard for ConnieRTC conversation transfers"
)]
struct Cli {
    /// Log format on standard error; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon from a configuration file.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the daemon with three simulated CBOs and live traffic: the whole story, then a
    /// summary.
    Demo {
        #[arg(long, default_value = "127.0.0.1:9843")]
        listen: SocketAddr,
        /// Stop after this long (e.g. "5m"); default: the story's length (the bad deploy, then
        /// 75 s for the rollback and the recovery). Ctrl-C stops it earlier.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// When the bad deploy comes (e.g. "45s").
        #[arg(long, value_parser = humantime::parse_duration, default_value = "45s")]
        breach_after: std::time::Duration,
    },
    /// Check a configuration file: one line per problem, exit 1 if any.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Also ask Twilio about each CBO's workflow, statistics and variables.
        #[arg(long)]
        online: bool,
        /// Also fail on what would leave the guard unable to act (dry run on, a CBO with no
        /// rollback or disable integration), for pipelines installing a production file.
        #[arg(long)]
        strict: bool,
    },
    /// Start (or follow) a post-deploy validation window and wait for its verdict: exit 0
    /// passed, 1 failed, 2 inconclusive, 3 could not run.
    Validate {
        /// The daemon, e.g. http://127.0.0.1:9843
        #[arg(long)]
        server: String,
        #[arg(long, required_unless_present = "id")]
        cbo: Option<String>,
        /// The deployment being validated (any id: a Serverless deployment SID, a release tag).
        #[arg(long, required_unless_present = "id")]
        deployment: Option<String>,
        /// The window's length (default: the daemon's [validation] duration, 15m).
        #[arg(long)]
        duration: Option<String>,
        /// Follow an existing window instead of starting one.
        #[arg(long, conflicts_with_all = ["cbo", "deployment", "duration"])]
        id: Option<String>,
        /// Environment variable holding the admin token (a CBO's token can follow with --id).
        #[arg(long, default_value = "TRANSFER_GUARD_ADMIN_TOKEN")]
        token_env: String,
        /// Print the final result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The decision log for on-call: one line per entry, with the failing conversations (SID
    /// and error) of each breach and action. Exit 0, or 3 when it could not be read.
    Decisions {
        /// The daemon, e.g. http://127.0.0.1:9843
        #[arg(long)]
        server: String,
        /// Only this CBO (a CBO's token reads only its own).
        #[arg(long)]
        cbo: Option<String>,
        /// Only entries at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Environment variable holding the admin token or the CBO's ingest token.
        #[arg(long, default_value = "TRANSFER_GUARD_ADMIN_TOKEN")]
        token_env: String,
        /// Print the entries as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every CBO on one line: success rate and Bad Requests of the last 5 minutes, the switch,
    /// the validation window, the workflow, the last poll, the rules not ok. Exit 0, or 3.
    Status {
        /// The daemon, e.g. http://127.0.0.1:9843
        #[arg(long)]
        server: String,
        /// Only this CBO.
        #[arg(long)]
        cbo: Option<String>,
        /// Environment variable holding the admin token or the CBO's ingest token.
        #[arg(long, default_value = "TRANSFER_GUARD_ADMIN_TOKEN")]
        token_env: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge a CBO's breached or pending rules (or one): their actions stay silent until
    /// they recover. Exit 0, or 3.
    Ack {
        #[arg(long)]
        server: String,
        #[arg(long)]
        cbo: String,
        /// Only this rule (e.g. success_rate).
        #[arg(long)]
        rule: Option<String>,
        /// Environment variable holding the admin token.
        #[arg(long, default_value = "TRANSFER_GUARD_ADMIN_TOKEN")]
        token_env: String,
    },
    /// Turn a CBO's transfers off or back on (restoring the Flex flags seen before). Exit 0, or 3.
    Switch {
        #[arg(long)]
        server: String,
        #[arg(long)]
        cbo: String,
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// With `off`: only these flags (enabled, cold_transfer, multi_participant).
        #[arg(long = "feature")]
        features: Vec<String>,
        /// Why, for the decision log.
        #[arg(long)]
        reason: Option<String>,
        /// Environment variable holding the admin token.
        #[arg(long, default_value = "TRANSFER_GUARD_ADMIN_TOKEN")]
        token_env: String,
    },
    /// Measure the in-process pipeline, memory and scrape cost (figures for BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Send a log file or standard input (`-`) to a running daemon.
    Ingest {
        /// The daemon, e.g. http://127.0.0.1:9843
        #[arg(long)]
        server: String,
        /// Environment variable holding the CBO's ingest token.
        #[arg(long)]
        token_env: String,
        /// A file of NDJSON or `[ConversationTransfer]` lines, or `-` for standard input.
        input: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Parse + track + window on one thread, NDJSON batches of 1,000 typical events.
    Pipeline {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Resident memory after feeding events over many CBOs.
    Memory {
        #[arg(long, default_value_t = 10_000_000)]
        events: usize,
        #[arg(long, default_value_t = 1000)]
        cbos: usize,
        /// Transfers a second per CBO (about four events each).
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
    },
    /// Detection latency: breach-completing event to the rollback request at the simulated Twilio.
    Detection {
        #[arg(long, default_value_t = 50)]
        trials: usize,
    },
    /// A breach storm: every CBO breaches in one tick; each rollback request's delay.
    Storm {
        #[arg(long, default_value_t = 1000)]
        cbos: usize,
        /// Seconds to let the fleet's start settle before the storm.
        #[arg(long, default_value_t = 30)]
        settle: u64,
    },
    /// Write generated NDJSON event lines to files of `per_file` lines (for wrk and mtail).
    Lines {
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        #[arg(long, default_value_t = 1000)]
        per_file: usize,
        #[arg(long)]
        dir: PathBuf,
        /// Write the plugin's log-line form `[ConversationTransfer] <event>: {json}`.
        #[arg(long)]
        log_lines: bool,
    },
    /// Read a log file of `[ConversationTransfer]` lines as a file source does.
    Logfile {
        #[arg(long)]
        file: PathBuf,
    },
    /// The pollers of Twilio's record (TaskRouter Events, Logs, Alerts) and the configuration
    /// polls of many CBOs, the daemon on one thread, against a simulated Twilio with traffic.
    EventsPoller {
        #[arg(long, default_value_t = 1000)]
        cbos: usize,
        /// How long transfers are recorded.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Transfers a second per CBO (three TaskRouter events each).
        #[arg(long, default_value_t = 0.05)]
        rate: f64,
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// Resident memory with many idle connections open against the daemon.
    Idle {
        #[arg(long, default_value_t = 2000)]
        connections: usize,
    },
    /// `run` with a `[[sources.file]]` read from its beginning: lines/s, peak RSS, /healthz.
    Backlog {
        #[arg(long)]
        file: PathBuf,
    },
    /// A decision log of many entries: opening it, starting on it, reading one CBO's page.
    Decisions {
        #[arg(long, default_value_t = 1_000_000)]
        entries: usize,
        #[arg(long, default_value_t = 1000)]
        cbos: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The embedded default's restart state: the journal's cost on the ingest path, a
    /// checkpoint's cost and a start's restore, at many CBOs each with an hour of transfers.
    Checkpoint {
        #[arg(long, default_value_t = 1000)]
        cbos: usize,
        /// Transfers per CBO over the last hour.
        #[arg(long, default_value_t = 20)]
        per_hour: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Single-event ingest requests per second at each fleet size (token lookup's cost).
    Tokens {
        /// Fleet sizes, compared in one run.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 1000, 5000])]
        cbos: Vec<usize>,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Rendering /metrics with many CBOs.
    Scrape {
        #[arg(long, default_value_t = 1000)]
        cbos: usize,
        #[arg(long, default_value_t = 21)]
        runs: usize,
    },
}

/// The daemon and the token of an on-call command; `None` (said) when the variable is unset.
fn on_call_server(command: &str, url: String, token_env: &str) -> Option<cli::oncall::Server> {
    match std::env::var(token_env).ok().filter(|t| !t.is_empty()) {
        Some(token) => Some(cli::oncall::Server {
            url,
            token: Secret::new(token),
        }),
        None => {
            eprintln!("transfer-guard {command}: environment variable {token_env} is not set");
            None
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only on a terminal: a file or a journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Exit code when a command could not run at all (unreachable server, bad token).
const COULD_NOT_RUN: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    // A usage error is "could not run" (3) everywhere: 2 is `validate`'s "inconclusive", which
    // a deploy script must not mistake for a bad command line.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(3),
            };
        }
    };
    init_logs(cli.log_format);
    if !matches!(
        cli.command,
        Command::Run { .. } | Command::Demo { .. } | Command::Ingest { .. } | Command::Bench { .. }
    ) {
        // One-shot commands end quietly when their output is closed (`… | head`), as shell
        // tools do; Rust ignores SIGPIPE, which turns that into a panic. The daemon keeps
        // ignoring it, and so do `ingest` and `bench`: they write request bodies while the
        // daemon may already have answered one (401, 413) and closed its connection, and a
        // write to that socket must be an error, not a signal that kills the command.
        #[cfg(unix)]
        // SAFETY: restoring a signal's default disposition, before any thread writes output.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Run { config } => match run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("transfer-guard: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            listen,
            duration,
            breach_after,
        } => match demo::run(listen, duration, breach_after).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("transfer-guard demo: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check {
            config,
            online,
            strict,
        } => {
            let env = |k: &str| std::env::var(k).ok();
            let code = cli::check::run(&config, online, strict, &env, &mut std::io::stdout()).await;
            ExitCode::from(code as u8)
        }
        Command::Ingest {
            server,
            token_env,
            input,
        } => ingest(&server, &token_env, &input).await,
        Command::Bench { what } => {
            use transfer_guard::bench;
            let _cleanup = bench::StateDirs;
            match what {
                BenchWhat::Pipeline { events, runs } => {
                    let (rate, len) = bench::pipeline(events, runs);
                    println!(
                        "pipeline: {events} events of {len:.0} bytes on average, median of {runs} runs: {rate:.0} events/s"
                    );
                    let (parse, track) = bench::phases(events, runs);
                    println!(
                        "  of which parsing alone: {parse:.0} events/s; tracking and windows alone: {track:.0} events/s"
                    );
                }
                BenchWhat::Memory { events, cbos, rate } => {
                    let marks = [1_000_000, events];
                    println!(
                        "memory: RSS before: {:.1} MiB",
                        bench::rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
                    );
                    let mut first = None;
                    for (fed, rss, secs) in bench::memory(events, cbos, rate, &marks) {
                        let mib = rss as f64 / (1 << 20) as f64;
                        let growth = first.map_or(String::new(), |f: f64| {
                            format!(" ({:+.1} % since the first mark)", (mib / f - 1.0) * 100.0)
                        });
                        first.get_or_insert(mib);
                        println!(
                            "memory: {fed} events over {cbos} CBOs ({rate} transfers/s each, {secs} s of event time): RSS {mib:.1} MiB{growth}"
                        );
                    }
                }
                BenchWhat::Detection { trials } => {
                    let mut ms: Vec<f64> = bench::detection(trials)
                        .await
                        .iter()
                        .map(|d| d.as_secs_f64() * 1000.0)
                        .collect();
                    ms.sort_by(|a, b| a.total_cmp(b));
                    let at = |q: f64| bench::quantile(&ms, q);
                    println!(
                        "detection: {trials} breaches, event to rollback request: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                        at(0.5),
                        at(0.99),
                        at(1.0)
                    );
                }
                BenchWhat::Storm { cbos, settle } => {
                    let (delays, commits, healthz) = bench::storm(cbos, settle).await;
                    let ms: Vec<f64> = delays.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
                    let at = |q: f64| bench::quantile(&ms, q);
                    println!(
                        "storm: {cbos} CBOs breaching in one tick: {} rollback requests; from the ingest: first {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, last {:.0} ms (spread {:.0} ms); {commits} decision-log commits",
                        ms.len(),
                        at(0.0),
                        at(0.5),
                        at(0.99),
                        at(1.0),
                        at(1.0) - at(0.0)
                    );
                    println!(
                        "  /healthz through the storm ({} answers): {}",
                        healthz.len(),
                        bench::spread(&healthz, 2)
                    );
                }
                BenchWhat::Lines {
                    events,
                    per_file,
                    dir,
                    log_lines,
                } => {
                    let now = chrono::Utc::now().timestamp_millis();
                    let lines = bench::lines(events, now);
                    if let Err(e) = bench::write_lines(&lines, per_file, &dir, log_lines) {
                        eprintln!("bench lines: {}: {e}", dir.display());
                        return ExitCode::FAILURE;
                    }
                    println!("wrote {events} events to {}", dir.display());
                }
                BenchWhat::Logfile { file } => match bench::logfile(&file) {
                    Ok((rate, taken)) => {
                        println!("logfile: {taken} events taken, {rate:.0} lines/s")
                    }
                    Err(e) => {
                        eprintln!("bench logfile: {}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                },
                BenchWhat::EventsPoller {
                    cbos,
                    seconds,
                    rate,
                    interval,
                } => {
                    let r = bench::events_poller(cbos, seconds, rate, interval).await;
                    println!(
                        "events poller: {} CBOs polled every {}, {:.0} s: {} transfers ({} TaskRouter events) recorded, {} taken from the Events API ({} events), {} counted",
                        r.cbos,
                        humantime::format_duration(interval),
                        r.seconds,
                        r.transfers,
                        r.recorded,
                        r.taken / 3,
                        r.taken,
                        r.counted
                    );
                    println!(
                        "  daemon on one thread: {:.1} CPU s in {:.0} s of wall time ({:.1} % of one core); every event taken {} after the last was recorded",
                        r.cpu,
                        r.seconds,
                        r.cpu / r.seconds * 100.0,
                        r.drained_after
                            .map_or("NOT within three intervals".to_string(), |s| format!(
                                "{s:.1} s"
                            ))
                    );
                    for (kind, n) in &r.per_cbo_minute {
                        println!("  requests per CBO per minute, {kind}: {n:.2}");
                    }
                }
                BenchWhat::Idle { connections } => {
                    let (before, with, closed, health, ms) = bench::idle(connections).await;
                    let mib = |b: u64| b as f64 / (1 << 20) as f64;
                    println!(
                        "idle: {connections} idle connections: RSS {:.1} MiB before, {:.1} MiB with them; {closed} closed at once (server.max_connections); /healthz {} after {ms:.0} ms",
                        mib(before),
                        mib(with),
                        if health { "answered" } else { "did NOT answer" }
                    );
                }
                BenchWhat::Checkpoint {
                    cbos,
                    per_hour,
                    runs,
                } => match bench::checkpoint(cbos, per_hour, runs) {
                    Ok(mut r) => {
                        println!(
                            "checkpoint: {cbos} CBOs, {} events over the last hour: taken at {:.0} events/s without a journal, {:.0} with one ({:.2}x); journal {:.1} MB ({:.0} bytes an event)",
                            r.events,
                            r.plain_rate,
                            r.journaled_rate,
                            r.plain_rate / r.journaled_rate,
                            r.journal_bytes as f64 / 1e6,
                            r.journal_bytes as f64 / r.events as f64
                        );
                        for (name, v) in [
                            (
                                "checkpoint (journal fsynced, pruned, checkpoint.json)",
                                &mut r.save_ms,
                            ),
                            (
                                "restore at start (journal read and replayed)",
                                &mut r.restore_ms,
                            ),
                        ] {
                            v.sort_by(|a, b| a.total_cmp(b));
                            println!("  {name} ({} times): {}", v.len(), bench::spread(v, 1));
                        }
                        println!(
                            "  {} records replayed; every CBO's windows equal after the restore",
                            r.records
                        );
                    }
                    Err(e) => {
                        eprintln!("bench checkpoint: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                BenchWhat::Decisions {
                    entries,
                    cbos,
                    runs,
                } => match bench::decisions(entries, cbos, runs).await {
                    Ok(mut r) => {
                        let line = |name: &str, v: &mut Vec<f64>| {
                            v.sort_by(|a, b| a.total_cmp(b));
                            println!("  {name} ({} times): {}", v.len(), bench::spread(v, 1));
                        };
                        println!(
                            "decisions: {} entries over {cbos} CBOs, {:.0} MB; first open (no index or snapshot yet) {:.0} ms; index and snapshot in memory: {:.1} MiB",
                            r.entries,
                            r.bytes as f64 / 1e6,
                            r.first_open_ms,
                            r.rss_after_open as f64 / (1 << 20) as f64
                        );
                        line("reopen", &mut r.open_ms);
                        line("daemon start until it listens", &mut r.start_ms);
                        line(
                            "GET /v1/decisions?cbo=X&limit=100, first page",
                            &mut r.first_page_ms,
                        );
                        line(
                            "the same from a cursor halfway through",
                            &mut r.middle_page_ms,
                        );
                    }
                    Err(e) => {
                        eprintln!("bench decisions: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                BenchWhat::Backlog { file } => match bench::backlog(&file).await {
                    Ok(r) => {
                        println!(
                            "backlog: {} lines of {} taken in {:.2} s: {:.0} lines/s; peak RSS {:.1} MiB; /healthz meanwhile ({} answers): {}",
                            r.lines,
                            file.display(),
                            r.seconds,
                            r.lines as f64 / r.seconds,
                            r.peak_rss as f64 / (1 << 20) as f64,
                            r.healthz_ms.len(),
                            bench::spread(&r.healthz_ms, 2)
                        );
                    }
                    Err(e) => {
                        eprintln!("bench backlog: {}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                },
                BenchWhat::Tokens {
                    cbos,
                    clients,
                    seconds,
                    runs,
                } => {
                    // Round robin over the sizes, so a machine's drift falls on all of them.
                    let mut rates = vec![Vec::new(); cbos.len()];
                    for _ in 0..runs {
                        for (i, n) in cbos.iter().enumerate() {
                            rates[i].push(bench::single_event_ingest(*n, clients, seconds).await);
                        }
                    }
                    let mut first = None;
                    for (n, mut rates) in cbos.into_iter().zip(rates) {
                        rates.sort_by(|a, b| a.total_cmp(b));
                        let median = rates[rates.len() / 2];
                        let base = *first.get_or_insert(median);
                        println!(
                            "tokens: {n} CBOs, single-event ingest with the last CBO's token, {clients} clients, median of {runs} x {seconds} s (interleaved): {median:.0} requests/s ({:.2} of the first)",
                            median / base
                        );
                    }
                }
                BenchWhat::Scrape { cbos, runs } => {
                    let r = bench::scrape(cbos, runs);
                    println!(
                        "scrape: {cbos} CBOs, {} bytes of /metrics ({} gzipped), medians of {runs}: the text {:.1} ms, gzipping it {:.1} ms; gzipped with the cache: {:.1} ms after every family of every CBO changed, {:.1} ms after one 15 s interval at a CBO's volume, {:.1} ms unchanged",
                        r.bytes,
                        r.gzipped,
                        r.render_ms,
                        r.gzip_ms,
                        r.all_changed_ms,
                        r.interval_ms,
                        r.unchanged_ms
                    );
                    for gzip in [false, true] {
                        let (ms, size, healthz) = bench::scrape_http(cbos, runs, gzip).await;
                        println!(
                            "scrape: {cbos} CBOs, {size} bytes of /metrics{}, median of {runs}: {ms:.1} ms for GET /metrics over loopback{}; /healthz meanwhile ({} answers): {}",
                            if gzip { " gzipped" } else { "" },
                            if gzip {
                                " with Accept-Encoding: gzip"
                            } else {
                                ""
                            },
                            healthz.len(),
                            bench::spread(&healthz, 2)
                        );
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Status {
            server,
            cbo,
            token_env,
            json,
        } => {
            let Some(server) = on_call_server("status", server, &token_env) else {
                return ExitCode::from(COULD_NOT_RUN);
            };
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let code = cli::oncall::status(&server, cbo.as_deref(), json, &mut out, &mut err).await;
            ExitCode::from(code as u8)
        }
        Command::Ack {
            server,
            cbo,
            rule,
            token_env,
        } => {
            let Some(server) = on_call_server("ack", server, &token_env) else {
                return ExitCode::from(COULD_NOT_RUN);
            };
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let code = cli::oncall::ack(&server, &cbo, rule.as_deref(), &mut out, &mut err).await;
            ExitCode::from(code as u8)
        }
        Command::Switch {
            server,
            cbo,
            state,
            features,
            reason,
            token_env,
        } => {
            let Some(server) = on_call_server("switch", server, &token_env) else {
                return ExitCode::from(COULD_NOT_RUN);
            };
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let on = state == "on";
            let code = cli::oncall::switch(
                &server,
                &cbo,
                on,
                &features,
                reason.as_deref(),
                &mut out,
                &mut err,
            )
            .await;
            ExitCode::from(code as u8)
        }
        Command::Decisions {
            server,
            cbo,
            since,
            token_env,
            json,
        } => {
            let Some(token) = std::env::var(&token_env).ok().filter(|t| !t.is_empty()) else {
                eprintln!("transfer-guard decisions: environment variable {token_env} is not set");
                return ExitCode::from(COULD_NOT_RUN);
            };
            let opts = cli::decisions::Options {
                server,
                token: Secret::new(token),
                cbo,
                since,
                json,
            };
            let code =
                cli::decisions::run(opts, &mut std::io::stdout(), &mut std::io::stderr()).await;
            ExitCode::from(code as u8)
        }
        Command::Validate {
            server,
            cbo,
            deployment,
            duration,
            id,
            token_env,
            json,
        } => {
            let Some(token) = std::env::var(&token_env).ok().filter(|t| !t.is_empty()) else {
                eprintln!("transfer-guard validate: environment variable {token_env} is not set");
                return ExitCode::from(COULD_NOT_RUN);
            };
            use std::io::IsTerminal;
            let target = match id {
                Some(id) => cli::validate::Target::Follow { id },
                None => cli::validate::Target::Start {
                    cbo: cbo.unwrap_or_default(),
                    deployment: deployment.unwrap_or_default(),
                    duration,
                },
            };
            let opts = cli::validate::Options {
                server,
                token: Secret::new(token),
                target,
                json,
                tty: std::io::stderr().is_terminal(),
                poll: std::time::Duration::from_secs(2),
            };
            let code =
                cli::validate::run(opts, &mut std::io::stdout(), &mut std::io::stderr()).await;
            ExitCode::from(code as u8)
        }
    }
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    // Before anything else: a signal that arrives while the daemon starts waits for it.
    let signals = transfer_guard::Signals::install().context("installing signal handlers")?;
    let (config, problems) = Config::load(&path)?;
    for p in problems {
        tracing::warn!(problem = %p, "configuration");
    }
    let app = App::start(config).await.context("starting")?;
    transfer_guard::serve_until_stopped(app, &path, signals).await;
    Ok(())
}

async fn ingest(server: &str, token_env: &str, input: &std::path::Path) -> ExitCode {
    let Some(token) = std::env::var(token_env).ok().filter(|t| !t.is_empty()) else {
        eprintln!("transfer-guard ingest: environment variable {token_env} is not set");
        return ExitCode::from(COULD_NOT_RUN);
    };
    let token = Secret::new(token);
    let name = input.display().to_string();
    let result = if name == "-" {
        cli::ingest::send(
            server,
            &token,
            tokio::io::BufReader::new(tokio::io::stdin()),
        )
        .await
    } else {
        match tokio::fs::File::open(input).await {
            Ok(f) => {
                // Large reads: a file read through tokio is a blocking-pool hop per read.
                let input = tokio::io::BufReader::with_capacity(cli::ingest::READ_BUFFER, f);
                cli::ingest::send(server, &token, input).await
            }
            Err(e) => {
                eprintln!("transfer-guard ingest: cannot open {name}: {e}");
                return ExitCode::from(COULD_NOT_RUN);
            }
        }
    };
    // The report is written without `println!`: SIGPIPE is ignored here, and a closed output
    // (`… | head`) ends the report, not the command with a panic; the exit code still tells.
    use std::io::Write;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    match result {
        Ok(report) => {
            for (line, error) in &report.rejected {
                if writeln!(err, "{name}:{line}: {error}").is_err() {
                    break;
                }
            }
            if report.rejected_unlisted > 0 {
                let _ = writeln!(
                    err,
                    "{name}: and {} more rejected lines the daemon counted without listing",
                    report.rejected_unlisted
                );
            }
            let _ = writeln!(
                out,
                "{name}: {} lines, {} accepted, {} rejected",
                report.lines,
                report.accepted,
                report.rejected.len() as u64 + report.rejected_unlisted
            );
            if report.rejected.is_empty() && report.rejected_unlisted == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            let _ = writeln!(err, "transfer-guard ingest: {e}");
            ExitCode::from(COULD_NOT_RUN)
        }
    }
}
