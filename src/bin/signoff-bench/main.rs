//! signoff-bench: drives signoff the way agents and approvers load it — open-loop, at fixed
//! arrival rates, latency measured from each request's intended send time (so a stalled
//! server is not hidden by a stalled load generator) — and measures the physical floors in
//! the same run. See BENCHMARKS.md.

mod fake_slack;
mod policies;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use signoff::config::{Config, Secret, SlackConfig};
use signoff::domain::{VoteRequest, Voter};
use signoff::policy::EvaluationInput;
use signoff::quota::Quotas;
use signoff::server::RunningServer;
use sqlx::{Connection, Executor};
use tokio::task::JoinSet;

/// glibc's allocator spent a fifth of the CPU at saturation (contended arenas,
/// `malloc_consolidate`); mimalloc's per-thread heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SIGNING_SECRET: &str = "bench-signing-secret";
/// The latency ceiling a rate must stay under to count as sustainable.
const P99_CEILING: Duration = Duration::from_millis(5);
/// Agents submitting back to back in the closed-loop throughput measurement.
const SATURATION_CLIENTS: usize = 64;
/// A looser ceiling, to see throughput against the floor when latency may grow.
const THROUGHPUT_CEILING: Duration = Duration::from_millis(100);

#[derive(Parser, Clone)]
#[command(about = "Benchmarks signoff against its floors; prints a Markdown report")]
struct Args {
    /// PostgreSQL to create scratch databases in.
    #[arg(
        long,
        env = "SIGNOFF_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Only SQLite.
    #[arg(long)]
    skip_postgres: bool,
    /// Only PostgreSQL.
    #[arg(long)]
    skip_sqlite: bool,
    /// Seconds per load step.
    #[arg(long, default_value_t = 2.0)]
    step_seconds: f64,
    /// Rows per floor measurement.
    #[arg(long, default_value_t = 2000)]
    floor_rows: usize,
    /// Pending requests for the memory measurement.
    #[arg(long, default_value_t = 100_000)]
    memory_requests: usize,
    /// Only the closed-loop intake measurement (for profiling).
    #[arg(long)]
    saturation_only: bool,
    /// Only the memory measurement.
    #[arg(long)]
    memory_only: bool,
    /// Only auto-allowed intake, open loop at these rates (comma-separated, req/s), each
    /// `--probe-attempts` times: for A/B comparisons of the latency tail.
    #[arg(long, value_delimiter = ',')]
    probe_rates: Vec<f64>,
    /// Attempts per rate with `--probe-rates`.
    #[arg(long, default_value_t = 3)]
    probe_attempts: usize,
    /// The server's SQLite `synchronous` setting ("full", the default, or "normal"): to
    /// tell the disk's share of a latency from the server's.
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    sqlite_synchronous: String,
    /// Keep the per-agent quotas on (rate limiter, pending cap, long-poll cap), set too high
    /// to refuse anything: their cost on intake, for an A/B against the default (off: the
    /// benchmark's one agent would be refused long before the server is saturated).
    #[arg(long)]
    quotas_on: bool,
    /// Only the quotas' cost, in this one run: N rounds, each intake at saturation with the
    /// quotas off and on (order alternating), server CPU per request of both, and their ratio.
    #[arg(long, value_name = "ROUNDS")]
    quota_cost: Option<usize>,
    /// Internal: run a server on this config and print its address (memory measurement).
    #[arg(long, hide = true)]
    serve: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(config) = &args.serve {
        return runtime.block_on(serve_for_measurement(config));
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let directory = tempfile_directory()?;
    settle_disk();
    println!("# signoff-bench\n");
    println!("machine: {} cores, {}", num_cpus(), cpu_model());
    println!("latency: open loop, from intended send time; sustainable = no errors and p99 < {P99_CEILING:?}\n");

    if args.memory_only {
        return memory(&directory, args.memory_requests).await;
    }
    policy_evaluation();

    let mut backends = Vec::new();
    if !args.skip_sqlite {
        backends.push(Backend::Sqlite);
    }
    if !args.skip_postgres {
        backends.push(Backend::Postgres);
    }
    for backend in backends {
        let database = Database::create(backend, &directory, &args.postgres_url).await?;
        println!("## {backend:?}\n");
        if !args.probe_rates.is_empty() {
            probe(&args, backend, &database, &directory).await?;
            database.drop_scratch().await;
            continue;
        }
        if let Some(rounds) = args.quota_cost {
            quota_cost(&args, &database, &directory, rounds).await?;
            database.drop_scratch().await;
            continue;
        }
        let floors = floors(backend, &database, args.floor_rows).await?;
        let harness = Harness::start(&args, &database, &directory, args.quotas_on).await?;
        println!("| measure | result | floor | ratio |\n|---|---|---|---|");
        for (label, floor) in &floors {
            println!("| floor: {label} | {floor:.0} rows/s | | |");
        }
        let floor = floors.iter().map(|(_, rate)| *rate).fold(0.0, f64::max);
        // The same criterion as intake's, applied to the raw inserts: what the disk itself
        // sustains with p99 < 5 ms when work arrives on a schedule.
        let floor_sustained = if args.saturation_only {
            None
        } else {
            let sustained = max_sustainable_rate(
                |rate| floor_under_load(&database, rate, args.step_seconds),
                P99_CEILING,
            )
            .await;
            println!(
                "| floor: raw inserts under open-loop load, max with p99 < 5 ms | {:.0} rows/s; {:.0} rows/s with every lower step sustained too (steps: {}) | | |",
                sustained.highest,
                sustained.unbroken,
                sustained.step_list()
            );
            if backend == Backend::Sqlite {
                let directory = directory.clone();
                let seconds = args.step_seconds * 2.0;
                let probe = tokio::task::spawn_blocking(move || {
                    disk_sync_under_load(&directory, 50.0, seconds)
                })
                .await??;
                println!(
                    "| floor: one 4 KiB write + fdatasync at 50/s, no database | {} | | |",
                    tail(&probe.histogram),
                );
            }
            // The disk's own tail, to set intake's low-rate latency against.
            let light = floor_under_load(&database, 50.0, args.step_seconds * 2.0).await;
            println!(
                "| floor: raw inserts at 50/s, open loop | {} · errors {} | | |",
                tail(&light.histogram),
                light.errors
            );
            Some(sustained)
        };
        let health = harness
            .saturate(
                harness.http.get(format!("{}/healthz", harness.base_url)),
                reqwest::StatusCode::OK,
                SATURATION_CLIENTS,
                args.step_seconds * 2.0,
            )
            .await;
        println!(
            "| HTTP ceiling: GET /healthz, {SATURATION_CLIENTS} clients back to back | {:.0} req/s (p50 {} · p99 {}; {}) | | |",
            health.rate,
            micros(health.histogram.value_at_quantile(0.5)),
            micros(health.histogram.value_at_quantile(0.99)),
            health.cpu(),
        );
        for (name, body) in [
            (
                "auto-allowed intake",
                json!({"action": "customers.get", "args": {"id": 42}}),
            ),
            (
                "pending intake",
                json!({"action": "email.send", "args": {"to": "a@example.com"}}),
            ),
        ] {
            let saturated = harness
                .saturation(&body, SATURATION_CLIENTS, args.step_seconds * 2.0)
                .await;
            println!(
                "| {name}: {SATURATION_CLIENTS} clients back to back | {:.0} req/s (p50 {} · p99 {} · errors {}; {}) | {floor:.0} rows/s | {:.2}x |",
                saturated.rate,
                micros(saturated.histogram.value_at_quantile(0.5)),
                micros(saturated.histogram.value_at_quantile(0.99)),
                saturated.errors,
                saturated.cpu(),
                saturated.rate / floor
            );
            if args.saturation_only {
                continue;
            }
            let max = harness
                .max_sustainable_rate(&body, args.step_seconds, P99_CEILING)
                .await;
            let floor_sustained = floor_sustained.clone().unwrap_or_default();
            println!(
                "| {name}: max sustainable (p99 < 5 ms) | {} (steps: {}) | {floor:.0} rows/s | |",
                max.against(floor),
                max.step_list()
            );
            println!(
                "| {name}: the same against raw inserts under the same criterion | | {:.0} rows/s | {} |",
                floor_sustained.highest,
                if floor_sustained.highest > 0.0 {
                    format!("{:.2}x", max.highest / floor_sustained.highest)
                } else {
                    "(no floor rate sustained)".to_string()
                }
            );
            // Throughput when latency may grow: what group commit buys against the floor.
            let throughput = harness
                .max_sustainable_rate(&body, args.step_seconds, THROUGHPUT_CEILING)
                .await;
            println!(
                "| {name}: max with p99 < {} ms | {} | {floor:.0} rows/s | |",
                THROUGHPUT_CEILING.as_millis(),
                throughput.against(floor)
            );
            // At 70 % of the sustainable rate; at the floor's 50/s when none was.
            let (label, rate) = if max.highest == 0.0 {
                ("not sustainable at any step; at", 50.0)
            } else {
                ("at 70 %", max.highest * 0.7)
            };
            let at70 = harness.run_load(&body, rate, args.step_seconds * 2.0).await;
            println!(
                "| {name} {label} ({rate:.0} req/s) | {} · errors {} | | |",
                tail(&at70.histogram),
                at70.errors
            );
        }
        if args.saturation_only {
            harness.stop().await;
            database.drop_scratch().await;
            continue;
        }
        let wake = harness.wake_latency(200).await?;
        println!(
            "| long-poll wake (commit to answer) | p50 {} · p99 {} | | |",
            micros(wake.value_at_quantile(0.5)),
            micros(wake.value_at_quantile(0.99))
        );
        let ack = harness.slack_ack_latency(200).await?;
        println!(
            "| Slack approve click to HTTP answer | p50 {} · p99 {} | | |\n",
            micros(ack.value_at_quantile(0.5)),
            micros(ack.value_at_quantile(0.99))
        );
        harness.stop().await;
        database.drop_scratch().await;
    }
    if !args.saturation_only && args.probe_rates.is_empty() {
        memory(&directory, args.memory_requests).await?;
    }
    Ok(())
}

/// The quotas' cost on intake, both arms in this run: each round starts a server with the
/// quotas off and one with them on (never refusing), in alternating order, and saturates
/// it; the median server CPU per request of each arm, and their ratio, are reported.
async fn quota_cost(
    args: &Args,
    database: &Database,
    directory: &Path,
    rounds: usize,
) -> anyhow::Result<()> {
    let bodies = [
        (
            "auto-allowed intake",
            json!({"action": "customers.get", "args": {"id": 42}}),
        ),
        (
            "pending intake",
            json!({"action": "email.send", "args": {"to": "a@example.com"}}),
        ),
    ];
    // cpu[body][arm]: server CPU per request, in microseconds, one per round.
    let mut cpu = vec![[Vec::new(), Vec::new()]; bodies.len()];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for quotas_on in order {
            let harness = Harness::start(args, database, directory, quotas_on).await?;
            for (index, (_, body)) in bodies.iter().enumerate() {
                let saturated = harness
                    .saturation(body, SATURATION_CLIENTS, args.step_seconds * 2.0)
                    .await;
                cpu[index][usize::from(quotas_on)]
                    .push(saturated.cpu_per_request.server.as_secs_f64() * 1e6);
            }
            harness.stop().await;
        }
    }
    // The checks alone, timed in a tight loop against the same database: what each
    // submission pays for them, set against a whole request's server CPU below.
    let checks = {
        let harness = Harness::start(args, database, directory, false).await?;
        let quotas = Quotas::new(100_000_000, 1_000_000_000, 1_000_000);
        // Opened beside the server's, on the same database and settings.
        let store = signoff::store::connect(&harness.config).await?;
        const CALLS: u32 = 200_000;
        let started = Instant::now();
        for _ in 0..CALLS {
            quotas
                .check_rate("bench-agent")
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let admitted = quotas.admit_pending("bench-agent", store.as_ref()).await?;
            drop(admitted.map_err(|error| anyhow::anyhow!("{error}"))?);
        }
        harness.stop().await;
        started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS)
    };
    println!("| quota cost: server CPU per request | quotas off | quotas on | on / off |\n|---|---|---|---|");
    for ((name, _), arms) in bodies.iter().zip(&cpu) {
        let [off, on] = arms.each_ref().map(|samples| median(samples));
        let list = |samples: &Vec<f64>| {
            samples
                .iter()
                .map(|micros| format!("{micros:.0}"))
                .collect::<Vec<_>>()
                .join(" · ")
        };
        println!(
            "| {name} ({rounds} rounds) | {off:.0} µs ({}) | {on:.0} µs ({}) | {:.3} |",
            list(&arms[0]),
            list(&arms[1]),
            on / off
        );
        println!(
            "| {name}: the checks alone (rate limit + pending admission, tight loop) | {checks:.3} µs per submission | {:.2} % of the quotas-off request | |",
            checks / off * 100.0
        );
    }
    println!();
    Ok(())
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        length if length % 2 == 1 => sorted[length / 2],
        length => (sorted[length / 2 - 1] + sorted[length / 2]) / 2.0,
    }
}

