//! The Markdown report: every table in the order a run prints it, each row printed as soon
//! as its measurement ends, and the formatting helpers (`tail`, `micros`).

use std::path::Path;

use hdrhistogram::Histogram;

use crate::floors::{disk_sync_under_load, floor_under_load, floors};
use crate::harness::{
    auto_allowed, cpu_model, intakes, num_cpus, settle_disk, Backend, Database, Harness,
};
use crate::latency::{max_sustainable_rate, P99_CEILING, THROUGHPUT_CEILING};
use crate::saturation::SATURATION_CLIENTS;
use crate::{latency, memory, saturation, Args};

/// The title, the machine, and what "sustainable" means in every table.
pub fn header() {
    println!("# signoff-bench\n");
    println!("machine: {} cores, {}", num_cpus(), cpu_model());
    println!("latency: open loop, from intended send time; sustainable = no errors and p99 < {P99_CEILING:?}\n");
}

/// p50/p99 of one evaluation, for policies of 10, 100 and 1,000 rules.
pub fn policy_evaluation_table() {
    println!("## Policy evaluation\n\n| rules | p50 | p99 |\n|---|---|---|");
    for (rules, p50, p99) in latency::policy_evaluation() {
        println!(
            "| {rules} | {:.2} µs | {:.2} µs |",
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0
        );
    }
    println!();
}

/// The heading of a backend's section.
pub fn backend_heading(backend: Backend) {
    println!("## {backend:?}\n");
}

/// A backend's table: the floors, the HTTP ceiling, each intake at saturation and at the
/// highest sustainable rates against the floors, then long-poll wake and Slack click latency.
pub async fn backend_table(
    args: &Args,
    backend: Backend,
    database: &Database,
    directory: &Path,
) -> anyhow::Result<()> {
    let floors = floors(backend, database, args.floor_rows).await?;
    let harness = Harness::start(args, database, directory, args.quotas_on).await?;
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
            |rate| floor_under_load(database, rate, args.step_seconds),
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
            let directory = directory.to_path_buf();
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
        let light = floor_under_load(database, 50.0, args.step_seconds * 2.0).await;
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
        "| HTTP ceiling: GET /healthz, {SATURATION_CLIENTS} clients back to back | {:.0} req/s ({}; {}) | | |",
        health.rate,
        p50_p99(&health.histogram),
        health.cpu(),
    );
    for (name, body) in intakes() {
        let saturated = harness
            .saturation(&body, SATURATION_CLIENTS, args.step_seconds * 2.0)
            .await;
        println!(
            "| {name}: {SATURATION_CLIENTS} clients back to back | {:.0} req/s ({} · errors {}; {}) | {floor:.0} rows/s | {:.2}x |",
            saturated.rate,
            p50_p99(&saturated.histogram),
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
        return Ok(());
    }
    let wake = harness.wake_latency(200).await?;
    println!(
        "| long-poll wake (commit to answer) | {} | | |",
        p50_p99(&wake)
    );
    let ack = harness.slack_ack_latency(200).await?;
    println!(
        "| Slack approve click to HTTP answer | {} | | |\n",
        p50_p99(&ack)
    );
    harness.stop().await;
    Ok(())
}

