//! Which rules one statement triggers, given what the migration did before
//! it (tables it created, constraints it added) and, when the database was
//! reachable, the catalog's facts.

use std::collections::BTreeSet;

use pg_query::protobuf::{AlterTableType, ConstrType, DropBehavior, FunctionParameterMode, ObjectType, RangeVar};
use pg_query::{Node, NodeEnum};

use super::catalog::{Catalog, Table};
use super::rules::*;
use super::{LintOptions, Rule, Severity};

/// What the analysis knows when it reaches a statement.
pub(super) struct Ctx<'a> {
    pub opts: LintOptions,
    pub catalog: Option<&'a Catalog>,
    /// The schema unqualified names resolve to.
    pub schema: &'a str,
    /// Tables (and materialized views) this migration created: new and empty.
    pub created: &'a BTreeSet<String>,
    /// `table/constraint` added by this migration.
    pub added_constraints: &'a BTreeSet<String>,
    /// New tables that are not empty: made by `CREATE TABLE ... AS` or
    /// `SELECT ... INTO` from existing data.
    pub filled: &'a BTreeSet<String>,
}

/// A rule a statement triggers, on which table, and what catalog facts said.
#[derive(Debug)]
pub(super) struct Hit {
    pub rule: &'static Rule,
    /// The table whose size decides how long the lock lasts (size-scaled rules).
    pub table: Option<String>,
    /// Set when a fact changed the rule's severity.
    pub severity: Option<Severity>,
    pub facts: Option<String>,
}

impl Hit {
    pub(super) fn of(rule: &'static Rule) -> Self {
        Hit {
            rule,
            table: None,
            severity: None,
            facts: None,
        }
    }

    pub(super) fn on(rule: &'static Rule, table: String) -> Self {
        Hit {
            table: Some(table),
            ..Hit::of(rule)
        }
    }
}

