//! The one builder of every Kafka client the relay makes: the producer, the
//! metadata client of `check`, the consumers of `verify` and `tail`. Each
//! gets the brokers, a `client.id` naming its role and the user's
//! `--kafka-property` values (TLS, SASL, timeouts: whatever reaching the
//! cluster takes), under librdkafka's canonical names. What a caller cannot
//! work without it sets on the returned config afterwards, over the user's.

use rdkafka::config::ClientConfig;

use super::canonical_name;

/// A client config for `brokers` with the user's `properties` applied over
/// `defaults` (the relay's choices a user may change).
pub fn client_config(
    brokers: &str,
    client_id: &str,
    defaults: &[(&str, &str)],
    properties: &[(String, String)],
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("client.id", client_id);
    for (k, v) in defaults {
        cfg.set(*k, *v);
    }
    for (k, v) in properties {
        cfg.set(canonical_name(k), v);
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_properties_win_over_defaults_under_canonical_names() {
        let props = vec![
            ("linger.ms".to_string(), "20".to_string()),
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
        ];
        let c = client_config("b:9092", "outbox-relay-x", &[("linger.ms", "5")], &props);
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(c.get("client.id"), Some("outbox-relay-x"));
        assert_eq!(c.get("linger.ms"), Some("20"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
    }
}
