//! The gate: the branch Flux follows, and the one place that moves it.
//!
//! **The gate invariant** (DESIGN section 2): the gate only ever points at a
//! commit whose guarded tree holds no carrier that is not applied with success
//! at exactly that version (same checksum) in its database. Every move of the
//! gate (a run's promotion, a fast-forward through plain commits, the revert of
//! a promoted commit, joining upstream) goes through [`GateView::move_to`],
//! which checks the target's tree against the history table right before the
//! push. The push itself needs a [`Checked`] proof that only this module can
//! make, and [`GitRepo::push`] refuses the gate branch, so no other code path
//! can move it.
//!
//! The pure half ([`violations`], [`furthest`]) decides; the async half reads
//! trees and history and pushes.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::Cluster;
use crate::git::{CommitInfo, GitError, GitRepo};
use crate::manifests::{self, Carrier};
use crate::runner::Runner;

/// A YAML file in a guarded tree that is not valid migration input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenFile {
    pub file: String,
    pub message: String,
    /// sha256 of the content: a broken file already live at the gate is not
    /// made worse by moving the gate (it is listed, not blocking).
    pub digest: String,
}

/// The carriers of one commit's guarded tree.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeState {
    pub sha: String,
    /// In (file, line) order.
    pub carriers: Vec<Carrier>,
    pub broken: Vec<BrokenFile>,
    /// Files under the path this commit changed against the commit before
    /// it in the pending list (empty for the gate's own state).
    pub changed: BTreeSet<String>,
}

impl TreeState {
    /// The state of `sha` whose guarded files are `snapshot`.
    pub fn parse(sha: &str, snapshot: &manifests::Snapshot) -> Self {
        let mut state = TreeState {
            sha: sha.to_string(),
            carriers: Vec::new(),
            broken: Vec::new(),
            changed: BTreeSet::new(),
        };
        for file in snapshot.keys() {
            state.parse_file(snapshot, file);
        }
        state
    }

    fn parse_file(&mut self, snapshot: &manifests::Snapshot, file: &str) {
        let Some(bytes) = snapshot.get(file).filter(|_| manifests::is_yaml(file)) else {
            return;
        };
        match manifests::parse_file(snapshot, file, bytes) {
            Ok(mut found) => self.carriers.append(&mut found),
            Err(errors) => self.broken.push(BrokenFile {
                file: file.to_string(),
                message: errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
                digest: hex::encode(Sha256::digest(bytes)),
            }),
        }
    }

    /// The state of the child commit `sha` that made `changes` to this
    /// state's tree (`snapshot`, updated in place). Only what the change can
    /// affect is parsed again: changed YAML files, carriers whose SQL files
    /// changed, and broken files (a change may mend what they name).
    pub fn next(&self, sha: &str, snapshot: &mut manifests::Snapshot, changes: crate::git::Changes) -> Self {
        if changes.is_empty() {
            let mut same = self.clone();
            same.sha = sha.to_string();
            same.changed.clear();
            return same;
        }
        let changed: BTreeSet<String> = changes.keys().cloned().collect();
        for (file, content) in changes {
            match content {
                Some(bytes) => snapshot.insert(file, bytes),
                None => snapshot.remove(&file),
            };
        }
        let mut reparse: BTreeSet<String> = changed.iter().filter(|f| manifests::is_yaml(f)).cloned().collect();
        for c in &self.carriers {
            if c.sql_files.iter().any(|f| changed.contains(f)) {
                reparse.insert(c.file.clone());
            }
        }
        reparse.extend(self.broken.iter().map(|b| b.file.clone()));
        let mut next = TreeState {
            sha: sha.to_string(),
            carriers: self
                .carriers
                .iter()
                .filter(|c| !reparse.contains(&c.file))
                .cloned()
                .collect(),
            broken: self
                .broken
                .iter()
                .filter(|b| !reparse.contains(&b.file))
                .cloned()
                .collect(),
            changed,
        };
        for file in &reparse {
            next.parse_file(snapshot, file);
        }
        next.carriers.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        next.broken.sort_by(|a, b| a.file.cmp(&b.file));
        next
    }
}

