//! Bounds on hostile or malformed input, checked before anything is built
//! from it: the size of a YAML file, its nesting depth (found by a cheap scan:
//! the YAML parser takes time quadratic in the depth of flow collections, 21 s
//! for 100,000 brackets, before its own recursion limit answers), a leading
//! UTF-8 byte order mark, the character set of migration ids, the bound of
//! `backstop.dev/timeout` and the shape of a carrier's `metadata`.

use std::time::Duration;

use super::{DocContext, ManifestError, PREFIX};

/// Largest YAML file read (4 MiB).
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// Deepest nesting of collections in a YAML document.
pub const MAX_DEPTH: usize = 64;
/// Longest migration id.
pub const MAX_ID_LEN: usize = 128;
/// Longest `backstop.dev/timeout` (PostgreSQL's statement_timeout stops at ~24.8 days).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `text` without a leading UTF-8 byte order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// The error for a YAML file over [`MAX_FILE_BYTES`], if it is.
pub fn check_size(file: &str, len: usize) -> Result<(), ManifestError> {
    if len <= MAX_FILE_BYTES {
        return Ok(());
    }
    Err(ManifestError {
        file: file.into(),
        line: 1,
        key: None,
        message: format!(
            "file is larger than the size limit of 4 MiB ({MAX_FILE_BYTES} bytes) for YAML input; refusing to parse it"
        ),
    })
}

/// The error for a document nested deeper than [`MAX_DEPTH`], at the line
/// where the limit is crossed.
pub fn check_depth(file: &str, text: &str, first_line: usize) -> Result<(), ManifestError> {
    match deeper_than(text, MAX_DEPTH) {
        None => Ok(()),
        Some(line) => Err(ManifestError {
            file: file.into(),
            line: first_line + line - 1,
            key: None,
            message: format!(
                "YAML is nested deeper than the nesting limit of {MAX_DEPTH} levels; refusing to parse it"
            ),
        }),
    }
}

/// How a character is named in an error (never the raw character: ids end up
/// on terminals and in reports).
fn describe(c: char) -> String {
    if c.is_control() {
        format!("the control character U+{:04X}", c as u32)
    } else if !c.is_ascii() {
        format!("the non-ASCII character {c:?} (U+{:04X})", c as u32)
    } else if c == ' ' {
        "a space".into()
    } else {
        format!("the character {c:?}")
    }
}

/// Checks a migration id: ASCII letters, digits, `.`, `_` and `-`, starting
/// with a letter or digit, at most [`MAX_ID_LEN`] characters.
pub fn check_id(id: &str) -> Result<(), String> {
    const ALLOWED: &str = "only ASCII letters, digits, '.', '_' and '-' are allowed";
    let Some(first) = id.chars().next() else {
        return Err("migration id must not be empty".into());
    };
    if let Some((i, c)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "migration id contains {} at character {}; {ALLOWED}",
            describe(c),
            i + 1
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "migration id must start with an ASCII letter or digit, not {}",
            describe(first)
        ));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "migration id is {} characters long; the limit is {MAX_ID_LEN}",
            id.len()
        ));
    }
    Ok(())
}

/// Checks an annotation value for control characters (line breaks and tabs
/// are fine: `verify` may be SQL over several lines).
pub fn check_value(value: &str) -> Result<(), String> {
    match value
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        Some(c) => Err(format!(
            "value contains {}; annotation values must be printable text",
            describe(c)
        )),
        None => Ok(()),
    }
}

