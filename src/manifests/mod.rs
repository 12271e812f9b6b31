//! Migration carriers: Kubernetes manifests annotated `backstop.dev/migration`,
//! parsed straight from multi-document YAML (no kustomize build), with every
//! annotation of the contract validated and its default applied.
//!
//! Errors name the file, the line and the annotation key. Files are read from a
//! [`Snapshot`] (a git tree or a folder), never from wherever the process runs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sql::{self, Statement};

mod limits;
mod patch;

pub use limits::{check_id, strip_bom, MAX_DEPTH, MAX_FILE_BYTES, MAX_ID_LEN, MAX_TIMEOUT};
pub use patch::{json_merge, patch_manifest, PatchedFile};

/// Annotation prefix of the contract.
pub const PREFIX: &str = "backstop.dev/";

/// Annotations that may appear on a carrier. Anything else under the prefix is
/// a typo and refused (a misspelt `verify` would otherwise skip verification).
const KNOWN_KEYS: &[&str] = &[
    "migration",
    "database",
    "database-name",
    "phase",
    "order",
    "run",
    "sql",
    "verify",
    "checkpoint",
    "revert",
    "replay",
    "timeout",
    "approved-by",
    "soak",
    "expand-migration",
];

/// Files of a tree: repo-relative path (with `/`) to content.
pub type Snapshot = BTreeMap<String, Vec<u8>>;

/// A carrier or YAML file that is not valid input.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {}{message}", key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ManifestError {
    /// Repo-relative file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// The annotation or data key concerned, if any.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Which database a migration runs against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DatabaseRef {
    /// A CloudNativePG cluster.
    Cnpg { namespace: String, cluster: String },
    /// A libpq URL held by an environment variable (local mode).
    Url { var: String },
}

impl std::fmt::Display for DatabaseRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseRef::Cnpg { namespace, cluster } => write!(f, "cnpg:{namespace}/{cluster}"),
            DatabaseRef::Url { var } => write!(f, "url:{var}"),
        }
    }
}

macro_rules! keyword_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }
        impl $name {
            const ALL: &'static [(&'static str, $name)] = &[$(($text, $name::$variant)),+];
            /// The annotation value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            fn parse(value: &str) -> Result<Self, String> {
                Self::ALL.iter().find(|(t, _)| *t == value).map(|(_, v)| *v).ok_or_else(|| {
                    let allowed: Vec<&str> = Self::ALL.iter().map(|(t, _)| *t).collect();
                    format!("unknown value {value:?} (expected one of: {})", allowed.join(", "))
                })
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

keyword_enum!(
    /// Expand/contract phase of a migration.
    Phase { Expand = "expand", Migrate = "migrate", Contract = "contract" }
);
keyword_enum!(
    /// When the migration runs relative to Flux applying the commit's manifests.
    Order { BeforeApply = "before-apply", AfterApply = "after-apply" }
);
keyword_enum!(
    /// How the migration is executed.
    RunKind { Sql = "sql", Job = "job" }
);
keyword_enum!(
    /// What checkpoint is taken before the migration.
    CheckpointKind { Backup = "backup", Snapshot = "snapshot", Dump = "dump", None = "none" }
);
keyword_enum!(
    /// How the code is reverted on failure.
    RevertMode { PullRequest = "pull-request", Commit = "commit" }
);
keyword_enum!(
    /// Whether the writes a restore discarded are put back by the run itself
    /// (`backstop.dev/replay`, see [`crate::capture::replay`]).
    ReplayMode { Manual = "manual", Auto = "auto" }
);
// keyword_enum! derives for every enum alike; only this one has a default.
#[allow(clippy::derivable_impls)]
impl Default for ReplayMode {
    fn default() -> Self {
        Self::Manual
    }
}

