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
//!
//! Why its own schema (review N2). A superuser's event trigger runs its
//! function on every DDL, and `CREATE OR REPLACE` keeps an existing
//! function's owner: whoever could create the function first under its
//! predictable name (anyone with CREATE on `public`) would keep it, and
//! replace its body with one that runs as the next superuser to create a
//! table. So the function lives in schema `outbox_relay`, which setup
//! creates and only a superuser may own or create objects in; setup
//! refuses, naming the owner, when the schema or the function exists under
//! any other role, and `check` and `run` report such a function.

use super::table_name::TableName;
use crate::pg::quote_ident;

/// The schema of the trigger's function: the relay's own, owned by a
/// superuser, where no other role may create anything.
pub const SCHEMA: &str = "outbox_relay";

/// The trigger's (and its function's) name for `publication`.
pub fn trigger_name(publication: &str) -> String {
    let name = format!("outbox_relay_publish_{publication}");
    if name.len() <= 63 {
        return name;
    }
    // Identifiers are at most 63 bytes, and a plain cut would give two long
    // publication names with one prefix the same trigger: keep a hash of
    // the whole name in the last bytes (FNV-1a: stable across builds).
    let hash = publication.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut cut = 63 - 9;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{:08x}", &name[..cut], hash as u32)
}

/// The patterns a trigger was installed for, as its comment records them
/// (`check` and `run` compare them with the configuration).
pub fn patterns_label(patterns: &[&TableName]) -> String {
    patterns
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The statements that (re)install the trigger for `patterns`, replacing an
/// earlier version (a changed list of patterns).
///
/// It fires on every way a table can come to match: created (alone, by
/// `CREATE TABLE AS`/`SELECT INTO`, or inside `CREATE SCHEMA`), moved or
/// renamed (`ALTER TABLE … SET SCHEMA / RENAME`), or its schema renamed
/// (`ALTER SCHEMA … RENAME`: every table of that schema is looked at).
/// Catalog names are qualified and `pg_temp` comes last in the path: the
/// function runs as its owner, a superuser, and a temporary table must not
/// stand in for a catalog.
/// Run it after [`owners_sql`] found nothing amiss, in the same transaction
/// as the `CREATE SCHEMA IF NOT EXISTS` before that ([`schema_sql`]).
///
/// Only a table its section can map is published (review N3): a regular,
/// WAL-logged one (a temporary or unlogged table cannot be published, and
/// adding it would make the tenant's own DDL fail) with every column the
/// section names (`patterns`: each pattern with those columns, in section
/// order, first match wins). Any other table is reported to whoever ran
/// the DDL (a WARNING) and left out; adding the missing columns later
/// (`ALTER TABLE`) publishes it then.
pub fn install_sql(publication: &str, patterns: &[(&TableName, Vec<String>)]) -> String {
    let name = trigger_name(publication);
    let function = format!("{}.{}", quote_ident(SCHEMA), quote_ident(&name));
    let matches = |p: &TableName| {
        format!(
            "(n.nspname LIKE {} AND c.relname = {})",
            crate::pg::quote_literal(&p.schema_like()),
            crate::pg::quote_literal(&p.name)
        )
    };
    let condition = patterns
        .iter()
        .map(|(p, _)| matches(p))
        .collect::<Vec<_>>()
        .join(" OR ");
    // The section's columns the table lacks, for the first section it
    // matches; NULL when it has them all.
    let missing = patterns
        .iter()
        .map(|(p, columns)| {
            let list = columns
                .iter()
                .map(|c| crate::pg::quote_literal(c))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "WHEN {} THEN (SELECT pg_catalog.string_agg(col, ', ') FROM pg_catalog.unnest(ARRAY[{list}]::text[]) col
                   WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                      WHERE a.attrelid = c.oid AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped))",
                matches(p)
            )
        })
        .collect::<Vec<_>>()
        .join("\n                      ");
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS event_trigger
           LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
         DECLARE
           t record;
         BEGIN
           FOR t IN
             SELECT DISTINCT c.oid, n.nspname, c.relname, c.relpersistence,
                    CASE {missing} END AS missing
               FROM pg_catalog.pg_event_trigger_ddl_commands() d
               JOIN pg_catalog.pg_class c
                 ON (d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND c.oid = d.objid)
                 OR (d.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND c.relnamespace = d.objid)
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND ({condition})
           LOOP
             IF t.relpersistence = 't' THEN
               CONTINUE;
             ELSIF t.relpersistence <> 'p' THEN
               RAISE WARNING 'outbox-relay: %.% matches an outbox pattern but is unlogged, which a publication cannot hold: not published', t.nspname, t.relname;
               CONTINUE;
             ELSIF t.missing IS NOT NULL THEN
               RAISE WARNING 'outbox-relay: %.% matches an outbox pattern but has no column %: not published (adding the columns publishes it)', t.nspname, t.relname, t.missing;
               CONTINUE;
             END IF;
             IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r
                              JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid
                             WHERE p.pubname = {pub} AND r.prrelid = t.oid) THEN
               EXECUTE pg_catalog.format('ALTER PUBLICATION %I ADD TABLE %I.%I', {pub}, t.nspname, t.relname);
             END IF;
           END LOOP;
         END
         $fn$;
         REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;
         DROP EVENT TRIGGER IF EXISTS {trigger};
         CREATE EVENT TRIGGER {trigger} ON ddl_command_end
           WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'CREATE SCHEMA',
                        'ALTER TABLE', 'ALTER SCHEMA')
           EXECUTE FUNCTION {function}();
         COMMENT ON EVENT TRIGGER {trigger} IS {label};
         DROP FUNCTION IF EXISTS public.{legacy}();",
        legacy = quote_ident(&name),
        pub = crate::pg::quote_literal(publication),
        trigger = quote_ident(&name),
        label = crate::pg::quote_literal(&patterns_label(
            &patterns.iter().map(|(p, _)| *p).collect::<Vec<_>>()
        )),
    )
}

