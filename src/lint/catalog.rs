//! What the live database says about the objects a migration touches, read
//! from the catalog at plan time (`backstop plan --database-url`, and the
//! plan phase of every run): which tables exist, their estimated rows and
//! size, column types, indexes and constraints, and how volatile functions
//! are.
//!
//! The analysis uses these facts to decide what a static linter has to
//! guess: `CREATE TABLE IF NOT EXISTS` creates a table or not; an `ALTER
//! COLUMN TYPE` widens a `varchar` (no rewrite) or not; a blocking statement
//! on an empty or small table is a warning, on a large one an error whose
//! message gives the size and the lock time to expect; a dropped constraint
//! is a unique one the running app's `ON CONFLICT` needs, or a check that
//! only loosens. Facts only ever lower what a plan needs (see
//! [`crate::policy::plan_hash`]), and every finding a fact changed says so.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;

/// Tables at most this large (all forks, indexes and TOAST) are small: a lock
/// or rewrite on them lasts milliseconds.
pub const SMALL_TABLE_BYTES: i64 = 8 << 20;

/// The rate assumed to estimate how long a rewrite, index build or
/// validating scan holds its lock: deliberately low (a busy server with the
/// table not in memory), so the estimate errs long.
pub const ESTIMATE_BYTES_PER_SECOND: f64 = 100e6;

/// The catalog facts of one database.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// The schema unqualified names resolve to (first of `search_path`).
    pub default_schema: String,
    /// Tables, views and materialized views by `schema.name`.
    pub tables: BTreeMap<String, Table>,
    /// Function volatility by (unqualified) name: the most volatile overload
    /// (`i` immutable, `s` stable, `v` volatile).
    pub functions: BTreeMap<String, char>,
    /// The server's `wal_level` (whether a run can keep the writes a
    /// restore discards: [`crate::capture`]).
    #[serde(default)]
    pub wal_level: String,
}

/// One relation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// `r` table, `p` partitioned table, `v` view, `m` materialized view, `f` foreign table.
    pub kind: char,
    /// The planner's estimate (`pg_class.reltuples`); `None` when never analysed.
    pub rows: Option<f64>,
    /// `pg_total_relation_size`; of a partitioned table, the sum over its
    /// partitions (the parent itself stores nothing).
    pub bytes: i64,
    pub columns: BTreeMap<String, Column>,
    pub indexes: Vec<Index>,
    /// Constraints by name.
    pub constraints: BTreeMap<String, Constraint>,
}

/// One column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// As `format_type` writes it: `character varying(50)`, `numeric(10,2)`, `text`.
    pub type_name: String,
    pub not_null: bool,
    pub has_default: bool,
}

/// One index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub unique: bool,
    pub valid: bool,
    pub partial: bool,
    /// Key columns in order (an expression is `None`).
    pub columns: Vec<Option<String>>,
}

/// What a constraint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConstraintKind {
    PrimaryKey,
    Unique,
    Exclusion,
    ForeignKey,
    Check,
    /// `NOT NULL` (PostgreSQL 18 records them) and triggers.
    Other,
}

/// One constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    pub kind: ConstraintKind,
    pub validated: bool,
}

impl ConstraintKind {
    fn from_contype(c: &str) -> Self {
        match c {
            "p" => ConstraintKind::PrimaryKey,
            "u" => ConstraintKind::Unique,
            "x" => ConstraintKind::Exclusion,
            "f" => ConstraintKind::ForeignKey,
            "c" => ConstraintKind::Check,
            _ => ConstraintKind::Other,
        }
    }

    /// Whether the running app can depend on it being there (`ON CONFLICT`
    /// names it or its index).
    pub fn app_relies_on(self) -> bool {
        matches!(
            self,
            ConstraintKind::PrimaryKey | ConstraintKind::Unique | ConstraintKind::Exclusion
        )
    }
}

impl Table {
    /// Small enough that a lock or rewrite on it is over in milliseconds.
    pub fn is_small(&self) -> bool {
        self.bytes <= SMALL_TABLE_BYTES
    }

    /// The facts a finding cites: `public.orders: ~1,200,000 rows, 840 MB`.
    pub fn describe(&self, name: &str) -> String {
        let rows = match self.rows {
            Some(r) => format!("~{} rows", thousands(r.round() as i64)),
            None => "rows not yet estimated (never analysed)".to_string(),
        };
        format!("{name}: {rows}, {}", bytes(self.bytes))
    }