/// Checks `backstop.dev/timeout` (already parsed, so greater than 0).
pub fn check_timeout(text: &str, timeout: Duration) -> Result<(), String> {
    if timeout > MAX_TIMEOUT {
        return Err(format!(
            "{:?} is longer than the limit of 24h ({} seconds)",
            text.trim(),
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(())
}

/// What a YAML value is, for errors.
pub fn kind_of(value: &serde_yaml::Value) -> &'static str {
    match value {
        serde_yaml::Value::Null => "null",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}

/// Whether any key or string of `value` mentions the annotation prefix.
fn mentions_prefix(value: &serde_yaml::Value) -> bool {
    match value {
        serde_yaml::Value::String(s) => s.contains(PREFIX),
        serde_yaml::Value::Sequence(items) => items.iter().any(mentions_prefix),
        serde_yaml::Value::Mapping(m) => m.iter().any(|(k, v)| mentions_prefix(k) || mentions_prefix(v)),
        serde_yaml::Value::Tagged(t) => mentions_prefix(&t.value),
        _ => false,
    }
}

/// A document that mentions `backstop.dev/` means to be a carrier: its root
/// must be a mapping and `metadata` and `metadata.annotations`, when present,
/// mappings too, or its annotations would be ignored and the gate move past it.
pub(super) fn check_shape(ctx: &DocContext<'_>, value: &serde_yaml::Value) -> Result<(), ManifestError> {
    let bad = |key: Option<&str>, line: usize, what: &str, found: &serde_yaml::Value| ManifestError {
        file: ctx.file.into(),
        line,
        key: key.map(str::to_string),
        message: format!(
            "{what} must be a mapping, not {}: this document mentions {PREFIX} annotations, which would be ignored",
            kind_of(found)
        ),
    };
    if !mentions_prefix(value) {
        return Ok(());
    }
    let Some(root) = value.as_mapping() else {
        return Err(bad(None, ctx.doc.first_line, "the document", value));
    };
    let Some(metadata) = root.get("metadata").filter(|m| !m.is_null()) else {
        return Ok(());
    };
    let metadata_line = ctx.key_line("metadata", 0);
    let Some(metadata) = metadata.as_mapping() else {
        return Err(bad(Some("metadata"), metadata_line, "metadata", metadata));
    };
    match metadata.get("annotations") {
        Some(a) if !a.is_null() && !a.is_mapping() => {
            let line = ctx.key_line("annotations", metadata_line);
            Err(bad(Some("metadata.annotations"), line, "metadata.annotations", a))
        }
        _ => Ok(()),
    }
}

/// Kind of an open block collection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Map,
    Seq,
}

/// Nesting state of the scan.
#[derive(Default)]
struct Scan {
    /// Open block collections: column and kind.
    block: Vec<(i64, Block)>,
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// A quoted scalar open across lines (`"` or `'`).
    quote: Option<u8>,
    /// A block scalar (`|`, `>`): the indentation its content must exceed,
    /// and that content's indentation once seen.
    block_scalar: Option<(i64, Option<usize>)>,
    /// A plain scalar that may go on over lines indented more than this.
    plain_owner: Option<i64>,
    /// The next token starts a node (so `[`, `{` and quotes are indicators).
    node_start: bool,
}

fn blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn flow_indicator(c: u8) -> bool {
    matches!(c, b',' | b'[' | b']' | b'{' | b'}')
}

/// The position after the quote closing a quoted scalar that starts at
/// `from` (after the opening quote); `None` when the line ends first.
fn skip_quote(line: &[u8], mut i: usize, quote: u8) -> Option<usize> {
    while i < line.len() {
        match line[i] {
            b'\\' if quote == b'"' => i += 2,
            b'\'' if quote == b'\'' && line.get(i + 1) == Some(&b'\'') => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

impl Scan {
    fn depth(&self) -> usize {
        self.block.len() + self.flow
    }

    fn top(&self) -> i64 {
        self.block.last().map(|b| b.0).unwrap_or(-1)
    }

    /// A block collection of `kind` whose first entry is at `col`.
    fn open_block(&mut self, col: usize, kind: Block) {
        let col = col as i64;
        while let Some(&(c, k)) = self.block.last() {
            // A sequence may sit at its parent key's column; a key there ends it.
            if c > col || (c == col && k == Block::Seq && kind == Block::Map) {
                self.block.pop();
            } else if c == col && k == kind {
                return;
            } else {
                break;
            }
        }
        self.block.push((col, kind));
    }

    /// Scans one line; false when the depth went over `limit`.
    fn line(&mut self, line: &[u8], limit: usize) -> bool {
        let indent = line.iter().take_while(|c| **c == b' ').count();
        let empty = line[indent..].iter().all(|c| blank(*c));
        if let Some((threshold, content)) = self.block_scalar {
            if empty {
                return true;
            }
            match content {
                None if indent as i64 > threshold => {
                    self.block_scalar = Some((threshold, Some(indent)));
                    return true;
                }
                Some(c) if indent >= c => return true,
                _ => self.block_scalar = None,
            }
        }
        let mut i = 0;
        if let Some(q) = self.quote {
            match skip_quote(line, 0, q) {
                None => return true,
                Some(end) => {
                    self.quote = None;
                    self.node_start = false;
                    i = end;
                }
            }
        } else if self.flow == 0 {
            if empty || line[indent] == b'#' {
                return true;
            }
            if self.plain_owner.is_some_and(|owner| indent as i64 > owner) {
                return true;
            }
            self.plain_owner = None;
            self.node_start = true;
            i = indent;
        }
        self.tokens(line, i, limit)
    }

    fn tokens(&mut self, line: &[u8], mut i: usize, limit: usize) -> bool {
        let at = |i: usize| line.get(i).copied();
        let ends_token = |i: usize| at(i).is_none_or(blank);
        loop {
            while at(i).is_some_and(blank) {
                i += 1;
            }
            let Some(c) = at(i) else { return true };
            if c == b'#' && (i == 0 || blank(line[i - 1])) {
                return true;
            }
            if self.flow > 0 {
                match c {
                    b'[' | b'{' => {
                        self.flow += 1;
                        if self.depth() > limit {
                            return false;
                        }
                        self.node_start = true;
                        i += 1;
                    }
                    b']' | b'}' => {
                        self.flow -= 1;
                        self.node_start = false;
                        i += 1;
                    }
                    b',' => {
                        self.node_start = true;
                        i += 1;
                    }
                    b':' if at(i + 1).is_none_or(|n| blank(n) || flow_indicator(n)) || !self.node_start => {
                        self.node_start = true;
                        i += 1;
                    }
                    b'"' | b'\'' if self.node_start => match skip_quote(line, i + 1, c) {
                        Some(end) => {
                            self.node_start = false;
                            i = end;
                        }
                        None => {
                            self.quote = Some(c);
                            return true;
                        }
                    },
                    b'&' | b'!' if self.node_start => {
                        while at(i).is_some_and(|n| !blank(n) && !flow_indicator(n)) {
                            i += 1;
                        }
                    }
                    b'?' if self.node_start && ends_token(i + 1) => i += 1,
                    _ => {
                        // A plain scalar: up to a flow indicator, `: ` or ` #`.
                        self.node_start = false;
                        i += 1;
                        while let Some(n) = at(i) {
                            if flow_indicator(n)
                                || (n == b':' && at(i + 1).is_none_or(|m| blank(m) || flow_indicator(m)))
                                || (n == b'#' && blank(line[i - 1]))
                            {
                                break;
                            }
                            i += 1;
                        }
                    }
                }
                continue;
            }
            // Block context.
            if !self.node_start {
                // After a quoted scalar or a flow collection: a key's `:`, or the rest.
                if c == b':' && ends_token(i + 1) {
                    self.node_start = true;
                }
                i += 1;
                continue;
            }
            match c {
                b'-' if ends_token(i + 1) => {
                    self.open_block(i, Block::Seq);
                    if self.depth() > limit {
                        return false;
                    }
                    i += 1;
                }
                b'?' if ends_token(i + 1) => {
                    self.open_block(i, Block::Map);
                    if self.depth() > limit {
                        return false;
                    }
                    i += 1;
                }
                b':' if ends_token(i + 1) => i += 1,
                b'[' | b'{' => {
                    self.flow = 1;
                    self.node_start = true;
                    if self.depth() > limit {
                        return false;
                    }
                    i += 1;
                }
                b'|' | b'>' => {
                    self.block_scalar = Some((self.top(), None));
                    return true;
                }
                b'&' | b'!' => {
                    while at(i).is_some_and(|n| !blank(n)) {
                        i += 1;
                    }
                }
                b'"' | b'\'' => {
                    let start = i;
                    match skip_quote(line, i + 1, c) {
                        Some(end) => i = end,
                        None => {
                            self.quote = Some(c);
                            return true;
                        }
                    }
                    let mut j = i;
                    while at(j).is_some_and(blank) {
                        j += 1;
                    }
                    if at(j) == Some(b':') && ends_token(j + 1) {
                        self.open_block(start, Block::Map);
                        if self.depth() > limit {
                            return false;
                        }
                        i = j + 1;
                    } else {
                        self.node_start = false;
                    }
                }
                _ => {
                    // A plain scalar: a key when `: ` follows on this line.
                    let start = i;
                    while let Some(n) = at(i) {
                        if n == b':' && ends_token(i + 1) {
                            break;
                        }
                        if n == b'#' && i > start && blank(line[i - 1]) {
                            break;
                        }
                        i += 1;
                    }
                    if at(i) == Some(b':') {
                        self.open_block(start, Block::Map);
                        if self.depth() > limit {
                            return false;
                        }
                        i += 1;
                    } else {
                        self.plain_owner = Some(self.top());
                        return true;
                    }
                }
            }
        }
    }
}

/// The 1-based line of `text` (one YAML document) where collections first
/// nest deeper than `limit`, if they do. Block collections count by
/// indentation and `- ` / `key:` / `? ` indicators, flow collections by
/// `[` / `{`; comments, quoted, block and plain scalars are skipped. A cheap
/// approximation of the parser's view, linear in the size of `text`.
pub fn deeper_than(text: &str, limit: usize) -> Option<usize> {
    let mut scan = Scan::default();
    for (index, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if !scan.line(line.as_bytes(), limit) {
            return Some(index + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str) -> bool {
        deeper_than(text, MAX_DEPTH).is_none()
    }

    #[test]
    fn ids_are_limited_to_a_safe_character_set() {
        for ok in ["0001-init", "m", "2024.01.02_add-email", &"a".repeat(128)] {
            assert_eq!(check_id(ok), Ok(()), "{ok}");
        }
        let err = |id: &str| check_id(id).unwrap_err();
        assert_eq!(err(""), "migration id must not be empty");
        assert!(err("0001\0x").contains("the control character U+0000 at character 5"));
        assert!(err("0001-\u{1b}[31m").contains("U+001B"));
        assert!(err("0001-ünï").contains("the non-ASCII character 'ü' (U+00FC)"));
        assert!(err("a b").contains("a space at character 2"));
        assert!(err("a/b").contains("the character '/'"));
        assert!(err("-x").contains("must start with an ASCII letter or digit"));
        assert!(err(".hidden").contains("must start with"));
        assert!(err(&"a".repeat(129)).contains("129 characters long; the limit is 128"));
    }

    #[test]
    fn values_refuse_control_characters_but_keep_line_breaks() {
        assert_eq!(check_value("SELECT\n\ttrue\r\n"), Ok(()));
        assert!(check_value("app\0").unwrap_err().contains("U+0000"));
    }

    #[test]
    fn timeout_is_bounded_by_a_day() {
        assert_eq!(check_timeout("24h", Duration::from_secs(86400)), Ok(()));
        let e = check_timeout("25h", Duration::from_secs(90000)).unwrap_err();
        assert_eq!(e, "\"25h\" is longer than the limit of 24h (86400 seconds)");
    }

    #[test]
    fn bom_is_stripped() {
        assert_eq!(strip_bom("\u{feff}a: 1"), "a: 1");
        assert_eq!(strip_bom("a: 1"), "a: 1");
    }

    #[test]
    fn size_limit_names_the_file() {
        assert!(check_size("a.yaml", MAX_FILE_BYTES).is_ok());
        let e = check_size("a.yaml", MAX_FILE_BYTES + 1).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("a.yaml:1: file is larger than the size limit of 4 MiB"),
            "{e}"
        );
    }

    #[test]
    fn deep_flow_nesting_is_found_on_its_line() {
        let bomb = format!("a: 1\nb: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(deeper_than(&bomb, MAX_DEPTH), Some(2));
        let at_limit = format!("a: {}{}\n", "[".repeat(63), "]".repeat(63));
        assert!(depth_ok(&at_limit));
        let over = format!("a: {}{}\n", "{x: ".repeat(64), "}".repeat(64));
        assert_eq!(deeper_than(&over, MAX_DEPTH), Some(1));
        // Spread over lines.
        let lines = format!("a:\n{}", "  [\n".repeat(70));
        assert_eq!(deeper_than(&lines, MAX_DEPTH), Some(65));
    }

    #[test]
    fn deep_block_nesting_is_found() {
        let mut text = String::new();
        for i in 0..70 {
            text.push_str(&format!("{}k{i}:\n", " ".repeat(i * 2)));
        }
        assert_eq!(deeper_than(&text, MAX_DEPTH), Some(65));
        let dashes = format!("{}x\n", "- ".repeat(65));
        assert_eq!(deeper_than(&dashes, MAX_DEPTH), Some(1));
        let mut siblings = String::new();
        for i in 0..1000 {
            siblings.push_str(&format!("k{i}:\n- a\n- b: c\n  d: e\n"));
        }
        assert!(depth_ok(&siblings));
    }

    #[test]
    fn brackets_in_scalars_and_comments_do_not_count() {
        let open = "[".repeat(100);
        let text = format!(
            "kind: ConfigMap  # {open}\nmetadata:\n  name: x{open}\n  annotations:\n    a: \"{open}\"\n    b: '{open}''{open}'\n    c: plain [ text {open}\n      continued {open}\n    multi: \"starts\n      {open} ends\"\ndata:\n  001.sql: |\n    SELECT '{open}';\n    SELECT ARRAY{open};\n  002.sql: >-\n    {open}\n\n    {open}\n  k: [a, \"]\", '[', b]\n  j: {{\"x\": [1, {{\"y\": \"{open}\"}}]}}\n# {open}\n"
        );
        assert!(depth_ok(&text), "{:?}", deeper_than(&text, MAX_DEPTH));
        let parsed: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
        assert!(parsed["data"]["001.sql"].as_str().unwrap().contains("ARRAY["));
    }

    #[test]
    fn ordinary_manifests_pass() {
        let text = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\n  annotations:\n    backstop.dev/migration: m\nspec:\n  template:\n    spec:\n      containers:\n        - name: c\n          args: [\"--x\", '--y']\n          env:\n            - {name: A, value: \"1\"}\n      restartPolicy: Never\n";
        assert!(depth_ok(text));
        assert!(depth_ok("[1, 2, 3]\n"));
        assert!(depth_ok(""));
    }
}