/// Auto-allowed intake at each of `--probe-rates`, every attempt printed.
async fn probe(
    args: &Args,
    backend: Backend,
    database: &Database,
    directory: &Path,
) -> anyhow::Result<()> {
    let harness = Harness::start(args, database, directory, args.quotas_on).await?;
    // The raw inserts' agent.
    harness
        .server
        .engine()
        .create_agent("bench", Vec::new())
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let body = json!({"action": "customers.get", "args": {"id": 42}});
    println!(
        "{backend:?}, server synchronous={}:\n\n| rate | attempt | raw inserts (floor) | intake |\n|---|---|---|---|",
        args.sqlite_synchronous
    );
    for &rate in &args.probe_rates {
        for attempt in 1..=args.probe_attempts {
            // Floor and intake back to back, so both meet the disk in the same mood.
            settle_disk();
            let floor = floor_under_load(database, rate, args.step_seconds).await;
            settle_disk();
            let load = harness.run_load(&body, rate, args.step_seconds).await;
            println!(
                "| {rate:.0} | {attempt} | {} | {} · errors {} |",
                tail(&floor.histogram),
                tail(&load.histogram),
                load.errors
            );
        }
    }
    harness.stop().await;
    Ok(())
}

/// p50/p99 of one evaluation, for policies of 10, 100 and 1,000 rules.
fn policy_evaluation() {
    println!("## Policy evaluation\n\n| rules | p50 | p99 |\n|---|---|---|");
    let args = json!({"amount": 2500, "currency": "EUR"});
    let context = json!({"reversible": false});
    for rules in [10, 100, 1000] {
        let policy = policies::generated_policy(rules);
        let mut histogram = Histogram::<u64>::new(3).expect("histogram");
        for _ in 0..20_000 {
            let started = Instant::now();
            let verdict = policy.evaluate(EvaluationInput {
                action: "payments.refund",
                args: &args,
                agent: "finance-bot",
                context: &context,
            });
            let elapsed = started.elapsed().as_nanos() as u64;
            std::hint::black_box(verdict);
            let _ = histogram.record(elapsed);
        }
        println!(
            "| {rules} | {:.2} µs | {:.2} µs |",
            histogram.value_at_quantile(0.5) as f64 / 1000.0,
            histogram.value_at_quantile(0.99) as f64 / 1000.0
        );
    }
    println!();
}

