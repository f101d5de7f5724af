//! Postgres plumbing shared by the pipeline and the operator commands.
//!
//! It owns how names are written into SQL and replication commands (here),
//! the connection settings (`config`), TLS (`tls`), the ordinary SQL
//! connection and its errors (`sql`), the standbys of a multi-host URL
//! (`standbys`), the catalog queries and messages several callers share
//! (`catalog`), the objects the relay needs (`objects`: wal_level, the table,
//! the publication) and the event trigger that publishes a schema pattern's new
//! tables (`publish_trigger`), and how close the slot is to being invalidated
//! (`slot_headroom`), and table names (`table_name`). It knows Postgres's
//! names, not the pipeline's types, and holds no pipeline state.

pub mod catalog;
pub mod config;
pub mod objects;
pub mod publish_trigger;
pub mod slot_headroom;
pub mod sql;
pub mod standbys;
pub mod table_name;
pub mod tls;

/// A double-quoted identifier, for SQL and for replication commands alike
/// (whose grammar takes the same quoted form). postgres-protocol's escaper,
/// so that every name the relay writes into a statement is quoted one way.
pub fn quote_ident(s: &str) -> String {
    postgres_protocol::escape::escape_identifier(s)
}

/// A string literal for SQL, for the statements that cannot take
/// parameters (simple queries, the replication connection's, DDL):
/// postgres-protocol's escaper, right whatever standard_conforming_strings
/// says (a backslash makes it an E'' string).
pub fn quote_literal(s: &str) -> String {
    postgres_protocol::escape::escape_literal(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_double_quoted_with_quotes_doubled() {
        assert_eq!(quote_ident("outbox"), "\"outbox\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        // A backslash is not special inside an identifier.
        assert_eq!(quote_ident("a\\b"), "\"a\\b\"");
        assert_eq!(quote_ident("Tenant A"), "\"Tenant A\"");
    }
}
