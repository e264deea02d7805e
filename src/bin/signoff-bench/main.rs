//! signoff-bench: drives signoff the way agents and approvers load it — open-loop, at fixed
//! arrival rates, latency measured from each request's intended send time (so a stalled
//! server is not hidden by a stalled load generator) — and measures the physical floors in
//! the same run. See BENCHMARKS.md.
//!
//! This file: the arguments and the order of a run. The measurements live in `harness`,
//! `floors`, `saturation`, `latency` and `memory`; the Markdown they print in `report`.

mod fake_slack;
mod fake_teams;
mod floors;
mod harness;
mod latency;
mod mcp_proxy;
mod memory;
mod policies;
mod report;
mod saturation;
mod teams_ack;

use std::path::PathBuf;

use clap::Parser;

use harness::{settle_disk, tempfile_directory, Backend, Database};

/// glibc's allocator spent a fifth of the CPU at saturation (contended arenas,
/// `malloc_consolidate`); mimalloc's per-thread heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Clone)]
#[command(about = "Benchmarks signoff against its floors; prints a Markdown report")]
pub struct Args {
    /// PostgreSQL to create scratch databases in.
    #[arg(
        long,
        env = "SIGNOFF_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub postgres_url: String,
    /// Only SQLite.
    #[arg(long)]
    pub skip_postgres: bool,
    /// Only PostgreSQL.
    #[arg(long)]
    pub skip_sqlite: bool,
    /// Seconds per load step.
    #[arg(long, default_value_t = 2.0)]
    pub step_seconds: f64,
    /// Rows per floor measurement.
    #[arg(long, default_value_t = 2000)]
    pub floor_rows: usize,
    /// Pending requests for the memory measurement.
    #[arg(long, default_value_t = 100_000)]
    pub memory_requests: usize,
    /// Only the closed-loop intake measurement (for profiling).
    #[arg(long)]
    pub saturation_only: bool,
    /// Only the memory measurement.
    #[arg(long)]
    pub memory_only: bool,
    /// Only auto-allowed intake, open loop at these rates (comma-separated, req/s), each
    /// `--probe-attempts` times: for A/B comparisons of the latency tail.
    #[arg(long, value_delimiter = ',')]
    pub probe_rates: Vec<f64>,
    /// Attempts per rate with `--probe-rates`.
    #[arg(long, default_value_t = 3)]
    pub probe_attempts: usize,
    /// The server's SQLite `synchronous` setting ("full", the default, or "normal"): to
    /// tell the disk's share of a latency from the server's.
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    pub sqlite_synchronous: String,
    /// Keep the per-agent quotas on (rate limiter, pending cap, long-poll cap), set too high
    /// to refuse anything: their cost on intake, for an A/B against the default (off: the
    /// benchmark's one agent would be refused long before the server is saturated).
    #[arg(long)]
    pub quotas_on: bool,
    /// Only the quotas' cost, in this one run: N rounds, each intake at saturation with the
    /// quotas off and on (order alternating), server CPU per request of both, and their ratio.
    #[arg(long, value_name = "ROUNDS")]
    pub quota_cost: Option<usize>,
    /// Only the Teams click acknowledgement: SAMPLES signed Approve invokes, each to the
    /// HTTP answer carrying the card, beside as many Slack approve clicks, and the token
    /// verification alone (its share of the invoke).
    #[arg(long, value_name = "SAMPLES")]
    pub teams_ack_only: Option<usize>,
    /// Only what `signoff mcp-proxy` adds to an allowed tool call: N calls each straight to
    /// the upstream MCP server, through the proxy, and as a plain intake, interleaved; p50
    /// and p99 of each and of the differences. Needs `signoff` and the
    /// `mcp_recording_server` example built beside the benchmark.
    #[arg(long, value_name = "CALLS")]
    pub mcp_proxy: Option<usize>,
    /// Internal: run a server on this config and print its address (memory measurement).
    #[arg(long, hide = true)]
    pub serve: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(config) = &args.serve {
        return runtime.block_on(memory::serve_for_measurement(config));
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let directory = tempfile_directory()?;
    settle_disk();
    report::header();

    if args.memory_only {
        return report::memory_table(&directory, args.memory_requests).await;
    }
    report::policy_evaluation_table();

    let mut backends = Vec::new();
    if !args.skip_sqlite {
        backends.push(Backend::Sqlite);
    }
    if !args.skip_postgres {
        backends.push(Backend::Postgres);
    }
    for backend in backends {
        let database = Database::create(backend, &directory, &args.postgres_url).await?;
        report::backend_heading(backend);
        if !args.probe_rates.is_empty() {
            report::probe_table(&args, backend, &database, &directory).await?;
        } else if let Some(samples) = args.teams_ack_only {
            report::teams_ack_table(&args, &database, &directory, samples).await?;
        } else if let Some(calls) = args.mcp_proxy {
            report::mcp_proxy_table(&args, &database, &directory, calls).await?;
        } else if let Some(rounds) = args.quota_cost {
            report::quota_cost_table(&args, &database, &directory, rounds).await?;
        } else {
            report::backend_table(&args, backend, &database, &directory).await?;
        }
        database.drop_scratch().await;
    }
    if !args.saturation_only
        && args.probe_rates.is_empty()
        && args.teams_ack_only.is_none()
        && args.mcp_proxy.is_none()
    {
        report::memory_table(&directory, args.memory_requests).await?;
    }
    Ok(())
}