/// A parsed, validated migration carrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carrier {
    /// Repo-relative file holding the manifest.
    pub file: String,
    /// 1-based line of the `backstop.dev/migration` annotation.
    pub line: usize,
    /// Line of each `backstop.dev/` annotation, by key (`database`, `phase`, ...).
    #[serde(default)]
    pub lines: BTreeMap<String, usize>,
    /// `kind/namespace/name` of the manifest.
    pub object: String,
    /// Migration id (`backstop.dev/migration`).
    pub id: String,
    pub database: DatabaseRef,
    /// `backstop.dev/database-name`; `None` means the default (`app`, or the
    /// database named in a `url:` URL).
    pub database_name: Option<String>,
    pub phase: Phase,
    pub order: Order,
    pub run: RunKind,
    pub checkpoint: CheckpointKind,
    pub revert: RevertMode,
    /// `backstop.dev/replay`: `auto` puts the lost writes back after a restore.
    #[serde(default)]
    pub replay: ReplayMode,
    /// Bound on migrate + verify.
    #[serde(with = "duration_secs")]
    pub timeout: Duration,
    pub approved_by: Option<String>,
    /// `backstop.dev/soak`: how long the expand must have been applied before
    /// this contract runs (default 24h).
    #[serde(default, with = "opt_duration_secs")]
    pub soak: Option<Duration>,
    /// `backstop.dev/expand-migration`: the expand this contract completes
    /// (default: the latest applied expand of the database).
    #[serde(default)]
    pub expand_migration: Option<String>,
    /// Statements in execution order (empty for `run: job`).
    pub statements: Vec<Statement>,
    /// Verify query, if any.
    pub verify: Option<String>,
    /// Repo files (other than `file`) this carrier takes SQL from.
    pub sql_files: Vec<String>,
    /// sha256 of the normalized statements (`run: job`: of the Job's spec).
    pub checksum: String,
    /// The Job manifest itself, for `run: job`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<serde_json::Value>,
}

mod opt_duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl Carrier {
    /// Line of annotation `key` (the migration annotation's line when absent).
    pub fn line_of(&self, key: &str) -> usize {
        self.lines.get(key).copied().unwrap_or(self.line)
    }
}

/// Parses a duration such as `90s`, `10m`, `1h30m`, `24h`, `2d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut total = 0u64;
    let mut number = String::new();
    let bad = || format!("invalid duration {text:?} (expected e.g. 90s, 10m, 1h30m, 24h)");
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    if total == 0 {
        return Err(format!("duration {text:?} must be greater than 0"));
    }
    Ok(Duration::from_secs(total))
}

/// Whether a path looks like a YAML manifest.
pub fn is_yaml(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

/// One YAML document of a file with the line it starts on.
struct Document<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits a multi-document YAML file on `---` lines, keeping line numbers.
fn documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push(Document {
                text: &text[start..offset],
                first_line: start_line,
            });
            start = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    docs.push(Document {
        text: &text[start..],
        first_line: start_line,
    });
    docs
}

/// Parses every carrier in the YAML files of `snapshot` whose path is in
/// `files`. Errors of all files are collected rather than stopping at the first.
pub fn parse_carriers<'a>(
    snapshot: &Snapshot,
    files: impl IntoIterator<Item = &'a String>,
) -> (Vec<Carrier>, Vec<ManifestError>) {
    let mut carriers = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let Some(bytes) = snapshot.get(file) else { continue };
        match parse_file(snapshot, file, bytes) {
            Ok(mut found) => carriers.append(&mut found),
            Err(mut errs) => errors.append(&mut errs),
        }
    }
    (carriers, errors)
}

