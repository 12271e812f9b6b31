//! SQL safety analysis: every statement of a migration, parsed with the real
//! PostgreSQL grammar, is classified into findings with a stable rule id, a
//! severity, where it is, why it is dangerous and how to do it safely.
//!
//! Families: destructive (`BS1xx`), backward-incompatible for the running app
//! version (`BS2xx`; destructive drops and renames are incompatible too), locks
//! and rewrites (`BS3xx`), transaction handling (`BS4xx`) and opaque code that
//! needs review (`BS5xx`). Rules know the target PostgreSQL version where
//! behaviour changed.

use std::collections::BTreeSet;

use pg_query::protobuf::{AlterTableType, ConstrType, ObjectType};
use pg_query::{Node, NodeEnum};
use serde::{Deserialize, Serialize};

use crate::sql::Statement;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// Rule families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Destructive,
    Incompatible,
    Locking,
    Transaction,
    Opaque,
}

/// A rule of the analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub id: &'static str,
    pub name: &'static str,
    pub family: Family,
    pub severity: Severity,
    /// Breaks the app version that is running (drops, renames, ...).
    pub incompatible: bool,
    pub why: &'static str,
    pub fix: &'static str,
}

macro_rules! rules {
    ($($konst:ident = $id:literal $name:literal $family:ident $sev:ident $incompat:literal, $why:literal, $fix:literal;)*) => {
        $(pub const $konst: Rule = Rule {
            id: $id, name: $name, family: Family::$family, severity: Severity::$sev,
            incompatible: $incompat, why: $why, fix: $fix,
        };)*
        /// Every rule, in id order.
        pub const RULES: &[Rule] = &[$($konst),*];
    };
}

