//! The topic template (`events.{aggregate_type}`) and Kafka's rules for a
//! topic name: parsed and validated once, at start-up. The router resolves
//! its placeholders to tuple positions; `verify` fills it from rows it reads
//! and matches it against the broker's topic names, by the same rules.

/// A topic name template: literal text with `{column}` placeholders, and
/// `{schema}`, the outbox table's schema (for a schema pattern such as
/// `tenant_*.outbox`, the tenant's); `schema` is therefore never a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
    Schema,
}

/// The placeholder that stands for the table's schema, not a column.
pub const SCHEMA_PLACEHOLDER: &str = "schema";

/// A piece of a parsed template: literal text, or a placeholder's column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplatePart<'a> {
    Literal(&'a str),
    Column(&'a str),
    /// `{schema}`: the schema of the row's table.
    Schema,
}

impl TopicTemplate {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("topic template {s:?} has an unclosed '{{'"))?;
            let column = rest[open + 1..open + close].trim();
            if column.is_empty() || column.contains('{') {
                return Err(format!(
                    "topic template {s:?} has an empty or nested placeholder"
                ));
            }
            parts.push(if column == SCHEMA_PLACEHOLDER {
                Part::Schema
            } else {
                Part::Column(column.to_string())
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("topic template {s:?} has a '}}' without '{{'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("the topic template is empty".into());
        }
        for p in &parts {
            if let Part::Literal(l) = p {
                if let Err(reason) = check_topic_chars(l) {
                    return Err(format!("topic template {s:?}: {reason}"));
                }
            }
        }
        Ok(TopicTemplate {
            source: s.to_string(),
            parts,
        })
    }

    /// The pieces in order, for a caller that resolves columns its own way
    /// (the router, to tuple positions).
    pub fn parts(&self) -> impl Iterator<Item = TemplatePart<'_>> {
        self.parts.iter().map(|p| match p {
            Part::Literal(l) => TemplatePart::Literal(l),
            Part::Column(c) => TemplatePart::Column(c),
            Part::Schema => TemplatePart::Schema,
        })
    }

    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts().filter_map(|p| match p {
            TemplatePart::Column(c) => Some(c),
            TemplatePart::Literal(_) | TemplatePart::Schema => None,
        })
    }

    /// The topic for a row of a table in `schema` whose placeholder columns
    /// hold `value` (`None` for NULL), with the router's rules: a NULL or
    /// empty placeholder, or a result that is no valid topic name, is an
    /// error saying which.
    pub fn fill<'a>(
        &self,
        schema: &str,
        value: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<String, String> {
        let mut topic = String::new();
        for p in self.parts() {
            match p {
                TemplatePart::Literal(l) => topic.push_str(l),
                TemplatePart::Schema => topic.push_str(schema),
                TemplatePart::Column(c) => match value(c) {
                    Some(v) if !v.is_empty() => topic.push_str(v),
                    Some(_) => return Err(format!("topic placeholder column {c} is empty")),
                    None => return Err(format!("topic placeholder column {c} is NULL")),
                },
            }
        }
        validate_topic(&topic).map_err(|r| format!("topic {topic:?}: {r}"))?;
        Ok(topic)
    }

    /// Whether `topic` could have come from this template, each placeholder
    /// standing for one or more characters.
    pub fn matches(&self, topic: &str) -> bool {
        fn go(parts: &[Part], s: &str) -> bool {
            match parts.split_first() {
                None => s.is_empty(),
                Some((Part::Literal(lit), rest)) => {
                    s.strip_prefix(lit.as_str()).is_some_and(|s| go(rest, s))
                }
                Some((Part::Column(_) | Part::Schema, rest)) => s
                    .char_indices()
                    .map(|(i, _)| i)
                    .skip(1)
                    .chain(std::iter::once(s.len()))
                    .any(|i| i > 0 && go(rest, &s[i..])),
            }
        }
        go(&self.parts, topic)
    }

    /// Fills the placeholders from `value`; a placeholder it has no value
    /// for is left empty (the caller validates the result).
    pub fn render<'a>(&self, value: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Column(c) => out.push_str(value(c).unwrap_or("")),
                Part::Schema => {}
            }
        }
        out
    }

    /// A topic without placeholders, if this template is one.
    pub fn fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Literal(l)] => Some(l),
            _ => None,
        }
    }
}

impl std::fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

fn check_topic_chars(s: &str) -> Result<(), String> {
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed in a Kafka topic name (allowed: ASCII letters, digits, '.', '_', '-')"
        )),
        None => Ok(()),
    }
}

/// Kafka's own rules for a topic name.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic name is empty".into());
    }
    if topic == "." || topic == ".." {
        return Err(format!("{topic:?} is not a valid topic name"));
    }
    if topic.len() > 249 {
        return Err(format!(
            "topic name is {} characters long (at most 249)",
            topic.len()
        ));
    }
    check_topic_chars(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_as_the_router_does_and_matches_what_it_could_produce() {
        let t = TopicTemplate::parse("events.{event_type}.v1").unwrap();
        assert_eq!(t.fill("public", |_| Some("X")).unwrap(), "events.X.v1");
        assert!(t.fill("public", |_| None).unwrap_err().contains("NULL"));
        assert!(t
            .fill("public", |_| Some(""))
            .unwrap_err()
            .contains("empty"));
        assert!(
            t.fill("public", |_| Some("a b")).is_err(),
            "not a topic name"
        );
        assert!(t.matches("events.X.v1"));
        assert!(t.matches("events.a.b.v1"));
        assert!(!t.matches("events..v1"));
        assert!(!t.matches("other.X.v1"));
        let f = TopicTemplate::parse("fixed").unwrap();
        assert!(f.matches("fixed") && !f.matches("fixed2"));
        let parts: Vec<_> = t.parts().collect();
        assert_eq!(
            parts,
            [
                TemplatePart::Literal("events."),
                TemplatePart::Column("event_type"),
                TemplatePart::Literal(".v1")
            ]
        );
    }

    #[test]
    fn schema_is_the_tables_schema_not_a_column() {
        let t = TopicTemplate::parse("{schema}.events.{event_type}").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["event_type"]);
        assert_eq!(
            t.fill("tenant_a", |_| Some("Paid")).unwrap(),
            "tenant_a.events.Paid"
        );
        assert!(t.matches("tenant_b.events.Paid"));
        assert_eq!(t.fixed(), None);
        assert_eq!(t.parts().next(), Some(TemplatePart::Schema));
    }
}