impl Ctx<'_> {
    /// `schema.name` of a relation as this migration would resolve it.
    pub fn qualify(&self, r: &RangeVar) -> String {
        let schema = if r.schemaname.is_empty() {
            self.schema
        } else {
            &r.schemaname
        };
        format!("{schema}.{}", r.relname)
    }

    /// `schema.name` from a dotted name list (`DROP VIEW s.v`, a type name).
    pub fn qualify_names(&self, names: &[Node]) -> String {
        let parts: Vec<&str> = names
            .iter()
            .filter_map(|n| match &n.node {
                Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        match parts.as_slice() {
            [] => String::new(),
            [name] => format!("{}.{name}", self.schema),
            [.., schema, name] => format!("{schema}.{name}"),
        }
    }

    fn is_new(&self, r: Option<&RangeVar>) -> bool {
        r.is_some_and(|r| self.created.contains(&self.qualify(r)))
    }

    fn table(&self, r: Option<&RangeVar>) -> Option<(String, &Table)> {
        let name = self.qualify(r?);
        let t = self.catalog?.table(&name)?;
        Some((name, t))
    }
}

fn is(v: i32, e: impl Into<i32>) -> bool {
    v == e.into()
}

/// The rules `node` triggers.
pub(super) fn classify(node: &NodeEnum, ctx: &Ctx<'_>, out: &mut Vec<Hit>, facts: &mut Vec<String>) {
    match node {
        NodeEnum::DropStmt(d) => drop(d, out),
        NodeEnum::DropdbStmt(_) => out.push(Hit::of(&DROP_DATABASE)),
        NodeEnum::TruncateStmt(_) => out.push(Hit::of(&TRUNCATE)),
        NodeEnum::DeleteStmt(d) if d.where_clause.is_none() => out.push(Hit::of(&DELETE_ALL)),
        NodeEnum::UpdateStmt(u) if u.where_clause.is_none() => out.push(Hit::of(&UPDATE_ALL)),
        NodeEnum::RenameStmt(_) => out.push(Hit::of(&RENAME)),
        NodeEnum::AlterEnumStmt(e) if !e.old_val.is_empty() => out.push(Hit::of(&ENUM_VALUE_RENAME)),
        NodeEnum::IndexStmt(i) if !i.concurrent && !ctx.is_new(i.relation.as_ref()) => {
            out.push(Hit::on(&CREATE_INDEX_LOCK, rel(ctx, i.relation.as_ref())))
        }
        NodeEnum::ReindexStmt(r) if !crate::sql::option_on(&r.params, "concurrently") => {
            out.push(Hit::on(&REINDEX_LOCK, rel(ctx, r.relation.as_ref())))
        }
        NodeEnum::VacuumStmt(v) if v.is_vacuumcmd && crate::sql::option_on(&v.options, "full") => {
            let only = match v.rels.as_slice() {
                [one] => match &one.node {
                    Some(NodeEnum::VacuumRelation(r)) => r.relation.as_ref().map(|r| ctx.qualify(r)),
                    _ => None,
                },
                _ => None,
            };
            out.push(Hit {
                table: only,
                ..Hit::of(&VACUUM_FULL)
            })
        }
        NodeEnum::ClusterStmt(c) => out.push(Hit::on(&CLUSTER, rel(ctx, c.relation.as_ref()))),
        NodeEnum::RefreshMatViewStmt(r) if !r.concurrent && !r.skip_data && !ctx.is_new(r.relation.as_ref()) => {
            out.push(Hit::on(&REFRESH_MATVIEW, rel(ctx, r.relation.as_ref())))
        }
        NodeEnum::AlterDomainStmt(d) if d.subtype == "C" => {
            if let Some(NodeEnum::Constraint(c)) = d.def.as_deref().and_then(|n| n.node.as_ref()) {
                if !c.skip_validation {
                    out.push(Hit::of(&DOMAIN_CONSTRAINT));
                }
            }
        }
        NodeEnum::TransactionStmt(_) => out.push(Hit::of(&TRANSACTION_CONTROL)),
        NodeEnum::DoStmt(_) => out.push(Hit::of(&DO_BLOCK)),
        NodeEnum::CreateFunctionStmt(_) => out.push(Hit::of(&FUNCTION_BODY)),
        NodeEnum::AlterTableStmt(a) => {
            let table = rel(ctx, a.relation.as_ref());
            let is_new = ctx.is_new(a.relation.as_ref());
            let facts_of = ctx.table(a.relation.as_ref()).map(|(_, t)| t);
            for cmd in &a.cmds {
                if let Some(NodeEnum::AlterTableCmd(c)) = &cmd.node {
                    let at = AlterCtx {
                        ctx,
                        table: &table,
                        is_new,
                        filled: ctx.filled.contains(&table),
                        facts: facts_of,
                    };
                    alter_table_cmd(c, &at, out, facts);
                }
            }
        }
        _ => {}
    }
}

fn rel(ctx: &Ctx<'_>, r: Option<&RangeVar>) -> String {
    r.map(|r| ctx.qualify(r)).unwrap_or_default()
}

fn drop(d: &pg_query::protobuf::DropStmt, out: &mut Vec<Hit>) {
    let t = d.remove_type;
    let rule = if is(t, ObjectType::ObjectTable) || is(t, ObjectType::ObjectForeignTable) {
        &DROP_TABLE
    } else if is(t, ObjectType::ObjectSchema) {
        &DROP_SCHEMA
    } else if is(t, ObjectType::ObjectIndex) {
        if !d.concurrent {
            out.push(Hit::of(&DROP_INDEX_LOCK));
        }
        &DROP_INDEX
    } else if is(t, ObjectType::ObjectView) || is(t, ObjectType::ObjectMatview) {
        &DROP_VIEW
    } else if is(t, ObjectType::ObjectType) || is(t, ObjectType::ObjectDomain) {
        &DROP_TYPE
    } else if is(t, ObjectType::ObjectSequence) {
        &DROP_SEQUENCE
    } else if is(t, ObjectType::ObjectFunction)
        || is(t, ObjectType::ObjectProcedure)
        || is(t, ObjectType::ObjectRoutine)
        || is(t, ObjectType::ObjectAggregate)
    {
        &DROP_FUNCTION
    } else if is(t, ObjectType::ObjectTrigger) {
        &DROP_TRIGGER
    } else if is(t, ObjectType::ObjectPolicy) {
        &DROP_POLICY
    } else {
        return;
    };
    out.push(Hit::of(rule));
}

/// The table an `ALTER TABLE` works on.
struct AlterCtx<'a> {
    ctx: &'a Ctx<'a>,
    table: &'a str,
    is_new: bool,
    /// New, but filled from existing data by the statement that made it.
    filled: bool,
    facts: Option<&'a Table>,
}

