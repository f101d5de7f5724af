//! What to route: the outbox table's name, which columns are the event id,
//! key, payload and headers, and the topic template. Parsed and validated
//! here from the operator's text; the router turns it into a plan per
//! relation. No I/O.

pub use crate::pg::table_name::TableName;
use crate::pipeline::route::template::TopicTemplate;

/// A header taken from a column: `column` or `column:header-name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderColumn {
    pub column: String,
    pub header: String,
}

impl HeaderColumn {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (column, header) = match s.split_once(':') {
            Some((c, h)) => (c.trim(), h.trim()),
            None => (s.trim(), s.trim()),
        };
        if column.is_empty() || header.is_empty() {
            return Err(format!(
                "header column {s:?} must be `column` or `column:header-name`"
            ));
        }
        Ok(HeaderColumn {
            column: column.into(),
            header: header.into(),
        })
    }
}

/// How the key column's text becomes the record key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KeyFormat {
    /// The text's bytes.
    #[default]
    Raw,
    /// The text as a JSON string, escaped as Kafka Connect's JsonConverter
    /// (Jackson) escapes it: the same bytes, so the same partition, as a
    /// Debezium connector with that key converter produced.
    JsonString,
}

impl KeyFormat {
    pub fn encode(self, key: bytes::Bytes) -> bytes::Bytes {
        match self {
            KeyFormat::Raw => key,
            KeyFormat::JsonString => json_string(&String::from_utf8_lossy(&key)).into(),
        }
    }
}

/// A JSON string as Jackson writes it by default: `"` and `\` escaped,
/// control characters as `\b \t \n \f \r` or `\u00XX`, characters
/// outside the Basic Multilingual Plane as a `\uXXXX\uXXXX` surrogate pair,
/// everything else as UTF-8; hex digits upper case.
fn json_string(s: &str) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c if (c as u32) > 0xFFFF => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out.into_bytes()
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub table: TableName,
    pub id_column: String,
    pub key_column: String,
    pub key_format: KeyFormat,
    pub payload_column: String,
    pub topic: TopicTemplate,
    pub headers: Vec<HeaderColumn>,
    /// Column whose value labels the event in metrics and logs.
    pub event_type_column: Option<String>,
    /// Refuse payloads that are not JSON (checked only for columns whose
    /// type does not already guarantee it).
    pub require_json: bool,
}

impl RouterConfig {
    /// Every column the configuration refers to, with the option naming it.
    pub fn referenced_columns(&self) -> Vec<(String, &'static str)> {
        let mut cols = vec![
            (self.id_column.clone(), "--id-column"),
            (self.key_column.clone(), "--key-column"),
            (self.payload_column.clone(), "--payload-column"),
        ];
        cols.extend(self.topic.columns().map(|c| (c.to_string(), "--topic")));
        cols.extend(
            self.headers
                .iter()
                .map(|h| (h.column.clone(), "--header-columns")),
        );
        if let Some(c) = &self.event_type_column {
            cols.push((c.clone(), "--event-type-column"));
        }
        cols
    }

    /// The configured columns, each once, in configuration order.
    pub fn mapped_columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = Vec::new();
        for (c, _) in self.referenced_columns() {
            if !columns.contains(&c) {
                columns.push(c);
            }
        }
        columns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte for byte what Debezium 3.6.1's JsonConverter wrote for these
    /// keys (tests/debezium.rs sees the same through Kafka).
    #[test]
    fn json_string_keys_are_escaped_as_jackson_escapes_them() {
        let enc = |s: &str| KeyFormat::JsonString.encode(bytes::Bytes::from(s.to_string()));
        assert_eq!(&enc("agg-1")[..], br#""agg-1""#);
        assert_eq!(
            &enc("agg-ünï-😀")[..],
            "\"agg-ünï-\\uD83D\\uDE00\"".as_bytes()
        );
        assert_eq!(&enc("a\"b\\c/d")[..], br#""a\"b\\c/d""#);
        assert_eq!(&enc("t\tn\nx\u{1}")[..], br#""t\tn\nx\u0001""#);
        assert_eq!(
            &KeyFormat::Raw.encode(bytes::Bytes::from_static(b"agg-1"))[..],
            b"agg-1"
        );
    }
}
