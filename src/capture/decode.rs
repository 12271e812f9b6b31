//! Reading `test_decoding` output into typed changes, and writing them back
//! as SQL a person can read and `backstop replay` can apply.
//!
//! `test_decoding` (with `include-xids` and `include-timestamp`) prints:
//!
//! ```text
//! BEGIN 741
//! table public.orders: INSERT: id[bigint]:4 customer[text]:'ada' note[text]:null
//! table public.orders: UPDATE: old-key: id[bigint]:4 new-tuple: id[bigint]:5 ...
//! table public.orders: DELETE: id[bigint]:4
//! COMMIT 741 (at 2026-12-04 18:10:01.123456+00)
//! ```

use serde::{Deserialize, Serialize};

/// A column value: its text (None: SQL NULL) and its type as PostgreSQL
/// names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    pub column: String,
    pub ty: String,
    pub text: Option<String>,
    /// A TOASTed value the UPDATE did not change (WAL does not carry it):
    /// left out of the statement.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        }
    }
}

/// One row change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `schema.table`, quoted where PostgreSQL quotes it.
    pub table: String,
    pub op: Op,
    /// The key before an UPDATE that changed it (or the whole old row with
    /// REPLICA IDENTITY FULL); the key of a DELETE.
    pub old: Vec<Value>,
    /// The row after an INSERT or UPDATE.
    pub new: Vec<Value>,
}

/// One source transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub xid: u32,
    /// As `test_decoding` prints it.
    pub committed_at: String,
    /// The LSN of its COMMIT.
    pub commit_lsn: String,
    pub changes: Vec<Change>,
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line:?}: {why}")]
pub struct DecodeError {
    pub line: String,
    pub why: &'static str,
}

fn bad(line: &str, why: &'static str) -> DecodeError {
    DecodeError {
        line: line.chars().take(200).collect(),
        why,
    }
}

/// Folds `(lsn, data)` rows of `pg_logical_slot_peek_changes` into
/// committed transactions, in commit order.
pub fn transactions<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Vec<Txn>, DecodeError> {
    let mut out = Vec::new();
    let mut open: Option<Txn> = None;
    for (lsn, line) in rows {
        if let Some(rest) = line.strip_prefix("BEGIN ") {
            let xid = rest.trim().parse().map_err(|_| bad(line, "BEGIN without an xid"))?;
            open = Some(Txn {
                xid,
                committed_at: String::new(),
                commit_lsn: String::new(),
                changes: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("COMMIT ") {
            let mut txn = open.take().ok_or_else(|| bad(line, "COMMIT without BEGIN"))?;
            txn.committed_at = rest
                .split_once("(at ")
                .map(|(_, t)| t.trim_end_matches(')').to_string())
                .unwrap_or_default();
            txn.commit_lsn = lsn.to_string();
            out.push(txn);
        } else if let Some(rest) = line.strip_prefix("table ") {
            let txn = open
                .as_mut()
                .ok_or_else(|| bad(line, "a change outside a transaction"))?;
            txn.changes.push(change(line, rest)?);
        } else if line.starts_with("message:") {
            // Logical messages (backstop's own markers) are not writes.
        } else {
            return Err(bad(line, "not a test_decoding line"));
        }
    }
    Ok(out)
}

/// `public.orders: INSERT: ...`
fn change(line: &str, rest: &str) -> Result<Change, DecodeError> {
    let (table, rest) = split_table(rest).ok_or_else(|| bad(line, "no table name"))?;
    let (op, body) = rest.split_once(": ").unwrap_or((rest.trim_end_matches(':'), ""));
    let op = match op {
        "INSERT" => Op::Insert,
        "UPDATE" => Op::Update,
        "DELETE" => Op::Delete,
        "TRUNCATE" => Op::Truncate,
        _ => return Err(bad(line, "unknown operation")),
    };
    let (mut old, mut new) = (Vec::new(), Vec::new());
    match op {
        Op::Truncate => {}
        Op::Delete => old = values(line, body)?,
        Op::Insert => new = values(line, body)?,
        Op::Update => match body.strip_prefix("old-key: ") {
            Some(both) => {
                let (o, n) = both
                    .split_once(" new-tuple: ")
                    .ok_or_else(|| bad(line, "old-key without new-tuple"))?;
                old = values(line, o)?;
                new = values(line, n)?;
            }
            None => new = values(line, body)?,
        },
    }
    Ok(Change { table, op, old, new })
}

/// The table name (which may hold `": "` inside quotes) and what follows it.
fn split_table(s: &str) -> Option<(String, &str)> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ':' if !quoted && s[i..].starts_with(": ") => return Some((s[..i].to_string(), &s[i + 2..])),
            _ => {}
        }
    }
    None
}

