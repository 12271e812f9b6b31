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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

mod verify;
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
ALTER TABLE backstop.datastore_lock ADD COLUMN IF NOT EXISTS suspended text[] NOT NULL DEFAULT '{}';";

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
COMMIT;";

/// Builds a connectable database from a URL given on the command line.
pub fn database(url: &str, side: &'static str) -> Result<Database> {
    Database::from_url(DatabaseRef::Url { var: side.to_string() }, url, None)
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
            "SELECT side, locked, locked_by, locked_at, reason, revoked_connect, unlocked_at FROM backstop.datastore_lock",
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
               unlocked_at = NULL, suspended = EXCLUDED.suspended",
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
pub async fn unlock(db: &Database) -> Result<String> {
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
/// looks like a dump. `progress` gets bytes written so far.
pub async fn export(db: &Database, dir: &Path, bindir: &Path, jobs: u32, progress: impl Fn(u64)) -> Result<String> {
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
    let mut wait = Box::pin(child.wait_with_output());
    let out = loop {
        tokio::select! {
            out = &mut wait => break out,
            _ = tokio::time::sleep(Duration::from_millis(250)) => progress(dir_size(&partial)),
        }
    };
    let out = out.map_err(spawn)?;
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
    let size = dir_size(dir);
    progress(size);
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

/// Objects of the user schemas, for telling what an import created.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Inventory {
    schemas: BTreeSet<String>,
    /// `kind qualified-name`, kind one of table, view, matview, sequence, foreign-table.
    relations: BTreeSet<String>,
    types: BTreeSet<String>,
    functions: BTreeSet<String>,
}

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'backstop', 'pg_toast') AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'";

async fn inventory(db: &Database, client: &Client) -> Result<Inventory> {
    let one = |sql: String| async move {
        client
            .query(&sql, &[])
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<BTreeSet<String>>())
    };
    let schemas = one(format!(
        "SELECT quote_ident(n.nspname) FROM pg_namespace n WHERE {USER_SCHEMAS}"
    ))
    .await;
    let relations = one(format!(
        "SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END || ' ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND NOT c.relispartition AND {USER_SCHEMAS}
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i') AND c.relkind = 'S')"
    ))
    .await;
    let types = one(format!(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(t.typname) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE t.typtype IN ('e', 'd', 'c', 'r', 'm') AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
            AND NOT EXISTS (SELECT 1 FROM pg_type e WHERE e.oid = t.typelem AND t.typcategory = 'A') AND {USER_SCHEMAS}"
    ))
    .await;
    let functions = one(format!(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE p.prokind IN ('f', 'p', 'a') AND {USER_SCHEMAS}
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"
    ))
    .await;
    Ok(Inventory {
        schemas: schemas.map_err(q(db, "listing the target's objects"))?,
        relations: relations.map_err(q(db, "listing the target's objects"))?,
        types: types.map_err(q(db, "listing the target's objects"))?,
        functions: functions.map_err(q(db, "listing the target's objects"))?,
    })
}

/// Options of [`import`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportOptions {
    /// Import into a target that already holds tables.
    pub allow_non_empty: bool,
    /// Leave out GRANTs (when the roles do not exist on the target).
    pub no_privileges: bool,
    /// `pg_restore --jobs` (0 or 1: one).
    pub jobs: u32,
}

