//! Capturing the writes a restore would discard, and giving them back.
//!
//! Where the server decodes WAL (`wal_level = logical`) and the role may
//! create replication slots, a run creates a logical slot (`test_decoding`)
//! right before it reads its recovery point, so the slot sees every change
//! committed after that point. Before a restore, the changes are read from
//! the slot without consuming it (`pg_logical_slot_peek_changes`). The
//! migration's own transactions (their xids, recorded by the runner),
//! backstop's own tables (`backstop.*`) and anything committed at or before
//! the recovery point are dropped. The rest is written to the run folder as
//! `lost-writes.sql` (one transaction per source transaction, in commit
//! order) and `lost-writes.json` (what `backstop replay` applies). The slot
//! is dropped whatever the outcome: after the read, and again when the run
//! ends (a crash between its creation and its drop is settled on resume;
//! the name is the run's). A slot forgotten on a live server retains WAL
//! forever: `status` warns about a run whose drop failed.
//!
//! When the server cannot decode, the run says why once (plan and report)
//! and restores as before: only the window's length is known.

pub mod decode;
pub mod replay;
pub mod sequences;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::checkpoint::base::parse_lsn;
use crate::db::Database;
pub use decode::{Change, Op, Txn, Value};

/// Whether a run captures its lost writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capture {
    /// A logical slot created right before the recovery point.
    Slot {
        name: String,
        start_lsn: String,
        /// The transaction id taken with the recovery point
        /// ([`recovery_point`]): a row whose `xmin` follows it was written
        /// after the point (or after the restore), so replay never
        /// overwrites it blindly. None in records from before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        xid_horizon: Option<u64>,
    },
    /// Not captured; why, in words. `maybe_created`: the attempt went as far
    /// as creating the slot, which may exist (it is dropped by name).
    Unavailable {
        why: String,
        #[serde(default)]
        maybe_created: bool,
    },
}

/// The run-folder files the lost writes are kept in: what replay reads,
/// the replayable SQL, and the report's summary.
pub const LOST_FILE: &str = "lost-writes.json";
pub const LOST_SQL: &str = "lost-writes.sql";
pub const LOST_SUMMARY: &str = "lost-writes-summary.json";

impl Capture {
    /// The slot of run `run_id` that may exist and must be dropped by name:
    /// one created, or one whose creation went far enough to maybe exist.
    pub fn slot_to_drop(&self, run_id: &str) -> Option<String> {
        match self {
            Capture::Slot { name, .. } => Some(name.clone()),
            Capture::Unavailable {
                maybe_created: true, ..
            } => Some(slot_name(run_id)),
            Capture::Unavailable { .. } => None,
        }
    }
}

/// Whether PostgreSQL refused `e` for want of a privilege (SQLSTATE 42501),
/// at any depth of its sources.
fn insufficient_privilege(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        let code = err.downcast_ref::<tokio_postgres::Error>().and_then(|pg| pg.code());
        if code == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Backends whose restore goes exactly to the recovery point's LSN: only
/// there do the slot's changes after that LSN equal what the restore
/// discards (a dump restores to when it was taken).
pub fn backend_restores_to_the_lsn(backend: &str) -> bool {
    matches!(backend, "local" | "pgbackrest" | "cnpg")
}

/// Why a run on `backend` keeps no lost writes (it restores elsewhere than
/// the recovery point's LSN, see [`backend_restores_to_the_lsn`]).
pub fn why_not_captured(backend: &str) -> String {
    let to = match backend {
        "dump" => "to when its dump was taken",
        _ => "elsewhere",
    };
    format!("the {backend} backend restores {to}, not to the recovery point's LSN: the writes after it are not kept")
}

/// How the run's slot was let go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotRelease {
    Dropped,
    /// Not there any more (a PITR restore takes the server back to before it).
    Gone,
    /// Could not be dropped: it retains WAL until a person drops it.
    Failed {
        why: String,
    },
}

/// The lost writes of a restore, summarised (the report and the run record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostWrites {
    pub transactions: usize,
    /// `table` → `INSERT|UPDATE|DELETE|TRUNCATE` → rows.
    pub rows: BTreeMap<String, BTreeMap<String, usize>>,
    pub first_commit: Option<String>,
    pub last_commit: Option<String>,
    /// The migration's own transactions left out.
    pub own_left_out: usize,
    /// Where they were written (`lost-writes.sql`), when the store keeps files.
    pub file: Option<String>,
    /// Sequences moved forward after the restore, past the ids the lost
    /// writes used ([`sequences`]); None: not (yet) done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequences_advanced: Option<usize>,
    /// Sequences that could not be moved (name, why), or why none was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sequences_not_moved: Vec<(String, String)>,
}

