//! Datastore move (DESIGN section 7), the `calicoctl datastore migrate` runbook
//! for PostgreSQL: lock the source, export, import into the target, verify
//! row counts and content checksums table by table, unlock the side that is
//! live, or roll back while the source still exists.
//!
//! State lives in the databases themselves: `backstop.datastore_lock` (one row:
//! who locked, when, why, which side, what was revoked) and, in the target,
//! `backstop.datastore_import` (what the import created, so rollback can drop
//! exactly that). Every step checks that state first, so it is safe to rerun
//! and says what it found.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio_postgres::Client;

use crate::db::{ident, Database, DbError};
use crate::manifests::DatabaseRef;
use crate::pgbin::{self, PgBinError};

/// Failures of datastore steps. `Refused` means nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("query on {database} failed while {step}")]
    Query {
        database: String,
        step: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{step} failed")]
    Tool { step: String, source: PgBinError },
    #[error("invalid URL for {side}")]
    Url { side: &'static str, source: DbError },
}

type Result<T> = std::result::Result<T, DatastoreError>;

mod import;
mod verify;
use import::{drop_created, drop_objects, Inventory};
pub use import::{import, ImportOptions};
pub use verify::{render_diffs, verify, TableDiff};

const LOCK_DDL: &str = "SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS backstop;
CREATE TABLE IF NOT EXISTS backstop.datastore_lock (
    id int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    side text NOT NULL,
    locked boolean NOT NULL,
    locked_by text NOT NULL,
    locked_at timestamptz NOT NULL,
    reason text NOT NULL,
    revoked_connect text[] NOT NULL DEFAULT '{}',
    unlocked_at timestamptz
);
ALTER TABLE backstop.datastore_lock ADD COLUMN IF NOT EXISTS suspended text[] NOT NULL DEFAULT '{}';
ALTER TABLE backstop.datastore_lock ADD COLUMN IF NOT EXISTS exported_at timestamptz;
ALTER TABLE backstop.datastore_lock ADD COLUMN IF NOT EXISTS exported_to text;";

/// The import record. `imported_at` is NULL while an import runs: the record
/// is written (with what the target held before) before `pg_restore` starts,
/// so that `rollback` knows what to drop even when the import was killed.
const IMPORT_DDL: &str = "SET client_min_messages = warning;
BEGIN;
SET TRANSACTION READ WRITE;
CREATE SCHEMA IF NOT EXISTS backstop;
CREATE TABLE IF NOT EXISTS backstop.datastore_import (
    id int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    imported_at timestamptz,
    file text NOT NULL,
    schemas text[] NOT NULL,
    relations text[] NOT NULL,
    types text[] NOT NULL,
    functions text[] NOT NULL
);
ALTER TABLE backstop.datastore_import ALTER COLUMN imported_at DROP NOT NULL;
ALTER TABLE backstop.datastore_import ADD COLUMN IF NOT EXISTS started_at timestamptz;
ALTER TABLE backstop.datastore_import ADD COLUMN IF NOT EXISTS before text;
ALTER TABLE backstop.datastore_import ADD COLUMN IF NOT EXISTS created_backstop_schema boolean NOT NULL DEFAULT false;
ALTER TABLE backstop.datastore_import ADD COLUMN IF NOT EXISTS toc_sha256 text;
COMMIT;";

/// Schemas that hold the application's objects (not the catalogs, not backstop's own).
const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'backstop', 'pg_toast') AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'";

/// Builds a connectable database from a URL given on the command line.
pub fn database(url: &str, side: &'static str) -> Result<Database> {
    Database::from_url(DatabaseRef::Url { var: side.to_string() }, url, None)
        .map(|db| db.labelled(side))
        .map_err(|source| DatastoreError::Url { side, source })
}

fn q<'a>(db: &'a Database, step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DatastoreError + 'a {
    move |source| DatastoreError::Query {
        database: db.describe(),
        step,
        source,
    }
}

/// The lock record of a database, if it has one.
#[derive(Debug, Clone, Serialize)]
pub struct LockRecord {
    pub side: String,
    pub locked: bool,
    pub locked_by: String,
    pub locked_at: chrono::DateTime<chrono::Utc>,
    pub reason: String,
    pub revoked_connect: Vec<String>,
    pub unlocked_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When a source was exported for a move, and where to.
    pub exported: Option<(chrono::DateTime<chrono::Utc>, String)>,
}

