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
//! least that value (never backward: only where it is behind), and replay does the same
//! again before it applies anything (a restore resumed after a crash, or a
//! sequence a person reset). A gap in a sequence is normal in PostgreSQL;
//! a reused id is not.

use serde::{Deserialize, Serialize};

use super::{query, CaptureError};
use crate::db::Database;

/// One sequence's value before the restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    /// `schema.name`, quoted where needed (`format('%I.%I')`).
    pub sequence: String,
    pub last_value: i64,
}

/// The values of the database's ascending, non-cycling sequences that were
/// ever used (`pg_sequences.last_value` is NULL for one never called, or
/// one this role may not read).
pub async fn read(client: &tokio_postgres::Client, db: &Database) -> Result<Vec<SequenceValue>, CaptureError> {
    let rows = client
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), last_value
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

/// What [`advance`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advanced {
    /// Sequences moved forward.
    pub moved: usize,
    /// Sequences that could not be moved, with the server's reason (a role
    /// without UPDATE on it, a value past its maximum): their ids may be
    /// handed out again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<(String, String)>,
}

/// Moves each sequence that still exists (the migration may have created
/// it) forward to at least its value before the restore, one at a time: a
/// sequence that cannot be moved is reported and the others still are.
/// Never moves one back: read and set in one statement, only where it is
/// behind (an application `nextval` in the microseconds between the two
/// could only be overtaken forward).
pub async fn advance(client: &tokio_postgres::Client, values: &[SequenceValue]) -> Advanced {
    let mut out = Advanced::default();
    for v in values {
        let moved = client
            .execute(
                "SELECT setval(to_regclass($1), $2, true)
                   FROM pg_sequences s
                  WHERE format('%I.%I', s.schemaname, s.sequencename) = $1
                    AND coalesce(s.last_value, s.start_value - s.increment_by) < $2",
                &[&v.sequence, &v.last_value],
            )
            .await;
        match moved {
            Ok(n) => out.moved += n as usize,
            Err(e) => {
                let why = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                tracing::warn!(sequence = %v.sequence, error = %why, "could not move a sequence past the ids the lost writes used");
                out.failed.push((v.sequence.clone(), why));
            }
        }
    }
    out
}