fn alter_table_cmd(
    c: &pg_query::protobuf::AlterTableCmd,
    at: &AlterCtx<'_>,
    out: &mut Vec<Hit>,
    facts: &mut Vec<String>,
) {
    let def = c.def.as_deref().and_then(|d| d.node.as_ref());
    let t = c.subtype;
    let table = || at.table.to_string();
    if at.is_new {
        // A table this migration created is unused: only what its
        // constraints lock elsewhere matters (see `takes_exclusive_lock`).
        // Filled from existing data, a validating foreign key to a live
        // table scans the copied rows while it blocks the live table's writes.
        if let (true, Some(NodeEnum::Constraint(k))) = (at.filled, def) {
            if is(t, AlterTableType::AtAddConstraint)
                && is(k.contype, ConstrType::ConstrForeign)
                && !k.skip_validation
                && !at.ctx.is_new(k.pktable.as_ref())
            {
                out.push(Hit::on(&FK_VALIDATE, table()));
            }
        }
        return;
    }
    if is(t, AlterTableType::AtDropColumn) {
        out.push(Hit::of(&DROP_COLUMN));
    } else if is(t, AlterTableType::AtAlterColumnType) {
        if let Some(NodeEnum::ColumnDef(col)) = def {
            let old = at.facts.and_then(|f| f.columns.get(&c.name));
            if let (Some(old), Some(new), None) = (old, col.type_name.as_ref(), col.raw_default.as_ref()) {
                if let Some(why) = widening(&old.type_name, new) {
                    facts.push(format!("{}.{} is {}: {why}", at.table, c.name, old.type_name));
                    return;
                }
            }
        }
        out.push(Hit::of(&ALTER_COLUMN_TYPE));
        out.push(Hit::on(&TYPE_REWRITE, table()));
    } else if is(t, AlterTableType::AtSetNotNull) {
        out.push(Hit::of(&SET_NOT_NULL));
    } else if is(t, AlterTableType::AtColumnDefault) && def.is_none() {
        let column = at.facts.and_then(|f| f.columns.get(&c.name));
        out.push(match column {
            Some(col) if col.not_null && col.has_default => Hit {
                severity: Some(Severity::Error),
                facts: Some(format!(
                    "{}.{} is NOT NULL: the running app's INSERTs that leave it out fail once the default is gone",
                    at.table, c.name
                )),
                ..Hit::of(&DROP_DEFAULT)
            },
            _ => Hit::of(&DROP_DEFAULT),
        });
    } else if is(t, AlterTableType::AtDropConstraint) {
        if at.ctx.added_constraints.contains(&format!("{}/{}", at.table, c.name)) {
            return;
        }
        match at.facts.and_then(|f| f.constraints.get(&c.name)) {
            Some(k) if k.kind.app_relies_on() => out.push(Hit {
                severity: Some(Severity::Error),
                facts: Some(format!(
                    "{} on {} is a {:?} constraint: INSERT ... ON CONFLICT on its columns fails without it",
                    c.name, at.table, k.kind
                )),
                ..Hit::of(&DROP_CONSTRAINT)
            }),
            Some(k) => facts.push(format!(
                "{} on {} is a {:?} constraint: dropping it only loosens what the running app may write",
                c.name, at.table, k.kind
            )),
            None => out.push(Hit::of(&DROP_CONSTRAINT)),
        }
    } else if is(t, AlterTableType::AtDetachPartition) {
        if let Some(NodeEnum::PartitionCmd(p)) = def {
            if !p.concurrent {
                out.push(Hit::of(&DETACH_PARTITION));
            }
        }
    } else if is(t, AlterTableType::AtAddColumn) {
        if let Some(NodeEnum::ColumnDef(col)) = def {
            add_column(col, at, out);
        }
    } else if is(t, AlterTableType::AtAddConstraint) {
        if let Some(NodeEnum::Constraint(c)) = def {
            constraint(c, at, out, facts);
        }
    }
}

