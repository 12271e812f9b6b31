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

use pg_query::protobuf::VariableSetKind;
use pg_query::NodeEnum;
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

mod rules;
pub use rules::*;

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
    /// What the live database said that decided this finding's severity
    /// (a table's size, a column's type), when it was consulted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<String>,
    /// The reason of a `-- backstop:ignore` on the statement: the finding
    /// does not count as an error, but stays in the plan, the report and the
    /// plan hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignored: Option<String>,
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
            facts: None,
            ignored: None,
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

/// Analyses the statements of one migration, in order. Tables created earlier
/// in the same migration are new and empty: lock and rewrite rules skip them.
pub fn lint(statements: &[Statement], opts: LintOptions) -> Vec<Finding> {
    analyse(statements, opts, None).findings
}

/// [`lint`] with the live database's catalog facts ([`Catalog`]), and the
/// facts that removed findings.
pub fn analyse(statements: &[Statement], opts: LintOptions, catalog: Option<&Catalog>) -> Analysis {
    run(Linter::new(opts).with_catalog(catalog), statements)
}

/// The static analysis, with unqualified names resolved in `schema` (the
/// database's, when known): what the plan hash covers.
pub fn analyse_in(statements: &[Statement], opts: LintOptions, schema: &str) -> Analysis {
    run(Linter::new(opts).in_schema(schema), statements)
}

fn run(mut linter: Linter<'_>, statements: &[Statement]) -> Analysis {
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
    linter.finish()
}

/// What the analysis of one migration found.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub statements: usize,
    pub findings: Vec<Finding>,
    /// Catalog facts that removed a finding a static linter would report
    /// (a widening type change, a check constraint dropped), for the plan.
    pub facts: Vec<String>,
}

/// A destructive finding on a `DROP` whose objects may yet be recreated.
struct PendingDrop {
    finding: usize,
    objects: Vec<classify::Recreatable>,
}

/// The rules over one migration's statements as they come, each with the
/// tree the split already parsed ([`crate::sql::split_each`]).
pub struct Linter<'c> {
    opts: LintOptions,
    catalog: Option<&'c Catalog>,
    /// Where unqualified names resolve: `default_schema` until the
    /// migration sets `search_path`.
    schema: String,
    default_schema: String,
    created: BTreeSet<String>,
    filled: BTreeSet<String>,
    added_constraints: BTreeSet<String>,
    /// `table/constraint` added NOT VALID by this migration.
    not_valid: BTreeSet<String>,
    /// VALIDATE findings that stand only if the migration is one transaction.
    validations: Vec<usize>,
    drops: Vec<PendingDrop>,
    /// Findings recreated objects made moot (only when the migration runs
    /// as one transaction: statement by statement, the object is gone in
    /// between, and for good if the CREATE fails).
    recreated: BTreeSet<usize>,
    /// Findings made moot whatever the migration's transaction.
    moot: BTreeSet<usize>,
    all_transactional: bool,
    lock_timeout_set: bool,
    /// The migration already has its (one) lock-timeout finding.
    lock_timeout_reported: bool,
    statements: usize,
    findings: Vec<Finding>,
    facts: Vec<String>,
    bad_ignores: Vec<Finding>,
}

impl<'c> Linter<'c> {
    pub fn new(opts: LintOptions) -> Self {
        Linter {
            opts,
            catalog: None,
            schema: "public".into(),
            default_schema: "public".into(),
            created: BTreeSet::new(),
            filled: BTreeSet::new(),
            added_constraints: BTreeSet::new(),
            not_valid: BTreeSet::new(),
            validations: Vec::new(),
            drops: Vec::new(),
            moot: BTreeSet::new(),
            recreated: BTreeSet::new(),
            all_transactional: true,
            lock_timeout_set: false,
            lock_timeout_reported: false,
            statements: 0,
            findings: Vec::new(),
            facts: Vec::new(),
            bad_ignores: Vec::new(),
        }
    }

