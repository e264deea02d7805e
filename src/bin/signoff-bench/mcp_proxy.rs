//! `--mcp-proxy N`: what `signoff mcp-proxy` adds to an allowed tool call. In one run, N
//! calls each way, interleaved: an MCP client straight to the upstream server, the same
//! client through the proxy (proxy -> signoff -> upstream), and signoff's own intake answer
//! for the same kind of request; p50 and p99 of each and of the differences.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt as _};
use serde_json::json;

use crate::harness::{Database, Harness};
use crate::Args;

/// The upstream's tool: the proxy submits `mcp.get`, which the bench policy's `reads`
/// rule allows at once.
const TOOL: &str = "get";

pub struct ProxyLatency {
    pub direct: Vec<Duration>,
    pub proxied: Vec<Duration>,
    pub intake: Vec<Duration>,
}

/// The `signoff` binary and the recording example beside this benchmark's binary.
fn sibling_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let bench = std::env::current_exe()?;
    let directory = bench.parent().context("the benchmark's directory")?;
    let signoff = directory.join(format!("signoff{}", std::env::consts::EXE_SUFFIX));
    let upstream = directory.join("examples").join(format!(
        "mcp_recording_server{}",
        std::env::consts::EXE_SUFFIX
    ));
    for binary in [&signoff, &upstream] {
        if !binary.exists() {
            bail!(
                "{} is missing: build it with the same profile first \
                 (cargo build [--release] --bin signoff --example mcp_recording_server)",
                binary.display()
            );
        }
    }
    Ok((signoff, upstream))
}

async fn connect(
    command: tokio::process::Command,
) -> anyhow::Result<RunningService<RoleClient, ()>> {
    Ok(().serve(TokioChildProcess::new(command)?).await?)
}

async fn timed_call(
    client: &RunningService<RoleClient, ()>,
    call: u64,
) -> anyhow::Result<Duration> {
    let arguments = json!({"call": call});
    let serde_json::Value::Object(arguments) = arguments else {
        unreachable!("a literal object")
    };
    let started = Instant::now();
    let result = client
        .call_tool(CallToolRequestParams::new(TOOL).with_arguments(arguments))
        .await?;
    let elapsed = started.elapsed();
    if result.is_error == Some(true) {
        bail!("the call was refused: {:?}", result.content);
    }
    Ok(elapsed)
}

pub async fn measure(
    args: &Args,
    database: &Database,
    directory: &Path,
    calls: usize,
) -> anyhow::Result<ProxyLatency> {
    let (signoff, upstream) = sibling_binaries()?;
    let harness = Harness::start(args, database, directory, false).await?;
    let direct = connect(tokio::process::Command::new(&upstream)).await?;
    let mut proxy_command = tokio::process::Command::new(&signoff);
    proxy_command
        .args([
            "mcp-proxy",
            "--url",
            &harness.base_url,
            "--key",
            &harness.key,
        ])
        .arg("--")
        .arg(&upstream);
    let proxied = connect(proxy_command).await?;
    let intake_body = json!({"action": format!("mcp.{TOOL}"), "args": {"call": 0}});
    // Warm up every path (connections, caches) before measuring.
    for call in 0..20 {
        timed_call(&direct, call).await?;
        timed_call(&proxied, call).await?;
        harness.submit(&intake_body).await?;
    }
    let mut latency = ProxyLatency {
        direct: Vec::with_capacity(calls),
        proxied: Vec::with_capacity(calls),
        intake: Vec::with_capacity(calls),
    };
    for call in 0..calls as u64 {
        latency.direct.push(timed_call(&direct, call).await?);
        latency.proxied.push(timed_call(&proxied, call).await?);
        let body = json!({"action": format!("mcp.{TOOL}"), "args": {"call": call}});
        let started = Instant::now();
        harness.submit(&body).await?;
        latency.intake.push(started.elapsed());
    }
    let _ = direct.cancel().await;
    let _ = proxied.cancel().await;
    harness.stop().await;
    Ok(latency)
}
