//! The `outbox-relay` binary: CLI parsing, logging, signals. Errors become
//! one clear line and a non-zero exit code here, at the edge.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_relay::commands::setup;
use outbox_relay::config::{LogFormat, Options};

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Publishes outbox-table INSERTs from PostgreSQL logical replication to Kafka, in commit order, confirming the slot only after the broker acknowledged."
)]
struct Cli {
    /// TOML file with options (keys are the long flag names with `_`).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct SetupArgs {
    #[command(flatten)]
    options: Options,
    /// Create the slot with failover = true (PostgreSQL 17+), so that a physical
    /// standby with sync_replication_slots = on keeps a copy the relay resumes from
    /// after a promotion.
    #[arg(long)]
    failover: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Create the publication and the replication slot if missing (idempotent).
    Setup(SetupArgs),
    /// Stream outbox events to Kafka until SIGTERM/SIGINT.
    Run(Options),
    /// Print records as they arrive in Kafka (topic, key, headers, payload).
    Tail(outbox_relay::commands::tail::TailOptions),
    /// Check Kafka against the outbox table: missing, duplicated, reordered or altered events; exit 1 on loss, disorder or mismatch.
    Verify(outbox_relay::commands::verify::VerifyArgs),
    /// Show the slot (position, retained WAL, activity) and the publication; exit 1 if the slot is missing.
    Status(outbox_relay::commands::status::StatusOptions),
    /// Preflight: check everything `run` needs (PASS/WARN/FAIL, with fixes); exit 1 on any FAIL.
    Check(Options),
    /// Cutover from a polling publisher: create the slot with an exported snapshot and publish the rows still pending in it.
    Backfill(outbox_relay::commands::backfill::BackfillArgs),
    /// After the slot was lost (invalidated, dropped, missing after a restore or failover): create it again and publish from the outbox table the events Kafka lacks; exit 1 naming any range that cannot be recovered.
    Recover(outbox_relay::commands::recover::RecoverArgs),
    /// Delete outbox rows already published (confirmed by the slot), or older than a retention; in batches.
    Cleanup(outbox_relay::commands::cleanup::CleanupArgs),
}

/// `status` and `check`: read-only reports; Kafka settings are optional.
async fn report(config: Option<PathBuf>, command: Command) -> std::process::ExitCode {
    let (opts, json) = match command {
        Command::Status(s) => (s.options, Some(s.json)),
        Command::Check(o) => (o, None),
        _ => unreachable!("only status and check are reports"),
    };
    let cfg = match outbox_relay::config::load(config.as_deref(), opts, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "outbox-relay: configuration error: {}",
                describe(&anyhow::Error::new(e))
            );
            return std::process::ExitCode::from(2);
        }
    };
    std::process::ExitCode::from(match json {
        Some(json) => outbox_relay::commands::status::command(&cfg, json).await,
        None => outbox_relay::commands::check::command(&cfg).await,
    })
}

/// An error and its causes on one line, without repeating a cause whose
/// text the message before it already includes (our error messages embed
/// their cause so they read well on their own).
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Logs go to stderr for every command: a command that waits on a broker
/// or a server says why (the client's warnings) instead of hanging in
/// silence. `default` is the level without OUTBOX_RELAY_LOG.
fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_RELAY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async_main());
    // The broker probe may be inside a blocking metadata request (up to a
    // few seconds against a broker that is down): a stop does not wait for
    // it, so the shutdown timeout is the whole bound.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn async_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Setup(_) | Command::Run(_)) {
        // Operator commands print their results on stdout; warnings only.
        init_logging(LogFormat::Text, "warn");
    }
    let mut failover = false;
    let (opts, is_setup) = match cli.command {
        Command::Setup(a) => {
            failover = a.failover;
            (a.options, true)
        }
        Command::Run(o) => (o, false),
        Command::Tail(t) => return outbox_relay::commands::tail::command(t).await.into(),
        c @ (Command::Status(_) | Command::Check(_)) => return report(cli.config, c).await,
        Command::Backfill(b) => {
            return outbox_relay::commands::backfill::command(cli.config.as_deref(), b)
                .await
                .into()
        }
        Command::Recover(r) => {
            return outbox_relay::commands::recover::command(cli.config.as_deref(), r)
                .await
                .into()
        }
        Command::Cleanup(c) => {
            return outbox_relay::commands::cleanup::command(cli.config.as_deref(), c)
                .await
                .into()
        }
        Command::Verify(v) => {
            return outbox_relay::commands::verify::command(cli.config.as_deref(), v)
                .await
                .into()
        }
    };
    let cfg = match outbox_relay::config::load(cli.config.as_deref(), opts, !is_setup) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "outbox-relay: configuration error: {}",
                describe(&anyhow::Error::new(e))
            );
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(cfg.log_format, "info");
    let result: anyhow::Result<()> = if is_setup {
        setup::run(&cfg, setup::SlotKind { failover })
            .await
            .map(|lines| lines.iter().for_each(|l| println!("{l}")))
            .context("setup failed")
    } else {
        outbox_relay::commands::run::run(&cfg)
            .await
            .map_err(anyhow::Error::new)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
