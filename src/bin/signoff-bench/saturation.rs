//! Closed-loop throughput: clients sending back to back, the rate and the CPU time per
//! request (the server's threads apart from the load generator's), and the quotas' cost
//! measured that way (`--quota-cost`).

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use signoff::quota::Quotas;
use tokio::task::JoinSet;

use crate::harness::{intakes, settle_disk, turn_quotas_on, Database, Harness, SERVER_THREAD_NAME};
use crate::latency::histogram;
use crate::report::micros;
use crate::Args;

/// Agents submitting back to back in the closed-loop throughput measurement.
pub const SATURATION_CLIENTS: usize = 64;

pub struct Saturation {
    pub rate: f64,
    pub histogram: Histogram<u64>,
    pub errors: u64,
    /// CPU time per answered request: on this VM the hypervisor takes a varying share of
    /// the cores (steal), which moves every rate, while CPU time spent is what the code
    /// costs whatever the neighbours do.
    pub cpu_per_request: CpuTime,
}

impl Saturation {
    pub fn cpu(&self) -> String {
        format!(
            "CPU per request: server {} · load generator {}",
            micros(self.cpu_per_request.server.as_micros() as u64),
            micros(self.cpu_per_request.generator.as_micros() as u64)
        )
    }
}

/// CPU time used by this process's live threads, split into the server's (its runtime's
/// threads and the SQLite connections' threads) and the rest (the load generator).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub server: Duration,
    pub generator: Duration,
}

impl CpuTime {
    /// From each thread's `schedstat` (nanoseconds on a CPU); zero where there is no /proc.
    pub fn now() -> Self {
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
    pub fn per_request_since(self, earlier: Self, count: u64) -> Self {
        let count = count.max(1) as u32;
        Self {
            server: self.server.saturating_sub(earlier.server) / count,
            generator: self.generator.saturating_sub(earlier.generator) / count,
        }
    }
}

impl Harness {
    /// Closed loop: `clients` agents each submit back to back for `seconds`. The most the
    /// server can commit when it is never idle, to set against the one-row-per-commit floor.
    /// The median of three runs: one stall of the disk (this VM's can last 300 ms) should
    /// not decide the figure either way.
    pub async fn saturation(&self, body: &Value, clients: usize, seconds: f64) -> Saturation {
        let mut runs = Vec::new();
        for _ in 0..3 {
            settle_disk();
            let run = self
                .saturate(
                    self.intake(body),
                    reqwest::StatusCode::CREATED,
                    clients,
                    seconds,
                )
                .await;
            eprintln!("  saturation run: {:.0} req/s ({})", run.rate, run.cpu());
            runs.push(run);
        }
        runs.sort_by(|first, second| first.rate.total_cmp(&second.rate));
        runs.swap_remove(1)
    }

    /// Closed loop on any request: `clients` tasks send it back to back for `seconds`.
    pub async fn saturate(
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
                let mut histogram = histogram();
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
        let mut histogram = histogram();
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
}

/// The quotas' cost on intake, both arms in one run (see `quota_cost`).
pub struct QuotaCost {
    /// Each intake measured, with its server CPU per request in microseconds, one sample per
    /// round: quotas off first, then on.
    pub intakes: Vec<(&'static str, [Vec<f64>; 2])>,
    /// The checks alone, in microseconds per submission.
    pub checks: f64,
}

/// The quotas' cost on intake, both arms in this run: each round starts a server with the
/// quotas off and one with them on (never refusing), in alternating order, and saturates
/// it; each arm's server CPU per request, round by round, and the checks alone.
pub async fn quota_cost(
    args: &Args,
    database: &Database,
    directory: &Path,
    rounds: usize,
) -> anyhow::Result<QuotaCost> {
    let bodies = intakes();
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
        let mut quotas_on = harness.config.clone();
        turn_quotas_on(&mut quotas_on);
        let quotas = Quotas::from_config(&quotas_on);
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
    Ok(QuotaCost {
        intakes: bodies.into_iter().map(|(name, _)| name).zip(cpu).collect(),
        checks,
    })
}