fn add_column(col: &pg_query::protobuf::ColumnDef, at: &AlterCtx<'_>, out: &mut Vec<Hit>) {
    let constraints: Vec<&pg_query::protobuf::Constraint> = col
        .constraints
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::Constraint(c)) => Some(c.as_ref()),
            _ => None,
        })
        .collect();
    let has = |k: ConstrType| constraints.iter().find(|c| is(c.contype, k));
    let default = has(ConstrType::ConstrDefault);
    let serial = col.type_name.as_ref().is_some_and(|t| {
        matches!(
            type_word(t).as_str(),
            "serial" | "bigserial" | "smallserial" | "serial2" | "serial4" | "serial8"
        )
    });
    let identity = has(ConstrType::ConstrIdentity).is_some() || serial;
    // PostgreSQL 18's VIRTUAL generated columns are computed on read.
    let generated = has(ConstrType::ConstrGenerated).is_some_and(|c| c.generated_kind != "v");
    let not_null = col.is_not_null || has(ConstrType::ConstrNotnull).is_some();
    if not_null && default.is_none() && !identity && !generated {
        out.push(Hit::of(&ADD_REQUIRED_COLUMN));
    }
    if identity {
        out.push(Hit::on(&IDENTITY_COLUMN, at.table.to_string()));
    }
    if generated {
        out.push(Hit::on(&GENERATED_COLUMN, at.table.to_string()));
    }
    if let Some(d) = default {
        if at.ctx.opts.pg_version < 11 {
            out.push(Hit::on(&DEFAULT_REWRITE, at.table.to_string()));
        } else if let Some(f) = d.raw_expr.as_deref().and_then(|e| not_known_stable(e, at.ctx.catalog)) {
            out.push(Hit {
                facts: Some(format!("the default calls {f}()")),
                ..Hit::on(&VOLATILE_DEFAULT, at.table.to_string())
            });
        }
    }
    for c in &constraints {
        constraint(c, at, out, &mut Vec::new());
    }
}

fn constraint(c: &pg_query::protobuf::Constraint, at: &AlterCtx<'_>, out: &mut Vec<Hit>, facts: &mut Vec<String>) {
    let t = c.contype;
    let table = || at.table.to_string();
    if is(t, ConstrType::ConstrForeign) && !c.skip_validation {
        out.push(Hit::on(&FK_VALIDATE, table()));
    } else if is(t, ConstrType::ConstrCheck) && !c.skip_validation {
        out.push(Hit::on(&CHECK_VALIDATE, table()));
    } else if (is(t, ConstrType::ConstrUnique) || is(t, ConstrType::ConstrPrimary)) && c.indexname.is_empty() {
        let rule = if is(t, ConstrType::ConstrUnique) {
            &UNIQUE_INDEXLESS
        } else {
            &PRIMARY_INDEXLESS
        };
        let keys: Vec<Option<String>> = c
            .keys
            .iter()
            .map(|k| match &k.node {
                Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                _ => None,
            })
            .collect();
        let usable = at.facts.and_then(|f| {
            f.indexes
                .iter()
                .find(|i| i.unique && i.valid && !i.partial && i.columns == keys)
        });
        if let Some(index) = usable {
            facts.push(format!(
                "{} already has the valid unique index {} on these columns: ADD CONSTRAINT ... USING INDEX {} builds nothing",
                at.table, index.name, index.name
            ));
        }
        out.push(Hit::on(rule, table()));
    }
}

/// Why changing `old` (as `format_type` writes it) to `new` rewrites
/// nothing, or `None` when it may: `varchar(n)` to a wider `varchar`, to
/// unbounded `varchar` or to `text`; `numeric(p,s)` to more precision at the
/// same scale, or to unbounded `numeric`.
fn widening(old: &str, new: &pg_query::protobuf::TypeName) -> Option<&'static str> {
    if !new.array_bounds.is_empty() || old.ends_with("[]") {
        return None;
    }
    let word = type_word(new);
    let mods: Vec<i32> = new
        .typmods
        .iter()
        .filter_map(|m| match &m.node {
            Some(NodeEnum::AConst(c)) => match &c.val {
                Some(pg_query::protobuf::a_const::Val::Ival(i)) => Some(i.ival),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let (old_word, old_mods) = match old.split_once('(') {
        Some((w, rest)) => (
            w.trim(),
            rest.trim_end_matches(')')
                .split(',')
                .filter_map(|m| m.trim().parse::<i32>().ok())
                .collect::<Vec<_>>(),
        ),
        None => (old.trim(), Vec::new()),
    };
    let varchar_like = |w: &str| matches!(w, "character varying" | "varchar" | "text");
    match (old_word, word.as_str()) {
        (o, "text") if varchar_like(o) => Some("to text rewrites nothing"),
        (o, "varchar") if varchar_like(o) => match (old_mods.as_slice(), mods.as_slice()) {
            (_, []) => Some("to unbounded varchar rewrites nothing"),
            ([n], [m]) if m >= n && o != "text" => Some("widening varchar rewrites nothing"),
            _ => None,
        },
        ("numeric", "numeric") => match (old_mods.as_slice(), mods.as_slice()) {
            (_, []) => Some("to unbounded numeric rewrites nothing"),
            ([p, s], [p2, s2]) if p2 >= p && s2 == s => Some("more precision at the same scale rewrites nothing"),
            _ => None,
        },
        _ => None,
    }
}

/// The type's own name, lowercased, without schema (`int4`, `varchar`).
pub(super) fn type_word(t: &pg_query::protobuf::TypeName) -> String {
    let word = t
        .names
        .iter()
        .rev()
        .find_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
            _ => None,
        })
        .unwrap_or_default();
    if t.array_bounds.is_empty() {
        word
    } else {
        format!("{word}[]")
    }
}