/// Key of a database in history lookups (`url:VAR` / `cnpg:ns/name` + database name).
pub fn database_key(c: &Carrier) -> String {
    format!("{}#{}", c.database, c.database_name.as_deref().unwrap_or(""))
}

/// What the history tables say: applied checksum per (database, migration id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub applied: HashMap<(String, String), String>,
    /// Databases whose history could not be read, with the reason.
    pub unreachable: HashMap<String, String>,
}

impl History {
    /// Whether `c` is applied with success at exactly its checksum.
    pub fn satisfies(&self, c: &Carrier) -> bool {
        self.applied.get(&(database_key(c), c.id.clone())) == Some(&c.checksum)
    }
}

/// Carriers and broken files the invariant does not hold against a target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exempt {
    /// (database key, id, checksum): live at the gate before backstop guarded
    /// it (no run ever took them), or the run's own after-apply carriers,
    /// which run right after the promotion.
    pub carriers: BTreeSet<(String, String, String)>,
    /// (file, digest) of broken files already live at the gate.
    pub broken: BTreeSet<(String, String)>,
}

impl Exempt {
    fn covers(&self, c: &Carrier) -> bool {
        self.carriers
            .contains(&(database_key(c), c.id.clone(), c.checksum.clone()))
    }
}

/// Why a tree may not be the gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// The carrier's migration has not run (at this version).
    NotApplied {
        id: String,
        file: String,
        line: usize,
        checksum: String,
    },
    /// History has the id at another checksum.
    OtherVersion {
        id: String,
        file: String,
        line: usize,
        checksum: String,
        applied: String,
    },
    /// A YAML file that is not valid migration input.
    Broken { file: String, message: String },
    /// The carrier's database history could not be read.
    Unreachable {
        id: String,
        file: String,
        line: usize,
        error: String,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        match self {
            Violation::NotApplied {
                id,
                file,
                line,
                checksum,
            } => {
                write!(
                    f,
                    "{file}:{line}: migration {id} (checksum {}) has not run",
                    short(checksum)
                )
            }
            Violation::OtherVersion {
                id,
                file,
                line,
                checksum,
                applied,
            } => write!(
                f,
                "{file}:{line}: migration {id} is applied at checksum {}, the tree has {}",
                short(applied),
                short(checksum)
            ),
            Violation::Broken { file, message } => write!(f, "{file}: {message}"),
            Violation::Unreachable { id, file, line, error } => {
                write!(f, "{file}:{line}: history of migration {id} cannot be read: {error}")
            }
        }
    }
}

/// Why `tree` may not be the gate (empty: it may).
pub fn violations(tree: &TreeState, history: &History, exempt: &Exempt) -> Vec<Violation> {
    let mut out = Vec::new();
    for c in &tree.carriers {
        if history.satisfies(c) || exempt.covers(c) {
            continue;
        }
        let key = database_key(c);
        out.push(if let Some(error) = history.unreachable.get(&key) {
            Violation::Unreachable {
                id: c.id.clone(),
                file: c.file.clone(),
                line: c.line,
                error: error.clone(),
            }
        } else if let Some(applied) = history.applied.get(&(key, c.id.clone())) {
            Violation::OtherVersion {
                id: c.id.clone(),
                file: c.file.clone(),
                line: c.line,
                checksum: c.checksum.clone(),
                applied: applied.clone(),
            }
        } else {
            Violation::NotApplied {
                id: c.id.clone(),
                file: c.file.clone(),
                line: c.line,
                checksum: c.checksum.clone(),
            }
        });
    }
    for b in &tree.broken {
        if !exempt.broken.contains(&(b.file.clone(), b.digest.clone())) {
            out.push(Violation::Broken {
                file: b.file.clone(),
                message: b.message.clone(),
            });
        }
    }
    out
}

