//! SQL text handling with the real PostgreSQL grammar (`pg_query`): splitting a
//! migration into statements, finding those that cannot run inside a
//! transaction, and the normalized form that migration checksums are taken over.

use pg_query::protobuf::{AlterTableType, Token};
use pg_query::NodeEnum;
use sha2::{Digest, Sha256};

/// A SQL text that does not parse, located in the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{origin}:{line}: SQL does not parse: {message}")]
pub struct SqlError {
    /// Where the text came from (`file` or `file#data-key`).
    pub origin: String,
    /// 1-based line of the offending statement.
    pub line: usize,
    /// What the PostgreSQL parser said.
    pub message: String,
}

/// One statement of a migration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    /// The statement as written (without the trailing semicolon).
    pub sql: String,
    /// Where it came from (`file` or `file#data-key`).
    pub origin: String,
    /// 1-based line where the statement starts in its origin.
    pub line: usize,
    /// 1-based column of the statement's first character on that line.
    #[serde(default)]
    pub column: usize,
    /// Whether PostgreSQL can run it inside a transaction block.
    pub transactional: bool,
    /// The statement's tokens joined by single spaces: comments and layout removed.
    pub normalized: String,
    /// Statement kind as PostgreSQL names it (`CreateStmt`, `IndexStmt`, ...).
    pub kind: String,
}

/// Splits `text` into statements. `origin` names the source for messages and
/// `first_line` is the line of `text`'s first line in that source (1-based).
pub fn split(origin: &str, text: &str, first_line: usize) -> Result<Vec<Statement>, SqlError> {
    // One parse gives both the statement boundaries and their trees.
    let parsed = match pg_query::parse(text, 0) {
        Ok(parsed) => parsed,
        Err(err) => return Err(locate_parse_error(origin, text, first_line, err)),
    };
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(text.len());
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => text.len(),
            Ok(len) => (start + len).min(text.len()),
        };
        let Some(piece) = text.get(start..end) else { continue };
        let lead = piece.len() - piece.trim_start().len();
        let before = &text[..start + lead];
        let line = first_line + before.matches('\n').count();
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        let sql = piece.trim().trim_end_matches(';').trim_end().to_string();
        if sql.is_empty() {
            continue;
        }
        let (kind, transactional) = raw
            .stmt
            .as_ref()
            .and_then(|node| node.node.as_ref())
            .map(|node| (kind_name(node), can_run_in_transaction(node)))
            .unwrap_or_else(|| ("Empty".to_string(), true));
        out.push(Statement {
            normalized: normalize(&sql),
            sql,
            origin: origin.to_string(),
            line,
            column,
            transactional,
            kind,
        });
    }
    Ok(out)
}

/// The parser's message without the wrapper's prefix.
fn message_of(err: pg_query::Error) -> String {
    match err {
        pg_query::Error::Parse(m) | pg_query::Error::Split(m) | pg_query::Error::Scan(m) => m,
        other => other.to_string(),
    }
}

/// `split_with_parser` reports no position: find the first statement (split
/// by the scanner, which never fails) that does not parse and name its line.
fn locate_parse_error(origin: &str, text: &str, first_line: usize, err: pg_query::Error) -> SqlError {
    let mut line = first_line;
    if let Ok(pieces) = pg_query::split_with_scanner(text) {
        for piece in pieces {
            if pg_query::parse(piece, 0).is_err() {
                let offset = piece.as_ptr() as usize - text.as_ptr() as usize;
                let lead = piece.len() - piece.trim_start().len();
                line = first_line + text[..offset + lead].matches('\n').count();
                break;
            }
        }
    }
    SqlError {
        origin: origin.to_string(),
        line,
        message: message_of(err),
    }
}

/// The statement's node type name, e.g. `IndexStmt`: the variant name that
/// `Debug` writes first (formatting stops there instead of printing the tree).
fn kind_name(node: &NodeEnum) -> String {
    struct UntilParen(String);
    impl std::fmt::Write for UntilParen {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            match s.find('(') {
                Some(i) => {
                    self.0.push_str(&s[..i]);
                    Err(std::fmt::Error)
                }
                None => {
                    self.0.push_str(s);
                    Ok(())
                }
            }
        }
    }
    let mut name = UntilParen(String::new());
    let _ = std::fmt::Write::write_fmt(&mut name, format_args!("{node:?}"));
    name.0
}