async fn lock_record(db: &Database, client: &Client) -> Result<Option<LockRecord>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('backstop.datastore_lock') IS NOT NULL", &[])
        .await
        .map_err(q(db, "looking for a lock record"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            // Read through to_jsonb: a record written by an older backstop has no export columns.
            "SELECT side, locked, locked_by, locked_at, reason, revoked_connect, unlocked_at,
                    (to_jsonb(l) ->> 'exported_at')::timestamptz, to_jsonb(l) ->> 'exported_to'
               FROM backstop.datastore_lock l",
            &[],
        )
        .await
        .map_err(q(db, "reading the lock record"))?;
    Ok(row.map(|r| LockRecord {
        side: r.get(0),
        locked: r.get(1),
        locked_by: r.get(2),
        locked_at: r.get(3),
        reason: r.get(4),
        revoked_connect: r.get(5),
        unlocked_at: r.get(6),
        exported: r
            .get::<_, Option<chrono::DateTime<chrono::Utc>>>(7)
            .map(|at| (at, r.get::<_, Option<String>>(8).unwrap_or_default())),
    }))
}

/// Stops writers: records the lock, revokes CONNECT from every role that has it
/// except superusers and ourselves, makes new sessions read-only, and ends the
/// other sessions. Returns what it did or found.
pub async fn lock(db: &Database, side: &str, by: &str, reason: &str, suspended: &[String]) -> Result<String> {
    let client = db.connect().await?;
    if let Some(rec) = lock_record(db, &client).await? {
        if rec.locked {
            return Ok(format!(
                "{} is already locked (as {}) by {} at {}: {}",
                db.describe(),
                rec.side,
                rec.locked_by,
                rec.locked_at.to_rfc3339(),
                rec.reason
            ));
        }
    }
    let name = db.dbname().to_string();
    client
        .batch_execute(LOCK_DDL)
        .await
        .map_err(q(db, "creating the lock table"))?;
    // Roles (or PUBLIC) allowed to connect, other than superusers and ourselves.
    let rows = client
        .query(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
               FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
               LEFT JOIN pg_roles r ON r.oid = a.grantee
              WHERE d.datname = $1 AND a.privilege_type = 'CONNECT'
                AND (a.grantee = 0 OR (NOT r.rolsuper AND r.rolname <> current_user))",
            &[&name],
        )
        .await
        .map_err(q(db, "reading CONNECT grants"))?;
    let revoked: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let d = ident(&name);
    let mut sql = String::from("BEGIN;\n");
    for grantee in &revoked {
        sql.push_str(&format!("REVOKE CONNECT ON DATABASE {d} FROM {grantee};\n"));
    }
    sql.push_str(&format!("ALTER DATABASE {d} SET default_transaction_read_only = on;\n"));
    sql.push_str("COMMIT;");
    client
        .batch_execute(&sql)
        .await
        .map_err(q(db, "revoking connections"))?;
    client
        .execute(
            "INSERT INTO backstop.datastore_lock (side, locked, locked_by, locked_at, reason, revoked_connect, unlocked_at, suspended)
             VALUES ($1, true, $2, now(), $3, $4, NULL, $5)
             ON CONFLICT (id) DO UPDATE SET side = EXCLUDED.side, locked = true, locked_by = EXCLUDED.locked_by,
               locked_at = EXCLUDED.locked_at, reason = EXCLUDED.reason, revoked_connect = EXCLUDED.revoked_connect,
               unlocked_at = NULL, suspended = EXCLUDED.suspended, exported_at = NULL, exported_to = NULL",
            &[&side, &by, &reason, &revoked, &suspended],
        )
        .await
        .map_err(q(db, "recording the lock"))?;
    let ended: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .map_err(q(db, "ending other sessions"))?
        .get(0);
    Ok(format!(
        "locked {} (as {side}): CONNECT revoked from {}, new sessions read-only, {ended} session(s) ended",
        db.describe(),
        if revoked.is_empty() {
            "nobody".to_string()
        } else {
            revoked.join(", ")
        }
    ))
}

