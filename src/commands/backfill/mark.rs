//! `--mark-processed`: the old scheme's bookkeeping, done only after every
//! record was acknowledged, so a row marked processed is a row delivered.

use tokio_postgres::Client;

use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::route::router::TableName;

use super::{BackfillArgs, BackfillError};

/// `--mark-processed`: sets the processed column of every backfilled row,
/// after every record was acknowledged, so the old scheme's "pending" query
/// shows 0.
pub(super) async fn mark_processed(
    client: &Client,
    table: &TableName,
    args: &BackfillArgs,
    order_type: &str,
    done_values: &[String],
    say: &mut (dyn FnMut(String) + Send),
) -> Result<u64, BackfillError> {
    let order_col = quote_ident(&args.order_column);
    let update = format!(
        "UPDATE {} SET {} = now() WHERE {} = ANY($1::text[]::{order_type}[]) AND {} IS NULL",
        table.quoted(),
        quote_ident(&args.processed_column),
        order_col,
        quote_ident(&args.processed_column),
    );
    let mut marked = 0u64;
    for chunk in done_values.chunks(args.batch_size.max(1) as usize) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        marked += client
            .execute(&update, &[&chunk])
            .await
            .map_err(sql(format!(
                "--mark-processed: every row is published, but setting {} failed",
                args.processed_column
            )))?;
    }
    say(format!(
        "marked {marked} backfilled row(s) processed ({} = now())",
        args.processed_column
    ));
    Ok(marked)
}
