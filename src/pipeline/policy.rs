//! What happens to an event the relay cannot publish as configured: the
//! error policy. Every bad event either stops the relay (`halt`, the
//! default: the slot stays before it and a person decides) or goes to the
//! dead-letter topic (`dead-letter`), whose acknowledgement is what lets the
//! slot move past it. Nothing is ever skipped silently.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::lsn::Lsn;
pub use crate::pipeline::route::router::Failed;
use crate::pipeline::route::router::{OutboxRecord, RouteError};

/// The kinds of bad event a policy can be set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// NULL or empty key.
    Key,
    /// NULL event id.
    EventId,
    /// The topic template gave an empty or invalid topic name.
    Topic,
    /// The record is larger than the producer or the broker accepts.
    TooLarge,
    /// The payload is not valid JSON where JSON is required.
    PayloadJson,
    /// The topic does not exist and the broker does not create it.
    TopicMissing,
    /// The relay may not write to the topic.
    Authorization,
    /// A table a schema pattern matches whose columns do not fit its
    /// section's mapping (review N3: one tenant's table, not the relay's
    /// configuration).
    TableShape,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Key,
        ErrorKind::EventId,
        ErrorKind::Topic,
        ErrorKind::TooLarge,
        ErrorKind::PayloadJson,
        ErrorKind::TopicMissing,
        ErrorKind::Authorization,
        ErrorKind::TableShape,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Key => "key",
            ErrorKind::EventId => "event-id",
            ErrorKind::Topic => "topic",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::PayloadJson => "payload-json",
            ErrorKind::TopicMissing => "topic-missing",
            ErrorKind::Authorization => "authorization",
            ErrorKind::TableShape => "table-shape",
        }
    }

    /// The kind of a routing error, if it concerns one row (schema and
    /// configuration errors concern every row and always halt).
    pub fn of_route(e: &RouteError) -> Option<ErrorKind> {
        match e {
            RouteError::Null { role: "key", .. } | RouteError::EmptyKey { .. } => {
                Some(ErrorKind::Key)
            }
            RouteError::Null {
                role: "event id", ..
            } => Some(ErrorKind::EventId),
            RouteError::InvalidTopic { .. } => Some(ErrorKind::Topic),
            RouteError::InvalidJson { .. } | RouteError::BadBytea { .. } => {
                Some(ErrorKind::PayloadJson)
            }
            RouteError::Unfit { .. } => Some(ErrorKind::TableShape),
            _ => None,
        }
    }

    /// The kind of a producer error, if it concerns the record rather than
    /// the connection (connection errors are retried, never dead-lettered).
    pub fn of_kafka(e: &KafkaError) -> Option<ErrorKind> {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code()? {
            C::MessageSizeTooLarge | C::InvalidMessageSize => Some(ErrorKind::TooLarge),
            C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition => {
                Some(ErrorKind::TopicMissing)
            }
            C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
                Some(ErrorKind::Authorization)
            }
            C::InvalidTopic => Some(ErrorKind::Topic),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ErrorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown error kind {s:?}; kinds: {}",
                    ErrorKind::ALL.map(ErrorKind::name).join(", ")
                )
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Stop the relay; the slot stays before the event.
    #[default]
    Halt,
    /// Publish the event to the dead-letter topic instead.
    DeadLetter,
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "halt" => Ok(Policy::Halt),
            "dead-letter" => Ok(Policy::DeadLetter),
            other => Err(format!(
                "unknown policy {other:?}: expected halt or dead-letter"
            )),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ErrorPolicy {
    pub default: Policy,
    pub overrides: HashMap<ErrorKind, Policy>,
    pub dead_letter_topic: String,
}

impl ErrorPolicy {
    pub fn for_kind(&self, kind: ErrorKind) -> Policy {
        self.overrides.get(&kind).copied().unwrap_or(self.default)
    }

    /// True when some delivery error could be dead-lettered, so in-flight
    /// records must be kept until acknowledged.
    pub fn may_dead_letter_deliveries(&self) -> bool {
        [
            ErrorKind::TooLarge,
            ErrorKind::TopicMissing,
            ErrorKind::Authorization,
            ErrorKind::Topic,
        ]
        .into_iter()
        .any(|k| self.for_kind(k) == Policy::DeadLetter)
    }