/// The Kustomizations suspended with the lock.
pub async fn suspended(db: &Database) -> Result<Vec<String>> {
    let client = db.connect().await?;
    let exists: bool = client
        .query_one("SELECT to_regclass('backstop.datastore_lock') IS NOT NULL", &[])
        .await
        .map_err(q(db, "looking for a lock record"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let row = client
        .query_opt("SELECT suspended FROM backstop.datastore_lock", &[])
        .await
        .map_err(q(db, "reading suspended Kustomizations"))?;
    Ok(row.map(|r| r.get(0)).unwrap_or_default())
}

/// Releases the lock: re-grants what was revoked and makes sessions writable.
/// A source that was exported for a move is refused without `force`: if the
/// target went live, both sides would take writes and drift apart without a
/// word. `rollback` (which drops the import first) is the way back.
pub async fn unlock(db: &Database, force: bool) -> Result<String> {
    let client = db.connect().await?;
    let Some(rec) = lock_record(db, &client).await? else {
        return Ok(format!("{} holds no lock record: nothing to unlock", db.describe()));
    };
    if !rec.locked {
        return Ok(format!(
            "{} is already unlocked (since {})",
            db.describe(),
            rec.unlocked_at.map(|t| t.to_rfc3339()).unwrap_or_default()
        ));
    }
    if let (Some((at, to)), "source", false) = (&rec.exported, rec.side.as_str(), force) {
        return Err(DatastoreError::Refused(format!(
            "{} is the source of a move, exported at {} to {to}: once the target is live, unlocking the source too leaves both sides writable. \
             To undo the move, run `backstop datastore rollback --source ... --target ...` (it drops the import, then unlocks the source); \
             if the target never went live, pass --force. Nothing was changed",
            db.describe(),
            at.to_rfc3339()
        )));
    }
    let d = ident(db.dbname());
    // This session started read-only: ask for a writable transaction first.
    let mut sql = String::from("BEGIN;\nSET TRANSACTION READ WRITE;\n");
    for grantee in &rec.revoked_connect {
        sql.push_str(&format!("GRANT CONNECT ON DATABASE {d} TO {grantee};\n"));
    }
    sql.push_str(&format!("ALTER DATABASE {d} RESET default_transaction_read_only;\n"));
    sql.push_str("UPDATE backstop.datastore_lock SET locked = false, unlocked_at = now();\nCOMMIT;");
    client.batch_execute(&sql).await.map_err(q(db, "releasing the lock"))?;
    Ok(format!(
        "unlocked {} ({}): CONNECT granted again to {}",
        db.describe(),
        rec.side,
        if rec.revoked_connect.is_empty() {
            "nobody".to_string()
        } else {
            rec.revoked_connect.join(", ")
        }
    ))
}

/// Exports schema and data of a locked source (the lock record itself stays
/// behind) into the directory `dir`, with `pg_dump -Fd --jobs` and no
/// compression: the move is bound by how fast the servers read and write,
/// and zlib would make the export ten times slower for a smaller dump that
/// is deleted after the move. The dump is written to `<dir>.partial` and
/// renamed when complete, so a killed export never leaves a directory that
/// looks like a dump. Progress (bytes written, rate) is drawn on a terminal.
pub async fn export(db: &Database, dir: &Path, bindir: &Path, jobs: u32) -> Result<String> {
    let client = db.connect().await?;
    match lock_record(db, &client).await? {
        Some(rec) if rec.locked => {}
        _ => {
            return Err(DatastoreError::Refused(format!(
                "{} is not locked: run `backstop datastore lock` first, or writes made after the export are lost",
                db.describe()
            )))
        }
    }
    if dir.exists() {
        return Err(DatastoreError::Refused(format!(
            "{} already exists: remove it or choose another --output (a dump is never overwritten)",
            dir.display()
        )));
    }
    let partial = partial_of(dir);
    if partial.exists() {
        // Left by an export that was killed; only ever ours.
        std::fs::remove_dir_all(&partial).map_err(|e| {
            DatastoreError::Refused(format!(
                "cannot remove {} left by an interrupted export: {e}",
                partial.display()
            ))
        })?;
    }
    let tool = |source| DatastoreError::Tool {
        step: format!("pg_dump of {}", db.describe()),
        source,
    };
    let mut cmd = pgbin::command(bindir, "pg_dump", None);
    cmd.envs(db.libpq_env())
        .args([
            "-Fd",
            "-Z0",
            "--no-password",
            "--exclude-table=backstop.datastore_lock",
            "--exclude-table=backstop.run_owner",
        ])
        .arg(format!("--jobs={}", jobs.max(1)))
        .arg("-f")
        .arg(&partial)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let spawn = |source| {
        tool(PgBinError::Spawn {
            program: "pg_dump".into(),
            source,
        })
    };
    let child = cmd.spawn().map_err(spawn)?;
    let progress = crate::progress::Progress::bytes_of("export: pg_dump", partial.clone(), None);
    let out = child.wait_with_output().await.map_err(spawn)?;
    drop(progress);
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(tool(PgBinError::Failed {
            program: "pg_dump".into(),
            status: out.status.to_string(),
            stderr: pgbin::tail(&String::from_utf8_lossy(&out.stderr), 20),
        }));
    }
    std::fs::rename(&partial, dir).map_err(|e| {
        DatastoreError::Refused(format!(
            "the dump is complete in {} but cannot be renamed to {}: {e}",
            partial.display(),
            dir.display()
        ))
    })?;
    // The source remembers it was exported: unlocking it later, once the
    // target may be live, needs a word from a person (see `unlock`).
    client
        .batch_execute(
            "BEGIN; SET TRANSACTION READ WRITE;
             ALTER TABLE backstop.datastore_lock ADD COLUMN IF NOT EXISTS exported_at timestamptz;
             ALTER TABLE backstop.datastore_lock ADD COLUMN IF NOT EXISTS exported_to text;",
        )
        .await
        .map_err(q(db, "recording the export"))?;
    client
        .execute(
            "UPDATE backstop.datastore_lock SET exported_at = now(), exported_to = $1",
            &[&dir.display().to_string()],
        )
        .await
        .map_err(q(db, "recording the export"))?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(q(db, "recording the export"))?;
    let size = dir_size(dir);
    Ok(format!(
        "exported {} to {} ({size} bytes, pg_dump directory format)",
        db.describe(),
        dir.display()
    ))
}

/// Where an export is written until it is complete.
fn partial_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    dir.with_file_name(name)
}

