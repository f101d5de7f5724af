//! A table's name as Postgres spells it (`schema.table`), or a schema
//! pattern (`tenant_*.outbox`) standing for several: parsed from the
//! configuration, matched against the catalog, quoted for SQL.

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
            super::quote_ident(&self.schema),
            super::quote_ident(&self.name)
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

#[cfg(test)]
mod tests {
    use super::*;

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