/// Parses the carriers of one YAML file.
pub fn parse_file(snapshot: &Snapshot, file: &str, bytes: &[u8]) -> Result<Vec<Carrier>, Vec<ManifestError>> {
    limits::check_size(file, bytes.len()).map_err(|e| vec![e])?;
    let text = std::str::from_utf8(bytes).map_err(|_| {
        vec![ManifestError {
            file: file.to_string(),
            line: 1,
            key: None,
            message: "file is not UTF-8".into(),
        }]
    })?;
    let text = strip_bom(text);
    let mut carriers = Vec::new();
    let mut errors = Vec::new();
    for doc in documents(text) {
        if let Err(e) = limits::check_depth(file, doc.text, doc.first_line) {
            errors.push(e);
            continue;
        }
        let value: serde_yaml::Value = match serde_yaml::from_str(doc.text) {
            Ok(v) => v,
            Err(e) => {
                let line = doc.first_line + e.location().map(|l| l.line().saturating_sub(1)).unwrap_or(0);
                let message = e.to_string();
                let message = message.split(" at line ").next().unwrap_or(&message).to_string();
                errors.push(ManifestError {
                    file: file.into(),
                    line,
                    key: None,
                    message: format!("YAML does not parse: {message}"),
                });
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let ctx = DocContext { file, doc: &doc };
        match parse_carrier(snapshot, &ctx, &value) {
            Ok(Some(c)) => carriers.push(c),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(carriers)
    } else {
        Err(errors)
    }
}

struct DocContext<'a> {
    file: &'a str,
    doc: &'a Document<'a>,
}

impl DocContext<'_> {
    /// Line of the first occurrence of `needle` in the document (else its start).
    fn line_of(&self, needle: &str) -> usize {
        self.doc
            .text
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| self.doc.first_line + i)
            .unwrap_or(self.doc.first_line)
    }

    /// Line of the first `key:` indented at most like the line `after` (0:
    /// the document's top level) and not before it (else the document's start).
    fn key_line(&self, key: &str, after: usize) -> usize {
        let top = after == 0;
        let lines = self
            .doc
            .text
            .lines()
            .enumerate()
            .skip(after.saturating_sub(self.doc.first_line));
        lines
            .filter(|(_, l)| !top || !l.starts_with([' ', '\t']))
            .find(|(_, l)| {
                let t = l.trim_start().trim_start_matches(['-', ' ']);
                let t = t.trim_start_matches(['"', '\'']);
                t.starts_with(key)
                    && t[key.len()..]
                        .trim_start_matches(['"', '\''])
                        .trim_start()
                        .starts_with(':')
            })
            .map(|(i, _)| self.doc.first_line + i)
            .unwrap_or(self.doc.first_line)
    }

    fn error(&self, key: &str, message: impl Into<String>) -> ManifestError {
        let full = format!("{PREFIX}{key}");
        ManifestError {
            file: self.file.into(),
            line: self.line_of(&full),
            key: Some(full),
            message: message.into(),
        }
    }
}

fn get_str<'v>(value: &'v serde_yaml::Value, path: &[&str]) -> Option<&'v str> {
    let mut v = value;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_str()
}

