//! The `outbox-relay` binary: CLI parsing, logging, signals. Errors become
//! one clear line and a non-zero exit code here, at the edge.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
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

#[derive(Subcommand)]
enum Command {
    /// Create the publication and the replication slot if missing (idempotent).
    Setup(outbox_relay::commands::setup::SetupArgs),
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
    // On a worker, not on this thread: a future block_on runs here is woken
    // by the worker that polls the sockets, a thread switch per message.
    let code = rt.block_on(async {
        tokio::spawn(async_main())
            .await
            .unwrap_or(std::process::ExitCode::FAILURE)
    });
    // The broker probe may be inside a blocking metadata request (up to a
    // few seconds against a broker that is down): a stop does not wait for
    // it, so the shutdown timeout is the whole bound.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn async_main() -> std::process::ExitCode {
    use outbox_relay::commands::*;
    let cli = Cli::parse();
    let config = cli.config.as_deref();
    if !matches!(cli.command, Command::Setup(_) | Command::Run(_)) {
        // Operator commands print their results on stdout; warnings only.
        outbox_relay::observe::logging::init(LogFormat::Text, "warn");
    }
    let code = match cli.command {
        Command::Setup(a) => setup::command(config, a).await,
        Command::Run(o) => run::command(config, o).await,
        Command::Tail(t) => tail::command(config, t).await,
        Command::Status(s) => status::command(config, s).await,
        Command::Check(o) => check::command(config, o).await,
        Command::Backfill(b) => backfill::command(config, b).await,
        Command::Recover(r) => recover::command(config, r).await,
        Command::Cleanup(c) => cleanup::command(config, c).await,
        Command::Verify(v) => verify::command(config, v).await,
    };
    std::process::ExitCode::from(code)
}
