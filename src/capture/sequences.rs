//! Sequences across a restore. A PITR takes every sequence back to its value
//! at the recovery point, while the rows the application inserted after it
//! (the lost writes) carry the ids it had handed out since. Left alone, the
//! application would hand out those ids again: its new rows would take the
//! lost rows' keys, and replaying them would conflict (or, replayed first,
//! the application's next inserts would fail on duplicate keys).
//!
//! So before the restore (the database closed, right after the slot is read)
//! the value of every ascending, non-cycling sequence is read and kept in
//! `lost-writes.json`; right after the restore each is moved forward to at
//! least that value (never backward: `greatest`), and replay does the same
//! again before it applies anything (a restore resumed after a crash, or a
//! sequence a person reset). A gap in a sequence is normal in PostgreSQL;
//! a reused id is not.

use serde::{Deserialize, Serialize};

use super::{query, CaptureError};
use crate::db::Database;

/// One sequence's value before the restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    /// `schema.name`, quoted where needed (`quote_ident`).
    pub sequence: String,
    pub last_value: i64,
}

/// The values of the database's ascending, non-cycling sequences that were
/// ever used (`pg_sequences.last_value` is NULL for one never called, or
/// one this role may not read).
pub async fn read(client: &tokio_postgres::Client, db: &Database) -> Result<Vec<SequenceValue>, CaptureError> {
    let rows = client
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value
               FROM pg_sequences
              WHERE last_value IS NOT NULL AND increment_by > 0 AND NOT cycle
                AND schemaname NOT IN ('pg_catalog', 'information_schema', 'backstop')
              ORDER BY 1",
            &[],
        )
        .await
        .map_err(query(db, "reading the sequences before the restore"))?;
    Ok(rows
        .iter()
        .map(|r| SequenceValue {
            sequence: r.get(0),
            last_value: r.get(1),
        })
        .collect())
}

/// Moves each sequence that still exists (the migration may have created
/// it) forward to at least its value before the restore; how many moved.
pub async fn advance(
    client: &tokio_postgres::Client,
    db: &Database,
    values: &[SequenceValue],
) -> Result<usize, CaptureError> {
    let mut moved = 0;
    for v in values {
        // `setval` only where it moves forward: a sequence used since the
        // restore past the old value is left where it is.
        let n = client
            .execute(
                "SELECT setval(s.seqrelid, $2, true)
                   FROM pg_sequence s
                   JOIN pg_sequences v ON format('%I.%I', v.schemaname, v.sequencename)::regclass = s.seqrelid
                  WHERE s.seqrelid = to_regclass($1)
                    AND coalesce(v.last_value, s.seqstart - s.seqincrement) < $2",
                &[&v.sequence, &v.last_value],
            )
            .await
            .map_err(query(db, "moving a sequence past the ids the lost writes used"))?;
        moved += n as usize;
    }
    Ok(moved)
}
