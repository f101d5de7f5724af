use super::*;
use crate::pipeline::policy::Policy;

fn base() -> Options {
    Options {
        database_url: Some("postgres://u:secret@localhost/db".into()),
        kafka_brokers: Some("localhost:9092".into()),
        ..Default::default()
    }
}

#[test]
fn presets_fill_the_columns() {
    let c = RelayConfig::resolve(Options {
        preset: Some(Preset::Debezium),
        ..base()
    })
    .unwrap();
    assert_eq!(c.tables[0].table.to_string(), "public.outboxevent");
    assert_eq!(c.tables[0].key_column, "aggregateid");
    assert_eq!(
        c.tables[0].topic.to_string(),
        "outbox.event.{aggregatetype}"
    );
    let c = RelayConfig::resolve(base()).unwrap();
    assert_eq!(c.tables[0].id_column, "event_id");
    assert_eq!(c.tables[0].topic.to_string(), "events.{event_type}");
}

/// L1 and L3 of the December 2026 review.
#[test]
fn slot_names_follow_postgres_and_bad_properties_are_not_echoed() {
    for bad in ["Outbox", "out-box", "x'; DROP", "", &"a".repeat(64)] {
        let e = RelayConfig::resolve(Options {
            slot: Some(bad.to_string()),
            ..base()
        })
        .err()
        .unwrap_or_else(|| panic!("slot {bad:?} accepted"));
        assert!(e.to_string().contains("lower-case letters"), "{e}");
    }
    assert!(RelayConfig::resolve(Options {
        slot: Some("relay_2".into()),
        ..base()
    })
    .is_ok());
    let e = RelayConfig::resolve(Options {
        kafka_property: Some(vec!["sasl.password:hunter2".into()]),
        ..base()
    })
    .expect_err("refused");
    let text = e.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("KEY=VALUE"), "{text}");
    // Nor does Debug show a secret (review L3).
    let o = Options {
        database_password: Some("pw-secret".into()),
        kafka_property: Some(vec!["sasl.password=kafka-secret".into()]),
        ..base()
    };
    let shown = format!("{o:?} {:?}", RelayConfig::resolve(o.clone()).unwrap());
    for secret in ["pw-secret", "kafka-secret", "postgres://u:secret"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(shown.contains("sasl.password"), "{shown}");
    // A `;` in a value, escaped; several properties in one value.
    let c = RelayConfig::resolve(Options {
        kafka_property: Some(vec!["sasl.password=a\\;b;linger.ms=1".into()]),
        ..base()
    })
    .unwrap();
    assert_eq!(
        c.kafka_properties,
        vec![
            ("sasl.password".to_string(), "a;b".to_string()),
            ("linger.ms".to_string(), "1".to_string())
        ]
    );
}

#[test]
fn setup_does_not_need_kafka() {
    let o = Options {
        kafka_brokers: None,
        ..base()
    };
    assert!(RelayConfig::resolve_for_setup(o.clone()).is_ok());
    assert!(RelayConfig::resolve(o).is_err());
}

#[test]
fn higher_layers_win() {
    let file: Options = toml::from_str(
        "key_column = \"from_file\"\ntopic = \"file-topic\"\nkafka_property = [\"linger.ms=1\"]\n",
    )
    .unwrap();
    let cli = Options {
        key_column: Some("from_cli".into()),
        ..base()
    };
    let c = RelayConfig::resolve(cli.or(file)).unwrap();
    assert_eq!(c.tables[0].key_column, "from_cli");
    assert_eq!(c.tables[0].topic.fixed(), Some("file-topic"));
    assert_eq!(
        c.kafka_properties,
        vec![("linger.ms".to_string(), "1".to_string())]
    );
}