rules! {
    DROP_TABLE = "BS101" "drop-table" Destructive Error true,
        "drops the table and all its rows; the running app still reads it",
        "stop using the table in a released app version, then drop it in a contract migration with an approval";
    DROP_COLUMN = "BS102" "drop-column" Destructive Error true,
        "drops the column and its data; the running app still reads or writes it",
        "stop using the column in a released app version, then drop it in a contract migration with an approval";
    DROP_SCHEMA = "BS103" "drop-schema" Destructive Error true,
        "drops the schema and everything in it",
        "drop the objects one by one in a contract migration with an approval";
    DROP_INDEX = "BS104" "drop-index" Destructive Warning false,
        "queries that use the index get slow at once",
        "make sure no query plan needs the index; use DROP INDEX CONCURRENTLY";
    DROP_VIEW = "BS105" "drop-view" Destructive Error true,
        "the running app may still query the view",
        "drop it in a contract migration after the app stopped using it";
    DROP_TYPE = "BS106" "drop-type" Destructive Error true,
        "columns or functions using the type break",
        "drop it in a contract migration after nothing uses it";
    DROP_SEQUENCE = "BS107" "drop-sequence" Destructive Error true,
        "defaults using the sequence fail",
        "drop it in a contract migration after nothing uses it";
    TRUNCATE = "BS108" "truncate" Destructive Error false,
        "deletes every row (CASCADE also empties referencing tables)",
        "delete in batches with a WHERE clause, or truncate in a contract migration with an approval";
    DELETE_ALL = "BS109" "delete-without-where" Destructive Error false,
        "DELETE without WHERE removes every row",
        "add a WHERE clause that names the rows to remove";
    UPDATE_ALL = "BS110" "update-without-where" Destructive Warning false,
        "UPDATE without WHERE rewrites every row and overwrites their values",
        "add a WHERE clause (e.g. WHERE col IS NULL for a backfill) and batch large tables";
    ALTER_COLUMN_TYPE = "BS111" "alter-column-type" Destructive Error true,
        "changes a column's type in place: values may be converted or lost and the running app sees a new type",
        "add a new column, backfill it, switch the app, then drop the old one (expand/contract)";
    RENAME = "BS112" "rename" Destructive Error true,
        "the running app still uses the old name",
        "add the new object (or a view/column under the new name), switch the app, then drop the old one";
    DROP_DATABASE = "BS113" "drop-database" Destructive Error true,
        "drops a whole database",
        "never from a migration; do it by hand with a fresh backup";
    SET_NOT_NULL = "BS201" "set-not-null" Incompatible Error true,
        "the running app may still write NULLs; the check also scans the table under an exclusive lock",
        "add CHECK (col IS NOT NULL) NOT VALID, VALIDATE it, then SET NOT NULL (PostgreSQL 12+ uses the valid check)";
    ADD_REQUIRED_COLUMN = "BS202" "add-required-column" Incompatible Error true,
        "a NOT NULL column without a default makes the running app's INSERTs fail (and fails on a non-empty table)",
        "add the column nullable or with a DEFAULT, backfill, then set NOT NULL in a later migration";
    ENUM_VALUE_RENAME = "BS203" "enum-value-rename" Incompatible Error true,
        "the running app still writes the old value",
        "add the new value, migrate rows and the app, and stop writing the old value";
    CREATE_INDEX_LOCK = "BS301" "create-index-not-concurrently" Locking Error false,
        "CREATE INDEX blocks writes to the table while it builds",
        "use CREATE INDEX CONCURRENTLY (it runs outside a transaction)";
    DROP_INDEX_LOCK = "BS302" "drop-index-not-concurrently" Locking Warning false,
        "DROP INDEX takes an ACCESS EXCLUSIVE lock on the table",
        "use DROP INDEX CONCURRENTLY";
    REINDEX_LOCK = "BS303" "reindex-not-concurrently" Locking Error false,
        "REINDEX blocks writes (and reads that use the index) while it runs",
        "use REINDEX ... CONCURRENTLY (PostgreSQL 12+)";
    FK_VALIDATE = "BS304" "add-foreign-key-validating" Locking Error false,
        "adding a validated foreign key scans the table while blocking writes on both tables",
        "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a separate migration";
    CHECK_VALIDATE = "BS305" "add-check-validating" Locking Error false,
        "adding a validated CHECK scans the table under an ACCESS EXCLUSIVE lock",
        "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a separate migration";
    UNIQUE_INDEXLESS = "BS306" "add-unique-without-index" Locking Error false,
        "adding a UNIQUE constraint builds its index under an ACCESS EXCLUSIVE lock",
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX";
    PRIMARY_INDEXLESS = "BS307" "add-primary-key-without-index" Locking Error false,
        "adding a PRIMARY KEY builds its index under an ACCESS EXCLUSIVE lock",
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... PRIMARY KEY USING INDEX";
    VOLATILE_DEFAULT = "BS308" "volatile-default" Locking Error false,
        "a volatile DEFAULT (random(), clock_timestamp(), gen_random_uuid(), nextval()) rewrites the whole table",
        "add the column without a default, set the default, and backfill in batches";
    DEFAULT_REWRITE = "BS309" "add-column-default-rewrite" Locking Error false,
        "before PostgreSQL 11, ADD COLUMN with any DEFAULT rewrites the whole table",
        "add the column without a default, set the default, and backfill in batches";
    TYPE_REWRITE = "BS310" "alter-type-rewrite" Locking Error false,
        "ALTER COLUMN TYPE usually rewrites the table and its indexes under an ACCESS EXCLUSIVE lock",
        "add a new column and backfill it in batches";
    VACUUM_FULL = "BS311" "vacuum-full" Locking Error false,
        "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock",
        "use plain VACUUM, or pg_repack outside the migration";
    CLUSTER = "BS312" "cluster" Locking Error false,
        "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock",
        "use pg_repack outside the migration";
    LOCK_TIMEOUT = "BS313" "lock-without-timeout" Locking Warning false,
        "the statement waits for an exclusive lock with no lock_timeout and queues every query behind it",
        "SET lock_timeout = '5s' at the start of the migration (and retry on timeout)";
    NON_TRANSACTIONAL = "BS401" "non-transactional" Transaction Warning false,
        "cannot run in a transaction: the migration runs statement by statement and a failure restores the checkpoint",
        "keep non-transactional statements in a migration of their own";
    TRANSACTION_CONTROL = "BS402" "transaction-control" Transaction Error false,
        "BEGIN/COMMIT/ROLLBACK inside a migration break backstop's transaction handling",
        "remove them: backstop runs the statements in one transaction when it can";
    DO_BLOCK = "BS501" "do-block" Opaque Warning false,
        "a DO block is code the analysis cannot see into",
        "review it by hand, or write the statements out";
    FUNCTION_BODY = "BS502" "function-body" Opaque Warning false,
        "a function or procedure body is code the analysis cannot see into",
        "review the body by hand";
}

