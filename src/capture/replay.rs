//! `backstop replay RUN`: puts the writes a restore discarded back, one
//! source transaction at a time, in commit order.
//!
//! - A transaction that touches a table the migration changed is left for a
//!   person (its rows may not fit the restored schema's meaning); so is one
//!   outside `--tables` when that is given.
//! - Each change must find its row as it was: an INSERT must not meet an
//!   existing key; an UPDATE or DELETE must match exactly one row, by its
//!   whole old row with `REPLICA IDENTITY FULL`, and with the default
//!   identity (whose changes carry only the key) by its key and by who
//!   wrote the row: its `xmin` must come before the recovery point's
//!   transaction-id horizon ([`crate::capture::recovery_point`]: the row is
//!   as the restore brought it back) or be replay's own. A row the
//!   application wrote since the restore is never overwritten. Anything
//!   else is a conflict: that transaction is rolled back and replay stops
//!   there, naming the row; `--skip XID` records a person's decision and
//!   replay goes on. A TRUNCATE always stops it. A transaction left for a
//!   person holds its tables: later ones on them are left too, so commit
//!   order is kept per table.
//! - Applied transactions are recorded in `backstop.replayed` in the same
//!   transaction, so a second replay goes on where the first stopped.
//! - `--dry-run` applies everything in one transaction and rolls it back.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::decode::{self, Op, Txn};
use super::{connect, query, CaptureError, LostFile};
use crate::db::Database;

/// What the run's own replay (`backstop.dev/replay: auto`,
/// `--replay-lost-writes`) did after its restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoReplay {
    Replayed(Replayed),
    /// It could not start (the database, the file); `backstop replay` can.
    NotReplayed {
        why: String,
    },
}

/// What replay did (or would do, dry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    pub dry_run: bool,
    pub applied: Vec<u32>,
    /// Already applied by an earlier replay (or skipped by a person).
    pub already: Vec<u32>,
    /// Skipped now, as a person asked (`--skip`): recorded as handled.
    #[serde(default)]
    pub skipped: Vec<u32>,
    /// Left for a person, with why.
    pub left: Vec<(u32, String)>,
    /// The conflict replay stopped at.
    pub stopped: Option<(u32, String)>,
    /// Sequences moved past the ids the lost writes used (not in a dry run:
    /// `setval` cannot be rolled back).
    #[serde(default)]
    pub sequences_advanced: usize,
    /// Sequences that could not be moved (name, why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sequences_not_moved: Vec<(String, String)>,
}

