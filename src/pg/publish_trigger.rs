//! The event trigger that keeps a publication covering the tables of a
//! schema pattern (`tenant_*.outbox`): each new table the pattern stands
//! for is added to the publication by the very transaction that creates it.
//!
//! Why a trigger, and not the relay adding tables as it finds them: pgoutput
//! decides whether a change is published by the publication's membership
//! *as of that change* (the historic catalog snapshot). A table added after
//! rows were committed to it never has those rows decoded, so anything
//! that adds tables later than their creation loses the rows in between.
//! Inside the creating transaction there is no "in between". `FOR TABLES IN
//! SCHEMA` (PostgreSQL 15+) does not help: it names schemas, and a tenant's
//! schema is new too; `FOR ALL TABLES` would, at the cost of decoding every
//! table's inserts.
//!
//! Event triggers need a superuser to create; the function is SECURITY
//! DEFINER, so that a migration run by an ordinary role (the tables' owner)
//! may still add its table to a publication it does not own.

use crate::pg::quote_ident;
use crate::pipeline::route::router::TableName;

/// The trigger's (and its function's) name for `publication`.
pub fn trigger_name(publication: &str) -> String {
    let mut name = format!("outbox_relay_publish_{publication}");
    // Identifiers are at most 63 bytes: Postgres would truncate, and two
    // long publication names could then share a trigger.
    if name.len() > 63 {
        let mut cut = 63;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    name
}

/// The statements that (re)install the trigger for `patterns`, replacing an
/// earlier version (a changed list of patterns).
pub fn install_sql(publication: &str, patterns: &[&TableName]) -> String {
    let name = trigger_name(publication);
    let function = format!("public.{}", quote_ident(&name));
    let condition = patterns
        .iter()
        .map(|p| {
            format!(
                "(n.nspname LIKE {} AND c.relname = {})",
                crate::pg::quote_literal(&p.schema_like()),
                crate::pg::quote_literal(&p.name)
            )
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS event_trigger
           LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
         DECLARE
           t record;
         BEGIN
           FOR t IN
             SELECT DISTINCT c.oid, n.nspname, c.relname
               FROM pg_event_trigger_ddl_commands() d
               JOIN pg_class c ON c.oid = d.objid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE d.classid = 'pg_class'::regclass
                AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND ({condition})
           LOOP
             IF NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                             WHERE p.pubname = {pub} AND r.prrelid = t.oid) THEN
               EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', {pub}, t.nspname, t.relname);
             END IF;
           END LOOP;
         END
         $fn$;
         DROP EVENT TRIGGER IF EXISTS {trigger};
         CREATE EVENT TRIGGER {trigger} ON ddl_command_end
           WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
           EXECUTE FUNCTION {function}();",
        pub = crate::pg::quote_literal(publication),
        trigger = quote_ident(&name),
    )
}

/// Whether the trigger exists and fires (`evtenabled` is not `D`), by an
/// ordinary SQL connection: None when it does not exist.
pub async fn state(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT evtenabled <> 'D' FROM pg_event_trigger WHERE evtname = $1",
            &[&trigger_name(publication)],
        )
        .await?
        .map(|r| r.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_patterns_become_like_conditions() {
        assert_eq!(
            trigger_name("outbox_pub"),
            "outbox_relay_publish_outbox_pub"
        );
        assert_eq!(trigger_name(&"p".repeat(63)).len(), 63);
        let p = TableName::parse("tenant_*.outbox").unwrap();
        let sql = install_sql("outbox_pub", &[&p]);
        assert!(sql.contains("n.nspname LIKE  E'tenant\\\\_%'"), "{sql}");
        assert!(
            sql.contains(
                "CREATE EVENT TRIGGER \"outbox_relay_publish_outbox_pub\" ON ddl_command_end"
            ),
            "{sql}"
        );
    }
}