/// Looks a rule up by id or name.
pub fn rule(key: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.id == key || r.name == key)
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub rule: String,
    pub name: String,
    pub severity: Severity,
    pub family: Family,
    pub incompatible: bool,
    /// `file` or `file#data-key`.
    pub origin: String,
    pub line: usize,
    pub column: usize,
    /// The statement, shortened.
    pub excerpt: String,
    pub why: String,
    pub fix: String,
}

impl Finding {
    fn new(rule: &Rule, s: &Statement) -> Self {
        let mut excerpt: String = s.normalized.chars().take(120).collect();
        if s.normalized.chars().count() > 120 {
            excerpt.push('…');
        }
        Self {
            rule: rule.id.into(),
            name: rule.name.into(),
            severity: rule.severity,
            family: rule.family,
            incompatible: rule.incompatible,
            origin: s.origin.clone(),
            line: s.line,
            column: s.column,
            excerpt,
            why: rule.why.into(),
            fix: rule.fix.into(),
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {sev} {} ({}): {}\n    {}\n    fix: {}",
            self.origin, self.line, self.column, self.rule, self.name, self.why, self.excerpt, self.fix
        )
    }
}

/// Options of the analysis.
#[derive(Debug, Clone, Copy)]
pub struct LintOptions {
    /// Target PostgreSQL major version.
    pub pg_version: u32,
}

impl Default for LintOptions {
    fn default() -> Self {
        Self { pg_version: 15 }
    }
}

/// Functions whose result changes per row: as a column default they force a rewrite.
const VOLATILE: &[&str] = &[
    "random",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "nextval",
    "txid_current",
];

/// Analyses the statements of one migration, in order. Tables created earlier
/// in the same migration are new and empty: lock and rewrite rules skip them.
pub fn lint(statements: &[Statement], opts: LintOptions) -> Vec<Finding> {
    let mut linter = Linter::new(opts);
    for s in statements {
        let Ok(parsed) = pg_query::parse(&s.sql, 0) else {
            continue;
        };
        if let Some(node) = parsed
            .protobuf
            .stmts
            .first()
            .and_then(|r| r.stmt.as_ref())
            .and_then(|n| n.node.as_ref())
        {
            linter.statement(s, node);
        }
    }
    linter.findings
}

/// The rules over one migration's statements as they come, each with the
/// tree the split already parsed ([`crate::sql::split_each`]).
pub struct Linter {
    opts: LintOptions,
    created: BTreeSet<String>,
    lock_timeout_set: bool,
    /// The migration already has its (one) lock-timeout finding.
    lock_timeout_reported: bool,
    pub statements: usize,
    pub findings: Vec<Finding>,
}

impl Linter {
    pub fn new(opts: LintOptions) -> Self {
        Linter {
            opts,
            created: BTreeSet::new(),
            lock_timeout_set: false,
            lock_timeout_reported: false,
            statements: 0,
            findings: Vec::new(),
        }
    }