fn parse_carrier(
    snapshot: &Snapshot,
    ctx: &DocContext<'_>,
    value: &serde_yaml::Value,
) -> Result<Option<Carrier>, ManifestError> {
    limits::check_shape(ctx, value)?;
    let Some(annotations) = value.get("metadata").and_then(|m| m.get("annotations")) else {
        return Ok(None);
    };
    let Some(map) = annotations.as_mapping() else {
        return Ok(None);
    };
    let mut ann: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in map {
        let Some(k) = k.as_str() else { continue };
        let Some(key) = k.strip_prefix(PREFIX) else { continue };
        let text = match v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            other => {
                let kind = limits::kind_of(other);
                return Err(ctx.error(key, format!("annotation values must be strings, not {kind}")));
            }
        };
        if !matches!(key, "migration" | "expand-migration") {
            // Ids get their own, stricter check below.
            limits::check_value(&text).map_err(|m| ctx.error(key, m))?;
        }
        ann.insert(key.to_string(), text);
    }
    let Some(id) = ann.get("migration").cloned() else {
        return Ok(None);
    };
    for key in ann.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(ctx.error(
                key,
                format!(
                    "unknown annotation on a migration carrier (known: {})",
                    KNOWN_KEYS.join(", ")
                ),
            ));
        }
    }
    let id = id.trim().to_string();
    check_id(&id).map_err(|m| ctx.error("migration", m))?;
    if let Some(e) = ann.get("expand-migration") {
        check_id(e.trim()).map_err(|m| ctx.error("expand-migration", m))?;
    }
    let kind = get_str(value, &["kind"]).unwrap_or("");
    let name = get_str(value, &["metadata", "name"]).unwrap_or("");
    let namespace = get_str(value, &["metadata", "namespace"]).unwrap_or("default");
    let object = format!("{kind}/{namespace}/{name}");

    let database = match ann.get("database") {
        None => return Err(ctx.error("database", "required annotation is missing")),
        Some(d) => parse_database(d, namespace).map_err(|m| ctx.error("database", m))?,
    };
    let phase = match ann.get("phase") {
        Some(p) => Phase::parse(p).map_err(|m| ctx.error("phase", m))?,
        None => Phase::Expand,
    };
    let order = match ann.get("order") {
        Some(o) => Order::parse(o).map_err(|m| ctx.error("order", m))?,
        None if phase == Phase::Contract => Order::AfterApply,
        None => Order::BeforeApply,
    };
    let run = match ann.get("run") {
        Some(r) => RunKind::parse(r).map_err(|m| ctx.error("run", m))?,
        None => RunKind::Sql,
    };
    let checkpoint = match ann.get("checkpoint") {
        Some(c) => CheckpointKind::parse(c).map_err(|m| ctx.error("checkpoint", m))?,
        None => CheckpointKind::Backup,
    };
    let revert = match ann.get("revert") {
        Some(r) => RevertMode::parse(r).map_err(|m| ctx.error("revert", m))?,
        None => RevertMode::PullRequest,
    };
    let replay = match ann.get("replay") {
        Some(r) => ReplayMode::parse(r.trim()).map_err(|m| ctx.error("replay", m))?,
        None => ReplayMode::Manual,
    };
    let timeout = match ann.get("timeout") {
        Some(t) => parse_duration(t)
            .and_then(|d| limits::check_timeout(t, d).map(|()| d))
            .map_err(|m| ctx.error("timeout", m))?,
        None => Duration::from_secs(600),
    };
    let soak = match ann.get("soak") {
        Some(s) => Some(parse_duration(s).map_err(|m| ctx.error("soak", m))?),
        None => None,
    };
    if let Some(a) = ann.get("approved-by") {
        crate::policy::parse_approval(a, "annotation").map_err(|m| ctx.error("approved-by", m))?;
    }
    let database_name = ann.get("database-name").map(|s| s.trim().to_string());
    if database_name.as_deref() == Some("") {
        return Err(ctx.error("database-name", "must not be empty"));
    }

    let folder = ctx.file.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let data = value.get("data").and_then(|d| d.as_mapping());
    let data_value = |key: &str| -> Option<String> {
        data.and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let data_line = |key: &str| ctx.line_of(&format!("{key}:")) + 1;

    // The verify query: a data key of this ConfigMap, else literal SQL.
    let (verify, verify_key) = match ann.get("verify") {
        None => (None, None),
        Some(v) if kind == "ConfigMap" && data_value(v.trim()).is_some() => {
            (data_value(v.trim()), Some(v.trim().to_string()))
        }
        Some(v) => (Some(v.clone()), None),
    };
    if let Some(q) = &verify {
        let origin = format!("{}#verify", ctx.file);
        let parsed = sql::split(&origin, q, ctx.line_of(&format!("{PREFIX}verify"))).map_err(|e| {
            let mut err = ctx.error("verify", format!("SQL does not parse: {}", e.message));
            err.line = e.line;
            err
        })?;
        if parsed.len() != 1 || parsed[0].kind != "SelectStmt" {
            return Err(ctx.error("verify", "must be exactly one SELECT returning a boolean first column"));
        }
        // A verify only reads (it also runs in a READ ONLY transaction).
        if let Ok(tree) = pg_query::parse(q, 0) {
            let written = tree.dml_tables();
            if !written.is_empty() {
                return Err(ctx.error(
                    "verify",
                    format!(
                        "must only read, but it modifies {} (a data-modifying WITH); move the change into the migration",
                        written.join(", ")
                    ),
                ));
            }
        }
    }

    let mut statements = Vec::new();
    let mut sql_files = Vec::new();
    if run == RunKind::Sql {
        match ann.get("sql") {
            Some(list) => {
                for rel in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let path = join_path(folder, rel);
                    let Some(bytes) = snapshot.get(&path) else {
                        return Err(ctx.error("sql", format!("names {rel:?}, but {path} is not in the repository")));
                    };
                    let text = std::str::from_utf8(bytes)
                        .map(strip_bom)
                        .map_err(|_| ctx.error("sql", format!("{path} is not UTF-8")))?;
                    let mut stmts = sql::split(&path, text, 1).map_err(|e| ManifestError {
                        file: path.clone(),
                        line: e.line,
                        key: Some(format!("{PREFIX}sql")),
                        message: format!("SQL does not parse: {}", e.message),
                    })?;
                    statements.append(&mut stmts);
                    sql_files.push(path);
                }
            }
            None => {
                let Some(data) = data.filter(|_| kind == "ConfigMap") else {
                    return Err(ctx.error(
                        "sql",
                        "run: sql needs SQL: a ConfigMap with data keys ending .sql, or backstop.dev/sql naming files",
                    ));
                };
                let mut keys: Vec<&str> = data
                    .keys()
                    .filter_map(|k| k.as_str())
                    .filter(|k| k.ends_with(".sql") && Some(*k) != verify_key.as_deref())
                    .collect();
                keys.sort_unstable();
                for key in keys {
                    let text = data_value(key).unwrap_or_default();
                    let origin = format!("{}#{key}", ctx.file);
                    let mut stmts = sql::split(&origin, &text, data_line(key)).map_err(|e| ManifestError {
                        file: ctx.file.into(),
                        line: e.line,
                        key: Some(key.to_string()),
                        message: format!("SQL does not parse: {}", e.message),
                    })?;
                    statements.append(&mut stmts);
                }
            }
        }
        if statements.is_empty() {
            return Err(ctx.error("sql", "the migration has no SQL statements"));
        }
        if let Some(s) = statements.iter().find(|s| sql::is_transaction_control(s)) {
            return Err(ManifestError {
                file: ctx.file.into(),
                line: s.line,
                key: Some(s.origin.clone()),
                message: format!(
                    "transaction control ({:?}) is not allowed in a migration: backstop runs the statements in one transaction when it can",
                    s.sql
                ),
            });
        }
    } else if ann.contains_key("sql") {
        return Err(ctx.error("sql", "only valid with run: sql"));
    }
    let job = if run == RunKind::Job {
        if kind != "Job" {
            return Err(ctx.error(
                "run",
                format!("run: job needs the carrier to be a batch/v1 Job, not a {kind}"),
            ));
        }
        // Flux applies everything under the path: without this it would run
        // the Job a second time when the gate moves.
        if get_str(
            value,
            &["metadata", "annotations", "kustomize.toolkit.fluxcd.io/reconcile"],
        ) != Some("disabled")
        {
            return Err(ctx.error(
                "run",
                "a Job carrier needs the annotation kustomize.toolkit.fluxcd.io/reconcile: disabled, or Flux runs it too",
            ));
        }
        Some(serde_json::to_value(value).map_err(|e| ctx.error("run", format!("the Job cannot be read: {e}")))?)
    } else {
        None
    };
    let checksum = match &job {
        // What a Job runs is its spec.
        Some(j) => {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(j["spec"].to_string().as_bytes()))
        }
        None => sql::checksum(&statements),
    };
    let lines: BTreeMap<String, usize> = ann
        .keys()
        .map(|k| (k.clone(), ctx.line_of(&format!("{PREFIX}{k}"))))
        .collect();
    Ok(Some(Carrier {
        file: ctx.file.into(),
        line: lines.get("migration").copied().unwrap_or(ctx.doc.first_line),
        lines,
        object,
        id,
        database,
        database_name,
        phase,
        order,
        run,
        checkpoint,
        revert,
        replay,
        timeout,
        approved_by: ann.get("approved-by").cloned(),
        soak,
        expand_migration: ann.get("expand-migration").map(|s| s.trim().to_string()),
        statements,
        verify,
        sql_files,
        checksum,
        job,
    }))
}