/// Auto-allowed intake at each of `--probe-rates`, every attempt printed.
pub async fn probe_table(
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
    let body = auto_allowed();
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

/// The quotas' cost on intake (`--quota-cost`): the median server CPU per request of each
/// arm, their ratio, and the checks alone as a share of a request.
pub async fn quota_cost_table(
    args: &Args,
    database: &Database,
    directory: &Path,
    rounds: usize,
) -> anyhow::Result<()> {
    let saturation::QuotaCost { intakes, checks } =
        saturation::quota_cost(args, database, directory, rounds).await?;
    println!("| quota cost: server CPU per request | quotas off | quotas on | on / off |\n|---|---|---|---|");
    for (name, arms) in &intakes {
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

/// The Teams click acknowledgement beside Slack's, and the token verification's share.
pub async fn teams_ack_table(
    args: &Args,
    database: &Database,
    directory: &Path,
    samples: usize,
) -> anyhow::Result<()> {
    let crate::teams_ack::TeamsAck {
        teams,
        slack,
        verify,
    } = crate::teams_ack::measure(args, database, directory, samples).await?;
    let ratio = |quantile: f64| {
        teams.value_at_quantile(quantile) as f64 / slack.value_at_quantile(quantile).max(1) as f64
    };
    println!("| click acknowledgement ({samples} each) | latency | Teams / Slack |\n|---|---|---|");
    println!(
        "| Slack approve click to HTTP answer (baseline) | {} | |",
        p50_p99(&slack)
    );
    println!(
        "| Teams approve invoke to HTTP answer with the card | {} | p50 {:.2} · p99 {:.2} |",
        p50_p99(&teams),
        ratio(0.5),
        ratio(0.99)
    );
    println!(
        "| Teams token verification alone (cached keys) | {} | {:.1} % of the invoke's p50 |\n",
        p50_p99(&verify),
        verify.value_at_quantile(0.5) as f64 / teams.value_at_quantile(0.5).max(1) as f64 * 100.0
    );
    Ok(())
}

/// What `signoff mcp-proxy` adds to an allowed call (`--mcp-proxy`): p50 and p99 of a call
/// straight to the upstream, through the proxy, and of signoff's intake alone, then the
/// proxy's addition and what remains of it beyond the intake answer.
pub async fn mcp_proxy_table(
    args: &Args,
    database: &Database,
    directory: &Path,
    calls: usize,
) -> anyhow::Result<()> {
    let latency = crate::mcp_proxy::measure(args, database, directory, calls).await?;
    let percentile = |samples: &[std::time::Duration], quantile: f64| -> f64 {
        let mut sorted: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        sorted.sort_by(f64::total_cmp);
        let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
        sorted.get(index).copied().unwrap_or(f64::NAN)
    };
    let row = |name: &str, samples: &[std::time::Duration]| {
        println!(
            "| {name} | {:.3} ms | {:.3} ms |",
            percentile(samples, 0.5),
            percentile(samples, 0.99)
        );
    };
    println!("| mcp-proxy, allowed call ({calls} each, interleaved) | p50 | p99 |\n|---|---|---|");
    row("client -> upstream (direct)", &latency.direct);
    row("client -> proxy -> signoff -> upstream", &latency.proxied);
    row(
        "signoff intake alone (POST /v1/requests, allowed)",
        &latency.intake,
    );
    for (label, quantile) in [("p50", 0.5), ("p99", 0.99)] {
        let direct = percentile(&latency.direct, quantile);
        let proxied = percentile(&latency.proxied, quantile);
        let intake = percentile(&latency.intake, quantile);
        println!(
            "| {label}: proxy adds {:.3} ms over direct; beyond the intake answer {:.3} ms (target p99 < 1 ms) | | |",
            proxied - direct,
            proxied - direct - intake
        );
    }
    println!();
    Ok(())
}

/// Resident memory of the server process, idle and with `pending` requests.
pub async fn memory_table(directory: &Path, pending: usize) -> anyhow::Result<()> {
    let memory::Resident { idle, loaded } = memory::resident(directory, pending).await?;
    println!("## Memory (server process, SQLite)\n\n| state | resident |\n|---|---|");
    println!("| idle | {:.1} MB |", idle as f64 / 1024.0);
    println!(
        "| {pending} pending requests | {:.1} MB |\n",
        loaded as f64 / 1024.0
    );
    Ok(())
}

/// `p50 · p99` of a latency histogram in microseconds.
pub fn p50_p99(histogram: &Histogram<u64>) -> String {
    format!(
        "p50 {} · p99 {}",
        micros(histogram.value_at_quantile(0.5)),
        micros(histogram.value_at_quantile(0.99))
    )
}

/// `p50 · p99 · p99.9 · max` of a latency histogram in microseconds.
pub fn tail(histogram: &Histogram<u64>) -> String {
    format!(
        "{} · p99.9 {} · max {}",
        p50_p99(histogram),
        micros(histogram.value_at_quantile(0.999)),
        micros(histogram.max())
    )
}

pub fn micros(value: u64) -> String {
    if value >= 1000 {
        format!("{:.2} ms", value as f64 / 1000.0)
    } else {
        format!("{value} µs")
    }
}

pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        length if length % 2 == 1 => sorted[length / 2],
        length => (sorted[length / 2 - 1] + sorted[length / 2]) / 2.0,
    }
}
