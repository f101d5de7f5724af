use super::*;
use crate::pipeline::decode::pgoutput::Column;
use crate::pipeline::route::config::KeyFormat;

fn col(name: &str, type_oid: u32) -> Column {
    Column {
        flags: 0,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    }
}

fn debezium_router() -> Router {
    let mut r = Router::new(vec![debezium_config()]);
    r.on_relation(&debezium_relation(7)).unwrap();
    r
}

fn debezium_config() -> RouterConfig {
    RouterConfig {
        table: TableName::parse("public.outboxevent").unwrap(),
        id_column: "id".into(),
        key_column: "aggregateid".into(),
        key_format: KeyFormat::Raw,
        payload_column: "payload".into(),
        topic: TopicTemplate::parse("outbox.event.{aggregatetype}").unwrap(),
        headers: vec![HeaderColumn::parse("type:eventType").unwrap()],
        event_type_column: Some("type".into()),
        require_json: false,
    }
}

fn debezium_relation(oid: u32) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: "outboxevent".into(),
        replica_identity: b'd',
        columns: vec![
            col("id", 2950),
            col("aggregatetype", 1043),
            col("aggregateid", 1043),
            col("type", 1043),
            col("payload", 3802),
        ],
    }
}

fn classic_config(table: &str, topic: &str) -> RouterConfig {
    RouterConfig {
        table: TableName::parse(table).unwrap(),
        id_column: "event_id".into(),
        key_column: "aggregate_id".into(),
        key_format: KeyFormat::Raw,
        payload_column: "payload".into(),
        topic: TopicTemplate::parse(topic).unwrap(),
        headers: vec![HeaderColumn::parse("event_type").unwrap()],
        event_type_column: Some("event_type".into()),
        require_json: false,
    }
}

fn classic_relation(oid: u32, table: &str, payload_type: u32) -> Relation {
    let name = TableName::parse(table).unwrap();
    Relation {
        oid,
        namespace: name.schema,
        name: name.name,
        replica_identity: b'd',
        columns: vec![
            col("id", 20),
            col("event_id", 2950),
            col("event_type", 25),
            col("aggregate_id", 25),
            col("payload", payload_type),
        ],
    }
}