/// The last of `states` (pending commits, oldest first) that may be the gate.
/// Commits before it that hold a never-run carrier version are skipped over:
/// the later tree no longer holds that version, so Flux never sees it.
pub fn furthest(states: &[TreeState], history: &History, exempt: &Exempt) -> Option<usize> {
    states.iter().rposition(|s| violations(s, history, exempt).is_empty())
}

/// The files under any of `paths` at `sha`.
pub async fn snapshot(git: &GitRepo, paths: &[&str], sha: &str) -> Result<manifests::Snapshot, GitError> {
    git.snapshot_paths(sha, paths).await
}

/// Tree states of `pending` (oldest first), built from `gate` by applying
/// each commit's changes under `paths` against the commit before it: one
/// snapshot and one batch of path-limited diffs for all paths, whatever the
/// number of commits, and only changed files parsed again.
pub async fn trees(
    git: &GitRepo,
    paths: &[&str],
    gate: &TreeState,
    pending: &[CommitInfo],
) -> Result<Vec<TreeState>, GitError> {
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut snapshot = snapshot(git, paths, &gate.sha).await?;
    let shas: Vec<String> = pending.iter().map(|c| c.sha.clone()).collect();
    let changes = git.changes_paths(&gate.sha, &shas, paths).await?;
    let mut out: Vec<TreeState> = Vec::with_capacity(pending.len());
    for (sha, changes) in shas.iter().zip(changes) {
        let state = out.last().unwrap_or(gate).next(sha, &mut snapshot, changes);
        out.push(state);
    }
    Ok(out)
}

/// Proof that a target passed the invariant check; only this module makes it.
#[derive(Debug)]
pub struct Checked {
    sha: String,
}

impl Checked {
    /// The commit that was checked.
    pub fn sha(&self) -> &str {
        &self.sha
    }
}

/// How the gate moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Fast-forward only (promotion, plain commits, the revert on the gate).
    FastForward,
    /// Upstream holds the gate's revert under another sha: jump to upstream.
    Join,
}

/// Failures to move the gate.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("refusing to move the gate to {target}: its guarded tree breaks the gate invariant: {}", .violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "))]
    Invariant { target: String, violations: Vec<Violation> },
    #[error(transparent)]
    Git(#[from] GitError),
}

/// The gate of one guarded path: trees, history and the checked move.
pub struct GateView<'a> {
    pub git: &'a GitRepo,
    pub cluster: &'a dyn Cluster,
    pub runner: &'a dyn Runner,
    pub branch: &'a str,
    pub path: &'a str,
    /// Other guarded paths deployed from the same gate branch (several
    /// Kustomizations following one GitRepository): the gate moves only to
    /// commits whose trees hold the invariant on every one of them.
    pub also: &'a [String],
    /// This instance's state id: a database another instance owns mid-run
    /// counts as unreadable (its history may be rolled back by that run).
    pub me: &'a str,
    /// The tree [`tree`](Self::tree) read last.
    pub last: &'a LastTree,
}

/// Guarded trees read or built lately, by commit and paths: a commit's
/// tree never changes, and a pass reads the gate's twice (to schedule, and
/// again at the gate move) and checks a pending commit's tree again when
/// it moves the gate there. A full parse reads every manifest under the
/// paths; the pending commits' states built incrementally ([`trees`], proven
/// equal to a full parse by `tests/gate_trees.rs`) are kept here for that
/// check. Bounded: the oldest entries go first.
#[derive(Default)]
pub struct LastTree(std::sync::Mutex<std::collections::VecDeque<(String, TreeState)>>);

impl LastTree {
    /// Pending commits' trees a pass keeps at most for its gate moves
    /// (beside the gate's own and the newest pending commit's).
    pub const PENDING: usize = 8;
    /// Trees kept at most.
    const KEPT: usize = Self::PENDING + 4;

