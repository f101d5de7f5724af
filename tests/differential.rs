//! Differential test: for a varied workload, what the relay publishes equals
//! what a SELECT of the same rows returns.
//!
//! One custom outbox table carries every column type the relay can meet:
//! four payload columns (`jsonb`, `json`, `text`, `bytea`) and header columns
//! of most built-in types plus an enum, a domain and a composite. Four relays
//! run side by side, one per payload column (each with its own slot and
//! topic), and every header column is exposed through `--header-columns`, so
//! the text form of every value is checked on every record.
//!
//! The reference is a simple-query (text protocol) SELECT: it returns each
//! value's OUTPUT function text, which is what pgoutput sends (a cast to text
//! can differ, e.g. bool gives `true` where the output function gives `t`).
//! The bytea payload is read with the binary protocol as raw bytes. The
//! comparing session does not SET anything, so it shares the server defaults
//! (TimeZone, DateStyle, IntervalStyle, extra_float_digits, bytea_output)
//! with the walsender, whose output functions produced the relay's text.
//! The inserting session sets its own TimeZone, so timestamptz literals
//! without an offset are read in a zone different from the server's.
//!
//! Rows: NULL in every nullable column (headers present without a value, no
//! record value), empty strings, 0- and 1-byte payloads, unicode (multi-byte,
//! emoji with ZWJ sequences, combining characters, RTL and bidi controls),
//! backslashes, quotes and control characters, numeric/float extremes,
//! infinite and BC dates, payloads at TOAST boundaries, compressible values
//! of exactly 1 MiB, and incompressible values over 1 MB stored out of line
//! (TOASTed; asserted through the TOAST table).
//!
//! Records over 1 MB: Kafka's default `max.message.bytes` (1048588) holds
//! per topic, so the test's topics are created with `max.message.bytes =
//! 8388608` through the Admin API (checked with DescribeConfigs, and the
//! >1 MB records are accepted), and the relays get `--kafka-property
//! message.max.bytes=8388608`.

use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::*;
use tokio_postgres::SimpleQueryMessage;

const TABLE: &str = "diff_outbox";
const PUBLICATION: &str = "diff_pub";
const PAYLOADS: [&str; 4] = ["p_jsonb", "p_json", "p_text", "p_bytea"];
const MAX_MESSAGE_BYTES: &str = "8388608";

/// Header columns and their header names, in `--header-columns` order.
const HEADERS: &[(&str, &str)] = &[
    ("event_type", "event_type"),
    ("h_int2", "int2"),
    ("h_int4", "int4"),
    ("h_int8", "int8"),
    ("h_numeric", "numeric"),
    ("h_numeric_t", "numeric_40_20"),
    ("h_float4", "float4"),
    ("h_float8", "float8"),
    ("h_bool", "bool"),
    ("h_date", "date"),
    ("h_ts", "timestamp"),
    ("h_tstz", "timestamptz"),
    ("h_timetz", "timetz"),
    ("h_interval", "interval"),
    ("h_uuid", "uuid"),
    ("h_inet", "inet"),
    ("h_cidr", "cidr"),
    ("h_macaddr", "macaddr"),
    ("h_bytea", "bytea"),
    ("h_text_arr", "text_array"),
    ("h_int_arr", "int_array"),
    ("h_jsonb", "jsonb"),
    ("h_varchar", "varchar_10"),
    ("h_char", "char_5"),
    ("h_enum", "enum"),
    ("h_domain", "domain"),
    ("h_composite", "composite"),
    ("h_text", "text"),
];

const SCHEMA: &str = r#"
CREATE TYPE diff_mood AS ENUM ('sad', 'ok', 'happy 😀', 'with "quote" \ and ''apos''');
CREATE DOMAIN diff_posint AS integer CHECK (VALUE > 0);
CREATE TYPE diff_pair AS (a integer, b text);
CREATE TABLE diff_outbox (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL DEFAULT gen_random_uuid(),
    aggregate_id text NOT NULL,
    event_type   text NOT NULL,
    p_jsonb      jsonb,
    p_json       json,
    p_text       text,
    p_bytea      bytea,
    h_int2       int2,
    h_int4       int4,
    h_int8       int8,
    h_numeric    numeric,
    h_numeric_t  numeric(40, 20),
    h_float4     float4,
    h_float8     float8,
    h_bool       bool,
    h_date       date,
    h_ts         timestamp,
    h_tstz       timestamptz,
    h_timetz     timetz,
    h_interval   interval,
    h_uuid       uuid,
    h_inet       inet,
    h_cidr       cidr,
    h_macaddr    macaddr,
    h_bytea      bytea,
    h_text_arr   text[],
    h_int_arr    int[],
    h_jsonb      jsonb,
    h_varchar    varchar(10),
    h_char       char(5),
    h_enum       diff_mood,
    h_domain     diff_posint,
    h_composite  diff_pair,
    h_text       text
);
"#;

