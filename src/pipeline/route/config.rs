//! What to route: the outbox table's name, which columns are the event id,
//! key, payload and headers, and the topic template. Parsed and validated
//! here from the operator's text; the router turns it into a plan per
//! relation. No I/O.

use crate::pipeline::route::template::TopicTemplate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`). Quoted identifiers
    /// keep their case and may contain dots. The schema may be a pattern, `*`
    /// standing for any characters (`tenant_*.outbox`: one outbox per tenant
    /// schema); the table name may not.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts = split_ident(s)?;
        if parts.last().is_some_and(|n| n.contains('*')) {
            return Err(format!(
                "{s:?}: only the schema may be a pattern (tenant_*.outbox), not the table name"
            ));
        }
        match parts.as_slice() {
            [name] => Ok(TableName {
                schema: "public".into(),
                name: name.clone(),
            }),
            [schema, name] => Ok(TableName {
                schema: schema.clone(),
                name: name.clone(),
            }),
            _ => Err(format!(
                "{s:?} is not a table name: expected table or schema.table"
            )),
        }
    }

    /// A schema pattern (`tenant_*.outbox`) rather than one table.
    pub fn is_pattern(&self) -> bool {
        self.schema.contains('*')
    }

    /// Whether the table `schema.name` is this one, or one this pattern
    /// stands for.
    pub fn matches(&self, schema: &str, name: &str) -> bool {
        name == self.name && glob(&self.schema, schema)
    }

    /// The schema as an SQL `LIKE` pattern (`\` escapes), for the catalog
    /// queries that find the tables a pattern stands for.
    pub fn schema_like(&self) -> String {
        let mut out = String::with_capacity(self.schema.len());
        for c in self.schema.chars() {
            match c {
                '*' => out.push('%'),
                '%' | '_' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c => out.push(c),
            }
        }
        out
    }

    /// The same table name with the concrete schema a pattern matched.
    pub fn in_schema(&self, schema: &str) -> TableName {
        TableName {
            schema: schema.to_string(),
            name: self.name.clone(),
        }
    }

    /// The name quoted for SQL (of one table: a pattern is expanded first).
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            crate::pg::quote_ident(&self.schema),
            crate::pg::quote_ident(&self.name)
        )
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// `*` matches any run of characters, everything else itself.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

fn split_ident(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.trim().chars().peekable();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted_part = true;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            cur.push('"');
                        }
                        Some('"') => break,
                        Some(c) => cur.push(c),
                        None => return Err(format!("unterminated quote in {s:?}")),
                    }
                }
            }
            '.' => {
                if cur.is_empty() {
                    return Err(format!("empty name part in {s:?}"));
                }
                parts.push(std::mem::take(&mut cur));
                quoted_part = false;
            }
            // Unquoted identifiers fold to lower case, as in SQL.
            c if !quoted_part => cur.extend(c.to_lowercase()),
            c => cur.push(c),
        }
    }
    if cur.is_empty() {
        return Err(format!("empty name part in {s:?}"));
    }
    parts.push(cur);
    Ok(parts)
}

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

    #[test]
    fn schema_patterns_match_tenant_schemas() {
        let p = TableName::parse("tenant_*.outbox").unwrap();
        assert!(p.is_pattern());
        assert!(p.matches("tenant_a", "outbox"));
        assert!(p.matches("tenant_", "outbox"));
        assert!(!p.matches("tenant_a", "outbox2"));
        assert!(!p.matches("other", "outbox"));
        assert_eq!(p.schema_like(), "tenant\\_%");
        assert_eq!(p.in_schema("tenant_b").to_string(), "tenant_b.outbox");
        let p = TableName::parse("*_events.outbox").unwrap();
        assert!(p.matches("x_events", "outbox") && !p.matches("x_event", "outbox"));
        let one = TableName::parse("public.outbox").unwrap();
        assert!(!one.is_pattern() && one.matches("public", "outbox"));
        assert!(TableName::parse("tenant_a.out*").is_err());
    }
}