    /// Checks the next statement of the migration.
    pub fn statement(&mut self, s: &Statement, node: &NodeEnum) {
        self.statements += 1;
        let mut found: Vec<&Rule> = Vec::new();
        classify(node, self.opts, &self.created, &mut found);
        if !s.transactional {
            found.push(&NON_TRANSACTIONAL);
        }
        let takes_exclusive_lock = takes_exclusive_lock(node, &self.created);
        match node {
            NodeEnum::VariableSetStmt(v) if v.name == "lock_timeout" => self.lock_timeout_set = true,
            NodeEnum::CreateStmt(c) => {
                if let Some(r) = &c.relation {
                    self.created.insert(r.relname.clone());
                }
            }
            _ => {}
        }
        // Once per migration: one SET at its start is the fix for all of them.
        if takes_exclusive_lock && !self.lock_timeout_set && !self.lock_timeout_reported {
            self.lock_timeout_reported = true;
            found.push(&LOCK_TIMEOUT);
        }
        for r in found {
            self.findings.push(Finding::new(r, s));
        }
    }
}

fn relname(r: &Option<pg_query::protobuf::RangeVar>) -> String {
    r.as_ref().map(|r| r.relname.clone()).unwrap_or_default()
}

fn is(v: i32, e: impl Into<i32>) -> bool {
    v == e.into()
}

fn classify(node: &NodeEnum, opts: LintOptions, created: &BTreeSet<String>, out: &mut Vec<&'static Rule>) {
    match node {
        NodeEnum::DropStmt(d) => {
            let t = d.remove_type;
            if is(t, ObjectType::ObjectTable) || is(t, ObjectType::ObjectForeignTable) {
                out.push(&DROP_TABLE);
            } else if is(t, ObjectType::ObjectSchema) {
                out.push(&DROP_SCHEMA);
            } else if is(t, ObjectType::ObjectIndex) {
                out.push(&DROP_INDEX);
                if !d.concurrent {
                    out.push(&DROP_INDEX_LOCK);
                }
            } else if is(t, ObjectType::ObjectView) || is(t, ObjectType::ObjectMatview) {
                out.push(&DROP_VIEW);
            } else if is(t, ObjectType::ObjectType) || is(t, ObjectType::ObjectDomain) {
                out.push(&DROP_TYPE);
            } else if is(t, ObjectType::ObjectSequence) {
                out.push(&DROP_SEQUENCE);
            }
        }
        NodeEnum::DropdbStmt(_) => out.push(&DROP_DATABASE),
        NodeEnum::TruncateStmt(_) => out.push(&TRUNCATE),
        NodeEnum::DeleteStmt(d) if d.where_clause.is_none() => out.push(&DELETE_ALL),
        NodeEnum::UpdateStmt(u) if u.where_clause.is_none() => out.push(&UPDATE_ALL),
        NodeEnum::RenameStmt(_) => out.push(&RENAME),
        NodeEnum::AlterEnumStmt(e) if !e.old_val.is_empty() => out.push(&ENUM_VALUE_RENAME),
        NodeEnum::IndexStmt(i) if !i.concurrent && !created.contains(&relname(&i.relation)) => {
            out.push(&CREATE_INDEX_LOCK)
        }
        NodeEnum::ReindexStmt(r) if !crate::sql::option_on(&r.params, "concurrently") => out.push(&REINDEX_LOCK),
        NodeEnum::VacuumStmt(v) if v.is_vacuumcmd && crate::sql::option_on(&v.options, "full") => {
            out.push(&VACUUM_FULL)
        }
        NodeEnum::ClusterStmt(_) => out.push(&CLUSTER),
        NodeEnum::TransactionStmt(_) => out.push(&TRANSACTION_CONTROL),
        NodeEnum::DoStmt(_) => out.push(&DO_BLOCK),
        NodeEnum::CreateFunctionStmt(_) => out.push(&FUNCTION_BODY),
        NodeEnum::AlterTableStmt(a) => {
            let is_new = created.contains(&relname(&a.relation));
            for cmd in &a.cmds {
                if let Some(NodeEnum::AlterTableCmd(c)) = &cmd.node {
                    alter_table_cmd(c, opts, is_new, out);
                }
            }
        }
        _ => {}
    }
}