/// Functions known to be immutable or stable: a column default calling only
/// these (and operators, casts, constants) is evaluated once for the whole
/// table on PostgreSQL 11+, so adding the column rewrites nothing. Anything
/// else might be volatile; the catalog, when at hand, settles it.
const KNOWN_STABLE: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "current_setting",
    "timezone",
    "date_trunc",
    "date_part",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "to_timestamp",
    "to_date",
    "to_char",
    "to_number",
    "lower",
    "upper",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "length",
    "char_length",
    "substring",
    "substr",
    "replace",
    "concat",
    "concat_ws",
    "format",
    "md5",
    "abs",
    "round",
    "floor",
    "ceil",
    "ceiling",
    "greatest",
    "least",
    "coalesce",
    "nullif",
    "array_fill",
    "jsonb_build_object",
    "jsonb_build_array",
    "json_build_object",
    "json_build_array",
    "to_jsonb",
    "to_json",
    "jsonb_object",
    "array_to_json",
    "row_to_json",
    "uuid_nil",
    "int4",
    "int8",
    "text",
    "numeric",
    "bool",
    "inet",
    "interval",
    "current_database",
    "current_schema",
    "version",
];

/// The first function `expr` calls that is not known to be immutable or
/// stable (by the catalog when given, else by [`KNOWN_STABLE`]).
fn not_known_stable(expr: &Node, catalog: Option<&Catalog>) -> Option<String> {
    called_functions(expr).into_iter().find(|name| {
        let stable = match catalog.and_then(|c| c.functions.get(name)) {
            Some(v) => *v != 'v',
            None => KNOWN_STABLE.contains(&name.as_str()),
        };
        !stable
    })
}