/// PostgreSQL refuses these inside a transaction block.
pub fn can_run_in_transaction(node: &NodeEnum) -> bool {
    match node {
        NodeEnum::IndexStmt(s) => !s.concurrent,
        NodeEnum::DropStmt(s) => !s.concurrent,
        NodeEnum::VacuumStmt(s) => !s.is_vacuumcmd,
        NodeEnum::ReindexStmt(s) => !s
            .params
            .iter()
            .any(|p| matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("concurrently"))),
        NodeEnum::AlterTableStmt(s) => !s.cmds.iter().any(|cmd| match &cmd.node {
            Some(NodeEnum::AlterTableCmd(c)) => {
                c.subtype == AlterTableType::AtDetachPartition as i32
                    && matches!(
                        c.def.as_deref().and_then(|d| d.node.as_ref()),
                        Some(NodeEnum::PartitionCmd(p)) if p.concurrent
                    )
            }
            _ => false,
        }),
        NodeEnum::AlterSystemStmt(_)
        | NodeEnum::CreatedbStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_) => false,
        _ => true,
    }
}

/// Whether the statement controls transactions itself (`BEGIN`, `COMMIT`, ...).
pub fn is_transaction_control(statement: &Statement) -> bool {
    statement.kind == "TransactionStmt"
}

/// Tokens joined by single spaces: insensitive to layout and comments,
/// sensitive to everything PostgreSQL would execute.
pub fn normalize(sql: &str) -> String {
    let Ok(scan) = pg_query::scan(sql) else {
        return sql.split_whitespace().collect::<Vec<_>>().join(" ");
    };
    let mut out = String::with_capacity(sql.len());
    for token in scan.tokens {
        if token.token == Token::SqlComment as i32 || token.token == Token::CComment as i32 {
            continue;
        }
        let (Ok(start), Ok(end)) = (usize::try_from(token.start), usize::try_from(token.end)) else {
            continue;
        };
        if let Some(text) = sql.get(start..end) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(text);
        }
    }
    out
}

/// sha256 over the normalized statements, one per line: the migration checksum.
pub fn checksum<'a>(statements: impl IntoIterator<Item = &'a Statement>) -> String {
    let mut hasher = Sha256::new();
    for s in statements {
        hasher.update(s.normalized.as_bytes());
        hasher.update(b";\n");
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_reports_lines_and_transactional_flag() {
        let text = "-- header\nCREATE TABLE t (id int);\n\nCREATE INDEX CONCURRENTLY t_id ON t (id);\n";
        let stmts = split("m.sql", text, 1).unwrap();
        assert_eq!(stmts.len(), 2);
        assert_eq!(stmts[0].line, 2);
        assert!(stmts[0].transactional);
        assert_eq!(stmts[1].line, 4);
        assert!(!stmts[1].transactional);
        assert_eq!(stmts[1].kind, "IndexStmt");
    }

    #[test]
    fn parse_error_names_the_line_of_the_bad_statement() {
        let text = "SELECT 1;\nSELECT 2;\nCREAT TABLE x (id int);\n";
        let err = split("m.sql", text, 10).unwrap_err();
        assert_eq!(err.line, 12);
        assert!(err.to_string().starts_with("m.sql:12: SQL does not parse"), "{err}");
    }

    #[test]
    fn normalization_ignores_comments_and_layout_but_not_constants() {
        assert_eq!(normalize("SELECT  1 -- x\n , 2"), normalize("SELECT 1, /* y */ 2"));
        assert_ne!(normalize("SELECT 1"), normalize("SELECT 2"));
    }

    #[test]
    fn non_transactional_statements_are_recognised() {
        for sql in [
            "VACUUM t",
            "ALTER SYSTEM SET work_mem = '4MB'",
            "CREATE DATABASE x",
            "REINDEX (CONCURRENTLY) INDEX i",
            "REINDEX INDEX CONCURRENTLY i",
            "DROP INDEX CONCURRENTLY i",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
        ] {
            let s = split("x", sql, 1).unwrap();
            assert!(!s[0].transactional, "{sql}");
        }
        for sql in [
            "ANALYZE t",
            "CREATE INDEX i ON t (a)",
            "ALTER TABLE p DETACH PARTITION c",
        ] {
            let s = split("x", sql, 1).unwrap();
            assert!(s[0].transactional, "{sql}");
        }
    }
}
