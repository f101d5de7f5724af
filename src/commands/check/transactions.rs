//! The preflight of the progress topic and of `--delivery exactly-once`:
//! the topic's settings, the brokers' transaction settings, and whether this
//! principal may use transactions at all. Never with the relay's own transactional.id:
//! registering it would fence a relay that is running.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, Producer};

use crate::config::{ExactlyOnceConfig, RelayConfig};
use crate::pipeline::sink::client::client_config;

use super::{CheckResult, BROKER_TIMEOUT};

const PROGRESS: &str = "progress topic";
const SETTINGS: &str = "kafka transaction settings";
const PROBE: &str = "kafka transactions";

/// The progress topic (whenever one is configured), and with exactly-once
/// the transaction settings and a probe.
pub(super) async fn progress_and_transaction_checks(cfg: &RelayConfig) -> Vec<CheckResult> {
    let Some(progress) = &cfg.progress_topic else {
        return Vec::new();
    };
    let client = client_config(
        &cfg.kafka_brokers,
        "outbox-relay-check",
        &[],
        &cfg.kafka_properties,
    );
    let admin: AdminClient<DefaultClientContext> = match client.create() {
        Ok(a) => a,
        Err(err) => {
            return vec![CheckResult::fail(
                PROBE,
                format!("the Kafka client refuses the configuration: {err}"),
                "fix the --kafka-property values",
            )]
        }
    };
    let opts = AdminOptions::new().request_timeout(Some(BROKER_TIMEOUT));
    // One metadata request for all topics: naming the progress topic could
    // make the broker auto-create it, uncompacted.
    let probe_cfg = client.clone();
    let topic = progress.clone();
    let (brokers, exists) = tokio::task::spawn_blocking(move || {
        let p: BaseProducer = probe_cfg.create().ok()?;
        let md = p.client().fetch_metadata(None, BROKER_TIMEOUT).ok()?;
        let exists = md
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none());
        Some((
            md.brokers().iter().map(|b| b.id()).collect::<Vec<i32>>(),
            exists,
        ))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default();
    let mut out = vec![progress_topic(&admin, &opts, progress, exists).await];
    if let Some(e) = &cfg.exactly_once {
        out.push(broker_settings(cfg, &brokers, &admin, &opts).await);
        out.push(probe(cfg, e, client).await);
    }
    out
}

async fn progress_topic(
    admin: &AdminClient<DefaultClientContext>,
    opts: &AdminOptions,
    topic: &str,
    exists: bool,
) -> CheckResult {
    if !exists {
        return CheckResult::pass(
            PROGRESS,
            format!("{topic} does not exist yet: `run` creates it (one partition, compacted)"),
        );
    }
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], opts)
        .await;
    let resource = match described.map(|mut v| v.pop()) {
        Ok(Some(Ok(r))) => r,
        Ok(Some(Err(code))) => {
            return CheckResult::warn(
                PROGRESS,
                format!("could not describe {topic}: {code:?}"),
                Some("grant DescribeConfigs on the topic to see its settings here".into()),
            )
        }
        Ok(None) | Err(_) => {
            return CheckResult::warn(PROGRESS, format!("could not describe {topic}"), None)
        }
    };
    let policy = resource
        .entries
        .iter()
        .find(|c| c.name == "cleanup.policy")
        .and_then(|c| c.value.clone())
        .unwrap_or_default();
    if policy.split(',').any(|p| p.trim() == "compact") {
        CheckResult::pass(PROGRESS, format!("{topic} exists, cleanup.policy={policy}"))
    } else {
        CheckResult::fail(
            PROGRESS,
            format!("{topic} has cleanup.policy={policy}: `run` refuses it, since it would keep one record per Kafka transaction"),
            format!("kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact, or name another --progress-topic"),
        )
    }
}