/// The relay's schema, created if missing, with nothing granted to PUBLIC
/// (setup's first statements, inside its transaction).
pub fn schema_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;",
        schema = quote_ident(SCHEMA)
    )
}

/// What in the relay's schema a role other than a superuser owns or may
/// create in (`$1`: the function's name): rows of (what, role). Empty when
/// the schema and the function are a superuser's alone.
pub fn owners_sql() -> String {
    format!(
        "SELECT 'schema {schema}', r.rolname::text
           FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
          WHERE n.nspname = {lit} AND NOT r.rolsuper
         UNION ALL
         SELECT 'CREATE on schema {schema}', coalesce(g.rolname::text, 'PUBLIC')
           FROM pg_catalog.pg_namespace n,
                pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a
           LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
          WHERE n.nspname = {lit} AND a.privilege_type = 'CREATE'
            AND a.grantee <> n.nspowner AND NOT coalesce(g.rolsuper, false)
         UNION ALL
         SELECT 'function {schema}.' || p.proname, r.rolname::text
           FROM pg_catalog.pg_proc p
           JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
           JOIN pg_catalog.pg_roles r ON r.oid = p.proowner
          WHERE n.nspname = {lit} AND p.proname = $1 AND NOT r.rolsuper",
        schema = SCHEMA,
        lit = crate::pg::quote_literal(SCHEMA),
    )
}

/// The simple query (so the replication connection can run it too) that
/// reads the trigger as installed: `evtenabled`, its comment, and what
/// makes its function unsafe ('' when nothing does); no row when it does
/// not exist.
pub fn state_sql(publication: &str) -> String {
    format!(
        "SELECT t.evtenabled::text, coalesce(pg_catalog.obj_description(t.oid, 'pg_event_trigger'), ''),
                pg_catalog.concat_ws('; ',
                  CASE WHEN n.nspname <> {schema} THEN 'its function ' || p.oid::pg_catalog.regprocedure::text || ' is in schema ' || n.nspname || ', where other roles may create functions' END,
                  CASE WHEN NOT fo.rolsuper THEN 'its function is owned by ' || fo.rolname || ', who is not a superuser and could change what it runs as one' END,
                  CASE WHEN NOT p.prosecdef THEN 'its function is not SECURITY DEFINER' END,
                  CASE WHEN NOT so.rolsuper THEN 'schema ' || n.nspname || ' is owned by ' || so.rolname || ', who is not a superuser' END,
                  CASE WHEN pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE') THEN 'PUBLIC may execute its function' END)
           FROM pg_catalog.pg_event_trigger t
           JOIN pg_catalog.pg_proc p ON p.oid = t.evtfoid
           JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
           JOIN pg_catalog.pg_roles fo ON fo.oid = p.proowner
           JOIN pg_catalog.pg_roles so ON so.oid = n.nspowner
          WHERE t.evtname = {name}",
        schema = crate::pg::quote_literal(SCHEMA),
        name = crate::pg::quote_literal(&trigger_name(publication))
    )
}

/// A row of [`state_sql`], as text fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerRow {
    pub enabled: Option<String>,
    pub label: Option<String>,
    pub unsafe_because: Option<String>,
}

