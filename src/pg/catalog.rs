//! What the catalog says that several callers must say alike: the session
//! set-up, `setup` and `check` describe a publication's problems in the
//! same words.

use super::quote_ident;

/// Why a publication without publish_via_partition_root cannot serve a
/// partitioned outbox table, and the fix.
pub fn partitions_by_name(publication: &str, table: &str) -> String {
    format!(
        "publication {publication} publishes the partitioned table {table} under its partitions' names (publish_via_partition_root is off), so the relay would not recognise its rows: ALTER PUBLICATION {} SET (publish_via_partition_root = true); (its other subscribers then see {table}'s name too), or give the relay a publication of its own (outbox-relay setup --publication NAME creates one)",
        quote_ident(publication)
    )
}