/// The transaction coordinator's settings against the cluster's size and
/// the relay's transaction timeout.
async fn broker_settings(
    cfg: &RelayConfig,
    brokers: &[i32],
    admin: &AdminClient<DefaultClientContext>,
    opts: &AdminOptions,
) -> CheckResult {
    let Some(&first) = brokers.first() else {
        return CheckResult::warn(SETTINGS, "no broker answered a metadata request", None);
    };
    let described = admin
        .describe_configs(&[ResourceSpecifier::Broker(first)], opts)
        .await;
    let Ok(Some(Ok(resource))) = described.map(|mut v| v.pop()) else {
        return CheckResult::warn(
            SETTINGS,
            format!("could not describe broker {first}'s configuration"),
            Some(
                "grant DescribeConfigs on the cluster to see the transaction settings here".into(),
            ),
        );
    };
    let get = |name: &str| -> Option<u64> {
        resource
            .entries
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.value.as_deref()?.parse().ok())
    };
    let rf = get("transaction.state.log.replication.factor").unwrap_or(3);
    let min_isr = get("transaction.state.log.min.isr").unwrap_or(2);
    let max_timeout = get("transaction.max.timeout.ms").unwrap_or(900_000);
    let ours = cfg
        .exactly_once
        .as_ref()
        .map_or(60_000, |e| e.transaction_timeout.as_millis() as u64);
    let n = brokers.len() as u64;
    if rf > n {
        return CheckResult::fail(
            SETTINGS,
            format!("transaction.state.log.replication.factor={rf} but the cluster has {n} broker(s): the transaction log cannot be created, so no producer can start a transaction (init_transactions times out)"),
            format!("set transaction.state.log.replication.factor={n} (and transaction.state.log.min.isr ≤ it) on the brokers, or add brokers"),
        );
    }
    if min_isr > rf {
        return CheckResult::fail(
            SETTINGS,
            format!("transaction.state.log.min.isr={min_isr} is above its replication factor {rf}: the coordinator cannot write"),
            format!("set transaction.state.log.min.isr ≤ {rf} on the brokers"),
        );
    }
    if ours > max_timeout {
        return CheckResult::fail(
            SETTINGS,
            format!("the relay's transaction.timeout.ms={ours} is above the brokers' transaction.max.timeout.ms={max_timeout}: the coordinator refuses the producer"),
            format!("lower --kafka-property transaction.timeout.ms to at most {max_timeout}, or raise transaction.max.timeout.ms on the brokers"),
        );
    }
    CheckResult::pass(
        SETTINGS,
        format!("transaction log replication factor {rf} (min.isr {min_isr}) on {n} broker(s); transaction.timeout.ms {ours} ≤ transaction.max.timeout.ms {max_timeout}"),
    )
}

/// init_transactions with a throwaway id sharing the relay's prefix: proves
/// a coordinator answers and accepts the timeout (and, with prefixed ACLs,
/// the principal's TransactionalId rights) without fencing a running relay.
async fn probe(
    cfg: &RelayConfig,
    e: &ExactlyOnceConfig,
    mut client: rdkafka::ClientConfig,
) -> CheckResult {
    let base = e
        .transactional_id
        .clone()
        .unwrap_or_else(|| format!("outbox-relay-check-{}", cfg.slot));
    let id = format!("{base}.check.{}", std::process::id());
    client.set("transactional.id", &id);
    let outcome = tokio::task::spawn_blocking(move || {
        let p: BaseProducer = client.create().map_err(|e| e.to_string())?;
        p.init_transactions(Duration::from_secs(30))
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match outcome {
        Ok(()) => CheckResult::pass(
            PROBE,
            format!("a transactional producer started (init_transactions with the throwaway id {id})"),
        ),
        Err(err) => CheckResult::fail(
            PROBE,
            format!("init_transactions with the throwaway id {id} failed: {err}"),
            "check the brokers' transaction settings above, and that this principal has Write and Describe on TransactionalId resources matching the relay's id (kafka-acls.sh --add --transactional-id 'outbox-relay-' --resource-pattern-type prefixed --operation Write --operation Describe)",
        ),
    }
}