/// Whether a restore kept the writes it discarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Captured {
    Kept(LostWrites),
    NotKept { why: String },
}

/// What `lost-writes.json` holds: the transactions and each table's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostFile {
    pub run: String,
    pub recovery_lsn: String,
    pub transactions: Vec<Txn>,
    /// Primary-key columns per table (for UPDATE/DELETE without an old key).
    pub keys: HashMap<String, Vec<String>>,
    /// The sequences' values before the restore ([`sequences`]).
    #[serde(default)]
    pub sequences: Vec<sequences::SequenceValue>,
    /// The tables the run's migrations changed, or why they cannot be
    /// known ([`replay::migrated_tables`]): replay from the file alone
    /// (`--file`, a controller's run) leaves them for a person too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated: Option<Result<std::collections::BTreeSet<String>, String>>,
    /// The recovery point's transaction-id horizon ([`recovery_point`]):
    /// replay takes a row whose `xmin` follows it as changed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid_horizon: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("connecting to {database}")]
    Connect {
        database: String,
        #[source]
        source: crate::db::DbError,
    },
    #[error("{step} on {database}")]
    Query {
        database: String,
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("slot {slot} is not on {database} (already restored, dropped, or lost with a failover: a logical slot lives on the primary only)")]
    NoSlot { slot: String, database: String },
    #[error("sessions of {roles} on {database} did not end within 10 s (a role may end only its own role's sessions, or with pg_signal_backend): writes could still commit after the read")]
    Busy { database: String, roles: String },
    #[error("reading the changes of slot {slot}")]
    Decode {
        slot: String,
        #[source]
        source: decode::DecodeError,
    },
}

/// The slot name of run `run_id` (lower case, at most 63 bytes).
pub fn slot_name(run_id: &str) -> String {
    let mut name: String = format!("backstop_{run_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

fn query(db: &Database, step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CaptureError {
    let database = db.describe();
    move |source| CaptureError::Query { database, step, source }
}

async fn connect(db: &Database) -> Result<tokio_postgres::Client, CaptureError> {
    db.connect().await.map_err(|source| CaptureError::Connect {
        database: db.describe(),
        source,
    })
}

/// Creates run `run_id`'s slot (replacing one a crashed attempt left), or
/// says why the server cannot capture. Never fails the run.
pub async fn start(db: &Database, run_id: &str) -> Capture {
    // Creating a logical slot waits for every transaction in progress: an
    // idle-in-transaction session must not hold the run.
    match tokio::time::timeout(std::time::Duration::from_secs(30), try_start(db, run_id)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let mut why = crate::run::chain(&e);
            if insufficient_privilege(&e) {
                why.push_str(
                    "; the role needs REPLICATION to keep the writes a restore discards (CNPG: spec.managed.roles[].replication: true)",
                );
            }
            Capture::Unavailable {
                why,
                maybe_created: true,
            }
        }
        Err(_) => Capture::Unavailable {
            why: "creating the logical slot waited 30 s for transactions in progress".into(),
            maybe_created: true,
        },
    }
}

async fn try_start(db: &Database, run_id: &str) -> Result<Capture, CaptureError> {
    let client = connect(db).await?;
    let level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(query(db, "reading wal_level"))?
        .get(0);
    if level != "logical" {
        return Ok(Capture::Unavailable {
            why: format!("wal_level is {level}, not logical: the writes a restore discards are counted, not kept"),
            maybe_created: false,
        });
    }
    let name = slot_name(run_id);
    drop_slot_with(&client, db, &name).await?;
    let lsn: String = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&name],
        )
        .await
        .map_err(query(db, "creating a logical replication slot"))?
        .get(0);
    tracing::info!(slot = %name, lsn = %lsn, "capturing the writes after the recovery point");
    Ok(Capture::Slot {
        name,
        start_lsn: lsn,
        xid_horizon: None,
    })
}

async fn drop_slot_with(client: &tokio_postgres::Client, db: &Database, name: &str) -> Result<bool, CaptureError> {
    let n = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(query(db, "dropping the logical replication slot"))?;
    Ok(n > 0)
}