fn alter_table_cmd(
    c: &pg_query::protobuf::AlterTableCmd,
    opts: LintOptions,
    is_new: bool,
    out: &mut Vec<&'static Rule>,
) {
    let def = c.def.as_deref().and_then(|d| d.node.as_ref());
    let t = c.subtype;
    if is(t, AlterTableType::AtDropColumn) {
        out.push(&DROP_COLUMN);
    } else if is(t, AlterTableType::AtAlterColumnType) {
        out.push(&ALTER_COLUMN_TYPE);
        if !is_new {
            out.push(&TYPE_REWRITE);
        }
    } else if is(t, AlterTableType::AtSetNotNull) {
        out.push(&SET_NOT_NULL);
    } else if is(t, AlterTableType::AtAddColumn) {
        if let Some(NodeEnum::ColumnDef(col)) = def {
            let constraints: Vec<&pg_query::protobuf::Constraint> = col
                .constraints
                .iter()
                .filter_map(|n| match &n.node {
                    Some(NodeEnum::Constraint(c)) => Some(c.as_ref()),
                    _ => None,
                })
                .collect();
            let default = constraints.iter().find(|c| is(c.contype, ConstrType::ConstrDefault));
            let not_null = col.is_not_null || constraints.iter().any(|c| is(c.contype, ConstrType::ConstrNotnull));
            if not_null && default.is_none() && !is_new {
                out.push(&ADD_REQUIRED_COLUMN);
            }
            if let Some(d) = default {
                if !is_new {
                    if opts.pg_version < 11 {
                        out.push(&DEFAULT_REWRITE);
                    } else if d.raw_expr.as_deref().is_some_and(calls_volatile) {
                        out.push(&VOLATILE_DEFAULT);
                    }
                }
            }
            for c in &constraints {
                constraint(c, is_new, out);
            }
        }
    } else if is(t, AlterTableType::AtAddConstraint) {
        if let Some(NodeEnum::Constraint(c)) = def {
            constraint(c, is_new, out);
        }
    }
}

fn constraint(c: &pg_query::protobuf::Constraint, is_new: bool, out: &mut Vec<&'static Rule>) {
    if is_new {
        return;
    }
    let t = c.contype;
    if is(t, ConstrType::ConstrForeign) && !c.skip_validation {
        out.push(&FK_VALIDATE);
    } else if is(t, ConstrType::ConstrCheck) && !c.skip_validation {
        out.push(&CHECK_VALIDATE);
    } else if is(t, ConstrType::ConstrUnique) && c.indexname.is_empty() {
        out.push(&UNIQUE_INDEXLESS);
    } else if is(t, ConstrType::ConstrPrimary) && c.indexname.is_empty() {
        out.push(&PRIMARY_INDEXLESS);
    }
}

/// Whether an expression calls a volatile function anywhere.
fn calls_volatile(node: &Node) -> bool {
    let debug = format!("{node:?}");
    VOLATILE.iter().any(|f| debug.contains(&format!("sval: \"{f}\"")))
}

/// Statements that wait for an ACCESS EXCLUSIVE (or similar) lock on an existing table.
fn takes_exclusive_lock(node: &NodeEnum, created: &BTreeSet<String>) -> bool {
    match node {
        NodeEnum::AlterTableStmt(a) => !created.contains(&relname(&a.relation)),
        NodeEnum::DropStmt(d) => !d.concurrent,
        NodeEnum::RenameStmt(_) | NodeEnum::TruncateStmt(_) | NodeEnum::ClusterStmt(_) | NodeEnum::LockStmt(_) => true,
        NodeEnum::IndexStmt(i) => !i.concurrent && !created.contains(&relname(&i.relation)),
        NodeEnum::ReindexStmt(r) => !crate::sql::option_on(&r.params, "concurrently"),
        NodeEnum::VacuumStmt(v) => v.is_vacuumcmd && crate::sql::option_on(&v.options, "full"),
        _ => false,
    }
}

