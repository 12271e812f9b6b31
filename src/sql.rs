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
    /// `-- backstop:ignore RULE reason` comments on the statement: on the
    /// lines just above it, inside it, or after it on its last line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignores: Vec<Ignore>,
}

/// A reviewer's suppression of one rule on one statement, with the reason
/// (`-- backstop:ignore BS301 the table holds 40 rows`). Several rules may be
/// named, comma-separated. The finding stays in the plan, the report and the
/// plan hash, marked ignored with the reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ignore {
    /// Rule ids or names as written.
    pub rules: Vec<String>,
    /// Empty when none was given (the suppression is then not applied).
    pub reason: String,
}

const IGNORE_MARK: &str = "backstop:ignore";

/// The suppressions in the comments of a statement: those in `leading`
/// (the comments above it; text before the first line break belongs to the
/// statement before), in `code` and in `trailing` (the rest of its last line).
fn ignores_of(leading: &str, at_line_start: bool, code: &str, trailing: &str) -> Vec<Ignore> {
    let leading = if at_line_start {
        leading
    } else {
        leading.split_once('\n').map(|(_, rest)| rest).unwrap_or("")
    };
    // After the statement on its line, only a comment right after its
    // semicolon is its own: one after a next statement is that one's.
    let trailing = trailing.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
    let trailing = if trailing.starts_with("--") || trailing.starts_with("/*") {
        trailing
    } else {
        ""
    };
    let mut out = Vec::new();
    for part in [leading, code, trailing] {
        if !part.contains(IGNORE_MARK) {
            continue;
        }
        let Ok(scan) = pg_query::scan(part) else { continue };
        for t in &scan.tokens {
            if t.token != Token::SqlComment as i32 && t.token != Token::CComment as i32 {
                continue;
            }
            let (Ok(a), Ok(b)) = (usize::try_from(t.start), usize::try_from(t.end)) else {
                continue;
            };
            let Some(comment) = part.get(a..b) else { continue };
            let body = comment
                .trim_start_matches("--")
                .trim_start_matches("/*")
                .trim_end_matches("*/");
            let Some((_, rest)) = body.split_once(IGNORE_MARK) else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let rules = words
                .next()
                .map(|r| r.split(',').filter(|r| !r.is_empty()).map(str::to_string).collect())
                .unwrap_or_default();
            out.push(Ignore {
                rules,
                reason: words.collect::<Vec<_>>().join(" "),
            });
        }
    }
    out
}

/// The largest statement backstop parses: a parse tree is many times the
/// size of its text, and one statement's tree is held whole.
pub const MAX_STATEMENT_BYTES: usize = 16 << 20;

/// Splits `text` into statements. `origin` names the source for messages and
/// `first_line` is the line of `text`'s first line in that source (1-based).
pub fn split(origin: &str, text: &str, first_line: usize) -> Result<Vec<Statement>, SqlError> {
    let mut out = Vec::new();
    split_each(origin, text, first_line, |statement, _| out.push(statement))?;
    Ok(out)
}

/// Splits `text` and hands each statement with its parse tree to `each`, in
/// order, holding one statement's tree at a time: time and memory grow with
/// the text, not with its square. The scanner finds the boundaries; each
/// piece is parsed on its own. Where a piece does not parse alone (a
/// `BEGIN ATOMIC` body holds semicolons the scanner splits at), the whole
/// text is parsed at once instead, which is exact but holds every tree.
pub fn split_each(
    origin: &str,
    text: &str,
    first_line: usize,
    each: impl FnMut(Statement, &NodeEnum),
) -> Result<(), SqlError> {
    split_inner(origin, text, first_line, each, None)
}

/// Like [`split_each`], for reading rather than running: what is not SQL is
/// handed to `bad` and the rest goes on. A statement that does not parse is
/// reported at its own line and the next one is read; a psql
/// meta-command line (`\set`, `\i`, ...) is reported as not SQL and left
/// out. Only text the scanner cannot read at all (an unterminated quote)
/// ends the file, reported once.
pub fn split_lenient(
    origin: &str,
    text: &str,
    first_line: usize,
    each: impl FnMut(Statement, &NodeEnum),
    mut bad: impl FnMut(SqlError),
) {
    let mut blanked = None;
    let mut at = 0;
    for (n, line_text) in text.split_inclusive('\n').enumerate() {
        if line_text.trim_start().starts_with('\\') {
            let command: String = line_text.trim().chars().take(60).collect();
            bad(SqlError {
                origin: origin.to_string(),
                line: first_line + n,
                message: format!(
                    "`{command}` is a psql meta-command, not SQL: backstop sends SQL only, so it is left out"
                ),
            });
            // Spaces keep every later offset, line and column where it was.
            let len = line_text.trim_end_matches('\n').len();
            let copy = blanked.get_or_insert_with(|| text.to_string());
            copy.replace_range(at..at + len, &" ".repeat(len));
        }
        at += line_text.len();
    }
    let text = blanked.as_deref().unwrap_or(text);
    if let Err(e) = split_inner(origin, text, first_line, each, Some(&mut bad)) {
        bad(e);
    }
}

