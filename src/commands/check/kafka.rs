//! The Kafka side of the preflight: the producer settings, the brokers
//! answering a metadata request through the user's properties, the topics.

use crate::pipeline::sink::client::client_config;
use rdkafka::producer::{BaseProducer, Producer};

use crate::config::RelayConfig;
use crate::pipeline::route::router::TopicTemplate;

use super::*;

/// Broker reachability and topics, from one metadata request for all topics
/// (a request naming a topic could make the broker auto-create it).
pub(super) fn kafka_checks(cfg: &RelayConfig) -> Vec<CheckResult> {
    let brokers = cfg.kafka_brokers.trim();
    if brokers.is_empty() {
        return vec![CheckResult::fail(
            "kafka brokers",
            "no brokers configured",
            "pass --kafka-brokers host:port,… or set OUTBOX_RELAY_KAFKA_BROKERS (or kafka_brokers in the --config file)",
        )];
    }
    if let Err(e) = crate::pipeline::sink::refuse_weakened(&cfg.kafka_properties) {
        return vec![CheckResult::fail(
            "kafka producer settings",
            e.to_string(),
            "remove that --kafka-property (or kafka_properties entry in the --config file)",
        )];
    }
    let mut client = client_config(brokers, "outbox-relay-check", &[], &cfg.kafka_properties);
    client.set("allow.auto.create.topics", "false");
    let producer: BaseProducer = match client.create() {
        Ok(p) => p,
        Err(e) => {
            return vec![CheckResult::fail(
                "kafka brokers",
                format!("the Kafka client refuses the configuration: {e}"),
                "fix the --kafka-property values",
            )]
        }
    };
    let metadata = match producer.client().fetch_metadata(None, BROKER_TIMEOUT) {
        Ok(m) => m,
        Err(e) => {
            return vec![CheckResult::fail(
                "kafka brokers",
                format!(
                    "no answer from {brokers} within {} s: {e}",
                    BROKER_TIMEOUT.as_secs()
                ),
                "check --kafka-brokers (host:port of a listener reachable from here), that the brokers run, firewalls, and the brokers' advertised.listeners",
            )]
        }
    };
    let mut out = vec![CheckResult::pass(
        "kafka brokers",
        format!(
            "{brokers} answered: {} broker(s), {} topic(s)",
            metadata.brokers().len(),
            metadata.topics().len()
        ),
    )];
    let topics: Vec<(&str, usize)> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name(), t.partitions().len()))
        .collect();
    for mapping in &cfg.tables {
        out.push(topic_line(&mapping.topic, &topics));
    }
    out
}

/// Whether the topic (or the topics a template can give) exists.
fn topic_line(template: &TopicTemplate, topics: &[(&str, usize)]) -> CheckResult {
    match template.fixed() {
        Some(topic) => match topics.iter().find(|(t, _)| *t == topic) {
            Some((_, partitions)) => CheckResult::pass(
                "kafka topic",
                format!("topic {topic} exists ({partitions} partition(s))"),
            ),
            None => CheckResult::warn(
                "kafka topic",
                format!("topic {topic} does not exist: the first event fails and stops the relay unless the brokers auto-create topics"),
                Some(format!("create it with the partition count you want (e.g. kafka-topics.sh --create --topic {topic} --partitions 6), or enable auto.create.topics.enable on the brokers")),
            ),
        },
        None => {
            let source = template.to_string();
            let prefix = &source[..source.find('{').unwrap_or(source.len())];
            let columns: Vec<&str> = template.columns().collect();
            let mut matching: Vec<&str> = topics
                .iter()
                .map(|(t, _)| *t)
                .filter(|t| t.starts_with(prefix))
                .collect();
            matching.sort_unstable();
            let existing = if matching.is_empty() {
                format!("no existing topic starts with {prefix:?}")
            } else {
                format!("existing topics starting with {prefix:?}: {}", matching.join(", "))
            };
            CheckResult::warn(
                "kafka topic",
                format!(
                    "topic template {source}: each row's topic comes from column(s) {}; {existing}; whether the brokers auto-create the others cannot be known from a client",
                    columns.join(", ")
                ),
                Some("create every topic the rows can route to up front, or make sure the brokers auto-create topics (auto.create.topics.enable)".into()),
            )
        }
    }
}