/// `id[bigint]:4 customer[text]:'it''s' note[text]:null`
fn values(line: &str, s: &str) -> Result<Vec<Value>, DecodeError> {
    let s = s.trim();
    if s.is_empty() || s == "(no-tuple-data)" {
        return Ok(Vec::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        // Column name, possibly quoted, up to '['.
        let start = i;
        let mut quoted = false;
        while i < b.len() && (quoted || b[i] != b'[') {
            if b[i] == b'"' {
                quoted = !quoted;
            }
            i += 1;
        }
        let column = s.get(start..i).ok_or_else(|| bad(line, "column name"))?.to_string();
        // Type, up to the "]:" that closes it (types hold brackets: int[]).
        let ty_start = i + 1;
        let close = s[ty_start.min(s.len())..]
            .find("]:")
            .map(|p| p + ty_start)
            .ok_or_else(|| bad(line, "column type"))?;
        let ty = s[ty_start..close].to_string();
        i = close + 2;
        let mut unchanged = false;
        let text = if b.get(i) == Some(&b'\'') {
            let mut v = String::new();
            i += 1;
            loop {
                match s[i..].find('\'') {
                    None => return Err(bad(line, "unterminated quoted value")),
                    Some(p) => {
                        v.push_str(&s[i..i + p]);
                        i += p + 1;
                        if b.get(i) == Some(&b'\'') {
                            v.push('\'');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            Some(v)
        } else {
            let end = s[i..].find(' ').map(|p| p + i).unwrap_or(s.len());
            let raw = &s[i..end];
            i = end;
            match raw {
                "null" => None,
                v if v.starts_with("B'") && v.ends_with('\'') && v.len() >= 3 => Some(v[2..v.len() - 1].to_string()),
                "unchanged-toast-datum" => {
                    unchanged = true;
                    None
                }
                v => Some(v.to_string()),
            }
        };
        out.push(Value {
            column,
            ty,
            text,
            unchanged,
        });
    }
    Ok(out)
}

/// `'text'`, or NULL. Untyped: PostgreSQL reads it as the column's own
/// type, typmod included (decoding names types without their typmod, and
/// `'abc'::character` would be `char(1)`).
pub fn literal(v: &Value) -> String {
    match &v.text {
        None => "NULL".into(),
        Some(t) => format!("'{}'", t.replace('\'', "''")),
    }
}

/// `col = literal AND ...` (IS NULL for nulls).
pub fn matches(values: &[Value]) -> String {
    values
        .iter()
        .filter(|v| !v.unchanged)
        .map(|v| match v.text {
            None => format!("{} IS NULL", v.column),
            Some(_) => format!("{} = {}", v.column, literal(v)),
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// What finds `c`'s row: its old image as decoded (the whole row with
/// `REPLICA IDENTITY FULL`, else the key), or for an UPDATE that left the
/// key alone (decoded with no old image) the key columns of its new row.
pub fn old_image(c: &Change, key: &[String]) -> Vec<Value> {
    match (c.op, c.old.is_empty()) {
        (Op::Update, true) => c.new.iter().filter(|v| key.contains(&v.column)).cloned().collect(),
        _ => c.old.clone(),
    }
}

/// The statement that redoes `c`; `key` names the columns that identify a
/// row of its table (its primary key), used when the change carries no old
/// key of its own. None when it cannot be redone safely (no key).
pub fn statement(c: &Change, key: &[String]) -> Option<String> {
    match c.op {
        Op::Insert => Some(format!(
            "INSERT INTO {} ({}) VALUES ({})",
            c.table,
            c.new.iter().map(|v| v.column.as_str()).collect::<Vec<_>>().join(", "),
            c.new.iter().map(literal).collect::<Vec<_>>().join(", ")
        )),
        Op::Update => {
            let old = old_image(c, key);
            if old.is_empty() {
                return None;
            }
            Some(format!(
                "UPDATE {} SET {} WHERE {}",
                c.table,
                c.new
                    .iter()
                    .filter(|v| !v.unchanged)
                    .map(|v| format!("{} = {}", v.column, literal(v)))
                    .collect::<Vec<_>>()
                    .join(", "),
                matches(&old)
            ))
        }
        Op::Delete => (!c.old.is_empty()).then(|| format!("DELETE FROM {} WHERE {}", c.table, matches(&c.old))),
        // Never redone by a program: it would erase what was written since.
        Op::Truncate => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_decoding_lines_become_transactions_with_typed_values() {
        let rows = [
            ("0/1", "BEGIN 741"),
            ("0/2", "table public.orders: INSERT: id[bigint]:4 customer[text]:'it''s: x' note[text]:null tags[text[]]:'{a,b}'"),
            ("0/3", "table public.\"Odd: Name\": UPDATE: old-key: id[bigint]:4 new-tuple: id[bigint]:5 customer[text]:'y'"),
            ("0/4", "table public.orders: UPDATE: id[bigint]:5 customer[text]:'z'"),
            ("0/5", "table public.orders: DELETE: id[bigint]:5"),
            ("0/6", "COMMIT 741 (at 2026-12-04 18:10:01.123456+00)"),
        ];
        let txns = transactions(rows).unwrap();
        assert_eq!(txns.len(), 1);
        let t = &txns[0];
        assert_eq!((t.xid, t.commit_lsn.as_str()), (741, "0/6"));
        assert_eq!(t.committed_at, "2026-12-04 18:10:01.123456+00");
        assert_eq!(t.changes[0].new[1].text.as_deref(), Some("it's: x"));
        assert_eq!(t.changes[0].new[2].text, None);
        assert_eq!(t.changes[0].new[3].ty, "text[]");
        assert_eq!(t.changes[1].table, "public.\"Odd: Name\"");
        assert_eq!(t.changes[1].old[0].text.as_deref(), Some("4"));
        let key = vec!["id".to_string()];
        assert_eq!(
            statement(&t.changes[0], &key).unwrap(),
            "INSERT INTO public.orders (id, customer, note, tags) VALUES ('4', 'it''s: x', NULL, '{a,b}')"
        );
        assert_eq!(
            statement(&t.changes[2], &key).unwrap(),
            "UPDATE public.orders SET id = '5', customer = 'z' WHERE id = '5'"
        );
        assert_eq!(
            statement(&t.changes[3], &key).unwrap(),
            "DELETE FROM public.orders WHERE id = '5'"
        );
        assert_eq!(statement(&t.changes[2], &[]), None, "no key: not redone blindly");
    }

    #[test]
    fn hostile_or_broken_lines_are_errors_not_guesses() {
        for line in [
            "table public.orders: INSERT: id[bigint]:'unterminated",
            "table public.orders: MERGE: id[bigint]:1",
            "DROP TABLE orders",
        ] {
            let rows = [("0/1", "BEGIN 1"), ("0/2", line), ("0/3", "COMMIT 1")];
            assert!(transactions(rows).is_err(), "{line}");
        }
        assert!(transactions([("0/1", "COMMIT 1")]).is_err());
        // An unchanged TOAST value is left out, not guessed; TRUNCATE is never redone.
        let rows = [
            ("0/1", "BEGIN 1"),
            (
                "0/2",
                "table public.t: UPDATE: id[bigint]:1 big[text]:unchanged-toast-datum n[integer]:2",
            ),
            ("0/3", "table public.t: TRUNCATE: (no-flags)"),
            ("0/4", "COMMIT 1"),
        ];
        let t = &transactions(rows).unwrap()[0];
        assert_eq!(
            statement(&t.changes[0], &["id".to_string()]).unwrap(),
            "UPDATE public.t SET id = '1', n = '2' WHERE id = '1'"
        );
        assert_eq!(statement(&t.changes[1], &[]), None);
    }
}
