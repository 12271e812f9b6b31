//! What runs: from the commits pending between gate and upstream, the carriers
//! the net diff touches, each one's introducing commit, and (against the
//! database's history) which still need to run. Bad input stops here, before
//! anything is touched, with file, line and key.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use serde::Serialize;

use crate::checkpoint::CheckpointError;
use crate::cluster::{Cluster, ClusterError};
use crate::db::Database;
use crate::git::{CommitInfo, GitError, GitRepo};
use crate::lint::{Finding, LintOptions};
use crate::manifests::{self, Carrier, CheckpointKind, ManifestError, Order, Phase};
use crate::policy::{self, Approval, Soak, Verdict};
use crate::runner::{Runner, RunnerError};

/// Why a plan was refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid migration input:\n  {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Manifests(Vec<ManifestError>),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("{file}:{line}: backstop.dev/database: cannot reach the database of migration {id}")]
    Database {
        file: String,
        line: usize,
        id: String,
        source: ClusterError,
    },
    #[error("{file}:{line}: backstop.dev/migration: migration {id} is already applied with checksum {applied}, but the carrier now has {current}; an applied migration must not change (write a new migration instead)")]
    ChecksumDrift {
        file: String,
        line: usize,
        id: String,
        applied: String,
        current: String,
    },
    #[error("failed to read migration history for {id}")]
    History { id: String, source: RunnerError },
    #[error("{file}:{line}: backstop.dev/checkpoint: {message}")]
    Checkpoint { file: String, line: usize, message: String },
    #[error("{file}:{line}: backstop.dev/checkpoint: checkpoint preflight failed for migration {id}")]
    Preflight {
        file: String,
        line: usize,
        id: String,
        source: Box<CheckpointError>,
    },
    #[error("commit {commit} mixes migrations that cannot share a run ({why}); split them into separate commits")]
    Mixed { commit: String, why: String },
    #[error("{first} and {second} both declare migration {id} for {database}")]
    DuplicateId {
        id: String,
        database: String,
        first: String,
        second: String,
    },
    #[error("{file}:{line}: backstop.dev/run: job migrations need the Kubernetes controller")]
    JobUnsupported { file: String, line: usize },
    #[error("{commit}: Backstop-Approved-By: {message}")]
    BadTrailer { commit: String, message: String },
    #[error("commit {commit} is refused by the safety rules:\n  {}", .reasons.join("\n  "))]
    Refused { commit: String, reasons: Vec<String> },
}

/// A pending commit and the touched carriers it introduces.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub commit: CommitInfo,
    pub carriers: Vec<Carrier>,
}

/// Finds the touched carriers in `gate..head` (limited to `path`) and groups
/// them by introducing commit, in commit order. YAML files that the range
/// changes must parse; unchanged ones that do not are skipped with a warning
/// (they are already live and carry nothing to run). `trees` are the pending
/// commits' tree states (their `changed` sets say what each commit touched).
pub async fn discover(
    git: &GitRepo,
    gate: &str,
    head: &str,
    path: &str,
    trees: &[crate::gate::TreeState],
    pending: &[CommitInfo],
) -> Result<Vec<Candidate>, PlanError> {
    let touched = touched_carriers(git, Some(gate), head, path).await?;
    if touched.is_empty() {
        return Ok(Vec::new());
    }
    // Introducing commit: the last pending commit that changed the carrier's files.
    let per_commit: Vec<&BTreeSet<String>> = trees.iter().map(|t| &t.changed).collect();
    let mut groups: BTreeMap<usize, Vec<Carrier>> = BTreeMap::new();
    for carrier in touched {
        let files: Vec<&String> = std::iter::once(&carrier.file).chain(carrier.sql_files.iter()).collect();
        let index = per_commit
            .iter()
            .rposition(|set| files.iter().any(|f| set.contains(*f)))
            .unwrap_or(pending.len().saturating_sub(1));
        groups.entry(index).or_default().push(carrier);
    }
    let mut out = Vec::new();
    for (index, mut carriers) in groups {
        carriers.sort_by(|a, b| a.id.cmp(&b.id));
        out.push(Candidate {
            commit: pending[index].clone(),
            carriers,
        });
    }
    Ok(out)
}