/// A SQL string literal (standard_conforming_strings: backslashes are data).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const UNICODE: &str = "é ü ß 中文 日本語 한국어 😀 👨\u{200d}👩\u{200d}👧\u{200d}👦 🏳\u{fe0f}\u{200d}🌈 \
     e\u{301} a\u{308}\u{323} Z\u{335}\u{321} עברית العربية \u{200f}\u{202e}rtl\u{202c} \u{feff}bom \u{10ffff} 𝄞";

const AWKWARD: &str = "back\\slash \\\\ \\x41 \\n \"dq\" 'sq' '' \"\" tab\tnl\ncr\r \u{1}\u{7f} {a,b} (c) $$ %s ; -- /*";

/// One row: column → SQL expression; columns left out are NULL.
fn rows() -> Vec<Vec<(&'static str, String)>> {
    let all_bytes = "decode(string_agg(lpad(to_hex(i), 2, '0'), '' ORDER BY i), 'hex') \
                     FROM generate_series(0, 255) i";
    // Incompressible text (md5 hex), so that it is stored out of line.
    let big_text = |n: usize| {
        format!("(SELECT string_agg(md5(i::text || 'x'), '' ORDER BY i) FROM generate_series(1, {n}) i)")
    };
    let big_bytes = |n: usize| {
        format!("(SELECT decode(string_agg(md5(i::text || 'b'), '' ORDER BY i), 'hex') FROM generate_series(1, {n}) i)")
    };
    let payloads = |text: &str, json: &str| -> Vec<(&'static str, String)> {
        vec![
            ("p_text", text.to_string()),
            ("p_json", format!("({json})::json")),
            ("p_jsonb", format!("({json})::jsonb")),
            ("p_bytea", format!("convert_to({text}, 'UTF8')")),
        ]
    };
    let mut rows: Vec<Vec<(&'static str, String)>> = Vec::new();

    // 0: NULL in every nullable column.
    rows.push(vec![
        ("aggregate_id", lit("agg-null")),
        ("event_type", lit("AllNull")),
    ]);

    // 1: empty strings and zero values everywhere.
    let mut r = vec![
        ("aggregate_id", lit("agg-empty")),
        ("event_type", lit("")),
        ("p_text", lit("")),
        ("p_json", lit("\"\"")),
        ("p_jsonb", lit("\"\"")),
        ("p_bytea", lit("\\x")),
        ("h_int2", "0".into()),
        ("h_int4", "0".into()),
        ("h_int8", "0".into()),
        ("h_numeric", lit("-0.000")),
        ("h_numeric_t", "0".into()),
        ("h_float4", lit("-0")),
        ("h_float8", lit("-0")),
        ("h_bool", "false".into()),
        ("h_date", lit("2000-01-01")),
        ("h_ts", lit("2000-01-01 00:00:00")),
        ("h_tstz", lit("2000-01-01 00:00:00")),
        ("h_timetz", lit("00:00:00+00")),
        ("h_interval", lit("0")),
        ("h_uuid", lit("00000000-0000-0000-0000-000000000000")),
        ("h_inet", lit("0.0.0.0/0")),
        ("h_cidr", lit("0.0.0.0/0")),
        ("h_macaddr", lit("00:00:00:00:00:00")),
        ("h_bytea", lit("\\x")),
        ("h_text_arr", lit("{}")),
        ("h_int_arr", lit("{}")),
        ("h_jsonb", lit("{}")),
        ("h_varchar", lit("")),
        ("h_char", lit("")),
        ("h_enum", lit("sad")),
        ("h_domain", "1".into()),
        ("h_composite", "ROW(NULL, NULL)".into()),
        ("h_text", lit("")),
    ];
    rows.push(std::mem::take(&mut r));

    // 2: one-byte payloads and one-element edge values.
    rows.push(vec![
        ("aggregate_id", lit("a")),
        ("event_type", lit("One")),
        ("p_text", lit("x")),
        ("p_json", lit("1")),
        ("p_jsonb", lit("1")),
        ("p_bytea", lit("\\x00")),
        ("h_bytea", lit("\\x00")),
        ("h_text_arr", lit("{\"\"}")),
        ("h_int_arr", "ARRAY[NULL]::int[]".into()),
        ("h_jsonb", lit("null")),
        ("h_varchar", lit(" ")),
        ("h_char", lit("a")),
        ("h_composite", "ROW(0, '')".into()),
        ("h_text", lit(" ")),
        ("h_float4", lit("1.17549435e-38")),
        ("h_float8", lit("0.1")),
        ("h_numeric", lit("0.1")),
        ("h_bool", "true".into()),
    ]);

    // 3: unicode everywhere.
    let json_uni = serde_json::json!({ "t": UNICODE, "k\u{e9}y": [UNICODE, "", null] }).to_string();
    let mut r = payloads(&lit(UNICODE), &lit(&json_uni));
    r.extend([
        ("aggregate_id", lit("agg-ünï-中文-😀-עב")),
        ("event_type", lit("Ünïcødé😀")),
        ("h_text", lit(UNICODE)),
        ("h_varchar", lit("😀😀😀😀😀👍🏽e\u{301}ü")),
        ("h_char", lit("é😀")),
        (
            "h_text_arr",
            format!("ARRAY[{}, '😀 x', 'עברית', 'e\u{301}']", lit(UNICODE)),
        ),
        ("h_jsonb", lit(&json_uni)),
        ("h_enum", lit("happy 😀")),
        ("h_composite", format!("ROW(-1, {})", lit(UNICODE))),
        ("h_domain", "2147483647".into()),
    ]);
    rows.push(r);

    // 4: backslashes, quotes, control characters; JSON with escapes and odd
    // whitespace (json keeps its text as written, jsonb normalises).
    let json_awkward = r#"{ "a\\b" : "q\"uote" ,"nl":"\n\t\u0001", "u":"\u00e9\ud83d\ude00", "a\\b": [ 1 ,2.50, 1e2, -0 ] ,"dup":1,"dup":2 }"#;
    let mut r = payloads(&lit(AWKWARD), &lit(json_awkward));
    r.extend([
        ("aggregate_id", lit("agg-\\\"'\\\\x00 ")),
        ("event_type", lit("Quote\"d'\\")),
        ("h_text", lit(AWKWARD)),
        ("h_varchar", lit("a\\\"b'c")),
        ("h_char", lit("\\")),
        (
            "h_text_arr",
            format!(
                "ARRAY['a,b', 'c\"d', 'e\\f', 'NULL', NULL, '', '{{}}', ' sp ', {}]",
                lit(AWKWARD)
            ),
        ),
        ("h_int_arr", lit("{{1,2},{3,NULL}}")),
        ("h_jsonb", lit(json_awkward)),
        ("h_enum", lit("with \"quote\" \\ and 'apos'")),
        (
            "h_composite",
            format!("ROW(7, {})", lit("a \"b\" \\ c,d (e) ''")),
        ),
        ("h_bytea", lit("\\x5c22270a0d09005c78")),
    ]);
    rows.push(r);

    // 5: extremes, one direction.
    rows.push(vec![
        ("aggregate_id", lit("agg-extremes")),
        ("event_type", lit("Min")),
        ("p_text", lit("min")),
        ("p_json", lit("[]")),
        ("p_jsonb", lit("[]")),
        ("p_bytea", format!("(SELECT {all_bytes})")),
        ("h_int2", "-32768".into()),
        ("h_int4", "-2147483648".into()),
        ("h_int8", "-9223372036854775808".into()),
        (
            "h_numeric",
            lit("-123456789012345678901234567890.123456789012345678901234567890"),
        ),
        (
            "h_numeric_t",
            lit("-12345678901234567890.12345678901234567890"),
        ),
        ("h_float4", lit("-Infinity")),
        ("h_float8", lit("1e-300")),
        ("h_bool", "false".into()),
        ("h_date", lit("4713-01-01 BC")),
        ("h_ts", lit("-infinity")),
        ("h_tstz", lit("0001-01-01 00:00:00 BC")),
        ("h_timetz", lit("23:59:59.999999-15:59")),
        ("h_interval", lit("-178000000 years")),
        ("h_uuid", lit("ffffffff-ffff-ffff-ffff-ffffffffffff")),
        ("h_inet", lit("::ffff:1.2.3.4/128")),
        ("h_cidr", lit("2001:db8::/32")),
        ("h_macaddr", lit("08:00:2b:01:02:03")),
        ("h_bytea", format!("(SELECT {all_bytes})")),
        ("h_text_arr", lit("[0:1]={a,b}")),
        ("h_int_arr", lit("{-2147483648,2147483647}")),
        (
            "h_jsonb",
            lit("[1e-300, 123456789012345678901234567890.5, -0.0]"),
        ),
        ("h_enum", lit("ok")),
        ("h_domain", "1".into()),
        ("h_composite", "ROW(-2147483648, NULL)".into()),
        ("h_text", lit("-")),
    ]);

    // 6: extremes, the other direction, and NaN.
    rows.push(vec![
        ("aggregate_id", lit("agg-extremes")),
        ("event_type", lit("Max")),
        ("p_text", lit("max")),
        ("p_json", lit("{}")),
        ("p_jsonb", lit("{}")),
        ("p_bytea", lit("\\xff")),
        ("h_int2", "32767".into()),
        ("h_int4", "2147483647".into()),
        ("h_int8", "9223372036854775807".into()),
        ("h_numeric", lit("NaN")),
        (
            "h_numeric_t",
            lit("99999999999999999999.99999999999999999999"),
        ),
        ("h_float4", lit("NaN")),
        ("h_float8", lit("-Infinity")),
        ("h_date", lit("5874897-12-31")),
        ("h_ts", lit("294276-12-31 23:59:59.999999")),
        ("h_tstz", lit("infinity")),
        ("h_timetz", lit("24:00:00+15:59")),
        ("h_interval", lit("1 year 2 mons -3 days 04:05:06.789")),
        ("h_inet", lit("192.168.0.1/24")),
        ("h_cidr", lit("10.0.0.0/8")),
        ("h_macaddr", lit("FF-FF-FF-FF-FF-FF")),
        (
            "h_jsonb",
            lit(r#"{"b": {"c": [true, false, null]}, "a": "\"\\/"}"#),
        ),
        ("h_enum", lit("with \"quote\" \\ and 'apos'")),
    ]);

    // 7: more numbers and times read in the inserting session's TimeZone.
    rows.push(vec![
        ("aggregate_id", lit("agg-numbers")),
        ("event_type", lit("Numbers")),
        ("p_text", lit("0")),
        ("p_json", lit("0")),
        ("p_jsonb", lit("0")),
        ("p_bytea", lit("\\x30")),
        ("h_numeric", "1e1000".into()),
        ("h_numeric_t", lit("1.5")),
        ("h_float4", lit("3.4028235e38")),
        ("h_float8", lit("5e-324")),
        ("h_ts", lit("2000-02-29 12:00:00.000001")),
        ("h_tstz", lit("1999-12-31 23:59:59.5")),
        ("h_timetz", lit("12:34:56.789")),
        ("h_interval", lit("P1Y2M3DT4H5M6.000007S")),
        ("h_date", lit("2000-02-29")),
        ("h_int_arr", lit("{}")),
    ]);
    rows.push(vec![
        ("aggregate_id", lit("agg-numbers")),
        ("event_type", lit("Numbers")),
        ("p_text", lit("1")),
        ("p_json", lit("1.000")),
        ("p_jsonb", lit("1.000")),
        ("p_bytea", lit("\\x31")),
        ("h_numeric", lit("Infinity")),
        ("h_numeric_t", lit("-0.00000000000000000001")),
        ("h_float4", lit("Infinity")),
        ("h_float8", lit("Infinity")),
        ("h_tstz", lit("2024-03-10 02:30:00 America/New_York")),
        ("h_ts", lit("infinity")),
        ("h_interval", lit("-00:00:00.000001")),
    ]);
    rows.push(vec![
        ("aggregate_id", lit("agg-numbers")),
        ("event_type", lit("Numbers")),
        ("p_text", lit("2")),
        ("p_json", lit("2")),
        ("p_jsonb", lit("2")),
        ("p_bytea", lit("\\x32")),
        ("h_numeric", lit("-Infinity")),
        ("h_float4", lit("-0.1")),
        ("h_float8", lit("NaN")),
        ("h_tstz", lit("-infinity")),
        ("h_timetz", lit("00:00:00.5-01:30")),
    ]);

    // Payload sizes around TOAST boundaries (compressible, so stored
    // compressed inline or out of line), and exactly 1 MiB.
    for n in [126usize, 127, 2031, 2032, 2033, 8192, 1 << 20] {
        let text = format!("repeat('y', {n})");
        let json = format!("'\"' || repeat('y', {}) || '\"'", n.saturating_sub(2));
        let mut r = payloads(&text, &json);
        r.extend([
            ("aggregate_id", lit(&format!("agg-size-{n}"))),
            ("event_type", lit("Size")),
            ("h_int8", n.to_string()),
        ]);
        rows.push(r);
    }

    // TOASTed (out of line, incompressible) payloads over 1 MB, and a
    // TOASTed header value.
    let big = big_text(40_000); // 1,280,000 bytes
    rows.push(vec![
        ("aggregate_id", lit("agg-big")),
        ("event_type", lit("Big")),
        ("p_text", big.clone()),
        ("p_json", format!("to_json({big})")),
        (
            "p_jsonb",
            format!("jsonb_build_object('data', {big}, 'ü', '😀')"),
        ),
        ("p_bytea", big_bytes(80_000)), // 1,280,000 bytes
        ("h_text", big_text(3_000)),    // 96,000 bytes
        ("h_bytea", big_bytes(1_000)),  // 16,000 bytes → 32,002 hex chars
        ("h_text_arr", format!("ARRAY[{}, 'x']", big_text(500))),
    ]);
    // The same again, in one transaction with small rows around it.
    rows.push(vec![
        ("aggregate_id", lit("agg-big")),
        ("event_type", lit("Big")),
        ("p_text", big_text(45_000)),
        ("p_json", format!("to_json({})", big_text(45_000))),
        ("p_jsonb", format!("to_jsonb({})", big_text(45_000))),
        ("p_bytea", big_bytes(70_000)),
    ]);
    rows
}

fn insert_sql(row: &[(&str, String)]) -> String {
    let cols: Vec<&str> = row.iter().map(|(c, _)| *c).collect();
    let vals: Vec<&str> = row.iter().map(|(_, v)| v.as_str()).collect();
    format!(
        "INSERT INTO {TABLE} ({}) VALUES ({});",
        cols.join(", "),
        vals.join(", ")
    )
}

/// Creates a one-partition topic, with `max.message.bytes` raised when
/// `big`, and returns what the broker reports for that config.
async fn create_topic(brokers: &str, topic: &str, big: bool) -> Option<String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let mut new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    if big {
        new = new.set("max.message.bytes", MAX_MESSAGE_BYTES);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let res = admin
        .create_topics([&new], &opts)
        .await
        .expect("create topic");
    for r in res {
        if let Err((t, e)) = r {
            panic!("create topic {t} (big: {big}): {e}");
        }
    }
    // CreateTopics returns once the controller committed the topic; the
    // broker answering DescribeConfigs may apply that metadata a moment
    // later and list the topic without its configs. Poll until the value
    // set at creation shows, for at most 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let described = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await
            .expect("describe configs");
        let value = described.into_iter().find_map(|r| match r {
            Ok(res) => res.get("max.message.bytes").and_then(|e| e.value.clone()),
            Err(e) => {
                eprintln!("describe_configs for {topic}: {e}");
                None
            }
        });
        if !big || value.as_deref() == Some(MAX_MESSAGE_BYTES) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Produces one record of `size` bytes directly (not through the relay).
async fn produce_direct(brokers: &str, topic: &str, size: usize) -> Result<(), String> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", MAX_MESSAGE_BYTES)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    let payload = vec![b'z'; size];
    producer
        .send(
            FutureRecord::to(topic).key("k").payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| e.to_string())
}

/// The broker enforces `max.message.bytes` per topic (Kafka's default,
/// 1048588, unless the topic was created with another value) and honours the
/// value given at creation: a 1.2 MB record is refused by a default topic and
/// accepted by one created with 8 MiB.
async fn broker_honours_per_topic_max_message_bytes(brokers: &str, prefix: &str) {
    let small = format!("{prefix}.probe-default");
    let big = format!("{prefix}.probe-big");
    let default = create_topic(brokers, &small, false).await;
    // Some brokers list only the configs set on the topic.
    assert!(
        matches!(default.as_deref(), None | Some("1048588")),
        "default topic's max.message.bytes: {default:?}"
    );
    let raised = create_topic(brokers, &big, true).await;
    assert_eq!(raised.as_deref(), Some(MAX_MESSAGE_BYTES));
    let refused = produce_direct(brokers, &small, 1_200_000).await;
    eprintln!("1.2 MB record on a default topic: {refused:?}");
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("too large")
            || e.contains("TooLarge")
            || e.contains("Too large")),
        "a 1.2 MB record on a default topic: {refused:?}"
    );
    produce_direct(brokers, &big, 1_200_000)
        .await
        .expect("a 1.2 MB record on a topic with max.message.bytes = 8 MiB");
}