struct Database {
    url: String,
    scratch: Option<(String, String)>,
}

impl Database {
    async fn create(
        backend: Backend,
        directory: &Path,
        postgres_url: &str,
    ) -> anyhow::Result<Self> {
        match backend {
            Backend::Sqlite => Ok(Self {
                url: format!("sqlite://{}", directory.join("bench.db").display()),
                scratch: None,
            }),
            Backend::Postgres => {
                let name = format!("signoff_bench_{}", std::process::id());
                let mut admin = sqlx::PgConnection::connect(postgres_url)
                    .await
                    .with_context(|| {
                        format!("connecting to {postgres_url} (use --skip-postgres without one)")
                    })?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                    .await?;
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await?;
                let mut url = url::Url::parse(postgres_url)?;
                url.set_path(&format!("/{name}"));
                Ok(Self {
                    url: url.to_string(),
                    scratch: Some((postgres_url.to_string(), name)),
                })
            }
        }
    }

    async fn drop_scratch(&self) {
        if let Some((admin_url, name)) = &self.scratch {
            if let Ok(mut admin) = sqlx::PgConnection::connect(admin_url).await {
                let _ = admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
            }
        }
    }
}

/// Due times at `rate` per second for `seconds`. A thread of its own keeps the schedule: a
/// thread's sleep is accurate to tens of microseconds, tokio's timers only to the
/// millisecond, and a late send would be counted against the server.
fn schedule(rate: f64, seconds: f64) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let total = (rate * seconds).max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (sender, due_times) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        for index in 0..total {
            let due = started + interval * index as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if sender.send(due).is_err() {
                break;
            }
        }
    });
    due_times
}

