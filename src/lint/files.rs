//! Reading what `backstop lint` is given: `.sql` files, migration carriers
//! and standard input, each on its own, so that one bad file does not hide
//! the findings of the others.

use serde::Serialize;

use super::{lint, Family, Finding, LintOptions, Linter, Rule, Severity};

/// Input to `backstop lint` that cannot be analysed.
#[derive(Debug, thiserror::Error)]
pub enum LintInputError {
    #[error("failed to read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is {what}, not a regular file; refusing to read it")]
    NotRegular { path: String, what: &'static str },
    #[error(transparent)]
    Sql(#[from] crate::sql::SqlError),
    #[error("invalid migration input:\n  {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Manifests(Vec<crate::manifests::ManifestError>),
}

/// Findings of one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileFindings {
    pub file: String,
    pub statements: usize,
    pub findings: Vec<Finding>,
    /// Statements (or lines) that are not SQL, reported as [`NOT_SQL`]
    /// findings: `backstop lint` exits 2 when any file has one.
    pub not_sql: usize,
    /// Why the file could not be linted at all (unreadable, invalid
    /// migration input); the other files are linted all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// The finding for text that is not SQL: a statement PostgreSQL does not
/// parse, or a psql meta-command.
pub const NOT_SQL: Rule = Rule {
    id: "BS001",
    name: "not-sql",
    family: Family::Opaque,
    severity: Severity::Error,
    incompatible: false,
    why: "PostgreSQL does not parse this: backstop can neither analyse nor run it",
    fix: "fix the statement (the parser's message is the excerpt); psql meta-commands such as \\set or \\i are not SQL and must go",
};

impl FileFindings {
    fn unreadable(file: &str, error: &dyn std::error::Error) -> Self {
        FileFindings {
            file: file.to_string(),
            statements: 0,
            findings: Vec::new(),
            not_sql: 0,
            unreadable: Some(crate::run::chain(error)),
        }
    }
}

/// A [`NOT_SQL`] finding.
fn not_sql(e: crate::sql::SqlError) -> Finding {
    Finding {
        rule: NOT_SQL.id.to_string(),
        name: NOT_SQL.name.to_string(),
        severity: NOT_SQL.severity,
        family: NOT_SQL.family,
        incompatible: NOT_SQL.incompatible,
        origin: e.origin,
        line: e.line,
        column: 1,
        excerpt: e.message,
        why: NOT_SQL.why.to_string(),
        fix: NOT_SQL.fix.to_string(),
        facts: None,
        ignored: None,
    }
}

/// Lints files: `.sql` files as one migration each, YAML files as migration
/// carriers (SQL files they name are read relative to the carrier's folder),
/// `-` as SQL read from standard input. Only regular files are read
/// (symlinks to them too): a FIFO or a device is refused by name rather than
/// waited on. A file that cannot be read or is invalid migration input is
/// reported as such and the others are linted all the same; in a `.sql`
/// file, a statement that does not parse is a finding at its line and the
/// statements after it are linted.
pub fn lint_files(paths: &[String], opts: LintOptions) -> Vec<FileFindings> {
    paths
        .iter()
        .flat_map(|path| match lint_one(path, opts) {
            Ok(found) => found,
            Err(e) => vec![FileFindings::unreadable(path, &e)],
        })
        .collect()
}

fn lint_one(path: &str, opts: LintOptions) -> Result<Vec<FileFindings>, LintInputError> {
    if crate::manifests::is_yaml(path) {
        // One byte over the limit is enough for the parser to refuse the file.
        let bytes = read_regular(path, Some(crate::manifests::MAX_FILE_BYTES))?;
        let mut snapshot = crate::manifests::Snapshot::new();
        let folder = std::path::Path::new(path)
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        let skipped = collect_files(&folder, &mut snapshot);
        snapshot.insert(path.to_string(), bytes.clone());
        let carriers = crate::manifests::parse_file(&snapshot, path, &bytes)
            .map_err(|errors| LintInputError::Manifests(explain_skipped(errors, &skipped)))?;
        return Ok(carriers
            .into_iter()
            .map(|c| FileFindings {
                file: format!("{path} ({})", c.id),
                statements: c.statements.len(),
                findings: lint(&c.statements, opts),
                not_sql: 0,
                unreadable: None,
            })
            .collect());
    }
    let bytes = if path == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes).map_err(|source| {
            LintInputError::Read {
                path: "standard input".into(),
                source,
            }
        })?;
        bytes
    } else {
        read_regular(path, None)?
    };
    let text = String::from_utf8_lossy(&bytes);
    // One parse per statement, one statement's tree held at a time.
    let mut linter = Linter::new(opts);
    let mut broken = Vec::new();
    crate::sql::split_lenient(
        path,
        crate::manifests::strip_bom(&text),
        1,
        |s, node| linter.statement(&s, node),
        |e| broken.push(not_sql(e)),
    );
    let not_sql = broken.len();
    let analysis = linter.finish();
    let mut findings = analysis.findings;
    findings.extend(broken);
    findings.sort_by_key(|f| (f.line, f.column));
    Ok(vec![FileFindings {
        file: path.to_string(),
        statements: analysis.statements,
        findings,
        not_sql,
        unreadable: None,
    }])
}