    fn get(&self, key: &str) -> Option<TreeState> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter().find(|(k, _)| k == key).map(|(_, tree)| tree.clone())
    }

    fn put(&self, key: String, tree: TreeState) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|(k, _)| *k != key);
        if kept.len() >= Self::KEPT {
            kept.pop_front();
        }
        kept.push_back((key, tree));
    }
}

impl GateView<'_> {
    /// The carriers and broken files of `sha`'s guarded tree.
    pub async fn tree(&self, sha: &str) -> Result<TreeState, GitError> {
        let key = self.key(sha);
        if let Some(tree) = self.last.get(&key) {
            return Ok(tree);
        }
        let tree = TreeState::parse(sha, &snapshot(self.git, &self.paths(), sha).await?);
        self.last.put(key, tree.clone());
        Ok(tree)
    }

    /// Keeps `states` (built by [`trees`](Self::trees)) for [`tree`](Self::tree):
    /// the gate moves to one of them next. Its own state as a full parse
    /// has it (what changed against the commit before is not part of it).
    pub fn remember<'t>(&self, states: impl IntoIterator<Item = &'t TreeState>) {
        for state in states {
            let mut tree = state.clone();
            tree.changed.clear();
            self.last.put(self.key(&state.sha), tree);
        }
    }

    fn key(&self, sha: &str) -> String {
        format!("{sha} {}", self.paths().join("\n"))
    }

    /// The guarded path and the others deployed from the same gate.
    pub fn paths(&self) -> Vec<&str> {
        std::iter::once(self.path)
            .chain(self.also.iter().map(String::as_str))
            .collect()
    }

    /// Tree states of `pending` (oldest first): see [`trees`].
    pub async fn trees(&self, gate: &TreeState, pending: &[CommitInfo]) -> Result<Vec<TreeState>, GitError> {
        trees(self.git, &self.paths(), gate, pending).await
    }

    /// History of every database the trees' carriers name.
    pub async fn history<'t>(&self, trees: impl IntoIterator<Item = &'t TreeState>) -> History {
        let mut history = History::default();
        let mut seen = BTreeSet::new();
        for c in trees.into_iter().flat_map(|t| t.carriers.iter()) {
            let key = database_key(c);
            if !seen.insert(key.clone()) {
                continue;
            }
            let rows = match self.cluster.resolve(&c.database, c.database_name.as_deref()).await {
                Ok(db) => match self.runner.owner_and_history(&db).await {
                    Ok((Some(owner), _)) if owner.state != self.me => Err(format!(
                        "owned mid-run by another {owner}: its history is not final until that run ends"
                    )),
                    Ok((_, history)) => history.map_err(|e| crate::run::chain(&e)),
                    Err(e) => Err(crate::run::chain(&e)),
                },
                Err(e) => Err(crate::run::chain(&e)),
            };
            match rows {
                Ok(rows) => {
                    for r in rows {
                        history.applied.insert((key.clone(), r.id), r.checksum);
                    }
                }
                Err(e) => {
                    history.unreachable.insert(key, e);
                }
            }
        }
        history
    }

    /// Checks `target` against the invariant and moves the gate there.
    /// Returns the sha the gate is at afterwards.
    pub async fn move_to(&self, target: &str, how: Move, exempt: &Exempt) -> Result<String, GateError> {
        let proof = self.check(target, exempt).await?;
        self.push(&proof, how).await
    }

    /// Checks `target` against the invariant; only reads. The proof is what
    /// [`push`](Self::push) takes.
    pub async fn check(&self, target: &str, exempt: &Exempt) -> Result<Checked, GateError> {
        let tree = self.tree(target).await?;
        let history = self.history([&tree]).await;
        let found = violations(&tree, &history, exempt);
        if !found.is_empty() {
            return Err(GateError::Invariant {
                target: target.to_string(),
                violations: found,
            });
        }
        Ok(Checked {
            sha: target.to_string(),
        })
    }

    /// Moves the gate to a target [`check`](Self::check) passed. Returns the
    /// sha the gate is at afterwards.
    pub async fn push(&self, proof: &Checked, how: Move) -> Result<String, GateError> {
        let target = proof.sha();
        tracing::info!(to = %&target[..target.len().min(7)], ?how, "moving the gate (invariant checked)");
        self.git.push_gate(proof, self.branch, how == Move::Join).await?;
        Ok(target.to_string())
    }
}

