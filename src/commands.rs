//! What each CLI subcommand does, given parsed arguments; `main.rs` only parses and dispatches.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::audit::AuditHead;
use crate::config::Config;
use crate::domain::{
    ApprovalRequest, GrantAsk, Principal, Status, VoteEffect, VoteKind, VoteRequest, Voter,
};
use crate::engine::load_policy;
use crate::engine::{Engine, EngineError};
use crate::policy::{EvaluationInput, Policy};
use crate::server::{build_engine, RunningServer};
use crate::store::{self, RequestFilter};

/// `println!` that returns write errors (a closed pipe) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

/// Prints a line to stdout; a closed pipe is an error the caller can ignore.
pub fn print(text: &str) -> anyhow::Result<()> {
    writeln!(std::io::stdout(), "{text}")?;
    Ok(())
}

/// How long in-flight requests get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

pub async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let server = RunningServer::start(config).await?;
    out!("signoff listening on http://{}", server.address());
    wait_for_termination(&server).await?;
    tracing::info!("shutting down");
    server.shutdown(SHUTDOWN_GRACE).await;
    Ok(ExitCode::SUCCESS)
}

/// Returns on SIGTERM or Ctrl-C; SIGHUP reloads the policy (a bad one is refused and logged).
async fn wait_for_termination(server: &RunningServer) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => {
                if let Err(error) = server.reload_policy() {
                    tracing::error!(error = format!("{error:#}"), "policy reload refused; keeping the current policy");
                }
            }
        }
    }
}

