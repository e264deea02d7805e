//! `--policy-cost ROUNDS`: what counters and grants cost intake. Each round measures, in
//! one server, auto-allowed intake (the baseline), intake allowed by a `recent_count` rule
//! and intake approved by an active grant, at saturation; the report gives each one's
//! server CPU per request relative to the baseline of the same round.

use std::path::Path;

use serde_json::{json, Value};
use signoff::domain::{GrantAsk, VoteRequest, Voter};

use crate::harness::{auto_allowed, Database, Harness};
use crate::report::median;
use crate::saturation::SATURATION_CLIENTS;
use crate::Args;

/// The bench policy plus a counter rule and a tier that grants.
const POLICY_COST_POLICY: &str = r#"version: 1
default: deny
tiers:
  medium:
    route: ["slack:C0BENCH"]
    approvers: ["slack:U0BENCH", "cli:bench"]
    ttl: 1h
    grants: {max_ttl: 8h, max_uses: 1000000000}
rules:
  - name: reads
    match: ["*.get"]
    effect: allow
  - name: counted
    match: ["metrics.push"]
    when: "recent_count('1h') < 1000000000"
    effect: allow
  - name: restarts
    match: ["ops.restart"]
    effect: require_approval
    tier: medium
"#;

fn counted() -> Value {
    json!({"action": "metrics.push", "args": {"id": 42}})
}

fn granted() -> Value {
    json!({"action": "ops.restart", "args": {"service": "web"}})
}

/// Server CPU per request in microseconds, one sample per round, per intake.
pub struct PolicyCost {
    pub intakes: Vec<(&'static str, Vec<f64>)>,
}

pub async fn policy_cost(
    args: &Args,
    database: &Database,
    directory: &Path,
    rounds: usize,
) -> anyhow::Result<PolicyCost> {
    let names = [
        "auto-allowed intake (baseline)",
        "intake allowed by a recent_count rule",
        "intake approved by an active grant",
    ];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        let harness =
            Harness::start_with_policy(args, database, directory, false, POLICY_COST_POLICY)
                .await?;
        grant_for_the_agent(&harness).await?;
        let bodies = [auto_allowed(), counted(), granted()];
        // The order rotates per round, so no intake always runs on a warmer or fuller table.
        for offset in 0..bodies.len() {
            let index = (offset + round) % bodies.len();
            let saturated = harness
                .saturation(&bodies[index], SATURATION_CLIENTS, args.step_seconds * 2.0)
                .await;
            if saturated.errors > 0 {
                anyhow::bail!("{}: {} errors", names[index], saturated.errors);
            }
            cpu[index].push(saturated.cpu_per_request.server.as_secs_f64() * 1e6);
        }
        harness.stop().await;
    }
    Ok(PolicyCost {
        intakes: names.into_iter().zip(cpu).collect(),
    })
}

/// One `ops.restart` approved by `cli:bench` with a grant that outlasts the run.
async fn grant_for_the_agent(harness: &Harness) -> anyhow::Result<()> {
    let response: Value = harness
        .http
        .post(format!("{}/v1/requests", harness.base_url))
        .bearer_auth(&harness.key)
        .json(&granted())
        .send()
        .await?
        .json()
        .await?;
    let id = response["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no request id: {response}"))?;
    let voter = Voter::new("cli:bench".parse()?);
    harness
        .server
        .engine()
        .record_vote_asking_grant(
            id,
            &voter,
            VoteRequest::Approve { note: None },
            None,
            Some(GrantAsk {
                ttl_seconds: 8 * 3600,
                uses: None,
                when: None,
            }),
        )
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok(())
}

/// The table: each intake's median server CPU per request and its ratio to the baseline.
pub fn print_table(cost: &PolicyCost, rounds: usize) {
    println!("| policy cost: server CPU per request | samples (µs) | median | / baseline |\n|---|---|---|---|");
    let baseline = cost
        .intakes
        .first()
        .map_or(f64::NAN, |(_, samples)| median(samples));
    for (name, samples) in &cost.intakes {
        let list = samples
            .iter()
            .map(|micros| format!("{micros:.0}"))
            .collect::<Vec<_>>()
            .join(" · ");
        let middle = median(samples);
        println!(
            "| {name} ({rounds} rounds) | {list} | {middle:.0} µs | {:.3} |",
            middle / baseline
        );
    }
    println!();
}
