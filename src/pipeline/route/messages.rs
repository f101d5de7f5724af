//! Logical decoding messages as a table-less outbox.
//!
//! `pg_logical_emit_message(true, 'outbox:Order:order-42', '{"total": 10}')`
//! inside a business transaction is an event without an outbox row: it is
//! written to the WAL with the transaction and decoded in commit order with
//! the transaction's table changes. The prefix carries the routing: after the
//! configured filter prefix comes `TYPE:KEY`. Messages whose prefix does not
//! start with the filter belong to someone else and are not events.

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::pipeline::decode::pgoutput::Message;
use crate::pipeline::route::router::{validate_topic, OutboxRecord, RouteError, TopicTemplate};

#[derive(Debug, Clone)]
pub struct MessageConfig {
    /// Only messages whose prefix starts with this are events.
    pub prefix: String,
    /// Topic template; `{type}` is the message's type.
    pub topic: TopicTemplate,
}

impl MessageConfig {
    /// Maps a message to a record, or None when it is not one of ours.
    pub fn route(&self, msg: &Message) -> Option<Result<OutboxRecord, RouteError>> {
        let rest = msg.prefix.strip_prefix(&self.prefix)?;
        Some(self.route_rest(rest, msg.lsn, &msg.content))
    }

    fn route_rest(
        &self,
        rest: &str,
        lsn: Lsn,
        content: &Bytes,
    ) -> Result<OutboxRecord, RouteError> {
        let (event_type, key) = match rest.split_once(':') {
            Some((t, k)) => (t, k),
            None => (rest, ""),
        };
        if event_type.is_empty() {
            return Err(RouteError::InvalidTopic {
                template: self.topic.to_string(),
                topic: String::new(),
                reason: format!(
                    "message prefix {:?} has no type: expected {}TYPE:KEY",
                    rest, self.prefix
                ),
            });
        }
        if key.is_empty() {
            return Err(RouteError::EmptyKey {
                column: format!(
                    "message prefix {:?} (expected {}TYPE:KEY)",
                    rest, self.prefix
                ),
            });
        }
        let topic = self
            .topic
            .render(|column| (column == "type").then_some(event_type));
        if let Err(reason) = validate_topic(&topic) {
            return Err(RouteError::InvalidTopic {
                template: self.topic.to_string(),
                topic,
                reason,
            });
        }
        // The message's WAL position identifies it: stable across
        // redeliveries, so consumers can drop repeats by it.
        let id = Bytes::from(format!("lsn:{lsn}"));
        Ok(OutboxRecord {
            topic: topic.into(),
            key: Bytes::copy_from_slice(key.as_bytes()),
            payload: Some(content.clone()),
            event_id: id.clone(),
            headers: vec![
                ("id".into(), Some(id)),
                (
                    "type".into(),
                    Some(Bytes::copy_from_slice(event_type.as_bytes())),
                ),
            ],
            event_type: Some(Bytes::copy_from_slice(event_type.as_bytes())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(prefix: &str) -> Message {
        Message {
            xid: None,
            flags: 1,
            lsn: Lsn(0x1_0000_0010),
            prefix: prefix.into(),
            content: Bytes::from_static(b"{\"a\":1}"),
        }
    }

    fn cfg() -> MessageConfig {
        MessageConfig {
            prefix: "outbox:".into(),
            topic: TopicTemplate::parse("outbox.event.{type}").unwrap(),
        }
    }

    #[test]
    fn routes_type_and_key_from_the_prefix() {
        let r = cfg().route(&msg("outbox:Order:order-42")).unwrap().unwrap();
        assert_eq!(&*r.topic, "outbox.event.Order");
        assert_eq!(r.key, "order-42");
        assert_eq!(r.event_id, "lsn:1/10");
        assert_eq!(r.payload.as_deref(), Some(&b"{\"a\":1}"[..]));
    }

    #[test]
    fn other_prefixes_are_not_events_and_bad_ones_are_errors() {
        assert!(cfg().route(&msg("audit:x")).is_none());
        assert!(matches!(
            cfg().route(&msg("outbox:Order")),
            Some(Err(RouteError::EmptyKey { .. }))
        ));
        assert!(matches!(
            cfg().route(&msg("outbox:Or der:k")),
            Some(Err(RouteError::InvalidTopic { .. }))
        ));
        assert!(matches!(
            cfg().route(&msg("outbox::k")),
            Some(Err(RouteError::InvalidTopic { .. }))
        ));
        // Spaces inside the placeholder are trimmed as the template parser does.
        let spaced = MessageConfig {
            prefix: "outbox:".into(),
            topic: TopicTemplate::parse("events.{ type }").unwrap(),
        };
        assert_eq!(
            &*spaced.route(&msg("outbox:Order:k")).unwrap().unwrap().topic,
            "events.Order"
        );
    }
}