/// What the gate of a guarded path waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Wait {
    /// Plan, lint, approval or bad input refused the commit; nothing was touched.
    Refused { commit: String, message: String },
    /// A migration at this version failed; it is not retried.
    RunFailed {
        run: String,
        migrations: Vec<String>,
        /// The revert to merge (a pull request, a branch, or a commit upstream).
        revert: Option<String>,
        /// Remediation did not complete: a person must act.
        needs_person: bool,
        detail: String,
    },
    /// A transient fault is being waited out; nothing is reverted.
    Retrying {
        run: Option<String>,
        step: String,
        cause: String,
        attempts: u32,
        since: DateTime<Utc>,
        next_at: DateTime<Utc>,
        stalled: bool,
    },
    /// The gate holds the revert of a promoted commit; upstream does not yet.
    GateRevert { run: String, revert: String },
    /// Another backstop instance owns the database mid-run; this one does not
    /// plan, run, restore or revert there, and the gate does not move past it.
    Busy {
        database: String,
        owner: crate::owner::Owner,
    },
}

impl Wait {
    /// Whether a person must act (exit 3).
    pub fn needs_person(&self) -> bool {
        match self {
            Wait::RunFailed { needs_person, .. } => *needs_person,
            Wait::Retrying { stalled, .. } => *stalled,
            _ => false,
        }
    }
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Refused { commit, message } => write!(
                f,
                "commit {} is refused; the gate waits before it until a commit fixes it:\n  {message}",
                &commit[..commit.len().min(7)]
            ),
            Wait::RunFailed {
                run,
                migrations,
                revert,
                needs_person,
                detail,
            } => {
                write!(f, "migration(s) {} failed in run {run}: {detail}; ", migrations.join(", "))?;
                match (revert, needs_person) {
                    (Some(r), false) => write!(f, "the gate waits for {r} to be merged, or for a commit that changes the carrier"),
                    (Some(r), true) => write!(f, "{r} was made but remediation did not complete: a person must act (see `backstop report {run}`); the gate holds until `backstop ack {run}`"),
                    (None, true) => write!(f, "no revert could be made: a person must act (see `backstop report {run}`); the gate holds until `backstop ack {run}`"),
                    (None, false) => write!(f, "no revert was needed or made; the gate waits for a commit that changes the carrier"),
                }
            }
            Wait::Retrying {
                run,
                step,
                cause,
                attempts,
                since,
                next_at,
                stalled,
            } => {
                let who = run.as_deref().map(|r| format!("run {r} ")).unwrap_or_default();
                write!(
                    f,
                    "{}{who}step {step} hit a transient fault ({attempts} attempt(s) since {}): {cause}; next try at {}; nothing was reverted",
                    if *stalled { "STALLED: " } else { "" },
                    since.format("%Y-%m-%d %H:%M:%S UTC"),
                    next_at.format("%Y-%m-%d %H:%M:%S UTC"),
                )
            }
            Wait::GateRevert { run, revert } => write!(
                f,
                "the gate holds revert {} made by run {run}; it joins upstream once upstream's guarded tree equals the gate's (merge the revert)",
                &revert[..revert.len().min(7)]
            ),
            Wait::Busy { database, owner } => write!(
                f,
                "database {database} is owned by another {owner}; nothing was done here. It is released when that run ends; if that instance is gone for good and its state directory lost, a person may release it with `DELETE FROM backstop.run_owner`"
            ),
        }
    }
}