/// Imports a dump into the target, all or nothing (one transaction; objects
/// owned by the importing role; GRANTs kept, so the roles must exist on the
/// target unless `no_privileges`). Refuses a target that already holds user
/// tables unless `allow_non_empty`; records what the import created; leaves
/// the target locked (read-only) until `unlock` after a passing `verify`.
pub async fn import(db: &Database, file: &Path, bindir: &Path, opts: ImportOptions, by: &str) -> Result<String> {
    let ImportOptions {
        allow_non_empty,
        no_privileges,
        jobs,
    } = opts;
    let client = db.connect().await?;
    let imported: bool = client
        .query_one("SELECT to_regclass('backstop.datastore_import') IS NOT NULL", &[])
        .await
        .map_err(q(db, "looking for an earlier import"))?
        .get(0);
    if imported {
        client
            .batch_execute(IMPORT_DDL)
            .await
            .map_err(q(db, "updating the import record table"))?;
        type Times = (
            Option<chrono::DateTime<chrono::Utc>>,
            Option<chrono::DateTime<chrono::Utc>>,
        );
        let at: Option<Times> = client
            .query_opt("SELECT imported_at, started_at FROM backstop.datastore_import", &[])
            .await
            .map_err(q(db, "reading the earlier import"))?
            .map(|r| (r.get(0), r.get(1)));
        match at {
            Some((Some(at), _)) => {
                return Ok(format!(
                    "{} already holds an import made at {}: nothing to do (roll back first to import again)",
                    db.describe(),
                    at.to_rfc3339()
                ))
            }
            Some((None, started)) => {
                return Err(DatastoreError::Refused(format!(
                    "an import into {} started at {} did not finish (backstop was stopped); run `backstop datastore rollback` first, which drops whatever it created",
                    db.describe(),
                    started.map(|t| t.to_rfc3339()).unwrap_or_default()
                )))
            }
            None => {}
        }
    }
    let before = inventory(db, &client).await?;
    let tables: Vec<&String> = before.relations.iter().filter(|r| r.starts_with("TABLE ")).collect();
    if !tables.is_empty() && !allow_non_empty {
        return Err(DatastoreError::Refused(format!(
            "{} is not empty ({} table(s), e.g. {}); import into an empty database, or pass --allow-non-empty",
            db.describe(),
            tables.len(),
            tables[0].trim_start_matches("TABLE ")
        )));
    }
    // Intent first: a killed import still tells rollback what the target held.
    let before_json =
        serde_json::to_string(&before).map_err(|e| DatastoreError::Refused(format!("encoding the inventory: {e}")))?;
    client
        .batch_execute(IMPORT_DDL)
        .await
        .map_err(q(db, "creating the import record"))?;
    client
        .execute(
            "INSERT INTO backstop.datastore_import (started_at, file, schemas, relations, types, functions, before) VALUES (now(), $1, '{}', '{}', '{}', '{}', $2)",
            &[&file.display().to_string(), &before_json],
        )
        .await
        .map_err(q(db, "recording the import's intent"))?;
    // The target already has the `backstop` schema (the record above): restore
    // everything but the dump's CREATE SCHEMA of it.
    let list = restore_list(bindir, file).await?;
    let mut cmd = pgbin::command(bindir, "pg_restore", None);
    cmd.envs(db.libpq_env())
        .args(["--no-owner", "--exit-on-error", "--no-password", "-d", db.dbname()])
        .arg(format!("--jobs={}", jobs.max(1)))
        .arg("-L")
        .arg(list.path());
    if no_privileges {
        cmd.arg("--no-privileges");
    }
    cmd.arg(file);
    if let Err(source) = pgbin::run(cmd, "pg_restore").await {
        // Parallel workers commit as they go: drop whatever exists now that
        // did not before, then the intent. If that fails too, the intent
        // stays and `rollback` finishes the job.
        let undo = match drop_created(db, &client, &before).await {
            Ok(n) => format!("dropped the {n} object(s) it had created"),
            Err(e) => format!(
                "dropping what it created failed too ({}); run `backstop datastore rollback`",
                crate::run::chain(&e)
            ),
        };
        return Err(DatastoreError::Tool {
            step: format!("pg_restore into {} ({undo})", db.describe()),
            source,
        });
    }
    let after = inventory(db, &client).await?;
    let created = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> { a.difference(b).cloned().collect() };
    let schemas = created(&after.schemas, &before.schemas);
    let relations = created(&after.relations, &before.relations);
    let types = created(&after.types, &before.types);
    let functions = created(&after.functions, &before.functions);
    client
        .execute(
            "UPDATE backstop.datastore_import SET imported_at = now(), schemas = $1, relations = $2, types = $3, functions = $4",
            &[&schemas, &relations, &types, &functions],
        )
        .await
        .map_err(q(db, "recording the import"))?;
    lock(db, "target", by, "imported; unlock after verify", &[]).await?;
    Ok(format!(
        "imported {} into {}: {} schema(s), {} relation(s), {} type(s), {} function(s); the target stays locked until `backstop datastore unlock`",
        file.display(),
        db.describe(),
        schemas.len(),
        relations.len(),
        types.len(),
        functions.len()
    ))
}