/// Where two byte strings first differ, for messages about big values.
fn describe_diff(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let window = |b: &[u8]| {
        let s = at.saturating_sub(16);
        let e = (at + 48).min(b.len());
        format!("{:?}", String::from_utf8_lossy(&b[s.min(e)..e]))
    };
    if got.len() <= 200 && want.len() <= 200 {
        format!(
            "got {:?} ({:02x?}), want {:?} ({:02x?})",
            String::from_utf8_lossy(got),
            got,
            String::from_utf8_lossy(want),
            want
        )
    } else {
        format!(
            "got {} bytes, want {} bytes, first difference at byte {at}: got …{}…, want …{}…",
            got.len(),
            want.len(),
            window(got),
            window(want)
        )
    }
}

fn opt_diff(got: &Option<Vec<u8>>, want: &Option<Vec<u8>>) -> String {
    match (got, want) {
        (Some(g), Some(w)) => describe_diff(g, w),
        (g, w) => format!(
            "got {}, want {}",
            g.as_ref()
                .map_or("NULL (no value)".to_string(), |g| describe_diff(g, g)),
            w.as_ref()
                .map_or("NULL (no value)".to_string(), |w| describe_diff(w, w))
        ),
    }
}

/// One row as the reference SELECT returns it.
struct Reference {
    id: i64,
    key: Vec<u8>,
    /// Payload per payload column.
    payloads: HashMap<&'static str, Option<Vec<u8>>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

async fn reference(db: &TestDb) -> HashMap<String, Reference> {
    let mut cols = vec![
        "id",
        "event_id",
        "aggregate_id",
        "p_jsonb",
        "p_json",
        "p_text",
    ];
    cols.extend(HEADERS.iter().map(|(c, _)| *c));
    // Text protocol: each value's output function text, in this session's
    // (= the server's default) settings.
    let msgs = db
        .client
        .simple_query(&format!(
            "SELECT {} FROM {TABLE} ORDER BY id",
            cols.join(", ")
        ))
        .await
        .expect("reference select");
    let mut out = HashMap::new();
    for m in msgs {
        let SimpleQueryMessage::Row(row) = m else {
            continue;
        };
        let get = |i: usize| row.get(i).map(|s| s.as_bytes().to_vec());
        let event_id = row.get(1).unwrap().to_string();
        let mut payloads = HashMap::new();
        payloads.insert("p_jsonb", get(3));
        payloads.insert("p_json", get(4));
        payloads.insert("p_text", get(5));
        let mut headers = vec![("id".to_string(), Some(event_id.as_bytes().to_vec()))];
        for (i, (_, name)) in HEADERS.iter().enumerate() {
            headers.push((name.to_string(), get(6 + i)));
        }
        out.insert(
            event_id,
            Reference {
                id: row.get(0).unwrap().parse().unwrap(),
                key: get(2).unwrap(),
                payloads,
                headers,
            },
        );
    }
    // Binary protocol for the bytea payload: the stored bytes.
    for r in db
        .client
        .query(&format!("SELECT event_id::text, p_bytea FROM {TABLE}"), &[])
        .await
        .unwrap()
    {
        let id: String = r.get(0);
        let bytes: Option<Vec<u8>> = r.get(1);
        out.get_mut(&id).unwrap().payloads.insert("p_bytea", bytes);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_records_equal_a_select_of_the_same_rows() {
    let started = Instant::now();
    let db = TestDb::new("diff").await;
    db.exec(SCHEMA).await;
    let header_arg = HEADERS
        .iter()
        .map(|(c, h)| format!("{c}:{h}"))
        .collect::<Vec<_>>()
        .join(",");
    let prefix = unique("diff");
    let brokers = brokers();
    broker_honours_per_topic_max_message_bytes(&brokers, &prefix).await;

    // One slot, topic and relay per payload column.
    let mut runs = Vec::new();
    for p in PAYLOADS {
        let slot = format!("s_{}_{p}", db.name);
        let topic = format!("{prefix}.{p}");
        let common: Vec<String> = [
            "--table",
            TABLE,
            "--publication",
            PUBLICATION,
            "--slot",
            &slot,
            "--id-column",
            "event_id",
            "--key-column",
            "aggregate_id",
            "--event-type-column",
            "event_type",
            "--payload-column",
            p,
            "--header-columns",
            &header_arg,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut setup = vec!["--database-url", db.url.as_str()];
        setup.extend(common.iter().map(String::as_str));
        relay_setup(&setup);

        let configured = create_topic(&brokers, &topic, true).await;
        assert_eq!(
            configured.as_deref(),
            Some(MAX_MESSAGE_BYTES),
            "the broker does not report the topic's max.message.bytes as set"
        );
        let mut extra = common.clone();
        extra.extend(
            [
                "--topic",
                &topic,
                "--kafka-property",
                &format!("message.max.bytes={MAX_MESSAGE_BYTES}"),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let relay = Relay::start(&relay_args(&db, &brokers, &extra));
        runs.push((p, topic, relay));
    }

    // The workload, from a session with its own TimeZone: a few rows per
    // transaction, the big ones mixed in.
    let writer = sql_client(&db.url).await;
    writer
        .batch_execute("SET TimeZone = 'America/St_Johns'")
        .await
        .unwrap();
    let rows = rows();
    for chunk in rows.chunks(3) {
        let mut sql = String::from("BEGIN;");
        for r in chunk {
            sql.push_str(&insert_sql(r));
        }
        sql.push_str("COMMIT;");
        writer
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
    }

    // The big payloads really are out of line.
    let toasted: i64 = scalar(
        &db.client,
        &format!(
            "SELECT count(*) FROM {TABLE} WHERE octet_length(p_text) > 1000000 \
                   AND pg_column_size(p_text) > 8000 AND pg_column_size(p_bytea) > 8000"
        ),
        &[],
    )
    .await;
    let toast_chunks: i64 = {
        let toast: String = scalar(&db.client, &format!("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = '{TABLE}'::regclass"), &[]).await;
        scalar(&db.client, &format!("SELECT count(*) FROM {toast}"), &[]).await
    };
    // Two incompressible ones, and 1 MiB of 'y' (compressed, still out of line).
    assert_eq!(toasted, 3, "payloads over 1 MB stored out of line");
    assert!(
        toast_chunks > 1000,
        "TOAST table holds {toast_chunks} chunks"
    );

    let expected = reference(&db).await;
    assert_eq!(expected.len(), rows.len());

    let mut mismatches = Vec::new();
    for (p, topic, relay) in &mut runs {
        let records = consume(
            &brokers,
            std::slice::from_ref(topic),
            rows.len(),
            Duration::from_secs(40),
        )
        .await;
        assert!(
            relay.is_running(),
            "relay for {p} died: {}",
            relay.log_text()
        );
        assert_eq!(
            records.len(),
            rows.len(),
            "{p}: exactly one record per row and nothing else on {topic}"
        );
        let mut seen: HashMap<String, usize> = HashMap::new();
        for rec in &records {
            let id = rec.header("id").expect("id header");
            let Some(want) = expected.get(&id) else {
                mismatches.push(format!("{p}: record with unknown id {id}: {rec:?}"));
                continue;
            };
            *seen.entry(id.clone()).or_default() += 1;
            let row = format!("{p} row id={} ({id})", want.id);
            if rec.key.as_deref() != Some(&want.key[..]) {
                mismatches.push(format!(
                    "{row}: key {}",
                    opt_diff(&rec.key, &Some(want.key.clone()))
                ));
            }
            let want_payload = &want.payloads[*p];
            if &rec.payload != want_payload {
                mismatches.push(format!(
                    "{row}: value {}",
                    opt_diff(&rec.payload, want_payload)
                ));
            }
            let names: Vec<&str> = rec.headers.iter().map(|(k, _)| k.as_str()).collect();
            let want_names: Vec<&str> = want.headers.iter().map(|(k, _)| k.as_str()).collect();
            if names != want_names {
                mismatches.push(format!(
                    "{row}: header names {names:?}, want {want_names:?}"
                ));
                continue;
            }
            for ((name, got), (_, w)) in rec.headers.iter().zip(&want.headers) {
                if got != w {
                    mismatches.push(format!("{row}: header {name}: {}", opt_diff(got, w)));
                }
            }
        }
        let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(dups.is_empty(), "{p}: duplicates {dups:?}");
        assert_eq!(seen.len(), rows.len(), "{p}: every row once");
    }

    // Nothing went to the dead-letter topic, and every relay is still up
    // (a bad event would have halted it).
    for (p, _, relay) in &mut runs {
        assert!(
            relay.is_running(),
            "relay for {p} died: {}",
            relay.log_text()
        );
        assert!(
            !relay.log_text().contains("dead-letter"),
            "{p}: {}",
            relay.log_text()
        );
    }

    assert!(
        mismatches.is_empty(),
        "{} mismatch(es) between the records and the SELECT:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );

    for (_, _, relay) in &mut runs {
        relay.stop_clean().await;
    }
    eprintln!("differential test took {:?}", started.elapsed());
    db.drop().await;
}

/// The walsender applies the database's and the role's settings, so
/// `ALTER DATABASE … SET bytea_output = 'escape'` (or the same in
/// postgresql.conf or on the relay's role) changes the text pgoutput sends
/// for bytea. The record value must still be the stored bytes. (The bytea
/// header is not checked here: pinning `bytea_output = hex` on the
/// replication connection, one way to fix this, changes its text.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytea_payload_is_the_stored_bytes_whatever_bytea_output_says() {
    let db = TestDb::new("diff_escape").await;
    db.exec(SCHEMA).await;
    db.exec(&format!(
        "ALTER DATABASE {} SET bytea_output = 'escape'",
        db.name
    ))
    .await;
    let slot = format!("s_{}", db.name);
    let topic = unique("diff_escape");
    let brokers = brokers();
    let common = [
        "--table",
        TABLE,
        "--publication",
        PUBLICATION,
        "--slot",
        &slot,
        "--id-column",
        "event_id",
        "--key-column",
        "aggregate_id",
        "--event-type-column",
        "event_type",
        "--payload-column",
        "p_bytea",
        "--header-columns",
        "h_bytea:bytea",
    ];
    let mut setup = vec!["--database-url", db.url.as_str()];
    setup.extend(common);
    relay_setup(&setup);
    create_topic(&brokers, &topic, false).await;
    let mut extra = common.to_vec();
    extra.extend(["--topic", &topic]);
    let mut relay = Relay::start(&relay_args(&db, &brokers, &extra));
    db.exec(&format!(
        "INSERT INTO {TABLE} (aggregate_id, event_type, p_bytea, h_bytea) \
         VALUES ('agg', 'Escape', '\\x00015c27ff'::bytea, '\\x00015c27ff'::bytea)"
    ))
    .await;
    // A fresh session picks up the database setting, as the walsender did.
    let reader = sql_client(&db.url).await;
    let header_text = match &reader
        .simple_query(&format!("SELECT h_bytea FROM {TABLE}"))
        .await
        .unwrap()[1]
    {
        SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        header_text, "\\000\\001\\\\'\\377",
        "escape format in this database"
    );
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while records.is_empty() && Instant::now() < deadline && relay.is_running() {
        records = consume(
            &brokers,
            std::slice::from_ref(&topic),
            0,
            Duration::from_secs(5),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        relay.is_running(),
        "the relay stopped on a bytea payload under bytea_output = 'escape':\n{}",
        relay.log_text()
    );
    assert_eq!(records.len(), 1, "one record");
    assert_eq!(records[0].payload.as_deref(), Some(&b"\x00\x01\\'\xff"[..]));
    relay.signal("TERM");
    relay.wait(Duration::from_secs(30)).await;
    db.drop().await;
}
