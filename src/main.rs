//! The `signoff` command line: parse arguments, load config, call into the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use signoff::config::Config;
use signoff::domain::VoteRequest;
use signoff::{client, commands};

/// glibc's allocator spent a fifth of the CPU at saturation (contended arenas,
/// `malloc_consolidate`); mimalloc's per-thread heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "signoff", version, about = "Approval gateway for AI agents")]
struct Cli {
    /// Config file (TOML). Default: $SIGNOFF_CONFIG, else built-in defaults.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (applies migrations first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Validate or explain a policy file.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Create, list and revoke agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// List pending requests.
    Pending {
        /// Print a JSON array of request objects.
        #[arg(long)]
        json: bool,
    },
    /// Print one request as JSON.
    Show { id: String },
    /// Vote approve as an operator (`--as cli:NAME`; operators act as themselves).
    Approve {
        id: String,
        #[arg(long = "as", value_name = "cli:NAME")]
        principal: String,
        #[arg(long)]
        note: Option<String>,
        /// Refuse unless N is the request's current revision (what you reviewed).
        #[arg(long, value_name = "N")]
        revision: Option<u32>,
    },
    /// Vote deny; a reason is required.
    Deny {
        id: String,
        #[arg(long = "as", value_name = "cli:NAME")]
        principal: String,
        #[arg(long)]
        reason: String,
        /// Refuse unless N is the request's current revision.
        #[arg(long, value_name = "N")]
        revision: Option<u32>,
    },
    /// Replace the args of a pending request: a new revision, checked against the policy
    /// again (counts as your approval where you approve the resulting tier).
    Modify {
        id: String,
        #[arg(long = "as", value_name = "cli:NAME")]
        principal: String,
        /// The new args, a JSON object.
        #[arg(long)]
        args: String,
        #[arg(long)]
        note: Option<String>,
        /// Refuse unless N is the request's current revision.
        #[arg(long, value_name = "N")]
        revision: Option<u32>,
    },
    /// Verify or export the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Submit an action as an agent and wait for the outcome. Exit 0 approved, 2 denied,
    /// 3 expired or cancelled, 4 still pending after --wait, 1 error.
    Request {
        #[arg(long, env = "SIGNOFF_URL")]
        url: String,
        #[arg(long, env = "SIGNOFF_API_KEY", hide_env_values = true)]
        key: String,
        #[arg(long)]
        action: String,
        /// JSON object.
        #[arg(long)]
        args: Option<String>,
        /// JSON object: summary, reason, reversible, links.
        #[arg(long)]
        context: Option<String>,
        #[arg(long, value_name = "PRINCIPAL")]
        on_behalf_of: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// How long to wait for a decision: 30s, 5m, 1h or plain seconds. Default 0.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// An MCP gateway on stdio in front of an upstream MCP server: every tool call is
    /// submitted to signoff as PREFIX + tool and runs only once allowed or approved.
    McpProxy {
        #[arg(long, env = "SIGNOFF_URL")]
        url: String,
        #[arg(long, env = "SIGNOFF_API_KEY", hide_env_values = true)]
        key: String,
        /// Put before each tool's name to make the action, e.g. `mcp.` + `send_email`.
        #[arg(long, default_value = "mcp.")]
        prefix: String,
        /// How long one call waits for people to decide: 30s, 5m, 1h or plain seconds.
        #[arg(long, value_name = "DURATION", default_value = "10m")]
        wait: String,
        /// How often a waiting call reports progress (when the client asked for it).
        #[arg(long, value_name = "DURATION", default_value = "10s", hide = true)]
        progress_every: String,
        /// The upstream MCP server's command and its arguments.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy: exit 0, or 1 with every error naming rule and line.
    Check { file: PathBuf },
    /// Print the verdict and every matching rule as JSON.
    Explain {
        file: PathBuf,
        #[arg(long)]
        action: String,
        #[arg(long)]
        args: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        context: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Create an agent and print its API key and webhook secret once.
    Add {
        name: String,
        /// A principal who owns the agent; owners may never approve its requests.
        #[arg(long = "owner", value_name = "PRINCIPAL")]
        owners: Vec<String>,
    },
    /// List agents.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its API key stops working at once.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain: exit 0 intact, 1 with the first bad sequence number.
    Verify {
        /// An earlier output of `audit head`, `{"seq":N,"hash":"..."}`: event N must still
        /// carry that hash (catches a trail cut short or rewritten and rehashed).
        #[arg(long, value_name = "JSON")]
        head: Option<String>,
    },
    /// Print `{"seq":N,"hash":"..."}` of the last event, to keep outside the database.
    Head,
    /// Print every event as JSON Lines.
    Export,
}

fn main() -> ExitCode {
    // Usage errors exit 1 (clap's own default, 2, means "denied" for `signoff request`).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // A blocked stdin read (mcp-proxy's) must not keep the process alive once done.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => code,
        // A closed pipe (`signoff pending --json | head`) is the reader's choice, not an error.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(format) = cli.log_format.as_deref() {
        if !matches!(format, "text" | "json") {
            anyhow::bail!("--log-format must be text or json, not {format:?}");
        }
    }
    // Commands that need no config must not fail on a broken one.
    match &cli.command {
        Command::Policy(PolicyCommand::Check { file }) => return commands::policy_check(file),
        Command::Policy(PolicyCommand::Explain {
            file,
            action,
            args,
            agent,
            context,
        }) => {
            return commands::policy_explain(
                file,
                action,
                args.as_deref(),
                agent.as_deref(),
                context.as_deref(),
            )
        }
        Command::McpProxy {
            url,
            key,
            prefix,
            wait,
            progress_every,
            command,
        } => {
            // stdout carries protocol messages only; logs go to stderr.
            init_logging(cli.log_format.as_deref().unwrap_or("text"), "warn");
            signoff::mcp::proxy::run(signoff::mcp::proxy::ProxyOptions {
                url: url.clone(),
                key: key.clone(),
                prefix: prefix.clone(),
                wait: parse_wait(wait)?,
                progress_every: parse_wait(progress_every)?,
                command: command.clone(),
            })
            .await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Request {
            url,
            key,
            action,
            args,
            context,
            on_behalf_of,
            idempotency_key,
            wait,
        } => {
            init_logging(cli.log_format.as_deref().unwrap_or("text"), "warn");
            let wait = match wait {
                Some(text) => parse_wait(text)?,
                None => Duration::ZERO,
            };
            let request = client::submit_and_wait(client::ClientRequest {
                url: url.clone(),
                key: key.clone(),
                action: action.clone(),
                args: commands::parse_json_object("--args", args.as_deref())?,
                context: commands::parse_json_object("--context", context.as_deref())?,
                on_behalf_of: on_behalf_of.clone(),
                idempotency_key: idempotency_key.clone(),
                wait,
            })
            .await?;
            commands::print(&serde_json::to_string_pretty(&request)?)?;
            return Ok(ExitCode::from(commands::request_exit_code(&request)));
        }
        _ => {}
    }
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(format) = cli.log_format {
        config.log_format = format;
    }
    let default_level = if matches!(cli.command, Command::Serve) {
        "info"
    } else {
        "warn"
    };
    init_logging(&config.log_format, default_level);
    match cli.command {
        Command::Serve => commands::serve(config).await,
        Command::Migrate => commands::migrate(config).await,
        Command::Agents(AgentsCommand::Add { name, owners }) => {
            commands::agents_add(config, &name, &owners).await
        }
        Command::Agents(AgentsCommand::List { json }) => commands::agents_list(config, json).await,
        Command::Agents(AgentsCommand::Revoke { name }) => {
            commands::agents_revoke(config, &name).await
        }
        Command::Pending { json } => commands::pending(config, json).await,
        Command::Show { id } => commands::show(config, &id).await,
        Command::Approve {
            id,
            principal,
            note,
            revision,
        } => {
            let vote = VoteRequest::Approve { note };
            commands::vote(config, &id, &principal, vote, revision).await
        }
        Command::Deny {
            id,
            principal,
            reason,
            revision,
        } => {
            let vote = VoteRequest::Deny { reason };
            commands::vote(config, &id, &principal, vote, revision).await
        }
        Command::Modify {
            id,
            principal,
            args,
            note,
            revision,
        } => {
            let args = commands::parse_json_object("--args", Some(&args))?;
            let vote = VoteRequest::Modify { args, note };
            commands::vote(config, &id, &principal, vote, revision).await
        }
        Command::Audit(AuditCommand::Verify { head }) => {
            commands::audit_verify(config, head.as_deref()).await
        }
        Command::Audit(AuditCommand::Head) => commands::audit_head(config).await,
        Command::Audit(AuditCommand::Export) => commands::audit_export(config).await,
        Command::Policy(_) | Command::Request { .. } | Command::McpProxy { .. } => {
            unreachable!("handled above")
        }
    }
}

/// `30s`, `5m`, `1h`, or a plain number of seconds.
fn parse_wait(text: &str) -> anyhow::Result<Duration> {
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|wait| *wait <= MAX_WAIT)
            .ok_or_else(|| anyhow::anyhow!("--wait {text:?} must be between 0 and 30 days"));
    }
    let wait = humantime::parse_duration(text).map_err(|error| {
        anyhow::anyhow!("--wait {text:?} is not a duration like 30s or 5m: {error}")
    })?;
    if wait > MAX_WAIT {
        anyhow::bail!("--wait {text:?} must be at most 30 days");
    }
    Ok(wait)
}

/// No agent waits longer than this for one decision.
const MAX_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

fn init_logging(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