/// What a file that is not a regular file is, for errors.
fn special_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// Reads `path` if it is a regular file (following symlinks), at most
/// `limit` + 1 bytes when a limit is given.
fn read_regular(path: &str, limit: Option<usize>) -> Result<Vec<u8>, LintInputError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| LintInputError::Read {
        path: path.to_string(),
        source,
    };
    let refuse = |meta: std::fs::Metadata| LintInputError::NotRegular {
        path: path.to_string(),
        what: special_kind(meta.file_type()),
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(refuse(meta));
    }
    // Non-blocking: should a FIFO take the file's place after the check,
    // opening it does not wait for a writer; the open file is checked again.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(refuse(meta));
    }
    let mut bytes = Vec::new();
    match limit {
        Some(limit) => file.take(limit as u64 + 1).read_to_end(&mut bytes),
        None => (&file).read_to_end(&mut bytes),
    }
    .map_err(read_err)?;
    Ok(bytes)
}

/// Reads the regular files below `dir` (at most 4 MiB each, 2,000 files;
/// symlinks to files are followed, to folders not) into `snapshot`. Returns
/// the files left out and why, for errors naming them.
fn collect_files(
    dir: &std::path::Path,
    snapshot: &mut crate::manifests::Snapshot,
) -> std::collections::BTreeMap<String, String> {
    let mut skipped = std::collections::BTreeMap::new();
    let mut stack = vec![if dir.as_os_str().is_empty() {
        std::path::PathBuf::from(".")
    } else {
        dir.to_path_buf()
    }];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                stack.push(p);
                continue;
            }
            if snapshot.len() >= 2000 {
                continue;
            }
            let key = p.to_string_lossy().trim_start_matches("./").to_string();
            match read_regular(&key, Some(crate::manifests::MAX_FILE_BYTES)) {
                Ok(bytes) if bytes.len() > crate::manifests::MAX_FILE_BYTES => {
                    skipped.insert(
                        key,
                        "larger than 4 MiB, the limit for files lint reads beside a carrier".into(),
                    );
                }
                Ok(bytes) => {
                    snapshot.insert(key, bytes);
                }
                Err(LintInputError::NotRegular { what, .. }) if what != "a directory" => {
                    skipped.insert(key, format!("{what}, not a regular file"));
                }
                Err(_) => {}
            }
        }
    }
    skipped
}

/// Says why a file a carrier names is missing when lint left it out.
fn explain_skipped(
    mut errors: Vec<crate::manifests::ManifestError>,
    skipped: &std::collections::BTreeMap<String, String>,
) -> Vec<crate::manifests::ManifestError> {
    for e in &mut errors {
        for (path, what) in skipped {
            let missing = format!("but {path} is not in the repository");
            if e.message.ends_with(&missing) {
                let len = e.message.len() - missing.len();
                e.message.truncate(len);
                e.message
                    .push_str(&format!("but {path} is {what}; refusing to read it"));
            }
        }
    }
    errors
}