/// The carriers at `to` under `path` that the diff `from..to` touches (their
/// file, or a file their `sql` names, changed). `from` None: `to`'s parent.
pub async fn touched_carriers(
    git: &GitRepo,
    from: Option<&str>,
    to: &str,
    path: &str,
) -> Result<Vec<Carrier>, PlanError> {
    let snapshot = git.snapshot(to, path).await?;
    let changed = git.changed_paths(from, to, path).await?;
    let mut carriers = Vec::new();
    let mut errors = Vec::new();
    for (file, bytes) in snapshot.iter().filter(|(f, _)| manifests::is_yaml(f)) {
        match manifests::parse_file(&snapshot, file, bytes) {
            Ok(mut found) => carriers.append(&mut found),
            Err(errs) if changed.contains(file) => errors.extend(errs),
            Err(errs) => {
                for e in errs {
                    tracing::warn!(error = %e, "skipping unchanged file that is not valid migration input");
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(PlanError::Manifests(errors));
    }
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    for c in &carriers {
        let key = (c.database.to_string(), c.id.clone());
        let here = format!("{}:{}", c.file, c.line);
        if let Some(first) = seen.insert(key.clone(), here.clone()) {
            return Err(PlanError::DuplicateId {
                id: key.1,
                database: key.0,
                first,
                second: here,
            });
        }
    }
    let mut touched: Vec<Carrier> = carriers
        .into_iter()
        .filter(|c| changed.contains(&c.file) || c.sql_files.iter().any(|f| changed.contains(f)))
        .collect();
    touched.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(touched)
}

/// A candidate checked against the database: what must run, where.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub commit: CommitInfo,
    /// Migrations still to run, in id order.
    pub migrations: Vec<Carrier>,
    /// Migrations skipped because history has them with the same checksum.
    pub already_applied: Vec<String>,
    pub database: Option<Database>,
    pub order: Order,
    pub plan_hash: String,
    /// Findings of the safety analysis, all migrations.
    pub findings: Vec<Finding>,
    /// Catalog facts that removed a finding (`file:line: fact`).
    pub facts: Vec<String>,
    /// One verdict per migration to run.
    pub verdicts: Vec<Verdict>,
    /// Approvals found (annotations and commit trailers).
    pub approvals: Vec<Approval>,
}

impl Prepared {
    /// Whether any migration needs an approval, and so a restore drill.
    pub fn needs_drill(&self) -> bool {
        self.verdicts.iter().any(|v| v.needs_approval)
    }
}

/// Approvals of a candidate: each carrier's `backstop.dev/approved-by` and the
/// commit's `Backstop-Approved-By:` trailers.
pub fn approvals(commit: &CommitInfo, carriers: &[Carrier]) -> Result<Vec<Approval>, PlanError> {
    let mut out = Vec::new();
    for c in carriers {
        if let Some(a) = &c.approved_by {
            let approval = policy::parse_approval(a, &format!("{}:{} backstop.dev/approved-by", c.file, c.line))
                .map_err(|message| {
                    PlanError::Manifests(vec![ManifestError {
                        file: c.file.clone(),
                        line: c.line,
                        key: Some("backstop.dev/approved-by".into()),
                        message,
                    }])
                })?;
            out.push(approval);
        }
    }
    for (k, v) in &commit.trailers {
        if k.eq_ignore_ascii_case("Backstop-Approved-By") {
            let approval =
                policy::parse_approval(v, &format!("commit {} trailer", commit.short())).map_err(|message| {
                    PlanError::BadTrailer {
                        commit: commit.sha.clone(),
                        message,
                    }
                })?;
            out.push(approval);
        }
    }
    Ok(out)
}

/// Checks a candidate before anything is touched: one database and one order
/// per run, the database reachable, no checksum drift, a usable checkpoint.
/// `checkpoint_for` maps a carrier's checkpoint kind to a backend (None for `none`).
pub async fn prepare(
    candidate: &Candidate,
    cluster: &dyn Cluster,
    runner: &dyn Runner,
    checkpoint_for: &(dyn Fn(CheckpointKind) -> Result<Option<std::sync::Arc<dyn crate::checkpoint::Checkpoint>>, String>
          + Send
          + Sync),
) -> Result<Prepared, PlanError> {
    let first = &candidate.carriers[0];
    let mixed = |why: &str| PlanError::Mixed {
        commit: candidate.commit.sha.clone(),
        why: why.into(),
    };
    if candidate
        .carriers
        .iter()
        .any(|c| c.database != first.database || c.database_name != first.database_name)
    {
        return Err(mixed("different databases"));
    }
    if candidate.carriers.iter().any(|c| c.order != first.order) {
        return Err(mixed("before-apply and after-apply"));
    }
    if candidate.carriers.iter().any(|c| c.checkpoint != first.checkpoint) {
        return Err(mixed("different checkpoint kinds"));
    }
    if let Some(job) = candidate.carriers.iter().find(|c| !runner.supports(c.run)) {
        return Err(PlanError::JobUnsupported {
            file: job.file.clone(),
            line: job.line,
        });
    }
    let db = cluster
        .resolve(&first.database, first.database_name.as_deref())
        .await
        .map_err(|source| PlanError::Database {
            file: first.file.clone(),
            line: first.line_of("database"),
            id: first.id.clone(),
            source,
        })?;
    let mut migrations = Vec::new();
    let mut already_applied = Vec::new();
    for c in &candidate.carriers {
        let row = runner.applied(&db, &c.id).await.map_err(|source| PlanError::History {
            id: c.id.clone(),
            source,
        })?;
        match row {
            None => migrations.push(c.clone()),
            Some(r) if r.checksum == c.checksum => already_applied.push(c.id.clone()),
            Some(r) => {
                return Err(PlanError::ChecksumDrift {
                    file: c.file.clone(),
                    line: c.line,
                    id: c.id.clone(),
                    applied: r.checksum,
                    current: c.checksum.clone(),
                })
            }
        }
    }
    // The live catalog decides what a static analysis must guess; only
    // needed when something is left to run.
    let history_err = |source| PlanError::History {
        id: first.id.clone(),
        source,
    };
    let (pg_version, catalog) = match migrations.is_empty() {
        true => (runner.server_version(&db).await.map_err(history_err)?, None),
        false => match runner
            .catalog(
                &db,
                crate::lint::catalog::names(migrations.iter().flat_map(|m| &m.statements).map(|s| s.sql.as_str()))
                    .as_deref(),
            )
            .await
            .map_err(history_err)?
        {
            Some((version, catalog)) => (version, Some(catalog)),
            None => (runner.server_version(&db).await.map_err(history_err)?, None),
        },
    };
    let opts = LintOptions { pg_version };
    let analysed = policy::analyse(&migrations, opts, catalog.as_ref());
    let plan_hash = policy::plan_hash(&migrations, &analysed);
    let approvals = approvals(&candidate.commit, &candidate.carriers)?;
    let mut verdicts = Vec::new();
    for (m, a) in migrations.iter().zip(&analysed) {
        let soak = if m.phase == Phase::Contract {
            let row = match &m.expand_migration {
                Some(id) => runner.applied(&db, id).await,
                None => runner.latest_applied(&db, Phase::Expand.as_str()).await,
            }
            .map_err(|source| PlanError::History {
                id: m.id.clone(),
                source,
            })?;
            match row.and_then(|r| r.finished_at.map(|at| (r.id, at))) {
                Some((id, at)) => Soak::ExpandAppliedAt { id, at },
                None => Soak::NoExpand,
            }
        } else {
            Soak::Unknown
        };
        verdicts.push(policy::evaluate(&policy::GateInput {
            carrier: m,
            findings: &a.findings,
            plan_hash: &plan_hash,
            approvals: &approvals,
            soak,
            now: Utc::now(),
        }));
    }
    let reasons: Vec<String> = verdicts.iter().flat_map(|v| v.reasons.iter().cloned()).collect();
    if !reasons.is_empty() {
        return Err(PlanError::Refused {
            commit: candidate.commit.sha.clone(),
            reasons,
        });
    }
    if !migrations.is_empty() {
        let backend = checkpoint_for(first.checkpoint).map_err(|message| PlanError::Checkpoint {
            file: first.file.clone(),
            line: first.line_of("checkpoint"),
            message,
        })?;
        if let Some(backend) = backend {
            backend.preflight(&db).await.map_err(|source| PlanError::Preflight {
                file: first.file.clone(),
                line: first.line_of("checkpoint"),
                id: first.id.clone(),
                source: Box::new(source),
            })?;
        }
    }
    Ok(Prepared {
        commit: candidate.commit.clone(),
        plan_hash,
        migrations,
        already_applied,
        database: Some(db),
        order: first.order,
        facts: analysed.iter().flat_map(|a| a.facts.iter().cloned()).collect(),
        findings: analysed.into_iter().flat_map(|a| a.findings).collect(),
        verdicts,
        approvals,
    })
}

/// One migration as `backstop plan` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedMigration {
    pub id: String,
    pub file: String,
    pub line: usize,
    pub database: String,
    pub phase: Phase,
    pub order: Order,
    pub checkpoint: CheckpointKind,
    pub transactional: bool,
    pub statements: Vec<crate::sql::Statement>,
    pub findings: Vec<Finding>,
    /// Catalog facts that removed a finding (`--database-url`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<String>,
}

/// What a commit range would run, and whether it may (`backstop plan`).
#[derive(Debug, Clone, Serialize)]
pub struct RangePlan {
    pub from: Option<String>,
    pub to: CommitInfo,
    pub plan_hash: String,
    pub migrations: Vec<PlannedMigration>,
    pub approvals: Vec<Approval>,
    pub verdicts: Vec<Verdict>,
    pub allowed: bool,
    /// Whether a restore would keep the writes it discards (known with a
    /// database: its `wal_level`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_writes: Option<String>,
}

impl RangePlan {
    /// Whether any finding is at error level or a verdict refuses.
    pub fn refused(&self) -> bool {
        !self.allowed
    }
}

/// Plans the carriers that `from..to` touches under `path`. History
/// (already applied, soak) is checked at run time; with `catalog` (`backstop
/// plan --database-url`), statements are judged against the live schema.
pub async fn plan_range(
    git: &GitRepo,
    from: Option<&str>,
    to: &str,
    path: &str,
    opts: LintOptions,
    catalog: Option<&crate::lint::Catalog>,
) -> Result<RangePlan, PlanError> {
    let commit = git.commit(to).await?;
    let carriers = touched_carriers(git, from, to, path).await?;
    let analysed = policy::analyse(&carriers, opts, catalog);
    let plan_hash = policy::plan_hash(&carriers, &analysed);
    let approvals = approvals(&commit, &carriers)?;
    let verdicts: Vec<Verdict> = carriers
        .iter()
        .zip(&analysed)
        .map(|(m, a)| {
            policy::evaluate(&policy::GateInput {
                carrier: m,
                findings: &a.findings,
                plan_hash: &plan_hash,
                approvals: &approvals,
                soak: Soak::Unknown,
                now: Utc::now(),
            })
        })
        .collect();
    let allowed = verdicts.iter().all(|v| v.allowed);
    let migrations = carriers
        .into_iter()
        .zip(analysed)
        .map(|(c, a)| PlannedMigration {
            transactional: c.statements.iter().all(|s| s.transactional),
            id: c.id,
            file: c.file,
            line: c.line,
            database: c.database.to_string(),
            phase: c.phase,
            order: c.order,
            checkpoint: c.checkpoint,
            statements: c.statements,
            findings: a.findings,
            facts: a.facts,
        })
        .collect();
    Ok(RangePlan {
        from: from.map(str::to_string),
        to: commit,
        plan_hash,
        migrations,
        approvals,
        verdicts,
        allowed,
        lost_writes: catalog.map(|c| match c.wal_level.as_str() {
            "logical" => "a restore would keep the writes it discards (wal_level is logical): lost-writes.sql and `backstop replay`".to_string(),
            other => format!("a restore would not keep the writes it discards (wal_level is {other}, not logical): only their count"),
        }),
    })
}

/// The plan for people.
pub fn render_plan(p: &RangePlan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let range = match &p.from {
        Some(f) => format!("{}..{}", &f[..f.len().min(7)], p.to.short()),
        None => p.to.short().to_string(),
    };
    let _ = writeln!(s, "plan for {range} ({}, {})", p.to.subject, p.to.author);
    if p.migrations.is_empty() {
        let _ = writeln!(s, "no migration carriers touched: nothing would run");
        return s;
    }
    let _ = writeln!(s, "plan hash: sha256:{}", p.plan_hash);
    for (m, v) in p.migrations.iter().zip(&p.verdicts) {
        let _ = writeln!(
            s,
            "\nmigration {} ({}:{})\n  database {}, phase {}, order {}, checkpoint {}, {}",
            m.id,
            m.file,
            m.line,
            m.database,
            m.phase,
            m.order,
            m.checkpoint,
            if m.transactional {
                "one transaction"
            } else {
                "statement by statement (non-transactional)"
            }
        );
        for st in &m.statements {
            let _ = writeln!(s, "  {}:{}  {}", st.origin, st.line, st.normalized);
        }
        for f in &m.findings {
            let _ = writeln!(
                s,
                "  {:?} {} {} at {}:{}:{}: {}\n    fix: {}",
                f.severity, f.rule, f.name, f.origin, f.line, f.column, f.why, f.fix
            );
            if let Some(facts) = &f.facts {
                let _ = writeln!(s, "    facts: {facts}");
            }
            if let Some(reason) = &f.ignored {
                let _ = writeln!(s, "    ignored (backstop:ignore): {reason}");
            }
        }
        for fact in &m.facts {
            let _ = writeln!(s, "  fact: {fact}");
        }
        let _ = writeln!(s, "  verdict: {}", if v.allowed { "ALLOWED" } else { "REFUSED" });
        for r in &v.reasons {
            let _ = writeln!(s, "    refused: {r}");
        }
        for n in &v.notes {
            let _ = writeln!(s, "    note: {n}");
        }
    }
    if let Some(l) = &p.lost_writes {
        let _ = writeln!(s, "\nlost writes: {l}");
    }
    let _ = writeln!(
        s,
        "\n{}",
        if p.allowed {
            "ALLOWED: this plan may run"
        } else {
            "REFUSED: this plan would stop in plan"
        }
    );
    s
}
