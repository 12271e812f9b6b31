//! What runs: from the commits pending between gate and upstream, the carriers
//! the net diff touches, each one's introducing commit, and (against the
//! database's history) which still need to run. Bad input stops here, before
//! anything is touched, with file, line and key.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::CheckpointError;
use crate::cluster::{Cluster, ClusterError};
use crate::db::Database;
use crate::git::{CommitInfo, GitError, GitRepo};
use crate::manifests::{self, Carrier, CheckpointKind, ManifestError, Order};
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
        source: CheckpointError,
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
/// (they are already live and carry nothing to run).
pub async fn discover(
    git: &GitRepo,
    gate: &str,
    head: &str,
    path: &str,
    pending: &[CommitInfo],
) -> Result<Vec<Candidate>, PlanError> {
    let snapshot = git.snapshot(head, path).await?;
    let changed = git.changed_paths(Some(gate), head, path).await?;
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
    let touched: Vec<Carrier> = carriers
        .into_iter()
        .filter(|c| changed.contains(&c.file) || c.sql_files.iter().any(|f| changed.contains(f)))
        .collect();
    if touched.is_empty() {
        return Ok(Vec::new());
    }
    // Introducing commit: the last pending commit that changed the carrier's files.
    let mut per_commit: Vec<BTreeSet<String>> = Vec::with_capacity(pending.len());
    for c in pending {
        per_commit.push(git.changed_paths(None, &c.sha, path).await?);
    }
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
    if let Some(job) = candidate.carriers.iter().find(|c| c.run == manifests::RunKind::Job) {
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
            line: first.line,
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
    if !migrations.is_empty() {
        let backend = checkpoint_for(first.checkpoint).map_err(|message| PlanError::Checkpoint {
            file: first.file.clone(),
            line: first.line,
            message,
        })?;
        if let Some(backend) = backend {
            backend.preflight(&db).await.map_err(|source| PlanError::Preflight {
                file: first.file.clone(),
                line: first.line,
                id: first.id.clone(),
                source,
            })?;
        }
    }
    Ok(Prepared {
        commit: candidate.commit.clone(),
        plan_hash: plan_hash(&migrations),
        migrations,
        already_applied,
        database: Some(db),
        order: first.order,
    })
}

/// sha256 over a canonical serialization of the migrations: for each, in id
/// order, `id`, `phase`, then each statement's kind and normalized text, one
/// per line.
pub fn plan_hash(migrations: &[Carrier]) -> String {
    let mut hasher = Sha256::new();
    for m in migrations {
        hasher.update(format!("migration {} phase {}\n", m.id, m.phase));
        for s in &m.statements {
            hasher.update(format!("{} {}\n", s.kind, s.normalized));
        }
    }
    hex::encode(hasher.finalize())
}

/// A summary of a plan for people and JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanSummary {
    pub commit: String,
    pub migrations: Vec<String>,
    pub plan_hash: String,
}