    /// Judges statements against the live database's facts.
    pub fn with_catalog(mut self, catalog: Option<&'c Catalog>) -> Self {
        if let Some(c) = catalog {
            self = self.in_schema(&c.default_schema);
        }
        self.catalog = catalog;
        self
    }

    /// Resolves unqualified names to `schema` (the database's search_path)
    /// without judging anything else against the catalog.
    pub fn in_schema(mut self, schema: &str) -> Self {
        self.schema = schema.to_string();
        self.default_schema = schema.to_string();
        self
    }

    /// Checks the next statement of the migration.
    pub fn statement(&mut self, s: &Statement, node: &NodeEnum) {
        self.statements += 1;
        for i in &s.ignores {
            let unknown: Vec<&String> = i.rules.iter().filter(|r| rule(r).is_none()).collect();
            if i.rules.is_empty() || !unknown.is_empty() || i.reason.is_empty() {
                let mut f = Finding::new(&BAD_SUPPRESSION, s);
                f.facts = Some(if i.rules.is_empty() {
                    "backstop:ignore names no rule".to_string()
                } else if !unknown.is_empty() {
                    format!("backstop:ignore names unknown rule(s) {unknown:?}")
                } else {
                    format!("backstop:ignore {} gives no reason", i.rules.join(","))
                });
                self.bad_ignores.push(f);
            }
        }
        let ctx = classify::Ctx {
            opts: self.opts,
            catalog: self.catalog,
            schema: &self.schema,
            created: &self.created,
            added_constraints: &self.added_constraints,
            filled: &self.filled,
        };
        let mut hits = Vec::new();
        let mut facts = Vec::new();
        classify::classify(node, &ctx, &mut hits, &mut facts);
        if !s.transactional {
            self.all_transactional = false;
            hits.push(classify::Hit::of(&NON_TRANSACTIONAL));
        }
        let takes_exclusive_lock = classify::takes_exclusive_lock(node, &ctx);
        let dropped = match node {
            NodeEnum::DropStmt(d) => classify::dropped_objects(d, &ctx),
            _ => None,
        };
        let created = classify::created_object(node, &ctx);
        let created_table = classify::created_table(node, &ctx);
        let (adds, validates) = self.constraints_of(node, &ctx);
        self.facts
            .extend(facts.into_iter().map(|f| format!("{}:{}: {f}", s.origin, s.line)));
        for (key, not_valid) in adds {
            if not_valid {
                self.not_valid.insert(key.clone());
            }
            self.added_constraints.insert(key);
        }
        match node {
            // RESET, DEFAULT and a zero timeout all mean: wait forever.
            NodeEnum::VariableSetStmt(v) if v.name == "lock_timeout" => {
                self.lock_timeout_set = v.kind == VariableSetKind::VarSetValue as i32 && !setting_is_zero(&v.args)
            }
            NodeEnum::VariableSetStmt(v) if v.kind == VariableSetKind::VarResetAll as i32 => {
                self.lock_timeout_set = false;
                self.schema = self.default_schema.clone();
            }
            NodeEnum::VariableSetStmt(v) if v.name == "search_path" => {
                // `"$user"` names a schema only where one is named after the
                // role: the first other entry is where names resolve.
                let first = v.args.iter().find_map(|a| match &a.node {
                    Some(NodeEnum::AConst(c)) => match &c.val {
                        Some(pg_query::protobuf::a_const::Val::Sval(s)) if s.sval != "$user" => Some(s.sval.clone()),
                        _ => None,
                    },
                    _ => None,
                });
                self.schema = match first {
                    Some(first) if v.kind == VariableSetKind::VarSetValue as i32 => first,
                    _ => self.default_schema.clone(),
                };
            }
            _ => {}
        }
        if let Some((table, certain)) = created_table {
            // IF NOT EXISTS creates the table only where it is missing: the
            // catalog says whether it is; without one, assume it exists.
            let missing = self.catalog.is_some_and(|c| c.table(&table).is_none());
            if certain || missing {
                if !certain {
                    self.facts.push(format!(
                        "{}:{}: {table} does not exist yet: IF NOT EXISTS creates it",
                        s.origin, s.line
                    ));
                }
                if matches!(node, NodeEnum::CreateTableAsStmt(_) | NodeEnum::SelectStmt(_)) {
                    self.filled.insert(table.clone());
                }
                self.created.insert(table);
            }
        }
        // Once per migration: one SET at its start is the fix for all of them.
        if takes_exclusive_lock && !self.lock_timeout_set && !self.lock_timeout_reported {
            self.lock_timeout_reported = true;
            hits.push(classify::Hit::of(&LOCK_TIMEOUT));
        }
        if let Some(key) = validates {
            hits.push(classify::Hit::on(&VALIDATE_SAME_TRANSACTION, key));
        }
        for i in s.ignores.iter().filter(|i| !i.reason.is_empty() && !i.rules.is_empty()) {
            let triggered = |r: &String| hits.iter().any(|h| *r == h.rule.id || *r == h.rule.name);
            let unknown = i.rules.iter().any(|r| rule(r).is_none());
            if !unknown && !i.rules.iter().any(triggered) {
                let mut f = Finding::new(&BAD_SUPPRESSION, s);
                f.facts = Some(format!(
                    "backstop:ignore {} names no rule this statement triggers",
                    i.rules.join(",")
                ));
                self.bad_ignores.push(f);
            }
        }
        for hit in hits {
            let finding = self.finding(hit, s);
            let index = self.findings.len();
            if finding.rule == VALIDATE_SAME_TRANSACTION.id {
                self.validations.push(index);
            }
            if let Some(objects) = dropped.as_ref().filter(|_| finding.family == Family::Destructive) {
                if !objects.is_empty() && finding.rule != DROP_INDEX_LOCK.id {
                    self.drops.push(PendingDrop {
                        finding: index,
                        objects: objects.clone(),
                    });
                }
            }
            self.findings.push(finding);
        }
        if let Some(made) = created {
            for d in &mut self.drops {
                d.objects.retain(|o| !made.restores(o));
                if d.objects.is_empty() {
                    self.recreated.insert(d.finding);
                }
            }
            self.drops.retain(|d| !d.objects.is_empty());
        }
    }

