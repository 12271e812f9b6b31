//! The import side of a move: what the target holds before, restoring the
//! dump all or nothing, and dropping exactly what an import created.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;
use tokio_postgres::Client;

use super::{lock, q, DatastoreError, Result, IMPORT_DDL, USER_SCHEMAS};
use crate::db::Database;
use crate::pgbin;

/// backstop's own state on the target, which the restore never writes: the
/// rest of the `backstop` schema (the source's `migration_history`) is the
/// import's like any table, and rollback drops it, so that a later `backstop
/// run` against the target does not take the source's history for its own.
const BACKSTOP_STATE: &str = "('datastore_lock', 'datastore_import', 'run_owner')";

/// Objects of the user schemas, for telling what an import created.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(super) struct Inventory {
    pub(super) schemas: BTreeSet<String>,
    /// `kind qualified-name`, kind one of table, view, matview, sequence, foreign-table.
    pub(super) relations: BTreeSet<String>,
    pub(super) types: BTreeSet<String>,
    pub(super) functions: BTreeSet<String>,
}

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
          WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND NOT c.relispartition
            AND ({USER_SCHEMAS} OR (n.nspname = 'backstop' AND c.relname NOT IN {BACKSTOP_STATE}))
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
    // The dump's table of contents: what is restored, and the dump's
    // identity (it names the source and when it was dumped).
    let (list, toc_sha256) = restore_list(bindir, file).await?;
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
        let at: Option<(Times, String, Option<String>)> = client
            .query_opt(
                "SELECT imported_at, started_at, file, toc_sha256 FROM backstop.datastore_import",
                &[],
            )
            .await
            .map_err(q(db, "reading the earlier import"))?
            .map(|r| ((r.get(0), r.get(1)), r.get(2), r.get(3)));
        match at {
            Some(((Some(at), _), earlier, sha)) if sha.as_deref() == Some(toc_sha256.as_str()) => {
                return Ok(format!(
                    "{} already holds this import ({earlier}, made at {}): nothing to do (roll back first to import again)",
                    db.describe(),
                    at.to_rfc3339()
                ))
            }
            Some(((Some(at), _), earlier, _)) => {
                return Err(DatastoreError::Refused(format!(
                    "{} already holds an import of another dump ({earlier}, made at {}); {} is a different dump. \
                     Roll back the first import (`backstop datastore rollback`) before importing another. Nothing was changed",
                    db.describe(),
                    at.to_rfc3339(),
                    file.display()
                )))
            }
            Some(((None, started), _, _)) => {
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
    if !no_privileges {
        missing_roles(db, &client, bindir, file, &list.1).await?;
    }
    let list = list.0;
    let created_backstop_schema: bool = client
        .query_one("SELECT to_regnamespace('backstop') IS NULL", &[])
        .await
        .map_err(q(db, "looking for the backstop schema"))?
        .get(0);
    // Intent first: a killed import still tells rollback what the target held.
    let before_json =
        serde_json::to_string(&before).map_err(|e| DatastoreError::Refused(format!("encoding the inventory: {e}")))?;
    client
        .batch_execute(IMPORT_DDL)
        .await
        .map_err(q(db, "creating the import record"))?;
    client
        .execute(
            "INSERT INTO backstop.datastore_import (started_at, file, schemas, relations, types, functions, before, created_backstop_schema, toc_sha256)
             VALUES (now(), $1, '{}', '{}', '{}', '{}', $2, $3, $4)",
            &[&file.display().to_string(), &before_json, &created_backstop_schema, &toc_sha256],
        )
        .await
        .map_err(q(db, "recording the import's intent"))?;
    // The target already has the `backstop` schema (the record above): restore
    // everything but the dump's CREATE SCHEMA of it.
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
    let progress = crate::progress::Progress::spinner(&format!("import: pg_restore into {}", db.dbname()));
    let restored = pgbin::run(cmd, "pg_restore").await;
    drop(progress);
    if let Err(source) = restored {
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
/// target itself (the `backstop` schema, the owner claim, the lock record),
/// as a list file and as lines, and the sha256 of the whole table of
/// contents (which names the source and the time of the dump).
async fn restore_list(bindir: &Path, file: &Path) -> Result<((tempfile::NamedTempFile, Vec<String>), String)> {
    let toc = pg_restore(bindir, &["-l"], &[file], || {
        format!("reading the table of contents of {}", file.display())
    })
    .await?;
    let kept: Vec<&str> = toc
        .lines()
        .filter(|l| {
            !(l.contains(" SCHEMA - backstop ")
                || l.contains(" backstop run_owner ")
                || l.contains(" backstop datastore_lock "))
        })
        .collect();
    let list = list_file(&kept, "the restore list")?;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(toc.as_bytes()));
    Ok(((list, kept.iter().map(|l| l.to_string()).collect()), sha))
}

/// `pg_restore ARGS PATHS`, its standard output, or the failure of `step`.
async fn pg_restore(bindir: &Path, args: &[&str], paths: &[&Path], step: impl Fn() -> String) -> Result<String> {
    let mut cmd = pgbin::command(bindir, "pg_restore", None);
    cmd.args(args).args(paths);
    pgbin::run(cmd, "pg_restore")
        .await
        .map_err(|source| DatastoreError::Tool { step: step(), source })
}

/// A pg_restore list file (`-L`) of `lines`.
fn list_file(lines: &[&str], what: &str) -> Result<tempfile::NamedTempFile> {
    let io = |e: std::io::Error| DatastoreError::Refused(format!("writing {what}: {e}"));
    let mut list = tempfile::NamedTempFile::new().map_err(io)?;
    std::io::Write::write_all(&mut list, lines.join("\n").as_bytes()).map_err(io)?;
    Ok(list)
}

/// Refuses an import whose GRANTs name roles the target does not have:
/// `pg_restore --exit-on-error` would stop at the first of them, part-way.
/// Reads the dump's ACL entries as SQL and checks every grantee first, so
/// that nothing is changed.
async fn missing_roles(db: &Database, client: &Client, bindir: &Path, file: &Path, toc: &[String]) -> Result<()> {
    let acl: Vec<&str> = toc
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with(';') && (l.contains(" ACL ") || l.contains(" DEFAULT ACL ")))
        .collect();
    if acl.is_empty() {
        return Ok(());
    }
    let list = list_file(&acl, "the ACL list")?;
    let sql = pg_restore(bindir, &["-f", "-", "-L"], &[list.path(), file], || {
        format!("reading the GRANTs of {}", file.display())
    })
    .await?;
    let wanted: Vec<String> = grantees(&sql).into_iter().collect();
    let existing: Vec<String> = client
        .query("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)", &[&wanted])
        .await
        .map_err(q(db, "checking the roles the dump grants to"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|r| !existing.contains(r)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Quoted only where SQL needs it, so the hint reads as a person writes it.
    let plain = |r: &str| {
        r.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && r.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let names: Vec<String> = missing
        .iter()
        .map(|r| if plain(r) { r.to_string() } else { crate::db::ident(r) })
        .collect();
    Err(DatastoreError::Refused(format!(
        "the dump grants privileges to role(s) {} that {} does not have; nothing was changed. \
         Create them first (e.g. `CREATE ROLE {} NOLOGIN;`), or import with --no-privileges and grant by hand",
        names.join(", "),
        db.describe(),
        names[0]
    )))
}

/// The roles `GRANT ... TO` and `REVOKE ... FROM` statements name (not PUBLIC),
/// and the owners `ALTER DEFAULT PRIVILEGES FOR ROLE` names.
fn grantees(sql: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in sql.lines().map(str::trim) {
        let line = line.replace(" WITH GRANT OPTION", "");
        let mut lists: Vec<String> = Vec::new();
        // ALTER DEFAULT PRIVILEGES FOR ROLE owner [IN SCHEMA s] GRANT ... TO r
        let mut stmt = line.clone();
        if line.starts_with("ALTER DEFAULT PRIVILEGES") {
            let (head, grant) = match (line.split_once(" GRANT "), line.split_once(" REVOKE ")) {
                (Some((h, g)), _) => (h, format!("GRANT {g}")),
                (None, Some((h, r))) => (h, format!("REVOKE {r}")),
                (None, None) => continue,
            };
            if let Some((_, owners)) = head.split_once(" FOR ROLE ") {
                lists.push(owners.split(" IN SCHEMA ").next().unwrap_or(owners).to_string());
            }
            stmt = grant;
        }
        if stmt.starts_with("GRANT ") {
            if let Some((_, to)) = stmt.rsplit_once(" TO ") {
                lists.push(to.to_string());
            }
        } else if stmt.starts_with("REVOKE ") {
            if let Some((_, from)) = stmt.rsplit_once(" FROM ") {
                lists.push(from.to_string());
            }
        }
        for list in &lists {
            let list = list.trim_end_matches(';');
            let list = list.split(" GRANTED BY ").next().unwrap_or(list);
            for role in list.split(',') {
                let role = role.trim().trim_start_matches("GROUP ").trim();
                let role = match role.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                    Some(quoted) => quoted.replace("\"\"", "\""),
                    None => role.to_string(),
                };
                if !role.is_empty() && !role.eq_ignore_ascii_case("PUBLIC") {
                    out.insert(role);
                }
            }
        }
    }
    out
}

/// Drops what exists in the target now and is not in `before`, and the
/// import record, in one transaction. Returns how many objects.
pub(super) async fn drop_created(db: &Database, client: &Client, before: &Inventory) -> Result<usize> {
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
pub(super) async fn drop_objects(db: &Database, client: &Client, objects: &Inventory) -> Result<usize> {
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

#[cfg(test)]
mod tests {
    use super::grantees;

    #[test]
    fn grantees_are_read_from_grant_revoke_and_default_privileges() {
        let sql = "REVOKE ALL ON TABLE public.orders FROM PUBLIC;\n\
                   GRANT SELECT ON TABLE public.orders TO app_reader;\n\
                   GRANT ALL ON TABLE public.orders TO \"Odd \"\"Name\", writer WITH GRANT OPTION;\n\
                   ALTER DEFAULT PRIVILEGES FOR ROLE owner_role IN SCHEMA public GRANT SELECT ON TABLES TO reporting;\n\
                   REVOKE SELECT ON TABLE public.orders FROM old_role;\n";
        let got: Vec<String> = grantees(sql).into_iter().collect();
        assert_eq!(
            got,
            vec![
                "Odd \"Name",
                "app_reader",
                "old_role",
                "owner_role",
                "reporting",
                "writer"
            ]
        );
    }
}