    /// `about 8 s` under [`ESTIMATE_BYTES_PER_SECOND`].
    pub fn lock_estimate(&self) -> String {
        let secs = self.bytes as f64 / ESTIMATE_BYTES_PER_SECOND;
        if secs < 1.0 {
            "under a second".to_string()
        } else if secs < 120.0 {
            format!("about {} s", secs.round())
        } else {
            format!("about {} min", (secs / 60.0).round())
        }
    }
}

fn thousands(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `sql` with the names as `$1` when there are names, asked once (each
/// pass reads the catalog once: preparing would cost a round trip more).
async fn query_named(
    session: &crate::db::Session,
    sql: &str,
    names: Option<&[String]>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    match names {
        Some(names) => session.query_once(sql, &[(&names, Type::TEXT_ARRAY)]).await,
        None => session.query_once(sql, &[]).await,
    }
}

/// Reading the catalog failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to read the database catalog ({what})")]
pub struct CatalogError {
    what: &'static str,
    #[source]
    source: tokio_postgres::Error,
}

/// Every word of `texts` that could name a function or a relation: a
/// superset, read without knowing where comments and string literals are.
/// Unquoted, a name is a run of letters, digits, `_`, `$` and any non-ASCII
/// character (as PostgreSQL's scanner reads it), folded as PostgreSQL folds
/// it (ASCII letters only) and also with every letter lowercased; quoted,
/// what follows every quote up to the next lone one, a doubled quote read
/// as one (a stray quote in a comment shifts which quotes pair, so every
/// quote is read as an opening one). Each is also cut to the 63 bytes
/// PostgreSQL keeps of a longer name.
pub fn words<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    let starts = |c: char| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii();
    let continues = |c: char| starts(c) || c.is_ascii_digit() || c == '$';
    for text in texts {
        // Unquoted words, wherever they are.
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if starts(c) {
                let end = rest.find(|c: char| !continues(c)).unwrap_or(rest.len());
                out.insert(rest[..end].to_ascii_lowercase());
                out.insert(rest[..end].to_lowercase());
                rest = &rest[end..];
            } else {
                rest = &rest[c.len_utf8()..];
            }
        }
        // Quoted names, read from every quote (a stray quote in a comment
        // shifts which quotes pair), a doubled quote read as one. Past 63
        // bytes only the cut name counts: no read goes further, so this is
        // linear in the text however its quotes fall.
        for (open, _) in text.match_indices('"') {
            out.insert(quoted_name(&text[open + 1..]));
        }
    }
    let cut: Vec<String> = out.iter().filter_map(|w| truncated(w)).collect();
    out.extend(cut);
    out.remove("");
    out.into_iter().collect()
}

/// The names the catalog read is limited to ([`Catalog::load`]): the
/// [`words`] of `texts`, or None (read everything) when one writes an
/// identifier with Unicode escapes (`U&"…"`), whose name its words do not
/// spell.
pub fn names<'a>(texts: impl IntoIterator<Item = &'a str> + Clone) -> Option<Vec<String>> {
    let escaped = texts.clone().into_iter().any(|t| {
        t.as_bytes()
            .windows(3)
            .any(|w| w[0].eq_ignore_ascii_case(&b'u') && w[1] == b'&' && w[2] == b'"')
    });
    (!escaped).then(|| words(texts))
}

/// The quoted name `body` starts with (after its opening quote): up to the
/// closing quote, a doubled quote read as one, cut to 63 bytes.
fn quoted_name(body: &str) -> String {
    let mut name = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            if chars.peek() != Some(&'"') {
                break;
            }
            chars.next();
        }
        name.push(c);
        if name.len() > NAME_BYTES {
            break;
        }
    }
    truncated(&name).unwrap_or(name)
}

/// The bytes PostgreSQL keeps of a name.
const NAME_BYTES: usize = 63;

/// `word` cut to PostgreSQL's 63-byte names (on a character boundary), when longer.
fn truncated(word: &str) -> Option<String> {
    if word.len() <= NAME_BYTES {
        return None;
    }
    let mut end = NAME_BYTES;
    while !word.is_char_boundary(end) {
        end -= 1;
    }
    Some(word[..end].to_string())
}