/// The dump's table of contents without the entries backstop keeps on the
/// target itself (the `backstop` schema, the owner claim, the lock record).
async fn restore_list(bindir: &Path, file: &Path) -> Result<tempfile::NamedTempFile> {
    let mut cmd = pgbin::command(bindir, "pg_restore", None);
    cmd.arg("-l").arg(file);
    let toc = pgbin::run(cmd, "pg_restore")
        .await
        .map_err(|source| DatastoreError::Tool {
            step: format!("reading the table of contents of {}", file.display()),
            source,
        })?;
    let kept: Vec<&str> = toc
        .lines()
        .filter(|l| {
            !(l.contains(" SCHEMA - backstop ")
                || l.contains(" backstop run_owner ")
                || l.contains(" backstop datastore_lock "))
        })
        .collect();
    let io = |e: std::io::Error| DatastoreError::Refused(format!("writing the restore list: {e}"));
    let mut list = tempfile::NamedTempFile::new().map_err(io)?;
    std::io::Write::write_all(&mut list, kept.join("\n").as_bytes()).map_err(io)?;
    Ok(list)
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
    if recorded {
        t.batch_execute(IMPORT_DDL)
            .await
            .map_err(q(target, "updating the import record table"))?;
        if let Some(r) = t
            .query_opt(
                "SELECT schemas, relations, types, functions, imported_at IS NULL, before FROM backstop.datastore_import",
                &[],
            )
            .await
            .map_err(q(target, "reading the import record"))?
        {
            let interrupted: bool = r.get(4);
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
    let unlocked = unlock(source).await?;
    let target_lock = unlock(target).await?;
    Ok(format!(
        "rolled back: dropped {dropped} object(s) the import created in {}; {unlocked}; {target_lock}",
        target.describe()
    ))
}

/// Drops what exists in the target now and is not in `before`, and the
/// import record, in one transaction. Returns how many objects.
async fn drop_created(db: &Database, client: &Client, before: &Inventory) -> Result<usize> {
    let now = inventory(db, client).await?;
    let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> BTreeSet<String> { a.difference(b).cloned().collect() };
    let created = Inventory {
        schemas: new(&now.schemas, &before.schemas),
        relations: new(&now.relations, &before.relations),
        types: new(&now.types, &before.types),
        functions: new(&now.functions, &before.functions),
    };
    drop_objects(db, client, &created).await
}

/// Drops `objects` (an import's) and the import record, in one transaction.
async fn drop_objects(db: &Database, client: &Client, objects: &Inventory) -> Result<usize> {
    let mut sql = String::from("BEGIN;\nSET TRANSACTION READ WRITE;\n");
    for s in &objects.schemas {
        sql.push_str(&format!("DROP SCHEMA IF EXISTS {s} CASCADE;\n"));
    }
    for r in &objects.relations {
        sql.push_str(&format!("DROP {} IF EXISTS {} CASCADE;\n", kind_of(r), name_of(r)));
    }
    for ty in &objects.types {
        sql.push_str(&format!("DROP TYPE IF EXISTS {ty} CASCADE;\n"));
    }
    for f in &objects.functions {
        sql.push_str(&format!("DROP ROUTINE IF EXISTS {f} CASCADE;\n"));
    }
    sql.push_str("DELETE FROM backstop.datastore_import;\nCOMMIT;");
    client
        .batch_execute(&sql)
        .await
        .map_err(q(db, "dropping what the import created"))?;
    Ok(objects.schemas.len() + objects.relations.len() + objects.types.len() + objects.functions.len())
}

fn kind_of(entry: &str) -> &str {
    ["MATERIALIZED VIEW", "FOREIGN TABLE", "SEQUENCE", "VIEW", "TABLE"]
        .into_iter()
        .find(|k| entry.starts_with(&format!("{k} ")))
        .unwrap_or("TABLE")
}

fn name_of(entry: &str) -> &str {
    entry.strip_prefix(kind_of(entry)).map(str::trim_start).unwrap_or(entry)
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