#[test]
fn errors_name_the_option_and_hide_passwords() {
    let e = RelayConfig::resolve(Options {
        kafka_brokers: None,
        ..base()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "kafka_brokers is required: pass --kafka-brokers or set OUTBOX_RELAY_KAFKA_BROKERS (or `kafka_brokers` in the --config file)"
    );
    let e = RelayConfig::resolve(Options {
        database_url: Some("postgres://u:secret@host:notaport/db".into()),
        ..base()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("database_url") && !e.contains("secret"), "{e}");
    let e = RelayConfig::resolve(Options {
        kafka_property: Some(vec!["nokey".into()]),
        ..base()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("KEY=VALUE"), "{e}");
    assert!(toml::from_str::<Options>("no_such_option = 1").is_err());
}

#[test]
fn exactly_once_settings_are_checked() {
    let eos = || Options {
        delivery: Some(Delivery::ExactlyOnce),
        ..base()
    };
    let c = RelayConfig::resolve(eos()).unwrap();
    let e = c.exactly_once.expect("exactly-once configured");
    assert_eq!(c.progress_topic.as_deref(), Some("outbox-relay.progress"));
    let _ = e;
    assert_eq!(e.transaction_timeout, Duration::from_secs(60));
    assert!(RelayConfig::resolve(base()).unwrap().exactly_once.is_none());
    let refused = |o: Options, option: &str| {
        let err = RelayConfig::resolve(o).expect_err("refused").to_string();
        assert!(
            err.contains(option) && err.contains("exactly-once"),
            "{err}"
        );
    };
    assert!(RelayConfig::resolve(Options {
        streaming: Some(true),
        ..eos()
    })
    .is_ok());
    assert!(RelayConfig::resolve(Options {
        message_prefix: Some("outbox:".into()),
        ..eos()
    })
    .is_ok());
    // Rows that cannot be routed are dead-lettered in their transaction;
    // records Kafka refuses, in the transaction written again.
    for kind in ["key", "too-large", "topic-missing"] {
        assert!(RelayConfig::resolve(Options {
            on_error_override: Some(vec![format!("{kind}=dead-letter")]),
            ..eos()
        })
        .is_ok());
    }
    refused(
        Options {
            progress_topic: Some("off".into()),
            ..eos()
        },
        "progress",
    );
    refused(
        Options {
            on_error: Some(Policy::DeadLetter),
            ..eos()
        },
        "authorization",
    );
    let err = RelayConfig::resolve(Options {
        transaction_max_duration: Some(20.0),
        ..eos()
    })
    .expect_err("refused")
    .to_string();
    assert!(err.contains("quarter of transaction.timeout.ms"), "{err}");
}

#[test]
fn tables_sections_each_take_their_own_preset_and_keys() {
    let file: Options = toml::from_str(
        r#"
[[tables]]
table = "billing.outbox"
topic = "billing.{event_type}"

[[tables]]
table = "shipping.outboxevent"
preset = "debezium"
key_format = "json-string"
header_columns = ["type:event-type"]
"#,
    )
    .unwrap();
    let c = RelayConfig::resolve(base().or(file.clone())).unwrap();
    assert!(!c.table_picked);
    let names: Vec<String> = c.tables.iter().map(|t| t.table.to_string()).collect();
    assert_eq!(names, ["billing.outbox", "shipping.outboxevent"]);
    assert_eq!(c.tables[0].key_column, "aggregate_id");
    assert_eq!(c.tables[0].topic.to_string(), "billing.{event_type}");
    assert_eq!(c.tables[1].key_column, "aggregateid");
    assert_eq!(
        c.tables[1].topic.to_string(),
        "outbox.event.{aggregatetype}"
    );
    assert_eq!(
        c.tables[1].key_format,
        crate::pipeline::route::config::KeyFormat::JsonString
    );
    assert_eq!(c.tables[1].headers[0].header, "event-type");
    assert!(c.single_table("verify").is_err());

    // --table picks a section.
    let pick = Options {
        table: Some("shipping.outboxevent".into()),
        ..base()
    };
    let c = RelayConfig::resolve(pick.or(file.clone())).unwrap();
    assert!(c.table_picked);
    assert_eq!(c.single_table("verify").unwrap().key_column, "aggregateid");
    let e = RelayConfig::resolve(
        Options {
            table: Some("public.outbox".into()),
            ..base()
        }
        .or(file.clone()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no section names this table"), "{e}");

    // A one-table mapping option beside sections is refused, naming it.
    let e = RelayConfig::resolve(
        Options {
            topic: Some("t".into()),
            ..base()
        }
        .or(file),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("topic") && e.contains("[[tables]]"), "{e}");
}

#[test]
fn tables_sections_are_checked() {
    let resolve = |toml_text: &str| {
        let file: Options = toml::from_str(toml_text).unwrap();
        RelayConfig::resolve(base().or(file))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = resolve("[[tables]]\ntopic = \"x\"\n");
    assert!(e.contains("needs `table"), "{e}");
    let e = resolve("[[tables]]\ntable = \"a\"\n[[tables]]\ntable = \"public.a\"\n");
    assert!(e.contains("two [[tables]] sections name this table"), "{e}");
    let e = resolve("[[tables]]\ntable = \"a\"\ntopic = \"bad topic\"\n");
    assert!(e.contains("in the [[tables]] section of a"), "{e}");
    let e = toml::from_str::<Options>("[[tables]]\ntable = \"a\"\ntopics = \"x\"\n")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("topics"), "{e}");
}

#[test]
fn table_picks_one_table_of_a_schema_pattern() {
    let file: Options =
        toml::from_str("[[tables]]\ntable = \"tenant_*.outbox\"\ntopic = \"{schema}.events\"\n")
            .unwrap();
    let c = RelayConfig::resolve(base().or(file.clone())).unwrap();
    assert!(c.tables[0].table.is_pattern());
    let e = c.single_table("verify").unwrap_err().to_string();
    assert!(e.contains("is a pattern") && e.contains("--table"), "{e}");
    let pick = Options {
        table: Some("tenant_b.outbox".into()),
        ..base()
    };
    let c = RelayConfig::resolve(pick.or(file)).unwrap();
    assert_eq!(
        c.single_table("verify").unwrap().table.to_string(),
        "tenant_b.outbox"
    );
    assert_eq!(c.tables[0].topic.to_string(), "{schema}.events");
}

#[test]
fn a_table_an_earlier_pattern_matches_is_refused() {
    let file: Options = toml::from_str(
        "[[tables]]\ntable = \"tenant_*.outbox\"\n[[tables]]\ntable = \"tenant_vip.outbox\"\n",
    )
    .unwrap();
    let e = RelayConfig::resolve(base().or(file))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already matches this table"), "{e}");
    // The other way round is how a tenant gets a mapping of its own.
    let file: Options = toml::from_str(
        "[[tables]]\ntable = \"tenant_vip.outbox\"\n[[tables]]\ntable = \"tenant_*.outbox\"\n",
    )
    .unwrap();
    assert!(RelayConfig::resolve(base().or(file)).is_ok());
}