/// The settings the analysis reads: the default schema and `wal_level`.
pub const SETTINGS: &str = "SELECT coalesce((current_schemas(false))[1], 'public')::text, current_setting('wal_level')";

impl Catalog {
    /// Looks a relation up by its qualified name.
    pub fn table(&self, qualified: &str) -> Option<&Table> {
        self.tables.get(qualified)
    }

    /// Reads the facts of the user relations (not `pg_catalog`,
    /// `information_schema` or TOAST) and the volatility of the functions
    /// whose names are among `names` (every one when None). The analysis
    /// looks up only relations a statement names and functions it calls,
    /// whose names are among the migration's [`words`]: so the read costs
    /// what the migration names, not what the database holds (a database
    /// of 10,000 tables is not read whole for every migration). The
    /// settings, the functions and the relations named go out together,
    /// pipelined on the one session; the columns, indexes and constraints
    /// of the relations found follow, only when some were.
    pub async fn load(session: &crate::db::Session, names: Option<&[String]>) -> Result<Catalog, CatalogError> {
        let q = |what: &'static str| move |source| CatalogError { what, source };
        const USER: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";
        // Every lookup of the analysis is by a relation a statement names
        // (an index is looked up on the table its CREATE INDEX names).
        let named = match names {
            Some(_) => "AND c.relname = ANY($1::text[])",
            None => "",
        };
        let tables_sql = format!(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.reltuples::float8, \
             CASE WHEN c.relkind = 'p' \
                  THEN (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)::int8 FROM pg_partition_tree(c.oid) t) \
                  ELSE coalesce(pg_total_relation_size(c.oid), 0) END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {USER} {named}"
        );
        // The most volatile overload of each name: a default that calls the
        // name is judged by the worst one it could resolve to.
        const FUNCTIONS: &str =
            "SELECT proname::text, max(CASE provolatile WHEN 'v' THEN 3 WHEN 's' THEN 2 ELSE 1 END)::int4 FROM pg_proc";
        let functions_sql = match names {
            Some(_) => format!("{FUNCTIONS} WHERE proname = ANY($1::text[]) GROUP BY proname"),
            None => format!("{FUNCTIONS} GROUP BY proname"),
        };
        let (settings, tables, function_rows) = tokio::join!(
            session.query_one(SETTINGS, &[]),
            query_named(session, &tables_sql, names),
            query_named(session, &functions_sql, names),
        );
        let tables = tables.map_err(q("tables"))?;
        let oids: Vec<tokio_postgres::types::Oid> = tables.iter().map(|r| r.get(0)).collect();
        let of_tables = |sql: &'static str| {
            let oids = &oids;
            async move {
                if oids.is_empty() {
                    return Ok(Vec::new());
                }
                session.query_once(sql, &[(oids, Type::OID_ARRAY)]).await
            }
        };
        let (columns, indexes, constraints) = tokio::join!(
            of_tables(
                "SELECT n.nspname::text, c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), \
                 a.attnotnull, a.atthasdef \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            of_tables(
                "SELECT n.nspname::text, c.relname::text, i.relname::text, x.indisunique, x.indisvalid, \
                 x.indpred IS NOT NULL, \
                 ARRAY(SELECT a.attname::text FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                       LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum AND k.attnum > 0 \
                       WHERE k.ord <= x.indnkeyatts ORDER BY k.ord) \
                 FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1::oid[])"
            ),
            of_tables(
                "SELECT n.nspname::text, c.relname::text, k.conname::text, k.contype::text, k.convalidated \
                 FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1::oid[])"
            ),
        );
        let settings = settings.map_err(q("settings"))?;
        let mut cat = Catalog {
            default_schema: settings.get(0),
            wal_level: settings.get(1),
            ..Catalog::default()
        };
        for r in tables {
            let (schema, name, kind): (String, String, String) = (r.get(1), r.get(2), r.get(3));
            let rows: f64 = r.get(4);
            cat.tables.insert(
                format!("{schema}.{name}"),
                Table {
                    kind: kind.chars().next().unwrap_or('r'),
                    rows: (rows >= 0.0).then_some(rows),
                    bytes: r.get(5),
                    ..Table::default()
                },
            );
        }
        let rows = columns.map_err(q("columns"))?;
        for r in rows {
            let key = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
            if let Some(t) = cat.tables.get_mut(&key) {
                t.columns.insert(
                    r.get(2),
                    Column {
                        type_name: r.get(3),
                        not_null: r.get(4),
                        has_default: r.get(5),
                    },
                );
            }
        }
        let rows = indexes.map_err(q("indexes"))?;
        for r in rows {
            let key = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
            if let Some(t) = cat.tables.get_mut(&key) {
                t.indexes.push(Index {
                    name: r.get(2),
                    unique: r.get(3),
                    valid: r.get(4),
                    partial: r.get(5),
                    columns: r.get::<_, Vec<Option<String>>>(6),
                });
            }
        }
        let rows = constraints.map_err(q("constraints"))?;
        for r in rows {
            let key = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
            if let Some(t) = cat.tables.get_mut(&key) {
                t.constraints.insert(
                    r.get(2),
                    Constraint {
                        kind: ConstraintKind::from_contype(&r.get::<_, String>(3)),
                        validated: r.get(4),
                    },
                );
            }
        }
        let rows = function_rows.map_err(q("functions"))?;
        for r in rows {
            let v = match r.get::<_, i32>(1) {
                3 => 'v',
                2 => 's',
                _ => 'i',
            };
            cat.functions.insert(r.get(0), v);
        }
        Ok(cat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_estimates_read_like_a_person_wrote_them() {
        let t = Table {
            rows: Some(1_234_567.0),
            bytes: 840_000_000,
            ..Table::default()
        };
        assert_eq!(t.describe("public.orders"), "public.orders: ~1,234,567 rows, 840.0 MB");
        assert_eq!(t.lock_estimate(), "about 8 s");
        assert!(!t.is_small());
        let empty = Table::default();
        assert_eq!(
            empty.describe("s.t"),
            "s.t: rows not yet estimated (never analysed), 0 bytes"
        );
        assert!(empty.is_small());
        assert_eq!(empty.lock_estimate(), "under a second");
    }

    #[test]
    fn the_words_of_a_migration_name_every_function_it_can_call() {
        let w = words([
            "ALTER TABLE t ADD c text DEFAULT App.Make_Token() || \"MixedCase\"(1)",
            "SELECT nextval('s'), x$1, ünïcode_fn()",
        ]);
        for name in [
            "alter",
            "app",
            "make_token",
            "MixedCase",
            "nextval",
            "x$1",
            "ünïcode_fn",
        ] {
            assert!(w.iter().any(|x| x == name), "{name} in {w:?}");
        }
        assert!(!w.iter().any(|x| x.is_empty() || x == "1" || x == "("), "{w:?}");
    }

    #[test]
    fn names_are_read_as_postgres_reads_them_whatever_comments_and_strings_hold() {
        // PostgreSQL folds ASCII letters only; a combining accent is part of
        // the name; a stray quote in a comment does not hide what follows.
        let w = words([
            "-- 27\" screens\nALTER TABLE Ärger ADD c int; ALTER TABLE cafe\u{301}s DROP x; ALTER TABLE \"MyT\" ADD d int",
            "-- 5\" screens\nALTER TABLE \"a\"\"b\" ADD c int",
        ]);
        for name in ["Ärger", "cafe\u{301}s", "screens", "MyT", "a\"b"] {
            assert!(w.iter().any(|x| x == name), "{name} in {w:?}");
        }
        // Hostile text: 256 KiB of quotes, and a quoted name that never
        // closes, is read (no read from a quote goes past 63 bytes of name).
        let w = words([
            "\"".repeat(1 << 18).as_str(),
            format!("\"{}", "x\"\"".repeat(1 << 16)).as_str(),
        ]);
        assert!(w.iter().all(|x| x.len() <= 63), "{w:?}");
    }

    #[test]
    fn a_doubled_quote_is_one_quote_of_the_name_and_a_long_name_is_also_cut_to_63_bytes() {
        let long = "é".repeat(40);
        let w = words([format!("ALTER TABLE \"Odd\"\"Name\" ADD c int; DROP TABLE {long}").as_str()]);
        assert!(w.iter().any(|x| x == "Odd\"Name"), "{w:?}");
        assert!(w.contains(&long), "{w:?}");
        // 31 two-byte characters: the 63rd byte would split the 32nd.
        assert!(w.contains(&"é".repeat(31)), "{w:?}");
        assert_eq!(names(["SELECT 1"]), Some(vec!["select".to_string()]));
        assert_eq!(names(["CREATE TABLE U&\"\\0061\" (id int)"]), None);
    }
}