impl TriggerRow {
    /// From the row's fields in order.
    pub fn from_fields(mut fields: impl Iterator<Item = Option<String>>) -> TriggerRow {
        TriggerRow {
            enabled: fields.next().flatten(),
            label: fields.next().flatten(),
            unsafe_because: fields.next().flatten().filter(|s| !s.is_empty()),
        }
    }
}

/// What is wrong with the installed trigger for the configured `patterns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerProblem {
    Missing,
    Disabled,
    /// Its function can be changed by a role that is not a superuser, or
    /// run by anyone: why.
    Unsafe(String),
    /// Installed for `installed` (its comment), which lacks `missing`.
    Uncovered {
        installed: String,
        missing: Vec<String>,
    },
}

/// The verdict on the row of [`state_sql`] (None: no row): None when the
/// trigger fires and covers every pattern.
pub fn problem(row: Option<TriggerRow>, patterns: &[&TableName]) -> Option<TriggerProblem> {
    let Some(TriggerRow {
        enabled: Some(enabled),
        label,
        unsafe_because,
    }) = row
    else {
        return Some(TriggerProblem::Missing);
    };
    if let Some(why) = unsafe_because {
        return Some(TriggerProblem::Unsafe(why));
    }
    if enabled == "D" {
        return Some(TriggerProblem::Disabled);
    }
    let label = label.unwrap_or_default();
    let missing = uncovered(&label, patterns);
    (!missing.is_empty()).then_some(TriggerProblem::Uncovered {
        installed: label,
        missing,
    })
}

/// The configured patterns the installed trigger (its comment: `label`)
/// does not cover: a table of one of them created now would not be
/// published.
pub fn uncovered(label: &str, patterns: &[&TableName]) -> Vec<String> {
    let covered: Vec<&str> = label.split(',').map(str::trim).collect();
    patterns
        .iter()
        .map(|p| p.to_string())
        .filter(|p| !covered.contains(&p.as_str()))
        .collect()
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
        let long = trigger_name(&format!("{}a", "p".repeat(60)));
        assert_eq!(long.len(), 63);
        assert_ne!(long, trigger_name(&format!("{}b", "p".repeat(60))));
        let p = TableName::parse("tenant_*.outbox").unwrap();
        let sql = install_sql("outbox_pub", &[(&p, vec!["id".into(), "payload".into()])]);
        assert!(sql.contains("n.nspname LIKE  E'tenant\\\\_%'"), "{sql}");
        assert!(
            sql.contains(
                "CREATE EVENT TRIGGER \"outbox_relay_publish_outbox_pub\" ON ddl_command_end"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("FUNCTION \"outbox_relay\".\"outbox_relay_publish_outbox_pub\"()"),
            "{sql}"
        );
        assert!(sql.contains("FROM PUBLIC"), "{sql}");
    }

    #[test]
    fn the_comment_says_which_patterns_are_covered() {
        let a = TableName::parse("tenant_*.outbox").unwrap();
        let b = TableName::parse("other_*.outbox").unwrap();
        let label = patterns_label(&[&a]);
        assert_eq!(label, "tenant_*.outbox");
        assert!(uncovered(&label, &[&a]).is_empty());
        assert_eq!(uncovered(&label, &[&a, &b]), ["other_*.outbox"]);
        assert!(install_sql("p", &[(&a, vec!["id".into()])]).contains("COMMENT ON EVENT TRIGGER"));
    }

    #[test]
    fn the_verdict_names_what_is_wrong() {
        let a = TableName::parse("tenant_*.outbox").unwrap();
        let b = TableName::parse("other_*.outbox").unwrap();
        let row = |e: &str, l: &str| {
            Some(TriggerRow::from_fields(
                [
                    Some(e.to_string()),
                    Some(l.to_string()),
                    Some(String::new()),
                ]
                .into_iter(),
            ))
        };
        assert_eq!(problem(None, &[&a]), Some(TriggerProblem::Missing));
        let hijackable = TriggerRow {
            unsafe_because: Some("its function is owned by app".into()),
            ..row("O", "tenant_*.outbox").unwrap()
        };
        assert_eq!(
            problem(Some(hijackable), &[&a]),
            Some(TriggerProblem::Unsafe(
                "its function is owned by app".into()
            ))
        );
        assert_eq!(
            problem(row("D", "tenant_*.outbox"), &[&a]),
            Some(TriggerProblem::Disabled)
        );
        assert_eq!(problem(row("O", "tenant_*.outbox"), &[&a]), None);
        assert_eq!(
            problem(row("O", "tenant_*.outbox"), &[&a, &b]),
            Some(TriggerProblem::Uncovered {
                installed: "tenant_*.outbox".into(),
                missing: vec!["other_*.outbox".into()]
            })
        );
    }
}
