//! `backstop replay RUN`: puts the writes a restore discarded back, one
//! source transaction at a time, in commit order.
//!
//! - A transaction that touches a table the migration changed is left for a
//!   person (its rows may not fit the restored schema's meaning); so is one
//!   outside `--tables` when that is given.
//! - Each change must find its row as it was: an INSERT must not meet an
//!   existing key, an UPDATE or DELETE must match exactly one row by its old
//!   key. Anything else is a conflict: that transaction is rolled back and
//!   replay stops there, naming the row.
//! - Applied transactions are recorded in `backstop.replayed` in the same
//!   transaction, so a second replay goes on where the first stopped.
//! - `--dry-run` applies everything in one transaction and rolls it back.

use std::collections::HashSet;

use serde::Serialize;

use super::decode::{self, Op, Txn};
use super::{connect, query, CaptureError, LostFile};
use crate::db::Database;

/// What replay did (or would do, dry).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Replayed {
    pub dry_run: bool,
    pub applied: Vec<u32>,
    /// Already applied by an earlier replay.
    pub already: Vec<u32>,
    /// Left for a person, with why.
    pub left: Vec<(u32, String)>,
    /// The conflict replay stopped at.
    pub stopped: Option<(u32, String)>,
}

/// Whether `table` (`schema.name` as decoded) is one of `names` (as the
/// migration wrote them, qualified or not).
fn named(table: &str, names: &HashSet<String>) -> bool {
    let bare = table.rsplit('.').next().unwrap_or(table);
    names
        .iter()
        .any(|n| n == table || n == bare || n.trim_matches('"') == bare.trim_matches('"'))
}

/// Applies `file`'s transactions to `db`; `migrated` are the tables the
/// run's migrations touched, `only` the tables asked for (empty: all).
pub async fn replay(
    db: &Database,
    file: &LostFile,
    migrated: &HashSet<String>,
    only: &HashSet<String>,
    dry_run: bool,
) -> Result<Replayed, CaptureError> {
    let client = connect(db).await?;
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS backstop;
             CREATE TABLE IF NOT EXISTS backstop.replayed (run text, xid bigint, at timestamptz DEFAULT now(), PRIMARY KEY (run, xid))",
        )
        .await
        .map_err(query(db, "creating backstop.replayed"))?;
    let done: HashSet<u32> = client
        .query("SELECT xid FROM backstop.replayed WHERE run = $1", &[&file.run])
        .await
        .map_err(query(db, "reading backstop.replayed"))?
        .iter()
        .map(|r| r.get::<_, i64>(0) as u32)
        .collect();
    let mut out = Replayed {
        dry_run,
        ..Default::default()
    };
    // One connection: SAVEPOINTs inside a dry run's outer transaction, a
    // real transaction per source transaction otherwise.
    if dry_run {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(query(db, "beginning the dry run"))?;
    }
    for t in &file.transactions {
        if done.contains(&t.xid) {
            out.already.push(t.xid);
            continue;
        }
        if let Some(c) = t.changes.iter().find(|c| named(&c.table, migrated)) {
            out.left
                .push((t.xid, format!("touches {}, which the migration changed", c.table)));
            continue;
        }
        if !only.is_empty() {
            if let Some(c) = t.changes.iter().find(|c| !named(&c.table, only)) {
                out.left.push((t.xid, format!("touches {}, not in --tables", c.table)));
                continue;
            }
        }
        let (begin, end_ok, end_bad) = if dry_run {
            (
                "SAVEPOINT replay",
                "RELEASE SAVEPOINT replay",
                "ROLLBACK TO SAVEPOINT replay",
            )
        } else {
            ("BEGIN", "COMMIT", "ROLLBACK")
        };
        client
            .batch_execute(begin)
            .await
            .map_err(query(db, "beginning a replayed transaction"))?;
        match apply(&client, file, t).await {
            Ok(()) => {
                client
                    .execute(
                        "INSERT INTO backstop.replayed (run, xid) VALUES ($1, $2)",
                        &[&file.run, &(t.xid as i64)],
                    )
                    .await
                    .map_err(query(db, "recording a replayed transaction"))?;
                client
                    .batch_execute(end_ok)
                    .await
                    .map_err(query(db, "committing a replayed transaction"))?;
                out.applied.push(t.xid);
            }
            Err(why) => {
                client
                    .batch_execute(end_bad)
                    .await
                    .map_err(query(db, "rolling back a conflicting transaction"))?;
                out.stopped = Some((t.xid, why));
                break;
            }
        }
    }
    if dry_run {
        client
            .batch_execute("ROLLBACK")
            .await
            .map_err(query(db, "ending the dry run"))?;
    }
    Ok(out)
}

/// Applies one transaction's changes; the conflict, in words.
async fn apply(client: &tokio_postgres::Client, file: &LostFile, t: &Txn) -> Result<(), String> {
    for c in &t.changes {
        let key = file.keys.get(&c.table).map(Vec::as_slice).unwrap_or_default();
        let Some(sql) = decode::statement(c, key) else {
            return Err(format!(
                "{} on {} has no key to find its row by: replay it by hand from lost-writes.sql",
                c.op.as_str(),
                c.table
            ));
        };
        match client.execute(sql.as_str(), &[]).await {
            Ok(n) if c.op == Op::Insert || c.op == Op::Truncate || n == 1 => {}
            Ok(n) => {
                let old = if c.old.is_empty() {
                    c.new.iter().filter(|v| key.contains(&v.column)).cloned().collect()
                } else {
                    c.old.clone()
                };
                return Err(format!(
                    "{} on {} matched {n} rows where {}: the row no longer matches its old image (changed or deleted since the restore)",
                    c.op.as_str(),
                    c.table,
                    decode::matches(&old)
                ));
            }
            Err(e) => {
                let why = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                return Err(format!("{} on {}: {why}", c.op.as_str(), c.table));
            }
        }
    }
    Ok(())
}
