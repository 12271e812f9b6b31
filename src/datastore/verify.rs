//! `datastore verify`: every table of source and target compared by row
//! counts and content checksums computed in the databases.
//!
//! A table is first summarised whole on both sides at once: `count(*)` and
//! the sum of a 64-bit hash of each row, an order-independent aggregate (one
//! sequential scan, no sort, no window; PostgreSQL may use parallel
//! workers). The row hash is `hash_record_extended` (PostgreSQL 14 and later:
//! each column hashed by its type's own hash function, five times cheaper
//! than printing the row) when every column is of a built-in type whose hash
//! depends only on the value ([`PORTABLE_TYPES`], or arrays of them, with a
//! deterministic collation); otherwise the hash of the row's text (enums
//! hash by their OID, which differs between servers; `json`, `point` and
//! others have no hash function). Only a table whose summaries differ
//! is looked at more closely: its rows are split into buckets by a hash of
//! their key (the primary key, or the whole row without one), the buckets
//! summarised the same way, and the rows of differing buckets read (key and
//! `md5` of the row) to name the rows that differ.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tokio_postgres::Client;

use super::{q, Result, USER_SCHEMAS};
use crate::db::Database;

/// One table compared by [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct TableDiff {
    pub table: String,
    pub source_rows: Option<i64>,
    pub target_rows: Option<i64>,
    /// `ok`, `missing in target`, `missing in source`, `rows differ`.
    pub status: String,
    /// Keys of rows that differ (changed, missing or extra), at most 20.
    pub rows: Vec<String>,
}

/// Rows per bucket aimed at (from the source's row estimate).
const BUCKET_ROWS: f64 = 20_000.0;
/// At most this many buckets per table (bounds the aggregate's memory).
const MAX_BUCKETS: i64 = 4096;
/// Differing rows named per table.
const MAX_ROWS: usize = 20;

/// Built-in types whose extended hash is a function of the value alone,
/// the same on every server.
const PORTABLE_TYPES: &[&str] = &[
    "int2",
    "int4",
    "int8",
    "numeric",
    "float4",
    "float8",
    "text",
    "varchar",
    "bpchar",
    "char",
    "bool",
    "bytea",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    "interval",
    "uuid",
    "jsonb",
    "inet",
    "cidr",
    "macaddr",
];

/// A table of the user schemas.
struct Table {
    /// Its primary key as `t.col, ...`; empty without one.
    key: String,
    /// The planner's row estimate.
    estimate: f64,
    /// Whether rows can be hashed by [`RowHash::Record`] on this server.
    portable: bool,
}

/// Tables (quoted, qualified) of the user schemas.
async fn tables(db: &Database, client: &Client) -> Result<BTreeMap<String, Table>> {
    let portable = PORTABLE_TYPES
        .iter()
        .map(|t| format!("'pg_catalog.{t}'::regtype"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = client
        .query(
            &format!(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                        coalesce((SELECT string_agg('t.' || quote_ident(a.attname), ', ' ORDER BY array_position(i.indkey, a.attnum))
                                    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                                   WHERE i.indrelid = c.oid AND i.indisprimary), ''),
                        greatest(c.reltuples, 0)::float8,
                        current_setting('server_version_num')::int >= 140000 AND NOT EXISTS (
                            SELECT 1 FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
                              LEFT JOIN pg_type el ON el.oid = ty.typelem AND ty.typcategory = 'A'
                              LEFT JOIN pg_collation co ON co.oid = a.attcollation
                             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                               AND (coalesce(el.oid, ty.oid) NOT IN ({portable}) OR NOT coalesce(co.collisdeterministic, true)))
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND {USER_SCHEMAS}"
            ),
            &[],
        )
        .await
        .map_err(q(db, "listing tables"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                Table {
                    key: r.get(1),
                    estimate: r.get(2),
                    portable: r.get(3),
                },
            )
        })
        .collect())
}

/// The text a row is bucketed and named by: its key, or the whole row.
fn key_text(key: &str) -> String {
    if key.is_empty() {
        "t::text".to_string()
    } else {
        format!("({key})::text")
    }
}

/// The bucket of a row, in `0..buckets`.
fn bucket_expr(key: &str, buckets: i64) -> String {
    format!(
        "((hashtextextended({}, 7) & 9223372036854775807) % {buckets})",
        key_text(key)
    )
}

/// How a row is hashed (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowHash {
    Record,
    Text,
}

impl RowHash {
    fn expr(self) -> &'static str {
        match self {
            RowHash::Record => "hash_record_extended(t, 0)",
            RowHash::Text => "hashtextextended(t::text, 0)",
        }
    }
}

/// A summary: rows, and the sum of their hashes.
type Summary = (i64, String);

/// The whole table's summary.
async fn summary(db: &Database, client: &Client, table: &str, hash: RowHash) -> Result<Summary> {
    let sql = format!(
        "SELECT count(*), coalesce(sum({})::text, '') FROM {table} t",
        hash.expr()
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(q(db, "checksumming a table"))?;
    Ok((row.get(0), row.get(1)))
}

/// Summaries of the non-empty buckets of a table.
async fn buckets(
    db: &Database,
    client: &Client,
    table: &str,
    key: &str,
    n: i64,
    hash: RowHash,
) -> Result<BTreeMap<i64, Summary>> {
    let sql = format!(
        "SELECT {b} AS b, count(*), sum({h})::text FROM {table} t GROUP BY 1",
        b = bucket_expr(key, n),
        h = hash.expr()
    );
    let rows = client.query(&sql, &[]).await.map_err(q(db, "checksumming a table"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), (r.get(1), r.get(2))))
        .collect())
}

