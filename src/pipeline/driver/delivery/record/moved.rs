//! Whether a slot found past this process's position was moved by a relay
//! of ours (the progress topic records that far) or by someone else.

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::history::Fork;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::progress::Progress;

use super::super::super::errors::PipelineError;

/// A slot found past the position this process confirmed is fine when the
/// progress topic records at least that far (a relay of ours
/// confirmed it, as a standby that took over); beyond that, someone else
/// moved it over events that may never have been published.
pub(crate) fn moved_by_us(
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    found: Lsn,
    recorded: Option<&Progress>,
    timeline: u32,
) -> Result<(), PipelineError> {
    let Some(ours) = resume.filter(|ours| found > *ours) else {
        // Review N10: at a fresh start, a slot past the furthest record
        // of its own history was moved while no relay of ours ran. (On
        // another timeline it is the history's doing: `history` judges
        // that.)
        return match recorded {
            Some(p) if p.timeline == Some(timeline) && found > p.confirmed && resume.is_none() => {
                Err(PipelineError::SlotMovedWhileDown {
                    slot: cfg.slot.clone(),
                    found,
                    recorded: p.confirmed,
                })
            }
            _ => Ok(()),
        };
    };
    match recorded.map(|p| p.confirmed) {
        Some(r) if found <= r => {
            tracing::info!(
                slot = %cfg.slot,
                from = %ours,
                to = %found,
                recorded = %r,
                "the slot moved on under another relay of ours (the progress topic records that position): going on from it"
            );
            Ok(())
        }
        _ => Err(PipelineError::SlotMovedAhead {
            slot: cfg.slot.clone(),
            found,
            ours,
        }),
    }
}

/// Says and counts a fork between the progress record's history and the
/// server's, and what the relay does about it.
pub(crate) fn report_fork(metrics: &Metrics, slot: &str, fork: Fork, doing: &str) {
    metrics.history_forks.inc();
    tracing::warn!(
        slot,
        fork = %fork,
        "the WAL history forked {fork}: the progress record was written on a history this server does not continue (a restore from a copy, an asynchronous standby promoted, a slot recreated). Positions past the fork are new transactions, never ones already in Kafka: {doing}"
    );
}