pub async fn migrate(config: Config) -> anyhow::Result<ExitCode> {
    let store = store::connect(&config).await?;
    store
        .migrate()
        .await
        .context("applying database migrations")?;
    out!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

pub fn policy_check(path: &Path) -> anyhow::Result<ExitCode> {
    let source =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match Policy::parse(&source) {
        Ok(policy) => {
            out!(
                "{}: ok ({} rules, {} tiers, {})",
                path.display(),
                policy.rule_count(),
                policy.tiers().len(),
                policy.hash()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            for issue in &error.issues {
                eprintln!("{}: {issue}", path.display());
            }
            eprintln!("{}: {} error(s)", path.display(), error.issues.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn policy_explain(
    path: &Path,
    action: &str,
    args: Option<&str>,
    agent: Option<&str>,
    context: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let policy = crate::engine::load_policy(path)?;
    let args = parse_json_object("--args", args)?;
    let context = parse_json_object("--context", context)?;
    // No history: counters read 0; sampled rules show their rate.
    let verdict = policy.evaluate(EvaluationInput {
        action,
        args: &args,
        agent: agent.unwrap_or(""),
        context: &context,
    });
    out!(
        "{}",
        serde_json::to_string_pretty(&verdict.explain(policy.hash()))?
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn agents_add(config: Config, name: &str, owners: &[String]) -> anyhow::Result<ExitCode> {
    let owners = owners
        .iter()
        .map(|owner| {
            owner
                .parse::<Principal>()
                .map_err(|error| anyhow::anyhow!("--owner: {error}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let engine = operator_engine(&config).await?;
    let credentials = engine
        .create_agent(name, owners)
        .await
        .map_err(user_error)?;
    out!("{}", serde_json::to_string(&credentials)?);
    Ok(ExitCode::SUCCESS)
}

pub async fn agents_list(config: Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let engine = operator_engine(&config).await?;
    let agents = engine.list_agents().await?;
    if as_json {
        let listed: Vec<Value> = agents
            .iter()
            .map(|agent| {
                json!({
                    "agent": agent.name,
                    "owners": agent.owners,
                    "created_at": agent.created_at,
                    "revoked_at": agent.revoked_at,
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    if agents.is_empty() {
        out!("no agents; create one with `signoff agents add NAME`");
    }
    for agent in agents {
        let owners: Vec<&str> = agent.owners.iter().map(Principal::as_str).collect();
        let state = match agent.revoked_at {
            Some(at) => format!("revoked {}", at.to_rfc3339()),
            None => "active".into(),
        };
        out!(
            "{}\t{}\towners: {}\tcreated {}",
            agent.name,
            state,
            if owners.is_empty() {
                "-".to_string()
            } else {
                owners.join(",")
            },
            agent.created_at.to_rfc3339()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn agents_revoke(config: Config, name: &str) -> anyhow::Result<ExitCode> {
    let engine = operator_engine(&config).await?;
    engine.revoke_agent(name).await.map_err(user_error)?;
    out!("agent {name} revoked; its API key no longer works");
    Ok(ExitCode::SUCCESS)
}

pub async fn pending(config: Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let policy = listing_policy(&config)?;
    let engine = operator_engine(&config).await?;
    let requests: Vec<ApprovalRequest> = engine
        .list_requests(RequestFilter {
            status: Some(Status::Pending),
            agent: None,
            limit: 1000,
        })
        .await?
        .iter()
        .map(|request| policy.redacted(request))
        .collect();
    if as_json {
        let listed: Vec<Value> = requests
            .iter()
            .map(listed_request)
            .collect::<Result<_, _>>()?;
        out!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    if requests.is_empty() {
        out!("no pending requests");
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "{:<30}  {:<16}  {:<24}  {:<8}  {:<9}  EXPIRES",
        "ID",
        "AGENT",
        "ACTION",
        "TIER",
        "APPROVALS"
    );
    for request in requests {
        out!(
            "{:<30}  {:<16}  {:<24}  {:<8}  {:<9}  {}",
            request.id,
            request.agent,
            request.action,
            request.tier.as_deref().unwrap_or("-"),
            approvals_text(&request),
            request
                .expires_at
                .map(|at| at.to_rfc3339())
                .unwrap_or_else(|| "-".into()),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(config: Config, id: &str) -> anyhow::Result<ExitCode> {
    let policy = listing_policy(&config)?;
    let engine = operator_engine(&config).await?;
    let request = engine.request(id).await.map_err(user_error)?;
    out!(
        "{}",
        serde_json::to_string_pretty(&listed_request(&policy.redacted(&request))?)?
    );
    Ok(ExitCode::SUCCESS)
}

/// The policy whose `redact` paths listings apply. Without it nobody can tell which
/// values must not be shown, so listings refuse rather than show them.
fn listing_policy(config: &Config) -> anyhow::Result<Policy> {
    load_policy(&config.policy).context(
        "listings show args and context redacted under the policy's `redact` paths, so they need the policy",
    )
}

/// A (redacted) request object as listings print it: with a per-group quorum, also
/// `group_progress`, each group's approvals so far and approvals required.
fn listed_request(request: &ApprovalRequest) -> anyhow::Result<Value> {
    let mut listed = serde_json::to_value(request)?;
    let progress = request.group_progress();
    if let (false, Some(object)) = (progress.is_empty(), listed.as_object_mut()) {
        let by_group: serde_json::Map<String, Value> = progress
            .iter()
            .map(|group| {
                (
                    group.group.clone(),
                    json!({"approvals": group.filled, "required": group.required}),
                )
            })
            .collect();
        object.insert("group_progress".into(), Value::Object(by_group));
    }
    Ok(listed)
}

/// `1/2`, and per group for a per-group quorum: `1/2 (finance 1/1 · sre 0/1)`.
fn approvals_text(request: &ApprovalRequest) -> String {
    let progress = request.group_progress();
    let mut text = format!(
        "{}/{}",
        request.approvals_counted(),
        request.approvals_required
    );
    if !progress.is_empty() {
        let groups: Vec<String> = progress
            .iter()
            .map(|group| format!("{} {}/{}", group.group, group.filled, group.required))
            .collect();
        text.push_str(&format!(" ({})", groups.join(" · ")));
    }
    text
}

/// approve / deny / modify from the command line, under the same rules as chat. Operators
/// act as themselves (`cli:NAME`): a chat or email principal would let anyone with shell
/// access vote as someone else.
pub async fn vote(
    config: Config,
    id: &str,
    principal: &str,
    vote: VoteRequest,
    revision: Option<u32>,
) -> anyhow::Result<ExitCode> {
    vote_asking_grant(config, id, principal, vote, revision, None).await
}

/// `approve --grant`: the vote asks for a standing grant; see `Engine::record_vote_asking_grant`.
pub async fn approve_with_grant(
    config: Config,
    id: &str,
    principal: &str,
    vote: VoteRequest,
    revision: Option<u32>,
    ask: GrantAsk,
) -> anyhow::Result<ExitCode> {
    let code = vote_asking_grant(config.clone(), id, principal, vote, revision, Some(ask)).await?;
    let engine = operator_engine(&config).await?;
    let created = engine
        .list_grants(None)
        .await?
        .into_iter()
        .find(|grant| grant.request_id == id);
    match created {
        Some(grant) => out!(
            "grant {} created: {}",
            grant.id,
            serde_json::to_string(&grant)?
        ),
        None => {
            out!("no grant yet: it is created once every approval of the decision asks for one")
        }
    }
    Ok(code)
}

/// `--grant DURATION [--grant-uses N] [--grant-when CEL]` as a grant request.
pub fn grant_ask(
    duration: &str,
    uses: Option<u32>,
    when: Option<String>,
) -> anyhow::Result<GrantAsk> {
    let ttl = humantime::parse_duration(duration).map_err(|error| {
        anyhow::anyhow!("--grant {duration:?} is not a duration like 4h: {error}")
    })?;
    Ok(GrantAsk {
        ttl_seconds: ttl.as_secs(),
        uses,
        when,
    })
}

pub async fn grants_list(config: Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let engine = operator_engine(&config).await?;
    let grants = engine.list_grants(None).await?;
    if as_json {
        out!("{}", serde_json::to_string_pretty(&grants)?);
        return Ok(ExitCode::SUCCESS);
    }
    if grants.is_empty() {
        out!("no grants");
    }
    let now = crate::domain::now();
    for grant in grants {
        let state = match grant.revoked_at {
            Some(at) => format!("revoked {}", at.to_rfc3339()),
            None if grant.expires_at <= now => "expired".into(),
            None if grant.uses_left == 0 => "spent".into(),
            None => "active".into(),
        };
        out!(
            "{}\t{}\t{}\t{}\ttier {}\t{} uses left\texpires {}\t{}",
            grant.id,
            grant.agent,
            grant.action,
            state,
            grant.tier,
            grant.uses_left,
            grant.expires_at.to_rfc3339(),
            grant.when.as_deref().unwrap_or("same args"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn grants_revoke(config: Config, id: &str, principal: &str) -> anyhow::Result<ExitCode> {
    let principal = operator_principal(principal)?;
    let engine = build_engine(&config).await?;
    let grant = engine
        .revoke_grant(id, &Voter::new(principal.clone()))
        .await
        .map_err(user_error)?;
    out!("grant {} revoked by {principal}", grant.id);
    Ok(ExitCode::SUCCESS)
}

/// `--as cli:NAME`: operators act as themselves.
fn operator_principal(principal: &str) -> anyhow::Result<Principal> {
    let principal: Principal = principal
        .parse()
        .map_err(|error| anyhow::anyhow!("--as: {error}"))?;
    if principal.kind() != "cli" {
        anyhow::bail!(
            "--as {principal}: operators vote as themselves, with a cli: principal (--as cli:NAME); \
             chat and email principals vote through their own channel"
        );
    }
    Ok(principal)
}

async fn vote_asking_grant(
    config: Config,
    id: &str,
    principal: &str,
    vote: VoteRequest,
    revision: Option<u32>,
    grant: Option<GrantAsk>,
) -> anyhow::Result<ExitCode> {
    let principal = operator_principal(principal)?;
    let engine = build_engine(&config).await?;
    let (request, effect) = engine
        .record_vote_asking_grant(
            id,
            &Voter::new(principal.clone()),
            vote.clone(),
            revision,
            grant,
        )
        .await
        .map_err(user_error)?;
    let revision_note = format!("revision {}", request.revision);
    match effect {
        VoteEffect::Counted {
            approvals,
            required,
        } => {
            let verb = match (&vote, request.votes.last().map(|vote| vote.vote)) {
                (VoteRequest::Modify { .. }, Some(VoteKind::Approve)) => {
                    "modified (a new revision; this counts as your approval)"
                }
                (VoteRequest::Modify { .. }, _) => {
                    "modified (a new revision; you do not approve its tier, so this is not an approval)"
                }
                _ => "approved",
            };
            out!("{principal} {verb} {id} ({revision_note}): {approvals} of {required} approvals; still pending")
        }
        VoteEffect::Decided(status) => out!("{id} is now {} ({revision_note})", status.as_str()),
    }
    if let Some(tier) = request.tier.as_deref() {
        if matches!(vote, VoteRequest::Modify { .. }) {
            out!("tier: {tier}");
        }
    }
    // What was voted on, so the operator sees exactly what they approved.
    let shown = engine.policy().redacted(&request);
    match request.status {
        Status::Approved => out!("final args: {}", shown.args),
        _ => out!("args: {}", shown.args),
    }
    Ok(ExitCode::SUCCESS)
}

/// Recomputes the chain; with `head` (an earlier `audit head`), also requires the trail to
/// still hold it. Exit 1 naming the first bad sequence number otherwise.
pub async fn audit_verify(config: Config, head: Option<&str>) -> anyhow::Result<ExitCode> {
    // A mistyped head is the operator's error, found before any work.
    let head = head
        .map(|text| AuditHead::parse(text).map_err(|error| anyhow::anyhow!("--head: {error}")))
        .transpose()?;
    let engine = operator_engine(&config).await?;
    let count = match engine.verify_audit_chain().await? {
        Ok(count) => count,
        Err(broken) => {
            out!("{broken}");
            out!("first bad seq: {}", broken.seq);
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(head) = &head {
        if let Err(broken) = engine.check_audit_head(head).await? {
            out!("{broken}");
            out!("first bad seq: {}", broken.seq);
            return Ok(ExitCode::FAILURE);
        }
        out!(
            "audit chain intact: {count} events verified; it still holds the head at seq {}",
            head.seq
        );
    } else {
        out!("audit chain intact: {count} events verified");
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `{"seq":N,"hash":"..."}` of the last event (seq 0 and the genesis hash while the
/// trail is empty), to be kept outside the database for `audit verify --head`.
pub async fn audit_head(config: Config) -> anyhow::Result<ExitCode> {
    let engine = operator_engine(&config).await?;
    let head = engine.audit_head().await?;
    out!("{}", serde_json::to_string(&head)?);
    Ok(ExitCode::SUCCESS)
}

pub async fn audit_export(config: Config) -> anyhow::Result<ExitCode> {
    let engine = operator_engine(&config).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    engine
        .export_audit(|event| {
            serde_json::to_writer(&mut out, event)?;
            out.write_all(b"\n")?;
            Ok(())
        })
        .await?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The engine for commands that read or manage but never evaluate or vote: they must work
/// even where the policy file is not at hand, so they run under a deny-everything policy.
async fn operator_engine(config: &Config) -> anyhow::Result<Engine> {
    let store = store::connect(config).await?;
    store
        .migrate()
        .await
        .context("applying database migrations")?;
    let policy = Policy::parse("version: 1\ndefault: deny\n")
        .map_err(|error| anyhow::anyhow!("built-in policy: {error}"))?;
    Ok(Engine::new(store, policy))
}

/// Engine refusals become one readable line for the operator.
fn user_error(error: EngineError) -> anyhow::Error {
    match error {
        EngineError::NotFound => anyhow::anyhow!("no such request"),
        other => anyhow::anyhow!("{other}"),
    }
}

pub fn parse_json_object(flag: &str, text: Option<&str>) -> anyhow::Result<Value> {
    let Some(text) = text else {
        return Ok(json!({}));
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|error| anyhow::anyhow!("{flag} is not valid JSON: {error}"))?;
    if !value.is_object() {
        anyhow::bail!("{flag} must be a JSON object");
    }
    Ok(value)
}

/// Exit status of `signoff request` for a request in this state.
pub fn request_exit_code(request: &ApprovalRequest) -> u8 {
    match request.status {
        Status::Approved => 0,
        Status::Denied => 2,
        Status::Expired | Status::Cancelled => 3,
        Status::Pending => 4,
    }
}