/// Attempts per rate step: a step is sustained when one of them has no errors and its p99
/// under the ceiling. This VM's disk stalls for 20-300 ms a few times every few seconds at
/// any write rate; a stall fails one attempt, an overloaded server fails all of them.
const ATTEMPTS_PER_STEP: usize = 3;

/// What a rate search found, step by step.
#[derive(Clone, Debug, Default)]
struct Sustained {
    /// The highest step sustained in one of `ATTEMPTS_PER_STEP` attempts.
    highest: f64,
    /// The highest step sustained with every step below it sustained too.
    unbroken: f64,
    /// Each step's rate, whether it was sustained, and its best attempt's p50 and p99.
    steps: Vec<(f64, bool, u64, u64)>,
}

impl Sustained {
    /// Both figures with their ratios to `floor`.
    fn against(&self, floor: f64) -> String {
        format!(
            "{:.0} req/s ({:.2}x); {:.0} req/s ({:.2}x) with every lower step sustained too",
            self.highest,
            self.highest / floor,
            self.unbroken,
            self.unbroken / floor,
        )
    }

    /// Every step: `rate ✓`, `rate ✗ (p99 …)`, or `rate ✗ (errors)` when every attempt had some.
    fn step_list(&self) -> String {
        self.steps
            .iter()
            .map(|(rate, sustained, _, p99)| {
                if *sustained {
                    format!("{rate:.0} ✓")
                } else if *p99 == u64::MAX {
                    format!("{rate:.0} ✗ (errors)")
                } else {
                    format!("{rate:.0} ✗ (p99 {})", micros(*p99))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Steps up by about 1.4x from 50 per second; a step is sustained when one of
/// `ATTEMPTS_PER_STEP` attempts has no errors and p99 under `ceiling`. A step that is not
/// sustained only ends the search when even its best attempt had errors or a median over
/// the ceiling: then the work is past what the machine keeps up with. Otherwise only its
/// tail was late, as a stall of the disk's sync makes it at any rate, so higher rates are
/// still tried.
async fn max_sustainable_rate<Run, Running>(mut run: Run, ceiling: Duration) -> Sustained
where
    Run: FnMut(f64) -> Running,
    Running: std::future::Future<Output = LoadResult>,
{
    let mut rate = 50.0;
    let mut found = Sustained::default();
    loop {
        settle_disk();
        // The attempt with the best tail, and the fewest errors and lowest median of any.
        let mut best: Option<(u64, u64)> = None;
        let (mut fewest_errors, mut lowest_p50) = (u64::MAX, u64::MAX);
        let mut passed = false;
        for attempt in 1..=ATTEMPTS_PER_STEP {
            let result = run(rate).await;
            let p50 = result.histogram.value_at_quantile(0.5);
            let p99 = result.histogram.value_at_quantile(0.99);
            eprintln!(
                "  {rate:.0}/s attempt {attempt}: p50 {} p99 {} errors {}",
                micros(p50),
                micros(p99),
                result.errors
            );
            fewest_errors = fewest_errors.min(result.errors);
            lowest_p50 = lowest_p50.min(p50);
            if result.errors == 0 && best.is_none_or(|(_, best_p99)| p99 < best_p99) {
                best = Some((p50, p99));
            }
            passed = result.errors == 0 && Duration::from_micros(p99) <= ceiling;
            if passed {
                break;
            }
        }
        let (p50, p99) = best.unwrap_or((lowest_p50, u64::MAX));
        found.steps.push((rate, passed, p50, p99));
        if passed {
            found.highest = rate;
            if found.steps.iter().all(|(_, sustained, _, _)| *sustained) {
                found.unbroken = rate;
            }
        } else if fewest_errors > 0 || Duration::from_micros(lowest_p50) > ceiling {
            return found;
        }
        rate = (rate * 1.4).round();
    }
}

/// Flushes what earlier work (a build, the previous step) left for the disk to write, so a
/// measurement does not pay for it.
fn settle_disk() {
    let _ = std::process::Command::new("sync").status();
}

/// The floor under the same open-loop load as intake: one connection inserts one row per
/// commit for each due time, in order, so a stall of the disk delays the ones behind it
/// exactly as it would delay a server that commits each request alone.
async fn floor_under_load(database: &Database, rate: f64, seconds: f64) -> LoadResult {
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    let mut errors = 0;
    let connection = floor_connection(database).await;
    let Ok(mut connection) = connection else {
        return LoadResult {
            histogram,
            errors: 1,
        };
    };
    let mut due_times = schedule(rate, seconds);
    while let Some(due) = due_times.recv().await {
        match insert_floor_row(&mut connection).await {
            Ok(()) => {
                let _ = histogram.record(due.elapsed().as_micros() as u64);
            }
            Err(_) => errors += 1,
        }
    }
    LoadResult { histogram, errors }
}

/// Below any database: one 4 KiB write and `fdatasync` per due time, in the directory the
/// SQLite file lives in. Whatever tail this has, every durable commit inherits.
fn disk_sync_under_load(directory: &Path, rate: f64, seconds: f64) -> anyhow::Result<LoadResult> {
    use std::os::unix::fs::FileExt as _;
    let path = directory.join("sync-probe.bin");
    let file = std::fs::File::create(&path)?;
    let page = [7u8; 4096];
    let mut histogram = Histogram::<u64>::new(3)?;
    let total = (rate * seconds).max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    for index in 0..total {
        let due = started + interval * index as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Sixteen pages written over and over: the file never grows, so no metadata is synced.
        file.write_all_at(&page, (index % 16) * 4096)?;
        file.sync_data()?;
        let _ = histogram.record(due.elapsed().as_micros() as u64);
    }
    std::fs::remove_file(&path)?;
    Ok(LoadResult {
        histogram,
        errors: 0,
    })
}

/// A connection for raw inserts, at the server's durability setting.
enum FloorConnection {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

async fn floor_connection(database: &Database) -> anyhow::Result<FloorConnection> {
    if database.url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(&database.url).await?;
        connection
            .execute(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .await?;
        Ok(FloorConnection::Sqlite(connection))
    } else {
        Ok(FloorConnection::Postgres(
            sqlx::PgConnection::connect(&database.url).await?,
        ))
    }
}

/// One request row as intake stores it, in a commit of its own. Ids sort by time, as the
/// server's do.
async fn insert_floor_row(connection: &mut FloorConnection) -> anyhow::Result<()> {
    let id = format!("apr_floor_{}", signoff::domain::new_request_id());
    macro_rules! insert_with {
        ($connection:expr) => {
            sqlx::query(FLOOR_INSERT)
                .bind(&id)
                .bind(signoff::domain::now())
                .bind(sqlx::types::Json(sample_body(&id)))
                .execute($connection)
                .await?
        };
    }
    match connection {
        FloorConnection::Sqlite(connection) => {
            insert_with!(&mut *connection);
        }
        FloorConnection::Postgres(connection) => {
            insert_with!(&mut *connection);
        }
    }
    Ok(())
}

/// One request row exactly as intake stores it.
fn sample_body(id: &str) -> Value {
    json!({
        "id": id, "agent": "bench", "action": "customers.get", "args": {"id": 42},
        "context": {}, "on_behalf_of": null, "status": "approved", "tier": null,
        "rule": "reads", "approvals_required": 0, "revision": 1, "votes": [],
        "decision": {"outcome": "approved", "by": ["policy:reads"], "reason": null,
                     "at": "2026-11-21T10:00:00.000Z", "modified": false, "args": {"id": 42}},
        "action_hash": "sha256:0000", "policy_hash": "sha256:0000",
        "created_at": "2026-11-21T10:00:00.000Z", "expires_at": null, "executed": null,
        "original_args": {"id": 42}
    })
}

const FLOOR_INSERT: &str = "INSERT INTO requests (id, agent, action, status, revision, version, created_at, expires_at, updated_at, body) VALUES ($1, 'bench', 'customers.get', 'approved', 1, 1, $2, NULL, $2, $3)";

/// Raw inserts of the same rows, one row per commit, at the server's durability setting.
async fn floors(
    backend: Backend,
    database: &Database,
    rows: usize,
) -> anyhow::Result<Vec<(String, f64)>> {
    let config = bench_config(database, Path::new("unused"), "127.0.0.1:0");
    let store = signoff::store::connect(&config).await?;
    store.migrate().await?;
    let agent = signoff::engine::Engine::new(
        store,
        signoff::policy::Policy::parse("version: 1").map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    agent
        .create_agent("bench", Vec::new())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    settle_disk();
    let connection_counts: &[usize] = match backend {
        Backend::Sqlite => &[1],
        Backend::Postgres => &[1, 64],
    };
    let mut results = Vec::new();
    for &connections in connection_counts {
        let mut connected = Vec::new();
        for _ in 0..connections {
            connected.push(floor_connection(database).await?);
        }
        let started = Instant::now();
        let mut workers = JoinSet::new();
        for (worker, mut connection) in connected.into_iter().enumerate() {
            let share = rows / connections + usize::from(worker < rows % connections);
            workers.spawn(async move {
                for _ in 0..share {
                    insert_floor_row(&mut connection).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = workers.join_next().await {
            done??;
        }
        let rate = rows as f64 / started.elapsed().as_secs_f64();
        let label = match backend {
            Backend::Sqlite => "SQLite, 1 row per commit, synchronous=FULL".to_string(),
            Backend::Postgres => {
                format!("PostgreSQL, 1 row per commit, {connections} connection(s)")
            }
        };
        results.push((label, rate));
    }
    Ok(results)
}

const BENCH_POLICY: &str = r#"version: 1
default: deny
tiers:
  medium:
    route: ["slack:C0BENCH"]
    approvers: ["slack:U0BENCH", "cli:bench"]
    ttl: 1h
rules:
  - name: reads
    match: ["*.get"]
    effect: allow
  - name: email
    match: ["email.send"]
    effect: require_approval
    tier: medium
"#;

fn bench_config(database: &Database, policy: &Path, listen: &str) -> Config {
    Config {
        listen: listen.into(),
        database_url: Secret::new(database.url.clone()),
        policy: policy.to_path_buf(),
        database_max_connections: 64,
        // One agent sends all of the load: the per-agent quotas would refuse most of it.
        max_pending_per_agent: 0,
        agent_rate_limit: 0,
        max_waiting_per_agent: 0,
        ..Config::default()
    }
}

struct Harness {
    server: RunningServer,
    /// The server's configuration, for opening the same database beside it.
    config: Config,
    /// The server runs on its own runtime, so the load generator's timers and tasks do
    /// not queue behind the server's (they still share the machine's cores).
    server_runtime: tokio::runtime::Runtime,
    base_url: String,
    key: String,
    http: reqwest::Client,
}

struct Saturation {
    rate: f64,
    histogram: Histogram<u64>,
    errors: u64,
    /// CPU time per answered request: on this VM the hypervisor takes a varying share of
    /// the cores (steal), which moves every rate, while CPU time spent is what the code
    /// costs whatever the neighbours do.
    cpu_per_request: CpuTime,
}

impl Saturation {
    fn cpu(&self) -> String {
        format!(
            "CPU per request: server {} · load generator {}",
            micros(self.cpu_per_request.server.as_micros() as u64),
            micros(self.cpu_per_request.generator.as_micros() as u64)
        )
    }
}

/// Name of the server runtime's threads, so their CPU time can be told apart.
const SERVER_THREAD_NAME: &str = "signoff-server";

/// CPU time used by this process's live threads, split into the server's (its runtime's
/// threads and the SQLite connections' threads) and the rest (the load generator).
#[derive(Clone, Copy, Debug, Default)]
struct CpuTime {
    server: Duration,
    generator: Duration,
}

impl CpuTime {
    /// From each thread's `schedstat` (nanoseconds on a CPU); zero where there is no /proc.
    fn now() -> Self {
        let mut total = Self::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return total;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let on_cpu = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|stat| stat.split_whitespace().next()?.parse().ok())
                .map(Duration::from_nanos)
                .unwrap_or_default();
            if name.starts_with(SERVER_THREAD_NAME) || name.starts_with("sqlx-sqlite") {
                total.server += on_cpu;
            } else {
                total.generator += on_cpu;
            }
        }
        total
    }

    /// CPU time since `earlier`, per one of `count` requests.
    fn per_request_since(self, earlier: Self, count: u64) -> Self {
        let count = count.max(1) as u32;
        Self {
            server: self.server.saturating_sub(earlier.server) / count,
            generator: self.generator.saturating_sub(earlier.generator) / count,
        }
    }
}

struct LoadResult {
    histogram: Histogram<u64>,
    errors: u64,
}

impl Harness {
    async fn start(
        args: &Args,
        database: &Database,
        directory: &Path,
        quotas_on: bool,
    ) -> anyhow::Result<Self> {
        let slack = fake_slack::start().await?;
        let policy = directory.join("bench-policy.yaml");
        std::fs::write(&policy, BENCH_POLICY)?;
        let mut config = bench_config(database, &policy, "127.0.0.1:0");
        config.sqlite_synchronous = args.sqlite_synchronous.clone();
        if quotas_on {
            // Checked on every submission, never refusing: the rate limiter's state is
            // spent, the pending count is cached and re-read once a second.
            config.max_pending_per_agent = 100_000_000;
            config.agent_rate_limit = 1_000_000_000;
            config.max_waiting_per_agent = 1_000_000;
        }
        config.slack = SlackConfig {
            bot_token: Secret::new("xoxb-bench"),
            signing_secret: Secret::new(SIGNING_SECRET),
            api_url: slack,
            command: "/signoff".into(),
        };
        let server_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(num_cpus())
            .thread_name(SERVER_THREAD_NAME)
            .enable_all()
            .build()?;
        let server = server_runtime
            .spawn(RunningServer::start(config.clone()))
            .await??;
        // Several harnesses may start on one database in a run (the quota cost's rounds).
        static HARNESSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let number = HARNESSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let credentials = server
            .engine()
            .create_agent(
                &format!("agent-{}-{number}", std::process::id()),
                Vec::new(),
            )
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        Ok(Self {
            base_url: format!("http://{}", server.address()),
            server,
            config,
            server_runtime,
            key: credentials.api_key,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()?,
        })
    }

    async fn stop(self) {
        self.server.shutdown(Duration::from_secs(10)).await;
        self.server_runtime.shutdown_background();
    }

    async fn submit(&self, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}/v1/requests", self.base_url))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!("submit answered {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// Sends at `rate` per second for `seconds`, never waiting for answers before sending
    /// the next; latency counts from when each request was due.
    async fn run_load(&self, body: &Value, rate: f64, seconds: f64) -> LoadResult {
        // One request built up front and cloned per send (its body is shared bytes), so
        // the generator spends its share of the two cores on sending, not on serialising.
        let prototype = self
            .http
            .post(format!("{}/v1/requests", self.base_url))
            .bearer_auth(&self.key)
            .json(body)
            .timeout(Duration::from_secs(10))
            .build();
        let Ok(prototype) = prototype else {
            return LoadResult {
                histogram: Histogram::<u64>::new(3).expect("histogram"),
                errors: 1,
            };
        };
        let mut due_times = schedule(rate, seconds);
        let mut tasks = JoinSet::new();
        while let Some(due) = due_times.recv().await {
            let Some(request) = prototype.try_clone() else {
                break;
            };
            let http = self.http.clone();
            tasks.spawn(async move {
                // The answer is read to its end, as an agent would: only then does the
                // client put the connection back in its pool for the next request.
                let ok = match http.execute(request).await {
                    Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
                        response.bytes().await.is_ok()
                    }
                    _ => false,
                };
                (ok, due.elapsed())
            });
        }
        let mut histogram = Histogram::<u64>::new(3).expect("histogram");
        let mut errors = 0;
        while let Some(result) = tasks.join_next().await {
            match result {
                Ok((true, latency)) => {
                    let _ = histogram.record(latency.as_micros() as u64);
                }
                _ => errors += 1,
            }
        }
        LoadResult { histogram, errors }
    }

    /// Closed loop: `clients` agents each submit back to back for `seconds`. The most the
    /// server can commit when it is never idle, to set against the one-row-per-commit floor.
    /// The median of three runs: one stall of the disk (this VM's can last 300 ms) should
    /// not decide the figure either way.
    async fn saturation(&self, body: &Value, clients: usize, seconds: f64) -> Saturation {
        let mut runs = Vec::new();
        for _ in 0..3 {
            settle_disk();
            let request = self
                .http
                .post(format!("{}/v1/requests", self.base_url))
                .bearer_auth(&self.key)
                .json(body);
            let run = self
                .saturate(request, reqwest::StatusCode::CREATED, clients, seconds)
                .await;
            eprintln!("  saturation run: {:.0} req/s ({})", run.rate, run.cpu());
            runs.push(run);
        }
        runs.sort_by(|first, second| first.rate.total_cmp(&second.rate));
        runs.swap_remove(1)
    }

    /// Closed loop on any request: `clients` tasks send it back to back for `seconds`.
    async fn saturate(
        &self,
        prototype: reqwest::RequestBuilder,
        expected: reqwest::StatusCode,
        clients: usize,
        seconds: f64,
    ) -> Saturation {
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let cpu_before = CpuTime::now();
        let mut tasks = JoinSet::new();
        for _ in 0..clients {
            let request = prototype.try_clone().map(|builder| builder.build());
            let request = match request {
                Some(Ok(request)) => Ok(request),
                _ => Err(()),
            };
            let http = self.http.clone();
            tasks.spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).expect("histogram");
                let mut errors = 0u64;
                let Ok(request) = request else {
                    return (histogram, 1);
                };
                while Instant::now() < until {
                    let Some(attempt) = request.try_clone() else {
                        return (histogram, errors + 1);
                    };
                    let sent = Instant::now();
                    match http.execute(attempt).await {
                        Ok(response) if response.status() == expected => {
                            let _ = response.bytes().await;
                            let _ = histogram.record(sent.elapsed().as_micros() as u64);
                        }
                        _ => errors += 1,
                    }
                }
                (histogram, errors)
            });
        }
        let mut histogram = Histogram::<u64>::new(3).expect("histogram");
        let mut errors = 0;
        while let Some(Ok((part, part_errors))) = tasks.join_next().await {
            let _ = histogram.add(&part);
            errors += part_errors;
        }
        Saturation {
            rate: histogram.len() as f64 / started.elapsed().as_secs_f64(),
            cpu_per_request: CpuTime::now().per_request_since(cpu_before, histogram.len()),
            histogram,
            errors,
        }
    }

    async fn max_sustainable_rate(
        &self,
        body: &Value,
        seconds: f64,
        ceiling: Duration,
    ) -> Sustained {
        max_sustainable_rate(|rate| self.run_load(body, rate, seconds), ceiling).await
    }

    /// From the vote's commit to the waiting agent's answer, sequentially.
    async fn wake_latency(&self, samples: usize) -> anyhow::Result<Histogram<u64>> {
        settle_disk();
        let mut histogram = Histogram::<u64>::new(3)?;
        let voter = Voter::new(
            "cli:bench"
                .parse()
                .map_err(|error| anyhow::anyhow!("{error}"))?,
        );
        for _ in 0..samples {
            let request = self.submit(&json!({"action": "email.send"})).await?;
            let id = request["id"].as_str().unwrap_or_default().to_string();
            let poll = self
                .http
                .get(format!("{}/v1/requests/{id}?wait=30", self.base_url))
                .bearer_auth(&self.key)
                .send();
            let waiting = tokio::spawn(async move {
                let response = poll.await?;
                let answered = Instant::now();
                // Read to the end so the connection goes back to the pool.
                response.bytes().await?;
                Ok::<_, reqwest::Error>(answered)
            });
            // Give the long-poll time to register; what is measured starts at the commit.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.server
                .engine()
                .record_vote(&id, &voter, VoteRequest::Approve { note: None }, None)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let committed = Instant::now();
            let answered = waiting.await??;
            let _ =
                histogram.record(answered.saturating_duration_since(committed).as_micros() as u64);
        }
        Ok(histogram)
    }

    /// A signed Approve click on a fresh pending request, to the HTTP answer.
    async fn slack_ack_latency(&self, samples: usize) -> anyhow::Result<Histogram<u64>> {
        settle_disk();
        let mut histogram = Histogram::<u64>::new(3)?;
        for _ in 0..samples {
            let request = self.submit(&json!({"action": "email.send"})).await?;
            let id = request["id"].as_str().unwrap_or_default();
            let payload = json!({
                "type": "block_actions", "user": {"id": "U0BENCH"}, "trigger_id": "1.2.3",
                "channel": {"id": "C0BENCH"}, "container": {"channel_id": "C0BENCH"},
                "actions": [{"action_id": "approve", "value": id, "type": "button"}]
            });
            let body = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("payload", &payload.to_string())
                .finish();
            let timestamp = chrono::Utc::now().timestamp();
            let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes())?;
            mac.update(format!("v0:{timestamp}:{body}").as_bytes());
            let signature = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
            let started = Instant::now();
            let response = self
                .http
                .post(format!("{}/slack/interactions", self.base_url))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-slack-signature", signature)
                .header("x-slack-request-timestamp", timestamp.to_string())
                .body(body)
                .send()
                .await?;
            let status = response.status();
            response.bytes().await?;
            let elapsed = started.elapsed();
            if !status.is_success() {
                bail!("click answered {status}");
            }
            let _ = histogram.record(elapsed.as_micros() as u64);
        }
        Ok(histogram)
    }
}

/// Resident memory of a server process, idle and with many pending requests in its database.
async fn memory(directory: &Path, pending: usize) -> anyhow::Result<()> {
    let database = Database {
        url: format!("sqlite://{}", directory.join("memory.db").display()),
        scratch: None,
    };
    let policy = directory.join("memory-policy.yaml");
    std::fs::write(&policy, BENCH_POLICY)?;
    let config = directory.join("memory.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = {:?}\npolicy = {:?}\n",
            database.url,
            policy.display().to_string()
        ),
    )?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--serve")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let address = lines.next_line().await?.context("server address")?;
    let pid = child.id().context("child pid")?;
    let http = reqwest::Client::new();
    http.get(format!("http://{address}/readyz")).send().await?;
    let idle = resident_kib(pid)?;

    // Load the pending rows in bulk (one transaction), then make the server look at them.
    let mut connection = sqlx::SqliteConnection::connect(&database.url).await?;
    let mut transaction = connection.begin().await?;
    sqlx::query("INSERT INTO agents (name, api_key_hash, webhook_secret, owners, created_at) VALUES ('bench', 'unused', 'whsec_unused', '[]', $1) ON CONFLICT DO NOTHING")
        .bind(signoff::domain::now())
        .execute(&mut *transaction)
        .await?;
    let expires = signoff::domain::now() + chrono::Duration::hours(1);
    for index in 0..pending {
        let id = format!("apr_memory_{index}");
        let mut body = sample_body(&id);
        body["status"] = json!("pending");
        body["decision"] = Value::Null;
        sqlx::query("INSERT INTO requests (id, agent, action, status, revision, version, created_at, expires_at, updated_at, body) VALUES ($1, 'bench', 'email.send', 'pending', 1, 1, $2, $3, $2, $4)")
            .bind(&id)
            .bind(signoff::domain::now())
            .bind(expires)
            .bind(sqlx::types::Json(body))
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await?;
    for _ in 0..3 {
        http.get(format!("http://{address}/metrics")).send().await?;
    }
    let loaded = resident_kib(pid)?;
    println!("## Memory (server process, SQLite)\n\n| state | resident |\n|---|---|");
    println!("| idle | {:.1} MB |", idle as f64 / 1024.0);
    println!(
        "| {pending} pending requests | {:.1} MB |\n",
        loaded as f64 / 1024.0
    );
    child.kill().await?;
    Ok(())
}

async fn serve_for_measurement(config: &Path) -> anyhow::Result<()> {
    let server = RunningServer::start(Config::load(Some(config))?).await?;
    println!("{}", server.address());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS not found")
}

/// `p50 · p99 · p99.9 · max` of a latency histogram in microseconds.
fn tail(histogram: &Histogram<u64>) -> String {
    format!(
        "p50 {} · p99 {} · p99.9 {} · max {}",
        micros(histogram.value_at_quantile(0.5)),
        micros(histogram.value_at_quantile(0.99)),
        micros(histogram.value_at_quantile(0.999)),
        micros(histogram.max())
    )
}

fn micros(value: u64) -> String {
    if value >= 1000 {
        format!("{:.2} ms", value as f64 / 1000.0)
    } else {
        format!("{value} µs")
    }
}

fn tempfile_directory() -> anyhow::Result<PathBuf> {
    let directory = std::env::temp_dir().join(format!("signoff-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    Ok(directory)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|name| name.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