/// Stops the application writing to the run's database before the slot is
/// read, so that nothing commits between the read and the restore: new
/// connections are refused (`ALLOW_CONNECTIONS false`, WAL-logged after the
/// recovery point, so the restored database does not keep it) and the other
/// sessions are ended (their open transactions abort). [`reopen`] undoes it
/// when the restore does not happen.
pub async fn quiesce(db: &Database, keep_pid: i32) -> Result<u64, CaptureError> {
    // From another database: PostgreSQL refuses it for the current one.
    let client = connect(&db.sibling("postgres")).await?;
    let name = db.dbname().replace('"', "\"\"");
    client
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"))
        .await
        .map_err(query(db, "refusing new connections"))?;
    // Ended means gone: a session still there could commit after the read.
    let (ended, left) = crate::db::end_sessions_on(&client, db.dbname(), keep_pid)
        .await
        .map_err(query(db, "ending the application's sessions"))?;
    if left.is_empty() {
        return Ok(ended);
    }
    Err(CaptureError::Busy {
        database: db.describe(),
        roles: left.join(", "),
    })
}

/// Lets connections in again after [`quiesce`] (the restore did not run).
pub async fn reopen(db: &Database) -> Result<(), CaptureError> {
    let client = connect(&db.sibling("postgres")).await?;
    let name = db.dbname().replace('"', "\"\"");
    client
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .map_err(query(db, "allowing connections again"))
}

/// The recovery point of a run that captures, with its transaction-id
/// horizon X. A transactional logical message takes X for its transaction
/// and writes a WAL record carrying it; the point is the LSN that record
/// ends at (what `pg_logical_emit_message` returns). A restore to the LSN
/// (exclusive) replays that record, and replay moves the server's counter
/// past every id it sees, so the restored server hands out ids above X
/// only. Every row the restore brings back was committed before the LSN,
/// by a transaction whose id is below X, except one that took its id and
/// committed in the microseconds between X's assignment and the record (its
/// row is then taken as changed: a false conflict at replay, never an
/// overwrite). The message's transaction then rolls back: it wrote nothing.
pub async fn recovery_point(db: &Database) -> Result<(crate::checkpoint::RecoveryPoint, u64), CaptureError> {
    let client = connect(db).await?;
    client
        .batch_execute("BEGIN")
        .await
        .map_err(query(db, "beginning the recovery point"))?;
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, 'backstop', 'recovery point')::text, clock_timestamp(), txid_current()",
            &[],
        )
        .await
        .map_err(query(db, "reading the recovery point"))?;
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(query(db, "ending the recovery point"))?;
    let xid: i64 = row.get(2);
    Ok((
        crate::checkpoint::RecoveryPoint {
            time: row.get(1),
            lsn: row.get(0),
            capture: None,
        },
        xid as u64,
    ))
}

/// Whether `slot` is on `db`'s database, read from the `postgres` one; if
/// so, allows connections to it again.
async fn reopen_if_slot_is_here(db: &Database, slot: &str) -> bool {
    let Ok(client) = connect(&db.sibling("postgres")).await else {
        return false;
    };
    let here = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = $2",
            &[&slot, &db.dbname()],
        )
        .await;
    matches!(here, Ok(Some(_))) && reopen(db).await.is_ok()
}

/// Moves the sequences forward after a restore ([`sequences::advance`]).
pub async fn advance_sequences(
    db: &Database,
    values: &[sequences::SequenceValue],
) -> Result<sequences::Advanced, CaptureError> {
    let client = connect(db).await?;
    Ok(sequences::advance(&client, values).await)
}

/// Drops slot `name` if it exists.
pub async fn release(db: &Database, name: &str) -> SlotRelease {
    let result = async {
        let client = connect(db).await?;
        drop_slot_with(&client, db, name).await
    }
    .await;
    match result {
        Ok(true) => SlotRelease::Dropped,
        Ok(false) => SlotRelease::Gone,
        Err(e) => SlotRelease::Failed {
            why: crate::run::chain(&e),
        },
    }
}