    /// The constraints an ALTER TABLE adds (`table/name`, added NOT VALID
    /// to an existing table), and the table of a VALIDATE CONSTRAINT that
    /// validates one this migration added NOT VALID.
    fn constraints_of(&self, node: &NodeEnum, ctx: &classify::Ctx<'_>) -> (Vec<(String, bool)>, Option<String>) {
        let mut adds = Vec::new();
        let NodeEnum::AlterTableStmt(a) = node else {
            return (adds, None);
        };
        let Some(table) = a.relation.as_ref().map(|r| ctx.qualify(r)) else {
            return (adds, None);
        };
        let mut validates = None;
        for cmd in &a.cmds {
            let Some(NodeEnum::AlterTableCmd(c)) = &cmd.node else {
                continue;
            };
            if c.subtype == pg_query::protobuf::AlterTableType::AtAddConstraint as i32 {
                if let Some(NodeEnum::Constraint(k)) = c.def.as_deref().and_then(|d| d.node.as_ref()) {
                    let not_valid = k.skip_validation && !ctx.created.contains(&table);
                    adds.push((format!("{table}/{}", k.conname), not_valid));
                }
            } else if c.subtype == pg_query::protobuf::AlterTableType::AtValidateConstraint as i32 {
                let key = format!("{table}/{}", c.name);
                if self.not_valid.contains(&key) || adds.iter().any(|(k, nv)| *nv && *k == key) {
                    validates = Some(table.clone());
                }
            }
        }
        (adds, validates)
    }