/// Whether any finding is destructive or breaks the running app version.
pub fn has_destructive_or_incompatible(findings: &[Finding]) -> bool {
    findings
        .iter()
        .any(|f| f.family == Family::Destructive || f.incompatible)
}

/// Findings at error level.
pub fn errors(findings: &[Finding]) -> usize {
    findings.iter().filter(|f| f.severity == Severity::Error).count()
}

mod files;
pub use files::{lint_files, FileFindings, LintInputError, NOT_SQL};

/// Findings for people, grouped by file, with the fix.
pub fn render_text(files: &[FileFindings]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let (mut errors, mut warnings) = (0, 0);
    for f in files {
        if let Some(e) = &f.unreadable {
            let _ = writeln!(s, "{}: not linted: {e}", f.file);
            continue;
        }
        let _ = writeln!(s, "{} ({} statements)", f.file, f.statements);
        if f.findings.is_empty() {
            let _ = writeln!(s, "  no findings");
        }
        for x in &f.findings {
            let sev = match x.severity {
                Severity::Error => {
                    errors += 1;
                    "error"
                }
                Severity::Warning => {
                    warnings += 1;
                    "warning"
                }
            };
            let _ = writeln!(
                s,
                "  {}:{}:{}: {sev} {} {}: {}",
                x.origin, x.line, x.column, x.rule, x.name, x.why
            );
            let _ = writeln!(s, "      {}", x.excerpt);
            let _ = writeln!(s, "      fix: {}", x.fix);
        }
    }
    let _ = writeln!(s, "{errors} error(s), {warnings} warning(s)");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The findings, or why the first file that could not be linted was not.
    fn lint_paths(paths: &[&std::path::Path]) -> Result<Vec<FileFindings>, String> {
        let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let found = lint_files(&paths, LintOptions::default());
        match found.iter().find_map(|f| f.unreadable.clone()) {
            Some(e) => Err(e),
            None => Ok(found),
        }
    }

    #[test]
    fn special_files_are_refused_by_name_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("m.sql");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = lint_paths(&[&fifo]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a FIFO (named pipe), not a regular file; refusing to read it",
                fifo.display()
            )
        );
        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(lint_paths(&[&link]).unwrap_err().to_string().contains("is a FIFO"));
        let e = lint_paths(&[std::path::Path::new("/dev/null")]).unwrap_err();
        assert!(e.to_string().contains("/dev/null is a character device"), "{e}");
        assert!(lint_paths(&[dir.path()])
            .unwrap_err()
            .to_string()
            .contains("is a directory"));
    }

    #[test]
    fn a_fifo_named_by_a_carrier_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&dir.path().join("a.sql"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let carrier = dir.path().join("m.yaml");
        std::fs::write(
            &carrier,
            "kind: Job\nmetadata:\n  name: j\n  annotations:\n    backstop.dev/migration: m\n    backstop.dev/database: url:DB\n    backstop.dev/sql: a.sql\n",
        )
        .unwrap();
        let e = lint_paths(&[&carrier]).unwrap_err().to_string();
        assert!(e.contains("m.yaml:7: backstop.dev/sql: names \"a.sql\", but "), "{e}");
        assert!(
            e.ends_with("a.sql is a FIFO (named pipe), not a regular file; refusing to read it"),
            "{e}"
        );
    }

    #[test]
    fn byte_order_marks_and_symlinks_to_files_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let sql = dir.path().join("m.sql");
        std::fs::write(&sql, "\u{feff}DROP TABLE orders;\n").unwrap();
        let link = dir.path().join("link.sql");
        std::os::unix::fs::symlink(&sql, &link).unwrap();
        let found = lint_paths(&[&sql, &link]).unwrap();
        for f in &found {
            assert_eq!(f.statements, 1);
            assert_eq!(f.findings[0].rule, "BS101");
            assert_eq!((f.findings[0].line, f.findings[0].column), (1, 1));
        }
    }
}