/// How replay goes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only transactions whose every change is on these tables (empty: all).
    pub only: HashSet<String>,
    /// Transactions a person handled: recorded as done, not applied.
    pub skip: HashSet<u32>,
    /// Apply in one transaction and roll it back.
    pub dry_run: bool,
    /// Match key-only UPDATEs and DELETEs by key alone where the file has no
    /// transaction-id horizon (captured before backstop kept one).
    pub match_by_key: bool,
    /// Bound each statement (`lock_timeout` 5 s, `statement_timeout` 60 s;
    /// a timeout is a conflict): the run's own replay must not hold up the
    /// rest of its remediation behind an application's row lock.
    pub bounded: bool,
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
/// run's migrations touched.
pub async fn replay(
    db: &Database,
    file: &LostFile,
    migrated: &HashSet<String>,
    opts: &Options,
) -> Result<Replayed, CaptureError> {
    let (only, skip, dry_run) = (&opts.only, &opts.skip, opts.dry_run);
    let client = connect(db).await?;
    if opts.bounded {
        client
            .batch_execute("SET lock_timeout = '5s'; SET statement_timeout = '60s'")
            .await
            .map_err(query(db, "bounding the replay's statements"))?;
    }
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS backstop;
             CREATE TABLE IF NOT EXISTS backstop.replayed (run text, xid bigint, at timestamptz DEFAULT now(), PRIMARY KEY (run, xid));
             ALTER TABLE backstop.replayed ADD COLUMN IF NOT EXISTS by_xid bigint",
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
    if !dry_run {
        // Before any row goes back: the application must not hand out one
        // of their ids meanwhile (done after the restore too; again here for
        // a restore resumed after a crash).
        let moved = super::sequences::advance(&client, &file.sequences).await;
        out.sequences_advanced = moved.moved;
        out.sequences_not_moved = moved.failed;
    }
    // One connection: SAVEPOINTs inside a dry run's outer transaction, a
    // real transaction per source transaction otherwise.
    if dry_run {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(query(db, "beginning the dry run"))?;
    }
    // Tables a left transaction touched: a later transaction on them is
    // left too, so that no older write lands on top of a newer one.
    let mut held: HashSet<String> = HashSet::new();
    let mut seen = Seen {
        horizon: file.xid_horizon,
        match_by_key: opts.match_by_key,
        near: client
            .query_one("SELECT txid_snapshot_xmax(txid_current_snapshot())", &[])
            .await
            .map_err(query(db, "reading the transaction-id counter"))?
            .get::<_, i64>(0) as u64,
        // This run's earlier replays only: another run's are not ours.
        ours: client
            .query(
                "SELECT by_xid FROM backstop.replayed WHERE run = $1 AND by_xid IS NOT NULL",
                &[&file.run],
            )
            .await
            .map_err(query(db, "reading backstop.replayed"))?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect(),
    };
    for t in &file.transactions {
        if done.contains(&t.xid) {
            out.already.push(t.xid);
            continue;
        }
        if skip.contains(&t.xid) {
            // A person's decision (kept the row as it is now, or applied the
            // change by hand): recorded, so replay goes on past it.
            client
                .execute(
                    "INSERT INTO backstop.replayed (run, xid) VALUES ($1, $2)",
                    &[&file.run, &(t.xid as i64)],
                )
                .await
                .map_err(query(db, "recording a skipped transaction"))?;
            out.skipped.push(t.xid);
            continue;
        }
        let why = if let Some(c) = t.changes.iter().find(|c| named(&c.table, migrated)) {
            Some(format!("touches {}, which the migration changed", c.table))
        } else if let Some(c) = t.changes.iter().find(|c| held.contains(&c.table)) {
            Some(format!("touches {} after a transaction left for a person", c.table))
        } else {
            t.changes
                .iter()
                .find(|c| !only.is_empty() && !named(&c.table, only))
                .map(|c| format!("touches {}, not in --tables", c.table))
        };
        if let Some(why) = why {
            held.extend(t.changes.iter().map(|c| c.table.clone()));
            out.left.push((t.xid, why));
            continue;
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
        match apply(&client, file, t, &mut seen).await {
            Ok(()) => {
                // The row versions replay writes carry this id (`xmin`): a
                // later replay knows them as its own, not as changes since.
                client
                    .execute(
                        "INSERT INTO backstop.replayed (run, xid, by_xid) VALUES ($1, $2, txid_current())",
                        &[&file.run, &(t.xid as i64)],
                    )
                    .await
                    .map_err(query(db, "recording a replayed transaction"))?;
                client
                    .batch_execute(end_ok)
                    .await
                    .map_err(query(db, "committing a replayed transaction"))?;
                out.applied.push(t.xid);
                if out.applied.len() == 1 {
                    crate::checkpoint::local::pause_point("lost-write-replayed").await;
                }
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

/// What tells a row changed since the recovery point from one the restore
/// brought back, for tables whose changes carry only the key.
struct Seen {
    /// [`LostFile::xid_horizon`]; None: an older file.
    horizon: Option<u64>,
    /// Without a horizon, match by key alone (`--match-by-key`).
    match_by_key: bool,
    /// A full transaction id near the rows' (the counter at the start).
    near: u64,
    /// The full ids of the row versions this run's replay wrote.
    ours: HashSet<u64>,
}

/// The full (epoch-qualified) id of 32-bit `xid`: of the candidates one
/// epoch apart, the nearest to `near` (rows are within 2^31 of it).
fn full_xid(xid: u32, near: u64) -> u64 {
    let base = (near & !0xffff_ffff) | u64::from(xid);
    [base.checked_sub(1 << 32), Some(base), base.checked_add(1 << 32)]
        .into_iter()
        .flatten()
        .min_by_key(|c| c.abs_diff(near))
        .unwrap_or(base)
}

/// Why a key-only UPDATE or DELETE must not touch its row now: gone, or
/// written after the recovery point by someone other than replay. Locks
/// the row (FOR UPDATE) so that it stays as checked until the change.
async fn changed_since(
    client: &tokio_postgres::Client,
    c: &super::decode::Change,
    old: &[super::decode::Value],
    seen: &Seen,
) -> Result<Option<String>, String> {
    let horizon = match (seen.horizon, seen.match_by_key) {
        (Some(h), _) => h,
        (None, true) => return Ok(None),
        (None, false) => {
            return Ok(Some(format!(
                "{} on {} carries only its key, and this file has no transaction-id horizon (captured by an older backstop): replay cannot tell whether the row changed since the restore. Check the row, then --skip this transaction, or give --match-by-key to match by key alone",
                c.op.as_str(),
                c.table
            )))
        }
    };
    let where_ = decode::matches(old);
    let sql = format!("SELECT xmin::text FROM {} WHERE {where_} FOR UPDATE", c.table);
    let rows = client.query(sql.as_str(), &[]).await.map_err(|e| {
        let why = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        format!("{} on {}: {why}", c.op.as_str(), c.table)
    })?;
    let [row] = rows.as_slice() else {
        return Ok(Some(format!(
            "{} on {} matched {} rows where {where_}: the row no longer matches its old image (deleted since the restore)",
            c.op.as_str(),
            c.table,
            rows.len()
        )));
    };
    let xmin = full_xid(row.get::<_, String>(0).parse().unwrap_or(u32::MAX), seen.near);
    if seen.ours.contains(&xmin) || xmin < horizon {
        return Ok(None);
    }
    Ok(Some(format!(
        "{} on {} where {where_}: the row was written after the recovery point (xmin {xmin} >= horizon {horizon}): by the application or a person since the restore (or committed as the point was taken); replaying would overwrite it",
        c.op.as_str(),
        c.table
    )))
}

/// Applies one transaction's changes; the conflict, in words.
async fn apply(client: &tokio_postgres::Client, file: &LostFile, t: &Txn, seen: &mut Seen) -> Result<(), String> {
    for c in &t.changes {
        let key = file.keys.get(&c.table).map(Vec::as_slice).unwrap_or_default();
        let Some(sql) = decode::statement(c, key) else {
            return Err(match c.op {
                Op::Truncate => format!(
                    "TRUNCATE of {} is never replayed by a program (it would erase what was written since the restore): decide by hand",
                    c.table
                ),
                _ => format!(
                    "{} on {} has no key to find its row by: replay it by hand from lost-writes.sql",
                    c.op.as_str(),
                    c.table
                ),
            });
        };
        // Per change: with `REPLICA IDENTITY FULL` (then) the old image holds
        // the whole row and is matched as it is; otherwise only the key.
        let key_only = c.op != Op::Insert && c.old.iter().all(|v| key.contains(&v.column));
        if key_only {
            if let Some(why) = changed_since(client, c, &decode::old_image(c, key), seen).await? {
                return Err(why);
            }
        }
        // One row back per row changed; an INSERT's or UPDATE's carries the
        // new row version's xmin: replay's own, for the checks after.
        let sql = format!("{sql} RETURNING xmin::text");
        match client.query(sql.as_str(), &[]).await.map(|rows| {
            if c.op != Op::Delete {
                let near = seen.near;
                seen.ours.extend(
                    rows.iter()
                        .filter_map(|r| r.try_get::<_, String>(0).ok()?.parse::<u32>().ok())
                        .map(|x| full_xid(x, near)),
                );
            }
            rows.len()
        }) {
            Ok(n) if c.op == Op::Insert || n == 1 => {}
            Ok(n) => {
                let old = decode::old_image(c, key);
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

/// What `backstop replay` was asked.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub state: std::path::PathBuf,
    pub run: String,
    /// The database; default: the run's carrier's `url:VAR` from the environment.
    pub database_url: Option<String>,
    pub dry_run: bool,
    pub tables: Vec<String>,
    /// Transactions a person handled: recorded as done, not applied.
    pub skip: Vec<u32>,
    /// See [`Options::match_by_key`].
    pub match_by_key: bool,
    /// Replay this `lost-writes.json` (a controller's run, copied from its
    /// --state volume) instead of looking the run up in the journal; needs
    /// `database_url`.
    pub file: Option<std::path::PathBuf>,
}

/// Why replay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Refused(String),
    #[error("reading {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the database of run {run}")]
    Database {
        run: String,
        #[source]
        source: crate::db::DbError,
    },
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// The tables the run's migrations name (as written, qualified or not), or
/// why they cannot be known: a `job` migration runs SQL backstop never
/// sees, and a DO block, a CALL, or a SELECT (of a function) can write to
/// tables its text does not name. Replay must then not guess which tables
/// are safe.
pub fn migrated_tables(migrations: &[crate::manifests::Carrier]) -> Result<HashSet<String>, String> {
    let mut tables = HashSet::new();
    for m in migrations {
        if m.run == crate::manifests::RunKind::Job {
            return Err(format!(
                "migration {} is a job: backstop cannot tell which tables it changed",
                m.id
            ));
        }
        for s in &m.statements {
            let parsed = pg_query::parse(&s.sql, 0).map_err(|e| {
                format!(
                    "a statement of migration {} at {}:{} does not parse ({e})",
                    m.id, m.file, s.line
                )
            })?;
            if let Some(kind) = parsed
                .statement_types()
                .into_iter()
                .find(|k| matches!(*k, "DoStmt" | "CallStmt" | "SelectStmt" | "ExecuteStmt"))
            {
                return Err(format!(
                    "migration {} runs a {kind} at {}:{}, which can change tables its text does not name",
                    m.id, m.file, s.line
                ));
            }
            tables.extend(parsed.tables());
        }
    }
    Ok(tables)
}

/// The file, its path, the database and the migrated tables of a replay.
type Source = (LostFile, std::path::PathBuf, Database, Result<HashSet<String>, String>);

/// The database `--database-url` names.
fn given_database(url: &str) -> Result<Database, crate::db::DbError> {
    Database::from_url(
        crate::manifests::DatabaseRef::Url {
            var: "BACKSTOP_DATABASE_URL".into(),
        },
        url,
        None,
    )
}

fn read_err(path: &std::path::Path, e: Box<dyn std::error::Error + Send + Sync>) -> ReplayError {
    ReplayError::Read {
        path: path.to_path_buf(),
        source: e,
    }
}

/// `--file`: the run's lost writes as copied from a controller's volume.
fn from_file(opts: &ReplayOptions, path: &std::path::Path) -> Result<Source, ReplayError> {
    let Some(url) = &opts.database_url else {
        return Err(ReplayError::Refused(
            "--file needs --database-url (the file names no database)".into(),
        ));
    };
    let bytes = std::fs::read(path).map_err(|e| read_err(path, Box::new(e)))?;
    let file: LostFile = serde_json::from_slice(&bytes).map_err(|e| read_err(path, Box::new(e)))?;
    if !file.run.starts_with(&opts.run) || opts.run.is_empty() {
        return Err(ReplayError::Refused(format!(
            "{} holds the lost writes of run {}, not {}",
            path.display(),
            file.run,
            opts.run
        )));
    }
    let db = given_database(url).map_err(|source| ReplayError::Database {
        run: file.run.clone(),
        source,
    })?;
    let migrated = match &file.migrated {
        Some(Ok(tables)) => Ok(tables.iter().cloned().collect()),
        Some(Err(why)) => Err(why.clone()),
        None => Err(format!(
            "{} does not say which tables the migration changed",
            path.display()
        )),
    };
    Ok((file, path.to_path_buf(), db, migrated))
}

/// The run looked up in the journal under `--state`.
async fn from_journal(opts: &ReplayOptions) -> Result<Source, ReplayError> {
    let journal = crate::journal::Journal::new(&opts.state);
    let run = match journal
        .lookup(&opts.run)
        .map_err(|e| read_err(&opts.state, Box::new(e)))?
    {
        crate::journal::Lookup::Found(run) => *run,
        crate::journal::Lookup::Missing => {
            return Err(ReplayError::Refused(format!(
                "no run {:?} (see `backstop status`)",
                opts.run
            )))
        }
        crate::journal::Lookup::Ambiguous(runs) => {
            let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
            return Err(ReplayError::Refused(format!(
                "{:?} is ambiguous: it matches {}",
                opts.run,
                ids.join(", ")
            )));
        }
    };
    if !run.phase.is_terminal() {
        return Err(ReplayError::Refused(format!(
            "run {} is not over ({}): replay after its restore",
            run.id, run.phase
        )));
    }
    if run.restore.is_none() {
        return Err(ReplayError::Refused(format!(
            "run {} did not restore: no write was lost",
            run.id
        )));
    }
    let path = journal.run_dir(&run.id).join(super::LOST_FILE);
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ReplayError::Refused(format!(
            "run {} kept no lost writes ({} is missing: the server could not decode WAL, see its report)",
            run.id,
            path.display()
        )),
        _ => read_err(&path, Box::new(e)),
    })?;
    let file: LostFile = serde_json::from_slice(&bytes).map_err(|e| read_err(&path, Box::new(e)))?;
    let db = match (&opts.database_url, run.migrations.first()) {
        (Some(url), _) => given_database(url),
        (None, Some(m)) => Database::from_env(&m.database, m.database_name.as_deref()),
        (None, None) => {
            return Err(ReplayError::Refused(format!(
                "run {} names no database: give --database-url",
                run.id
            )))
        }
    }
    .map_err(|source| ReplayError::Database {
        run: run.id.clone(),
        source,
    })?;
    let migrated = migrated_tables(&run.migrations);
    Ok((file, path, db, migrated))
}

/// Finds run `opts.run`, reads its `lost-writes.json` and replays it.
pub async fn replay_run(opts: &ReplayOptions) -> Result<Replayed, ReplayError> {
    let (file, path, db, migrated) = match &opts.file {
        Some(path) => from_file(opts, path)?,
        None => from_journal(opts).await?,
    };
    let only: HashSet<String> = opts.tables.iter().cloned().collect();
    let unknown: Vec<String> = opts
        .skip
        .iter()
        .filter(|x| !file.transactions.iter().any(|t| t.xid == **x))
        .map(|x| x.to_string())
        .collect();
    if !unknown.is_empty() {
        return Err(ReplayError::Refused(format!(
            "--skip {}: no such transaction in {} (see `backstop replay {} --dry-run`)",
            unknown.join(","),
            path.display(),
            file.run
        )));
    }
    // Unknown migrated tables: only the tables a person names are replayed.
    let migrated = match migrated {
        Ok(tables) => tables,
        Err(why) if only.is_empty() => {
            return Err(ReplayError::Refused(format!(
                "{why}: name the tables to replay with --tables (none the migration changed)"
            )))
        }
        Err(_) => HashSet::new(),
    };
    let how = Options {
        only,
        skip: opts.skip.iter().copied().collect(),
        dry_run: opts.dry_run,
        match_by_key: opts.match_by_key,
        bounded: false,
    };
    Ok(replay(&db, &file, &migrated, &how).await?)
}

/// The text rendering.
pub fn text(r: &Replayed) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let verb = if r.dry_run { "would apply" } else { "applied" };
    let _ = writeln!(
        s,
        "{verb} {} transactions{}",
        r.applied.len(),
        if r.dry_run { " (dry run: rolled back)" } else { "" }
    );
    if r.sequences_advanced > 0 {
        let _ = writeln!(
            s,
            "moved {} sequences past the ids the lost writes used",
            r.sequences_advanced
        );
    }
    for (name, why) in &r.sequences_not_moved {
        let _ = writeln!(s, "sequence {name} NOT moved past the ids the lost writes used: {why}");
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "skipped as asked (recorded as handled): {}", r.skipped.len());
    }
    if !r.already.is_empty() {
        let _ = writeln!(s, "already applied by an earlier replay: {}", r.already.len());
    }
    for (xid, why) in &r.left {
        let _ = writeln!(s, "left for a person: xid {xid}: {why}");
    }
    if let Some((xid, why)) = &r.stopped {
        let _ = writeln!(
            s,
            "stopped at xid {xid}: {why}\nnothing of it was applied; the transactions after it were not tried. Decide for that row: keep it as it is now, or apply the transaction by hand from lost-writes.sql; then `--skip {xid}` records it as handled and replay goes on where it stopped"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carriers(yaml: &str) -> Vec<crate::manifests::Carrier> {
        let snap = crate::manifests::Snapshot::from([("m/a.yaml".to_string(), yaml.as_bytes().to_vec())]);
        crate::manifests::parse_file(&snap, "m/a.yaml", yaml.as_bytes()).unwrap()
    }

    fn sql_carrier(sql: &str) -> Vec<crate::manifests::Carrier> {
        carriers(&format!(
            "kind: ConfigMap\nmetadata:\n  name: a\n  annotations:\n    backstop.dev/migration: a\n    backstop.dev/database: url:DB\ndata:\n  a.sql: {sql:?}\n"
        ))
    }

    #[test]
    fn migrated_tables_are_named_or_replay_is_told_they_cannot_be_known() {
        let tables = migrated_tables(&sql_carrier(
            "ALTER TABLE orders ADD COLUMN t int; UPDATE public.items SET n = 1;",
        ))
        .unwrap();
        assert!(
            tables.contains("orders") && tables.contains("public.items"),
            "{tables:?}"
        );
        for sql in [
            "DO $$ BEGIN UPDATE orders SET n = 1; END $$;",
            "CALL backfill();",
            "SELECT backfill_totals();",
        ] {
            let why = migrated_tables(&sql_carrier(sql)).unwrap_err();
            assert!(why.contains("can change tables its text does not name"), "{sql}: {why}");
        }
        let job = carriers(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\n  annotations:\n    backstop.dev/migration: m\n    backstop.dev/database: url:DB\n    backstop.dev/run: job\n    kustomize.toolkit.fluxcd.io/reconcile: disabled\nspec: {template: {spec: {containers: []}}}\n",
        );
        let why = migrated_tables(&job).unwrap_err();
        assert!(why.contains("migration m is a job"), "{why}");
    }

    #[test]
    fn a_rows_32_bit_xmin_is_placed_in_the_epoch_nearest_the_counter() {
        let epoch = 3u64 << 32;
        // Same epoch, below and above the counter.
        assert_eq!(full_xid(100, epoch + 5_000), epoch + 100);
        assert_eq!(full_xid(9_000, epoch + 5_000), epoch + 9_000);
        // Just before the counter wrapped into this epoch: the one before.
        assert_eq!(full_xid(u32::MAX - 10, epoch + 5), epoch - 11);
        // Counter near the end of an epoch, row just after the wrap.
        assert_eq!(full_xid(3, epoch + u64::from(u32::MAX) - 2), epoch + (1 << 32) + 3);
        // Epoch 0: never below zero.
        assert_eq!(full_xid(u32::MAX, 10), u64::from(u32::MAX));
    }
}