/// (key text, row md5) of the rows of one bucket; rows without a key that
/// occur more than once are numbered so each is its own entry.
async fn bucket_rows(
    db: &Database,
    client: &Client,
    table: &str,
    key: &str,
    n: i64,
    bucket: i64,
) -> Result<BTreeMap<String, String>> {
    let sql = format!(
        "SELECT {k} AS k, md5(t::text) AS h FROM {table} t WHERE {b} = {bucket}",
        k = key_text(key),
        b = bucket_expr(key, n)
    );
    let rows = client.query(&sql, &[]).await.map_err(q(db, "reading differing rows"))?;
    let mut out = BTreeMap::new();
    for r in &rows {
        let (k, h): (String, String) = (r.get(0), r.get(1));
        let mut name = k.clone();
        let mut i = 1;
        while out.contains_key(&name) {
            i += 1;
            name = format!("{k} (copy {i})");
        }
        out.insert(name, h);
    }
    Ok(out)
}

/// Compares every table of source and target (see the module doc).
pub async fn verify(source: &Database, target: &Database) -> Result<Vec<TableDiff>> {
    let (s, t) = tokio::try_join!(source.connect(), target.connect())?;
    let (st, tt) = tokio::try_join!(tables(source, &s), tables(target, &t))?;
    let names: BTreeSet<&String> = st.keys().chain(tt.keys()).collect();
    let progress = crate::progress::Progress::items("verify", names.len() as u64, "tables");
    let mut out = Vec::new();
    for name in names {
        progress.inc();
        let (Some(a), Some(b)) = (st.get(name), tt.get(name)) else {
            out.push(one_sided(source, &s, target, &t, name, st.contains_key(name)).await?);
            continue;
        };
        let key = if a.key == b.key { a.key.clone() } else { String::new() };
        let hash = if a.portable && b.portable {
            RowHash::Record
        } else {
            RowHash::Text
        };
        let (sa, ta) = tokio::try_join!(summary(source, &s, name, hash), summary(target, &t, name, hash))?;
        let (source_rows, target_rows) = (sa.0, ta.0);
        let n = ((a.estimate / BUCKET_ROWS).ceil() as i64).clamp(1, MAX_BUCKETS);
        let differing: Vec<i64> = if sa == ta {
            Vec::new()
        } else {
            let (sb, tb) = tokio::try_join!(
                buckets(source, &s, name, &key, n, hash),
                buckets(target, &t, name, &key, n, hash)
            )?;
            sb.keys()
                .chain(tb.keys())
                .copied()
                .collect::<BTreeSet<i64>>()
                .into_iter()
                .filter(|b| sb.get(b) != tb.get(b))
                .collect()
        };
        let mut rows = Vec::new();
        for &b in &differing {
            if rows.len() >= MAX_ROWS {
                break;
            }
            let (a, z) = tokio::try_join!(
                bucket_rows(source, &s, name, &key, n, b),
                bucket_rows(target, &t, name, &key, n, b)
            )?;
            for (k, h) in &a {
                match z.get(k) {
                    None => rows.push(format!("{k}: missing in target")),
                    Some(h2) if h2 != h => rows.push(format!("{k}: changed")),
                    _ => {}
                }
            }
            for k in z.keys().filter(|k| !a.contains_key(*k)) {
                rows.push(format!("{k}: only in target"));
            }
        }
        rows.truncate(MAX_ROWS);
        out.push(TableDiff {
            table: name.clone(),
            source_rows: Some(source_rows),
            target_rows: Some(target_rows),
            status: if sa == ta { "ok".into() } else { "rows differ".into() },
            rows,
        });
    }
    Ok(out)
}

/// A table only one side has: its row count there.
async fn one_sided(
    source: &Database,
    s: &Client,
    target: &Database,
    t: &Client,
    name: &str,
    in_source: bool,
) -> Result<TableDiff> {
    let (db, client) = if in_source { (source, s) } else { (target, t) };
    let count: i64 = client
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .map_err(q(db, "counting rows"))?
        .get(0);
    Ok(TableDiff {
        table: name.to_string(),
        source_rows: in_source.then_some(count),
        target_rows: (!in_source).then_some(count),
        status: if in_source {
            "missing in target".into()
        } else {
            "missing in source".into()
        },
        rows: Vec::new(),
    })
}

/// The differences as a table for people.
pub fn render_diffs(diffs: &[TableDiff]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{:<40} {:>12} {:>12}  status", "TABLE", "SOURCE ROWS", "TARGET ROWS");
    for d in diffs {
        let n = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<40} {:>12} {:>12}  {}",
            d.table,
            n(d.source_rows),
            n(d.target_rows),
            d.status
        );
        for r in &d.rows {
            let _ = writeln!(s, "    {r}");
        }
    }
    let bad = diffs.iter().filter(|d| d.status != "ok").count();
    let _ = writeln!(s, "{} table(s), {bad} differ", diffs.len());
    s
}