/// Bytes of the files directly in `dir` (a dump directory is flat).
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Rolls the move back while the source exists and holds its lock record:
/// drops what the import created in the target and unlocks the source.
pub async fn rollback(source: &Database, target: &Database, force: bool) -> Result<String> {
    let s = source.connect().await.map_err(|e| {
        DatastoreError::Refused(format!(
            "rollback needs the source, which cannot be reached ({}); the move can only go forward now",
            crate::run::chain(&e)
        ))
    })?;
    match lock_record(source, &s).await? {
        Some(rec) if rec.locked && rec.side == "source" => {}
        Some(rec) if !rec.locked => {
            return Err(DatastoreError::Refused(format!(
                "the source {} was unlocked at {}: it may have taken writes since; nothing to roll back to",
                source.describe(),
                rec.unlocked_at.map(|t| t.to_rfc3339()).unwrap_or_default()
            )))
        }
        _ => {
            return Err(DatastoreError::Refused(format!(
                "the source {} holds no source lock record: it was never locked for a move",
                source.describe()
            )))
        }
    }
    let t = target.connect().await?;
    if let Some(rec) = lock_record(target, &t).await? {
        if !rec.locked && !force {
            return Err(DatastoreError::Refused(format!(
                "the target {} was unlocked at {} and may hold new writes that rollback would drop; pass --force to roll back anyway",
                target.describe(),
                rec.unlocked_at.map(|t| t.to_rfc3339()).unwrap_or_default()
            )));
        }
    }
    let recorded: bool = t
        .query_one("SELECT to_regclass('backstop.datastore_import') IS NOT NULL", &[])
        .await
        .map_err(q(target, "looking for the import record"))?
        .get(0);
    let mut dropped = 0usize;
    let mut created_backstop_schema = false;
    if recorded {
        t.batch_execute(IMPORT_DDL)
            .await
            .map_err(q(target, "updating the import record table"))?;
        if let Some(r) = t
            .query_opt(
                "SELECT schemas, relations, types, functions, imported_at IS NULL, before, created_backstop_schema FROM backstop.datastore_import",
                &[],
            )
            .await
            .map_err(q(target, "reading the import record"))?
        {
            let interrupted: bool = r.get(4);
            created_backstop_schema = r.get(6);
            dropped = if interrupted {
                // Killed mid-import: whatever exists now and did not before is its.
                let before: Inventory = r
                    .get::<_, Option<String>>(5)
                    .and_then(|v| serde_json::from_str(&v).ok())
                    .ok_or_else(|| {
                        DatastoreError::Refused(format!(
                            "the interrupted import's record in {} does not say what the target held before; drop its objects by hand",
                            target.describe()
                        ))
                    })?;
                drop_created(target, &t, &before).await?
            } else {
                let created = Inventory {
                    schemas: r.get::<_, Vec<String>>(0).into_iter().collect(),
                    relations: r.get::<_, Vec<String>>(1).into_iter().collect(),
                    types: r.get::<_, Vec<String>>(2).into_iter().collect(),
                    functions: r.get::<_, Vec<String>>(3).into_iter().collect(),
                };
                drop_objects(target, &t, &created).await?
            };
        }
    }
    drop(s);
    // The sanctioned way back: the import is gone, the source may take writes.
    let unlocked = unlock(source, true).await?;
    let target_lock = unlock(target, false).await?;
    // The import made the `backstop` schema (its record, the target's lock
    // record): with both gone, so is the schema, and the target is as it was.
    let schema = if created_backstop_schema {
        t.batch_execute("BEGIN; SET TRANSACTION READ WRITE; DROP SCHEMA IF EXISTS backstop CASCADE; COMMIT;")
            .await
            .map_err(q(target, "dropping the backstop schema the import created"))?;
        "; dropped the backstop schema the import created"
    } else {
        ""
    };
    Ok(format!(
        "rolled back: dropped {dropped} object(s) the import created in {}; {unlocked}; {target_lock}{schema}",
        target.describe()
    ))
}

/// Who runs the command, for lock records.
pub fn whoami() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    format!("{user}@{host}")
}

/// Default dump path in the working directory.
pub fn default_file() -> PathBuf {
    PathBuf::from("backstop-datastore.dump")
}