/// Where the gate of one guarded path is and what it waits for (`status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateStatus {
    pub path: String,
    pub gate_branch: String,
    pub upstream_branch: String,
    pub gate: String,
    pub upstream: String,
    pub waiting: Option<Wait>,
    /// Since when it waits for this.
    pub since: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carrier(id: &str, checksum: &str) -> Carrier {
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {id}\n  annotations:\n    backstop.dev/migration: \"{id}\"\n    backstop.dev/database: url:DB\ndata:\n  a.sql: \"SELECT {checksum}\"\n"
        );
        let file = format!("m/{id}.yaml");
        let snap = manifests::Snapshot::from([(file.clone(), yaml.clone().into_bytes())]);
        let mut c = manifests::parse_file(&snap, &file, yaml.as_bytes()).unwrap().remove(0);
        c.checksum = checksum.into();
        c
    }

    fn tree(sha: &str, carriers: &[(&str, &str)]) -> TreeState {
        TreeState {
            sha: sha.into(),
            carriers: carriers.iter().map(|(i, c)| carrier(i, c)).collect(),
            broken: vec![],
            changed: BTreeSet::new(),
        }
    }

    fn applied(rows: &[(&str, &str)]) -> History {
        let mut h = History::default();
        for (id, sum) in rows {
            h.applied
                .insert((database_key(&carrier(id, sum)), id.to_string()), sum.to_string());
        }
        h
    }

    #[test]
    fn a_tree_with_an_unapplied_carrier_may_not_be_the_gate() {
        let t = tree("c1", &[("0001", "aa")]);
        assert!(matches!(
            violations(&t, &History::default(), &Exempt::default())[..],
            [Violation::NotApplied { .. }]
        ));
        assert!(violations(&t, &applied(&[("0001", "aa")]), &Exempt::default()).is_empty());
    }

    #[test]
    fn another_applied_version_does_not_satisfy_the_invariant() {
        let t = tree("c1", &[("0001", "bb")]);
        assert!(matches!(
            violations(&t, &applied(&[("0001", "aa")]), &Exempt::default())[..],
            [Violation::OtherVersion { .. }]
        ));
    }

    #[test]
    fn intermediate_versions_are_skipped_over_and_the_gate_stops_before_unrun_ones() {
        // c1 adds 0006 v1 (+ deploy), c2 rewrites it to v2, c3 to v3 (applied), c4 adds 0007 (not run).
        let states = vec![
            tree("c1", &[("0006", "v1")]),
            tree("c2", &[("0006", "v2")]),
            tree("c3", &[("0006", "v3")]),
            tree("c4", &[("0006", "v3"), ("0007", "x")]),
        ];
        let h = applied(&[("0006", "v3")]);
        assert_eq!(furthest(&states, &h, &Exempt::default()), Some(2));
        // Nothing applied: the gate does not move at all.
        assert_eq!(furthest(&states, &History::default(), &Exempt::default()), None);
    }

    #[test]
    fn a_carrier_removed_later_lets_the_gate_jump_over_it() {
        let states = vec![tree("c1", &[("0006", "v1")]), tree("c2", &[])];
        assert_eq!(furthest(&states, &History::default(), &Exempt::default()), Some(1));
    }

    #[test]
    fn broken_files_block_unless_already_live_at_the_gate() {
        let mut t = tree("c1", &[]);
        t.broken.push(BrokenFile {
            file: "m/x.yaml".into(),
            message: "YAML does not parse".into(),
            digest: "d1".into(),
        });
        assert_eq!(violations(&t, &History::default(), &Exempt::default()).len(), 1);
        let mut exempt = Exempt::default();
        exempt.broken.insert(("m/x.yaml".into(), "d1".into()));
        assert!(violations(&t, &History::default(), &exempt).is_empty());
    }

    #[test]
    fn unreachable_history_blocks_carriers_of_that_database_only() {
        let t = tree("c1", &[("0001", "aa")]);
        let mut h = History::default();
        h.unreachable
            .insert(database_key(&t.carriers[0]), "connection refused".into());
        assert!(matches!(
            violations(&t, &h, &Exempt::default())[..],
            [Violation::Unreachable { .. }]
        ));
        assert!(violations(&tree("c2", &[]), &h, &Exempt::default()).is_empty());
    }
}