    /// Parses `KIND=POLICY`.
    pub fn parse_override(s: &str) -> Result<(ErrorKind, Policy), String> {
        let (k, p) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected KIND=POLICY, e.g. too-large=dead-letter"))?;
        Ok((k.parse()?, p.parse()?))
    }
}

/// Header names on dead-letter records.
pub const H_REASON: &str = "outbox.error";
pub const H_KIND: &str = "outbox.error.kind";
pub const H_TOPIC: &str = "outbox.original.topic";
pub const H_EVENT_ID: &str = "outbox.original.id";
pub const H_LSN: &str = "outbox.lsn";
pub const H_SIZE: &str = "outbox.original.size";

/// The dead-letter record for a failed event: the original key, value and
/// headers, plus why it failed, where it was going, its event id and its
/// position in the WAL. A record too large for Kafka cannot be kept whole:
/// its value is left out and its size recorded instead.
pub fn dead_letter(
    failed: Failed,
    kind: ErrorKind,
    reason: &str,
    lsn: Lsn,
    topic: &str,
) -> OutboxRecord {
    let mut headers = failed.headers;
    headers.push((H_REASON.into(), Some(Bytes::from(reason.to_string()))));
    headers.push((
        H_KIND.into(),
        Some(Bytes::from_static(kind.name().as_bytes())),
    ));
    headers.push((H_TOPIC.into(), Some(Bytes::from(failed.intended_topic))));
    headers.push((H_EVENT_ID.into(), failed.event_id.clone()));
    headers.push((H_LSN.into(), Some(Bytes::from(lsn.to_string()))));
    let payload = if kind == ErrorKind::TooLarge {
        let size = failed.payload.as_ref().map_or(0, Bytes::len);
        headers.push((H_SIZE.into(), Some(Bytes::from(size.to_string()))));
        None
    } else {
        failed.payload
    };
    OutboxRecord {
        topic: topic.into(),
        key: failed.key.unwrap_or_default(),
        payload,
        event_id: failed.event_id.unwrap_or_default(),
        headers,
        event_type: failed.event_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_the_default() {
        let mut p = ErrorPolicy::default();
        assert_eq!(p.for_kind(ErrorKind::Key), Policy::Halt);
        let (k, v) = ErrorPolicy::parse_override("too-large=dead-letter").unwrap();
        p.overrides.insert(k, v);
        assert_eq!(p.for_kind(ErrorKind::TooLarge), Policy::DeadLetter);
        assert!(p.may_dead_letter_deliveries());
        assert!(ErrorPolicy::parse_override("nope=halt")
            .unwrap_err()
            .contains("kinds: key, event-id"));
        assert!(ErrorPolicy::parse_override("key=skip").is_err());
    }

    #[test]
    fn dead_letter_records_keep_the_original_and_say_why() {
        let failed = Failed {
            key: Some(Bytes::from_static(b"k")),
            payload: Some(Bytes::from_static(b"{\"a\":1}")),
            event_id: Some(Bytes::from_static(b"e-1")),
            headers: vec![("id".into(), Some(Bytes::from_static(b"e-1")))],
            event_type: None,
            intended_topic: "orders".into(),
        };
        let r = dead_letter(
            failed.clone(),
            ErrorKind::Topic,
            "bad topic",
            Lsn(0x10),
            "dlq",
        );
        assert_eq!(&*r.topic, "dlq");
        assert_eq!(r.payload.as_deref(), Some(&b"{\"a\":1}"[..]));
        let h = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| &**k == name)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(h(H_TOPIC).as_deref(), Some(&b"orders"[..]));
        assert_eq!(h(H_LSN).as_deref(), Some(&b"0/10"[..]));
        assert_eq!(h(H_KIND).as_deref(), Some(&b"topic"[..]));
        let big = dead_letter(failed, ErrorKind::TooLarge, "too large", Lsn(1), "dlq");
        assert!(big.payload.is_none());
        assert!(big
            .headers
            .iter()
            .any(|(k, v)| &**k == H_SIZE && v.as_deref() == Some(&b"7"[..])));
    }
}