/// [`split_each`]; with `bad`, pieces that do not parse are reported there
/// and skipped (unless they may be part of a larger statement).
fn split_inner(
    origin: &str,
    text: &str,
    first_line: usize,
    mut each: impl FnMut(Statement, &NodeEnum),
    mut bad: Option<&mut dyn FnMut(SqlError)>,
) -> Result<(), SqlError> {
    let pieces = match pg_query::split_with_scanner(text) {
        Ok(pieces) => pieces,
        Err(err) => return Err(locate_parse_error(origin, text, first_line, err)),
    };
    // Pieces are handed out in batches once parsed; `emitted` is where the
    // next batch starts (a fallback to the whole-text parse resumes there).
    let mut emitted = 0;
    let mut lines = LineCursor::new(text, first_line);
    let mut parsed = Vec::new();
    // The scanner leaves out text it cannot make a statement of (`SELEC x;`
    // comes back as nothing): what lies between its pieces, other than
    // semicolons, blanks and comments, is handed on as a piece of its own,
    // so it fails to parse instead of vanishing.
    let mut pieces_and_gaps = Vec::with_capacity(pieces.len());
    let mut end = 0;
    for piece in pieces.iter().copied().chain(std::iter::once(&text[text.len()..])) {
        let start = piece.as_ptr() as usize - text.as_ptr() as usize;
        if let Some(gap) = text.get(end..start).filter(|gap| has_code(gap)) {
            pieces_and_gaps.push(gap.trim_start_matches(|c: char| c.is_whitespace() || c == ';'));
        }
        if !piece.is_empty() {
            pieces_and_gaps.push(piece);
        }
        end = start + piece.len();
    }
    for piece in pieces_and_gaps {
        let start = piece.as_ptr() as usize - text.as_ptr() as usize;
        let lead = code_start(piece);
        let (line, column) = lines.at(start + lead);
        if piece.len() > MAX_STATEMENT_BYTES {
            let too_big = SqlError {
                origin: origin.to_string(),
                line,
                message: format!(
                    "the statement is {} MiB, above the {} MiB backstop parses; split it into smaller statements",
                    piece.len() >> 20,
                    MAX_STATEMENT_BYTES >> 20
                ),
            };
            match bad.as_mut() {
                Some(report) => {
                    report(too_big);
                    continue;
                }
                None => return Err(too_big),
            }
        }
        match pg_query::parse(piece, 0) {
            Ok(tree) => {
                let end = start + piece.len();
                let trailing = text[end..].split('\n').next().unwrap_or("");
                let at_line_start = start == 0 || text.as_bytes()[start - 1] == b'\n';
                let ignores = ignores_of(&piece[..lead], at_line_start, &piece[lead..], trailing);
                parsed.push((&piece[lead..], line, column, tree, ignores))
            }
            Err(err) => {
                for (piece, line, column, tree, ignores) in parsed.drain(..) {
                    hand_out(origin, piece, line, column, &tree, ignores, &mut each);
                }
                // Only a body with semicolons of its own (`BEGIN ATOMIC`, a
                // rule's action list) needs the whole text; any other piece
                // that does not parse is a statement of its own.
                let upper = piece.to_ascii_uppercase();
                let whole = upper.contains("ATOMIC") || upper.contains("RULE");
                if whole {
                    return split_whole(origin, text, first_line, emitted.max(start), each);
                }
                let broken = SqlError {
                    origin: origin.to_string(),
                    line,
                    message: message_of(err),
                };
                match bad.as_mut() {
                    Some(report) => {
                        report(broken);
                        emitted = start + piece.len();
                        continue;
                    }
                    None => return Err(broken),
                }
            }
        }
        // Hand out in batches so trees do not pile up.
        if parsed.len() >= 256 {
            for (piece, line, column, tree, ignores) in parsed.drain(..) {
                hand_out(origin, piece, line, column, &tree, ignores, &mut each);
            }
            emitted = start + piece.len();
        }
    }
    for (piece, line, column, tree, ignores) in parsed {
        hand_out(origin, piece, line, column, &tree, ignores, &mut each);
    }
    Ok(())
}