fn parse_database(text: &str, namespace: &str) -> Result<DatabaseRef, String> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("cnpg:") {
        let (ns, cluster) = match rest.split_once('/') {
            Some((ns, c)) => (ns.to_string(), c.to_string()),
            None => (namespace.to_string(), rest.to_string()),
        };
        if ns.is_empty() || cluster.is_empty() || cluster.contains('/') {
            return Err(format!(
                "invalid {text:?} (expected cnpg:<cluster> or cnpg:<namespace>/<cluster>)"
            ));
        }
        return Ok(DatabaseRef::Cnpg { namespace: ns, cluster });
    }
    if let Some(var) = text.strip_prefix("url:") {
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid {text:?} (expected url:<ENV_VAR_NAME>)"));
        }
        return Ok(DatabaseRef::Url { var: var.to_string() });
    }
    Err(format!(
        "invalid {text:?} (expected cnpg:<cluster>, cnpg:<namespace>/<cluster> or url:<ENV_VAR>)"
    ))
}

/// Joins a carrier-relative path onto its folder, resolving `.` and `..`
/// (an absolute folder, as `backstop lint /path/m.yaml` gives, stays absolute).
fn join_path(folder: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = folder.split('/').filter(|p| !p.is_empty()).collect();
    for p in rel.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if folder.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests;