    /// A finding for `hit`: catalog facts scale a lock by its table's size
    /// (small: a warning; large: an error with the size and the lock time),
    /// and the statement's suppressions mark it ignored.
    fn finding(&self, hit: classify::Hit, s: &Statement) -> Finding {
        let mut f = Finding::new(hit.rule, s);
        if let Some(sev) = hit.severity {
            f.severity = sev;
        }
        f.facts = hit.facts;
        let table = hit
            .table
            .filter(|_| SIZE_SCALED.contains(&hit.rule.id))
            .and_then(|name| Some((self.catalog?.table(&name)?, name)));
        if let Some((t, name)) = table {
            let said = t.describe(&name);
            if t.is_small() {
                f.severity = Severity::Warning;
                f.facts = Some(format!("{said}: small, the lock lasts milliseconds"));
            } else {
                f.severity = Severity::Error;
                f.facts = Some(format!("{said}: expect the lock to be held {}", t.lock_estimate()));
            }
        }
        f.ignored = s
            .ignores
            .iter()
            .find(|i| !i.reason.is_empty() && i.rules.iter().any(|r| r == hit.rule.id || r == hit.rule.name))
            .map(|i| i.reason.clone());
        f
    }

    /// The analysis of the migration: drops of objects it recreated are not
    /// destructive, and a validation in the adding transaction only counts
    /// when the migration runs as one transaction.
    pub fn finish(mut self) -> Analysis {
        if self.all_transactional {
            self.moot.append(&mut self.recreated);
        } else {
            self.moot.extend(self.validations.iter().copied());
        }
        let moot = std::mem::take(&mut self.moot);
        let mut findings: Vec<Finding> = self
            .findings
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !moot.contains(i))
            .map(|(_, f)| f)
            .collect();
        // Suppressions that name no rule, give no reason, or name a rule
        // the statement does not trigger are findings of their own.
        findings.extend(self.bad_ignores);
        Analysis {
            statements: self.statements,
            findings,
            facts: self.facts,
        }
    }
}

/// Whether a `SET` value is zero (`0`, `'0'`, `'0s'`, `'0ms'`).
fn setting_is_zero(args: &[pg_query::Node]) -> bool {
    use pg_query::protobuf::a_const::Val;
    args.first().is_some_and(|a| match &a.node {
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(Val::Ival(i)) => i.ival == 0,
            Some(Val::Sval(s)) => s.sval.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim() == "0",
            Some(Val::Fval(f)) => f.fval.parse::<f64>().is_ok_and(|v| v == 0.0),
            _ => false,
        },
        _ => false,
    })
}

/// Rules whose lock lasts as long as a scan, rewrite or build of the table:
/// with catalog facts, their severity follows the table's size.
const SIZE_SCALED: &[&str] = &[
    CREATE_INDEX_LOCK.id,
    REINDEX_LOCK.id,
    FK_VALIDATE.id,
    CHECK_VALIDATE.id,
    UNIQUE_INDEXLESS.id,
    PRIMARY_INDEXLESS.id,
    VOLATILE_DEFAULT.id,
    DEFAULT_REWRITE.id,
    TYPE_REWRITE.id,
    VACUUM_FULL.id,
    CLUSTER.id,
    GENERATED_COLUMN.id,
    IDENTITY_COLUMN.id,
    VALIDATE_SAME_TRANSACTION.id,
    REFRESH_MATVIEW.id,
];

/// Whether any finding is destructive or breaks the running app version.
pub fn has_destructive_or_incompatible(findings: &[Finding]) -> bool {
    findings
        .iter()
        .any(|f| f.family == Family::Destructive || f.incompatible)
}

/// Findings at error level that no suppression ignores.
pub fn errors(findings: &[Finding]) -> usize {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Error && f.ignored.is_none())
        .count()
}

pub mod catalog;
mod classify;
mod files;
pub use catalog::Catalog;
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
                _ if x.ignored.is_some() => "ignored",
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
            if let Some(facts) = &x.facts {
                let _ = writeln!(s, "      facts: {facts}");
            }
            let _ = writeln!(s, "      fix: {}", x.fix);
            if let Some(reason) = &x.ignored {
                let _ = writeln!(s, "      ignored: {reason}");
            }
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