/// Hands out the statements of one parsed piece (a piece holds one, or none
/// when it is only a comment).
fn hand_out(
    origin: &str,
    piece: &str,
    line: usize,
    column: usize,
    tree: &pg_query::ParseResult,
    ignores: Vec<Ignore>,
    each: &mut impl FnMut(Statement, &NodeEnum),
) {
    for raw in &tree.protobuf.stmts {
        if let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) {
            emit(origin, piece, line, column, node, ignores.clone(), each);
        }
    }
}

fn emit(
    origin: &str,
    piece: &str,
    line: usize,
    column: usize,
    node: &NodeEnum,
    ignores: Vec<Ignore>,
    each: &mut impl FnMut(Statement, &NodeEnum),
) {
    let sql = piece.trim().trim_end_matches(';').trim_end().to_string();
    if sql.is_empty() {
        return;
    }
    each(
        Statement {
            normalized: normalize(&sql),
            sql,
            origin: origin.to_string(),
            line,
            column,
            transactional: can_run_in_transaction(node),
            kind: kind_name(node),
            ignores,
        },
        node,
    );
}

/// The exact split for texts the scanner splits wrongly: one parse of the
/// whole text, which gives boundaries and trees together. Statements that
/// start before `skip_before` were handed out already.
fn split_whole(
    origin: &str,
    text: &str,
    first_line: usize,
    skip_before: usize,
    mut each: impl FnMut(Statement, &NodeEnum),
) -> Result<(), SqlError> {
    let parsed = match pg_query::parse(text, 0) {
        Ok(parsed) => parsed,
        Err(err) => return Err(locate_parse_error(origin, text, first_line, err)),
    };
    let mut lines = LineCursor::new(text, first_line);
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(text.len());
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => text.len(),
            Ok(len) => (start + len).min(text.len()),
        };
        let Some(piece) = text.get(start..end) else { continue };
        let lead = code_start(piece);
        let (line, column) = lines.at(start + lead);
        if end <= skip_before {
            continue;
        }
        let trailing = text[end..].split('\n').next().unwrap_or("");
        let at_line_start = start == 0 || text.as_bytes()[start - 1] == b'\n';
        let ignores = ignores_of(&piece[..lead], at_line_start, &piece[lead..], trailing);
        let piece = &piece[lead..];
        if let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) {
            emit(origin, piece, line, column, node, ignores, &mut each);
        }
    }
    Ok(())
}

/// Whether `gap` (text between the scanner's statements) holds anything
/// but semicolons, blanks and comments.
fn has_code(gap: &str) -> bool {
    let mut rest = gap;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map(|(_, r)| r).unwrap_or("");
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map(|(_, r)| r).unwrap_or("");
        } else {
            return !rest.is_empty();
        }
    }
}

/// Where the statement's code starts in `piece`: after whitespace and the
/// comments before it, so that its line is the statement's own.
fn code_start(piece: &str) -> usize {
    let lead = piece.len() - piece.trim_start().len();
    let rest = &piece[lead..];
    if !(rest.starts_with("--") || rest.starts_with("/*")) {
        return lead;
    }
    let Ok(scan) = pg_query::scan(piece) else {
        return lead;
    };
    scan.tokens
        .iter()
        .find(|t| t.token != Token::SqlComment as i32 && t.token != Token::CComment as i32)
        .and_then(|t| usize::try_from(t.start).ok())
        .filter(|s| piece.is_char_boundary(*s))
        .unwrap_or(lead)
}

/// Line and column of increasing byte offsets, counting each byte once.
struct LineCursor<'a> {
    text: &'a str,
    offset: usize,
    line: usize,
    line_start: usize,
}

impl<'a> LineCursor<'a> {
    fn new(text: &'a str, first_line: usize) -> Self {
        LineCursor {
            text,
            offset: 0,
            line: first_line,
            line_start: 0,
        }
    }

    /// 1-based line and column of `offset` (not before the previous one).
    fn at(&mut self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len()).max(self.offset);
        let bytes = &self.text.as_bytes()[self.offset..offset];
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'\n' {
                self.line += 1;
                self.line_start = self.offset + i + 1;
            }
        }
        self.offset = offset;
        (self.line, offset - self.line_start + 1)
    }
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