/// The names of every function an expression calls, at any depth. pg_query's
/// own walker (`nodes()`) skips some expression kinds (array constructors,
/// CASE arguments, named arguments), so the tree's complete `Debug` text is
/// read instead: each `FuncCall` prints its name parts first.
fn called_functions(expr: &Node) -> Vec<String> {
    const CALL: &str = "FuncCall { funcname: [";
    let text = format!("{expr:?}");
    let mut out = Vec::new();
    for (at, _) in text.match_indices(CALL) {
        let rest = &text[at + CALL.len()..];
        let names = rest.split("], ").next().unwrap_or("");
        let last = names
            .split("sval: \"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .last();
        if let Some(name) = last {
            out.push(name.to_ascii_lowercase());
        }
    }
    out
}

/// Statements that wait for an ACCESS EXCLUSIVE (or similar) lock on a table
/// other statements use: every table this migration did not create, and the
/// table a new foreign key references (SHARE ROW EXCLUSIVE, which blocks its writes).
pub(super) fn takes_exclusive_lock(node: &NodeEnum, ctx: &Ctx<'_>) -> bool {
    match node {
        NodeEnum::AlterTableStmt(a) => {
            !ctx.is_new(a.relation.as_ref())
                || a.cmds.iter().any(|cmd| match &cmd.node {
                    Some(NodeEnum::AlterTableCmd(c)) => match c.def.as_deref().and_then(|d| d.node.as_ref()) {
                        Some(NodeEnum::Constraint(k)) => references_existing(k, ctx),
                        Some(NodeEnum::ColumnDef(col)) => col.constraints.iter().any(|n| constraint_references(n, ctx)),
                        _ => false,
                    },
                    _ => false,
                })
        }
        // A partition or child of a live table locks it (ACCESS EXCLUSIVE
        // for PARTITION OF), and so does a foreign key to one.
        NodeEnum::CreateStmt(c) => {
            c.inh_relations.iter().any(|n| match &n.node {
                Some(NodeEnum::RangeVar(r)) => !ctx.is_new(Some(r)),
                _ => false,
            }) || c.table_elts.iter().chain(&c.constraints).any(|n| match &n.node {
                Some(NodeEnum::ColumnDef(col)) => col.constraints.iter().any(|n| constraint_references(n, ctx)),
                _ => constraint_references(n, ctx),
            })
        }
        NodeEnum::DropStmt(d) => !d.concurrent,
        NodeEnum::RenameStmt(_) | NodeEnum::TruncateStmt(_) | NodeEnum::ClusterStmt(_) | NodeEnum::LockStmt(_) => true,
        NodeEnum::IndexStmt(i) => !i.concurrent && !ctx.is_new(i.relation.as_ref()),
        NodeEnum::ReindexStmt(r) => !crate::sql::option_on(&r.params, "concurrently"),
        NodeEnum::VacuumStmt(v) => v.is_vacuumcmd && crate::sql::option_on(&v.options, "full"),
        NodeEnum::RefreshMatViewStmt(r) => !r.concurrent && !ctx.is_new(r.relation.as_ref()),
        // CREATE TRIGGER takes SHARE ROW EXCLUSIVE (blocks writes), CREATE
        // and ALTER POLICY ACCESS EXCLUSIVE, on the table.
        NodeEnum::CreateTrigStmt(t) => !ctx.is_new(t.relation.as_ref()),
        NodeEnum::CreatePolicyStmt(p) => !ctx.is_new(p.table.as_ref()),
        NodeEnum::AlterPolicyStmt(p) => !ctx.is_new(p.table.as_ref()),
        _ => false,
    }
}

fn constraint_references(n: &Node, ctx: &Ctx<'_>) -> bool {
    matches!(&n.node, Some(NodeEnum::Constraint(k)) if references_existing(k, ctx))
}

fn references_existing(k: &pg_query::protobuf::Constraint, ctx: &Ctx<'_>) -> bool {
    is(k.contype, ConstrType::ConstrForeign) && !ctx.is_new(k.pktable.as_ref())
}

/// An object a migration may drop and create again: views, functions,
/// triggers, policies, indexes and types hold no data of their own, so
/// dropping one (without CASCADE) and recreating it in the same migration
/// loses nothing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Recreatable {
    View(String),
    /// Name and, when the drop named them, the input argument types.
    Function(String, Option<Vec<String>>),
    Trigger(String),
    Policy(String),
    Index(String),
    Type(String),
}

impl Recreatable {
    /// Whether creating `self` puts back what dropping `dropped` removed.
    pub fn restores(&self, dropped: &Recreatable) -> bool {
        match (self, dropped) {
            // A drop that named no arguments may have removed another overload.
            (Recreatable::Function(a, Some(x)), Recreatable::Function(b, Some(y))) => a == b && x == y,
            (Recreatable::Function(..), Recreatable::Function(..)) => false,
            _ => self == dropped,
        }
    }
}