/// Closes the database to the application ([`quiesce`]), then reads the
/// writes committed after `recovery_lsn` from slot `slot`, leaving out
/// transactions `own` (the migration's xids) and backstop's own tables.
pub async fn read(
    db: &Database,
    run_id: &str,
    slot: &str,
    recovery_lsn: &str,
    xid_horizon: Option<u64>,
    own: &HashSet<u32>,
) -> Result<(LostFile, usize), CaptureError> {
    // Connected first: once closed, the database takes no new connection.
    let client = match connect(db).await {
        Ok(c) => c,
        // Closed by an attempt that died before it kept the writes: where
        // the slot is still on it (no restore yet), open it again for this
        // read, which closes it again at once.
        Err(e) => {
            if !reopen_if_slot_is_here(db, slot).await {
                return Err(e);
            }
            connect(db).await?
        }
    };
    // Only the database the slot belongs to is closed (a resumed restore
    // must never close the restored, live one).
    let here = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(query(db, "looking for the run's slot"))?;
    if here.is_none() {
        return Err(CaptureError::NoSlot {
            slot: slot.to_string(),
            database: db.describe(),
        });
    }
    let me: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(query(db, "reading its own session"))?
        .get(0);
    let ended = quiesce(db, me).await?;
    crate::checkpoint::local::pause_point("lost-writes-database-closed").await;
    tracing::info!(
        sessions = ended,
        "the application's sessions are ended before the restore"
    );
    // Decoding reads WAL only up to what is flushed, and commits made with
    // synchronous_commit = off may not be yet: one synchronous commit of our
    // own flushes everything before it.
    client
        .batch_execute(
            "SET synchronous_commit = local;
             SELECT pg_logical_emit_message(true, 'backstop', 'lost writes read');",
        )
        .await
        .map_err(query(db, "flushing the WAL before reading the slot"))?;
    let rows = client
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, NULL,
                'include-xids', '1', 'include-timestamp', '1', 'skip-empty-xacts', '1')",
            &[&slot],
        )
        .await
        .map_err(query(db, "reading the changes since the recovery point"))?;
    let pairs: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let all = decode::transactions(pairs.iter().map(|(l, d)| (l.as_str(), d.as_str()))).map_err(|source| {
        CaptureError::Decode {
            slot: slot.to_string(),
            source,
        }
    })?;
    let after = parse_lsn(recovery_lsn).unwrap_or(u64::MAX);
    let mut own_left_out = 0;
    let mut transactions = Vec::new();
    for mut t in all {
        if parse_lsn(&t.commit_lsn).unwrap_or(u64::MAX) <= after {
            continue;
        }
        if own.contains(&t.xid) {
            own_left_out += 1;
            continue;
        }
        t.changes.retain(|c| !c.table.starts_with("backstop."));
        if !t.changes.is_empty() {
            transactions.push(t);
        }
    }
    let tables: HashSet<&str> = transactions
        .iter()
        .flat_map(|t| t.changes.iter().map(|c| c.table.as_str()))
        .collect();
    let mut keys = HashMap::new();
    for table in tables {
        let cols: Vec<String> = client
            .query(
                "SELECT quote_ident(a.attname) FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY a.attnum",
                &[&table],
            )
            .await
            .map_err(query(db, "reading a table's primary key"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        keys.insert(table.to_string(), cols);
    }
    // Still closed: no id is handed out between this read and the restore.
    let sequences = sequences::read(&client, db).await?;
    Ok((
        LostFile {
            run: run_id.to_string(),
            recovery_lsn: recovery_lsn.to_string(),
            transactions,
            keys,
            sequences,
            xid_horizon,
            migrated: None,
        },
        own_left_out,
    ))
}

impl LostFile {
    /// The summary for the report.
    pub fn summary(&self, own_left_out: usize, file: Option<String>) -> LostWrites {
        let mut rows: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for c in self.transactions.iter().flat_map(|t| &t.changes) {
            *rows
                .entry(c.table.clone())
                .or_default()
                .entry(c.op.as_str().into())
                .or_default() += 1;
        }
        LostWrites {
            transactions: self.transactions.len(),
            rows,
            first_commit: self.transactions.first().map(|t| t.committed_at.clone()),
            last_commit: self.transactions.last().map(|t| t.committed_at.clone()),
            own_left_out,
            file,
            sequences_advanced: None,
            sequences_not_moved: Vec::new(),
        }
    }

    /// `lost-writes.sql`: one transaction per source transaction, in
    /// commit order; a change that cannot be redone safely is a comment.
    pub fn sql(&self) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "-- Writes committed after the recovery point ({}) of backstop run {},\n-- discarded by its restore. `backstop replay {}` applies them, stopping\n-- at the first conflict; or review and run this file by hand.\n",
            self.recovery_lsn, self.run, self.run
        );
        for t in &self.transactions {
            let _ = writeln!(
                s,
                "\n-- xid {} committed {} (lsn {})\nBEGIN;",
                t.xid, t.committed_at, t.commit_lsn
            );
            for c in &t.changes {
                let key = self.keys.get(&c.table).map(Vec::as_slice).unwrap_or_default();
                match decode::statement(c, key) {
                    Some(sql) => {
                        let _ = writeln!(s, "{sql};");
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            "-- not redone: {} on {} has no key to find the row by",
                            c.op.as_str(),
                            c.table
                        );
                    }
                }
            }
            let _ = writeln!(s, "COMMIT;");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_and_per_run() {
        let n = slot_name("20261204-181000123-AbC1234");
        assert_eq!(n, "backstop_20261204_181000123_abc1234");
        assert!(slot_name(&"x".repeat(100)).len() <= 63);
    }
}