/// Whether option `name` is on in a parenthesised option list
/// (`VACUUM (FULL false)`, `REINDEX (CONCURRENTLY off)`): present and not
/// turned off by its value.
pub fn option_on(options: &[pg_query::Node], name: &str) -> bool {
    options.iter().any(|p| match &p.node {
        Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case(name) => {
            match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
                None => true,
                Some(NodeEnum::String(v)) => {
                    !matches!(v.sval.to_ascii_lowercase().as_str(), "false" | "off" | "0" | "no")
                }
                Some(NodeEnum::Integer(v)) => v.ival != 0,
                Some(NodeEnum::Boolean(v)) => v.boolval,
                Some(_) => true,
            }
        }
        _ => false,
    })
}

/// PostgreSQL refuses these inside a transaction block.
pub fn can_run_in_transaction(node: &NodeEnum) -> bool {
    match node {
        NodeEnum::IndexStmt(s) => !s.concurrent,
        NodeEnum::DropStmt(s) => !s.concurrent,
        NodeEnum::VacuumStmt(s) => !s.is_vacuumcmd,
        NodeEnum::ReindexStmt(s) => !option_on(&s.params, "concurrently"),
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
    fn a_statement_over_the_limit_is_refused_naming_its_line() {
        let huge = format!(
            "SELECT 1;\nSELECT 2;\nINSERT INTO t VALUES ('{}');",
            "x".repeat(MAX_STATEMENT_BYTES)
        );
        let err = split("big.sql", &huge, 1).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("above the 16 MiB"), "{}", err.message);
    }

    #[test]
    fn a_begin_atomic_body_is_split_exactly_even_after_many_statements() {
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(&format!("SELECT {i};\n"));
        }
        text.push_str("CREATE FUNCTION f() RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT 1;\n  SELECT 2;\nEND;\nSELECT 'after';\n");
        let statements = split("f.sql", &text, 1).unwrap();
        assert_eq!(
            statements.len(),
            302,
            "{:?}",
            statements.iter().map(|s| &s.sql).collect::<Vec<_>>()
        );
        for (i, s) in statements.iter().take(300).enumerate() {
            assert_eq!((s.sql.as_str(), s.line), (format!("SELECT {i}").as_str(), i + 1));
        }
        assert_eq!(statements[300].kind, "CreateFunctionStmt");
        assert_eq!(statements[300].line, 301);
        assert_eq!(
            (statements[301].sql.as_str(), statements[301].line),
            ("SELECT 'after'", 306)
        );
    }

    #[test]
    fn lines_and_columns_follow_the_text() {
        let text = "-- head\nSELECT 1; SELECT 2;\n\n  SELECT\n 3;";
        let statements = split("x.sql", text, 10).unwrap();
        let at: Vec<(usize, usize)> = statements.iter().map(|s| (s.line, s.column)).collect();
        assert_eq!(at, vec![(11, 1), (11, 11), (13, 3)]);
    }

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

#[cfg(test)]
mod lenient_tests {
    use super::*;

    #[test]
    fn text_the_scanner_cannot_make_a_statement_of_is_an_error_not_skipped() {
        // pg_query's scanner split returns nothing for `SELEC broken`: a
        // migration must not lose a statement to a typo.
        let text = "CREATE TABLE a (id int);\n-- note\nSELEC broken;\nALTER TABLE a ADD COLUMN b int;";
        let e = split_each("m.sql", text, 1, |_, _| {}).unwrap_err();
        assert_eq!(e.line, 3, "{e:?}");
        assert!(e.message.contains("syntax error"), "{e:?}");
        assert!(!has_code(" ;\n-- c\n/* d */ ;"));
        assert!(has_code(";\nSELEC x"));
    }

    #[test]
    fn a_statement_that_does_not_parse_is_reported_at_its_line_and_the_next_ones_are_read() {
        let text = "CREATE TABLE a (id int);\nSELEC broken;\n\\set x 1\nALTER TABLE a ADD COLUMN b int;\n";
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        split_lenient(
            "m.sql",
            text,
            1,
            |s, _| good.push((s.line, s.sql)),
            |e| bad.push((e.line, e.message)),
        );
        assert_eq!(
            good,
            vec![
                (1, "CREATE TABLE a (id int)".to_string()),
                (4, "ALTER TABLE a ADD COLUMN b int".to_string())
            ]
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!(bad[0].0, 3, "{bad:?}");
        assert!(bad[0].1.contains("psql meta-command"), "{bad:?}");
        assert_eq!(bad[1].0, 2, "{bad:?}");
        assert!(bad[1].1.contains("syntax error"), "{bad:?}");
    }
}