fn t(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// A row of relation `oid`, its values as text.
fn row(oid: u32, values: &[&str]) -> Insert {
    Insert {
        relation_oid: oid,
        tuple: values.iter().map(|v| t(v)).collect(),
    }
}

/// What `r` routes a row of relation `oid` to, which must be a record.
fn record(r: &mut Router, oid: u32, values: &[&str]) -> OutboxRecord {
    match r.route(&row(oid, values)) {
        Ok(Routed::Record(rec)) => rec,
        other => panic!("relation {oid} is an outbox table: {other:?}"),
    }
}

#[test]
fn routes_a_debezium_row() {
    let mut r = debezium_router();
    let rec = record(
        &mut r,
        7,
        &["u-1", "Order", "o-9", "OrderCreated", "{\"a\": 1}"],
    );
    assert_eq!(&*rec.topic, "outbox.event.Order");
    assert_eq!(rec.key, "o-9");
    assert_eq!(rec.payload.as_deref(), Some(&b"{\"a\": 1}"[..]));
    assert_eq!(
        rec.headers,
        vec![
            ("id".into(), Some(Bytes::from_static(b"u-1"))),
            (
                "eventType".into(),
                Some(Bytes::from_static(b"OrderCreated"))
            )
        ]
    );
}

/// The last topic is reused, never confused with another: a run of one
/// topic shares one name, a change renders and validates afresh, and an
/// invalid name is refused even right after a valid one.
#[test]
fn topics_are_shared_within_a_run_and_rendered_on_change() {
    let mut r = debezium_router();
    let mut topic = |agg_type: &str| {
        r.route(&row(7, &["u", agg_type, "k", "E", "{}"]))
            .map(|routed| match routed {
                Routed::Record(rec) => rec.topic,
                Routed::OtherTable(t) => panic!("not the outbox: {t}"),
            })
    };
    let a1 = topic("Order").unwrap();
    let a2 = topic("Order").unwrap();
    assert!(Arc::ptr_eq(&a1, &a2), "one name for a run of one topic");
    assert_eq!(&*topic("Invoice").unwrap(), "outbox.event.Invoice");
    let a3 = topic("Order").unwrap();
    assert_eq!(&*a3, "outbox.event.Order");
    assert!(matches!(
        topic("Or der"),
        Err(RouteError::InvalidTopic { .. })
    ));
    assert_eq!(&*topic("Order").unwrap(), "outbox.event.Order");
}

#[test]
fn bad_rows_are_typed_errors() {
    let mut r = debezium_router();
    let row = |agg_type: TupleValue, key: TupleValue, id: TupleValue| Insert {
        relation_oid: 7,
        tuple: vec![id, agg_type, key, t("x"), TupleValue::Null],
    };
    assert!(matches!(
        r.route(&row(t("Order"), TupleValue::Null, t("1"))),
        Err(RouteError::Null { role: "key", .. })
    ));
    assert!(matches!(
        r.route(&row(t("Order"), t(""), t("1"))),
        Err(RouteError::EmptyKey { .. })
    ));
    assert!(matches!(
        r.route(&row(t("Order"), t("k"), TupleValue::Null)),
        Err(RouteError::Null {
            role: "event id",
            ..
        })
    ));
    assert!(matches!(
        r.route(&row(t("Or der"), t("k"), t("1"))),
        Err(RouteError::InvalidTopic { .. })
    ));
    assert!(matches!(
        r.route(&row(TupleValue::Null, t("k"), t("1"))),
        Err(RouteError::InvalidTopic { .. })
    ));
    assert!(matches!(
        r.route(&row(t(""), t("k"), t("1"))),
        Err(RouteError::InvalidTopic { .. })
    ));
    assert!(matches!(
        r.route(&Insert {
            relation_oid: 99,
            tuple: vec![]
        }),
        Err(RouteError::UnknownRelation(99))
    ));
}

#[test]
fn missing_column_lists_the_existing_ones() {
    let mut r = debezium_router();
    let err = r
        .on_relation(&Relation {
            oid: 8,
            namespace: "public".into(),
            name: "outboxevent".into(),
            replica_identity: b'd',
            columns: vec![col("id", 2950), col("payload", 3802)],
        })
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no column aggregateid"), "{msg}");
    assert!(msg.contains("its columns are: id, payload"), "{msg}");
}

#[test]
fn a_mapped_column_changing_type_is_refused_an_unmapped_one_is_not() {
    let mut r = debezium_router();
    // The router's table, with the payload's type and a column it does not
    // map as given.
    let rel = |payload_type: u32, extra: u32| {
        let mut rel = debezium_relation(7);
        rel.columns
            .iter_mut()
            .filter(|c| c.name == "payload")
            .for_each(|c| c.type_oid = payload_type);
        rel.columns.push(col("note", extra));
        rel
    };
    // An unmapped column may come and change.
    r.on_relation(&rel(3802, 25)).unwrap();
    r.on_relation(&rel(3802, 23)).unwrap();
    let err = r.on_relation(&rel(17, 23)).unwrap_err().to_string();
    assert!(
        err.contains(
            "the type of column payload of public.outboxevent (set by --payload-column) changed"
        ),
        "{err}"
    );
}

#[test]
fn rows_of_other_tables_are_skipped_by_name() {
    let mut r = debezium_router();
    r.on_relation(&Relation {
        oid: 9,
        namespace: "public".into(),
        name: "orders".into(),
        replica_identity: b'd',
        columns: vec![col("id", 20)],
    })
    .unwrap();
    match r.route(&row(9, &["1"])) {
        Ok(Routed::OtherTable(name)) => assert_eq!(&*name, "public.orders"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn templates_and_names_parse() {
    assert!(TopicTemplate::parse("events.{event_type}").is_ok());
    assert_eq!(
        TopicTemplate::parse("fixed").unwrap().fixed(),
        Some("fixed")
    );
    for bad in ["", "a{b", "a}b", "{}", "bad topic.{x}"] {
        assert!(TopicTemplate::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(
        TableName::parse("outbox").unwrap().to_string(),
        "public.outbox"
    );
    assert_eq!(
        TableName::parse("App.\"Out.Box\"").unwrap().to_string(),
        "app.Out.Box"
    );
    assert!(TableName::parse("a.b.c").is_err());
    assert_eq!(
        decode_bytea_hex(&Bytes::from_static(b"\\x00fF")).unwrap(),
        Bytes::from_static(&[0, 255])
    );
    assert!(decode_bytea_hex(&Bytes::from_static(b"00")).is_err());
}

#[test]
fn several_tables_route_each_by_its_own_mapping() {
    let mut r = Router::new(vec![
        classic_config("billing.outbox", "billing.{event_type}"),
        debezium_config(),
    ]);
    r.on_relation(&classic_relation(1, "billing.outbox", 3802))
        .unwrap();
    r.on_relation(&debezium_relation(2)).unwrap();
    r.on_relation(&classic_relation(3, "shipping.outbox", 3802))
        .unwrap();
    let a = record(&mut r, 1, &["1", "e-1", "Invoiced", "inv-7", "{}"]);
    assert_eq!(&*a.topic, "billing.Invoiced");
    assert_eq!(&a.key[..], b"inv-7");
    assert_eq!(&a.event_id[..], b"e-1");
    let b = record(&mut r, 2, &["u-1", "Order", "o-9", "OrderCreated", "{}"]);
    assert_eq!(&*b.topic, "outbox.event.Order");
    assert_eq!(&b.key[..], b"o-9");
    // A table no section names is skipped, by name.
    match r.route(&row(3, &["1", "e-2", "X", "k", "{}"])).unwrap() {
        Routed::OtherTable(name) => assert_eq!(&*name, "shipping.outbox"),
        other => panic!("{other:?}"),
    }
    // A mapped column's type change is caught per table: the same column
    // name with another type in another table is not a change.
    let mut again = Router::with_column_types(r.tables().to_vec(), r.column_types().clone());
    again
        .on_relation(&classic_relation(1, "billing.outbox", 3802))
        .unwrap();
    let e = again
        .on_relation(&classic_relation(1, "billing.outbox", 25))
        .unwrap_err();
    assert!(
        matches!(e, RouteError::ColumnTypeChanged { ref table, .. } if table == "billing.outbox"),
        "{e}"
    );
}
