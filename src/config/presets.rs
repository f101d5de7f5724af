//! Presets: the defaults of the two table shapes users have today (the
//! classic polling table and Debezium's outbox), below every other layer.

use serde::Deserialize;

/// The two table shapes users have today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The classic polling table: id BIGSERIAL, event_id, event_type,
    /// aggregate_id, payload JSONB, occurred_at, processed_at, created_at.
    Classic,
    /// Debezium's Outbox Event Router table: id, aggregatetype, aggregateid,
    /// type, payload.
    Debezium,
}

pub(super) struct PresetDefaults {
    pub(super) table: &'static str,
    pub(super) id: &'static str,
    pub(super) key: &'static str,
    pub(super) payload: &'static str,
    pub(super) topic: &'static str,
    pub(super) headers: &'static [&'static str],
    pub(super) event_type: &'static str,
}

impl Preset {
    pub(super) fn defaults(self) -> PresetDefaults {
        match self {
            Preset::Classic => PresetDefaults {
                table: "public.outbox",
                id: "event_id",
                key: "aggregate_id",
                payload: "payload",
                topic: "events.{event_type}",
                headers: &["event_type"],
                event_type: "event_type",
            },
            Preset::Debezium => PresetDefaults {
                table: "public.outboxevent",
                id: "id",
                key: "aggregateid",
                payload: "payload",
                topic: "outbox.event.{aggregatetype}",
                headers: &[],
                event_type: "type",
            },
        }
    }
}