/// What a `DROP` (without CASCADE) removes that could be recreated.
pub(super) fn dropped_objects(d: &pg_query::protobuf::DropStmt, ctx: &Ctx<'_>) -> Option<Vec<Recreatable>> {
    if is(d.behavior, DropBehavior::DropCascade) {
        return None;
    }
    let t = d.remove_type;
    let names = |n: &Node| match &n.node {
        Some(NodeEnum::List(l)) => Some(l.items.clone()),
        Some(NodeEnum::TypeName(t)) => Some(t.names.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    for o in &d.objects {
        let key = if is(t, ObjectType::ObjectView) || is(t, ObjectType::ObjectMatview) {
            Recreatable::View(ctx.qualify_names(&names(o)?))
        } else if is(t, ObjectType::ObjectIndex) {
            Recreatable::Index(ctx.qualify_names(&names(o)?))
        } else if is(t, ObjectType::ObjectType) || is(t, ObjectType::ObjectDomain) {
            Recreatable::Type(ctx.qualify_names(&names(o)?))
        } else if is(t, ObjectType::ObjectTrigger) || is(t, ObjectType::ObjectPolicy) {
            let parts = names(o)?;
            let (name, table) = parts.split_last()?;
            let name = match &name.node {
                Some(NodeEnum::String(s)) => s.sval.clone(),
                _ => return None,
            };
            let key = format!("{}/{name}", ctx.qualify_names(table));
            if is(t, ObjectType::ObjectTrigger) {
                Recreatable::Trigger(key)
            } else {
                Recreatable::Policy(key)
            }
        } else if is(t, ObjectType::ObjectFunction) || is(t, ObjectType::ObjectProcedure) {
            let Some(NodeEnum::ObjectWithArgs(f)) = &o.node else {
                return None;
            };
            let args = (!f.args_unspecified).then(|| {
                f.objargs
                    .iter()
                    .filter_map(|a| match &a.node {
                        Some(NodeEnum::TypeName(t)) => Some(type_word(t)),
                        _ => None,
                    })
                    .collect()
            });
            Recreatable::Function(ctx.qualify_names(&f.objname), args)
        } else {
            return None;
        };
        out.push(key);
    }
    Some(out)
}

/// What a statement creates (or replaces) that a drop could have removed.
pub(super) fn created_object(node: &NodeEnum, ctx: &Ctx<'_>) -> Option<Recreatable> {
    Some(match node {
        NodeEnum::ViewStmt(v) => Recreatable::View(ctx.qualify(v.view.as_ref()?)),
        NodeEnum::CreateTableAsStmt(c) if is(c.objtype, ObjectType::ObjectMatview) => {
            Recreatable::View(ctx.qualify(c.into.as_ref()?.rel.as_ref()?))
        }
        // An index recreated puts back what was dropped only if it cannot
        // have lost uniqueness (the app's ON CONFLICT needs it): it is
        // unique, or the catalog says the dropped one was not.
        NodeEnum::IndexStmt(i)
            if !i.idxname.is_empty()
                && (i.unique
                    || ctx
                        .table(i.relation.as_ref())
                        .is_some_and(|(_, t)| t.indexes.iter().any(|x| x.name == i.idxname && !x.unique))) =>
        {
            let schema = i
                .relation
                .as_ref()
                .map(|r| {
                    if r.schemaname.is_empty() {
                        ctx.schema
                    } else {
                        r.schemaname.as_str()
                    }
                })
                .unwrap_or(ctx.schema);
            Recreatable::Index(format!("{schema}.{}", i.idxname))
        }
        NodeEnum::CreateFunctionStmt(f) => {
            let args = f
                .parameters
                .iter()
                .filter_map(|p| match &p.node {
                    Some(NodeEnum::FunctionParameter(p))
                        if !is(p.mode, FunctionParameterMode::FuncParamOut)
                            && !is(p.mode, FunctionParameterMode::FuncParamTable) =>
                    {
                        p.arg_type.as_ref().map(type_word)
                    }
                    _ => None,
                })
                .collect();
            Recreatable::Function(ctx.qualify_names(&f.funcname), Some(args))
        }
        NodeEnum::CreateTrigStmt(t) => {
            Recreatable::Trigger(format!("{}/{}", ctx.qualify(t.relation.as_ref()?), t.trigname))
        }
        NodeEnum::CreatePolicyStmt(p) => {
            Recreatable::Policy(format!("{}/{}", ctx.qualify(p.table.as_ref()?), p.policy_name))
        }
        NodeEnum::CompositeTypeStmt(t) => Recreatable::Type(ctx.qualify(t.typevar.as_ref()?)),
        NodeEnum::CreateEnumStmt(e) => Recreatable::Type(ctx.qualify_names(&e.type_name)),
        NodeEnum::CreateDomainStmt(d) => Recreatable::Type(ctx.qualify_names(&d.domainname)),
        NodeEnum::CreateRangeStmt(r) => Recreatable::Type(ctx.qualify_names(&r.type_name)),
        _ => return None,
    })
}

/// The table a statement creates, and whether it certainly does (`IF NOT
/// EXISTS` may create nothing).
pub(super) fn created_table(node: &NodeEnum, ctx: &Ctx<'_>) -> Option<(String, bool)> {
    let (r, if_not_exists) = match node {
        NodeEnum::CreateStmt(c) => (c.relation.as_ref()?, c.if_not_exists),
        NodeEnum::CreateTableAsStmt(c) => (c.into.as_ref()?.rel.as_ref()?, c.if_not_exists),
        NodeEnum::SelectStmt(s) => (s.into_clause.as_ref()?.rel.as_ref()?, false),
        _ => return None,
    };
    Some((ctx.qualify(r), !if_not_exists))
}
