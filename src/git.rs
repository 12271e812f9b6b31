//! The GitOps repository: a bare mirror of the `sre` remote (git2), the commits
//! pending between the gate and upstream branches, tree snapshots and diffs
//! limited to a path, fast-forward pushes of the gate, and revert commits.
//!
//! git2 is blocking: every public method runs its work on tokio's blocking pool.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use git2::{Oid, Repository};
use serde::{Deserialize, Serialize};

use crate::manifests::Snapshot;

mod local;
mod process;
pub use process::{bound_network_waits, init_deferring_ca_bundle, CONNECT_TIMEOUT, SERVER_TIMEOUT};

/// Failures of git operations; each names the step and the ref or remote.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("failed to open git mirror {path}")]
    Open { path: PathBuf, source: git2::Error },
    #[error("failed to fetch from {url}")]
    Fetch { url: String, source: git2::Error },
    #[error("branch {branch:?} does not exist on {url}")]
    MissingBranch { branch: String, url: String },
    #[error("gate branch {gate:?} ({gate_sha}) is not an ancestor of upstream {upstream:?}: the branches diverged; move the gate by hand to a commit of upstream that is deployed")]
    Diverged {
        gate: String,
        gate_sha: String,
        upstream: String,
    },
    #[error("failed to read commit {sha}")]
    Read { sha: String, source: git2::Error },
    #[error("push of {sha} to {branch:?} on {url} was rejected: {reason}")]
    Rejected {
        sha: String,
        branch: String,
        url: String,
        reason: String,
    },
    #[error("failed to push {sha} to {branch:?} on {url}")]
    Push {
        sha: String,
        branch: String,
        url: String,
        source: git2::Error,
    },
    #[error("reverting {sha} on top of {onto} conflicts in: {paths}")]
    RevertConflict { sha: String, onto: String, paths: String },
    #[error("failed to write the revert commit of {sha}")]
    Revert { sha: String, source: git2::Error },
    #[error("refusing to push to {branch:?} without the gate invariant check (internal error)")]
    Protected { branch: String },
    #[error("git worker task failed")]
    Join(#[from] tokio::task::JoinError),
}

type Result<T> = std::result::Result<T, GitError>;

/// One commit's changes under a path: file → new content (None: deleted).
pub type Changes = std::collections::BTreeMap<String, Option<Vec<u8>>>;

/// What a report needs to know about a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInfo {
    pub sha: String,
    pub subject: String,
    pub author: String,
    /// Commit time, RFC 3339.
    pub time: String,
    /// Trailers such as `Backstop-Approved-By` (key, value).
    pub trailers: Vec<(String, String)>,
}

impl CommitInfo {
    /// First seven characters of the sha.
    pub fn short(&self) -> &str {
        &self.sha[..self.sha.len().min(7)]
    }
}

/// A bare mirror of one remote, kept under the state directory.
#[derive(Debug, Clone)]
pub struct GitRepo {
    mirror: PathBuf,
    url: String,
    auth: GitAuth,
    /// The gate branch: only [`GitRepo::push_gate`] may move it.
    protected: Option<String>,
    /// Shared by the clones of one mirror (the controller's Kustomizations
    /// on one repository): when the last fetch started, so that a fetch
    /// asked for while another ran is answered by the next one alone.
    fetched: std::sync::Arc<tokio::sync::Mutex<Option<std::time::Instant>>>,
    /// Shared too: what the controller knows of the source (see
    /// [`hint_source`](Self::hint_source)).
    hint: std::sync::Arc<std::sync::Mutex<FetchHint>>,
    /// The GitRepository (`namespace/name`) this clone's hints are about.
    source: Option<String>,
    /// Shared too: the files the commits pending between two shas change
    /// (see [`pending_touches`](Self::pending_touches)).
    touched: TouchedCache,
}

/// Files changed by the commits pending between (gate, upstream) shas.
type TouchedCache = std::sync::Arc<std::sync::Mutex<HashMap<(Oid, Oid), std::sync::Arc<BTreeSet<String>>>>>;

/// When a fetch may be skipped: the revision of the asking clone's source
/// (its GitRepository) is what it was when the last fetch started, and that
/// fetch is younger than `max_age`. Revisions are kept per source: several
/// GitRepositories (branches) can share one mirror.
#[derive(Debug, Default)]
struct FetchHint {
    current: HashMap<String, String>,
    at_last_fetch: HashMap<String, String>,
    max_age: Option<std::time::Duration>,
}

/// Identity backstop writes its commits with.
const BOT_NAME: &str = "backstop";
const BOT_EMAIL: &str = "backstop@localhost";

impl GitRepo {
    /// Opens the mirror at `mirror`, creating it (bare, remote `origin` = `url`) if needed.
    /// Credentials in an http(s) `url` never reach the disk: the remote is
    /// stored without them (an older mirror's config is rewritten) and they
    /// answer the remote's credential requests unless [`with_auth`](Self::with_auth) gives others.
    pub async fn open(mirror: &Path, url: &str) -> Result<Self> {
        let mirror = mirror.to_path_buf();
        let (url, from_url) = split_credentials(url);
        let (m, u) = (mirror.clone(), url.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let open_err = |source| GitError::Open {
                path: m.clone(),
                source,
            };
            let repo = match Repository::open_bare(&m) {
                Ok(r) => r,
                Err(_) => Repository::init_bare(&m).map_err(open_err)?,
            };
            let secret = |u: Option<&str>| u.is_some_and(|u| redact(u) != u);
            match repo.find_remote("origin") {
                Ok(r) if r.url().ok() == Some(u.as_str()) && !secret(r.pushurl().ok().flatten()) => {}
                Ok(r) => {
                    repo.remote_set_url("origin", &u).map_err(open_err)?;
                    if secret(r.pushurl().ok().flatten()) {
                        repo.remote_set_pushurl("origin", None).map_err(open_err)?;
                    }
                    // FETCH_HEAD names the URL it fetched from (with a token, if it had one).
                    if secret(r.url().ok()) {
                        let _ = std::fs::remove_file(m.join("FETCH_HEAD"));
                    }
                }
                Err(_) => {
                    repo.remote("origin", &u).map_err(open_err)?;
                }
            }
            Ok(())
        })
        .await??;
        Ok(Self {
            mirror,
            url: redact(&url),
            auth: from_url
                .map(|(username, token)| GitAuth::Token { username, token })
                .unwrap_or_default(),
            protected: None,
            fetched: Default::default(),
            hint: Default::default(),
            source: None,
            touched: Default::default(),
        })
    }

    /// Uses `auth` for fetch and push; [`GitAuth::None`] keeps the credentials
    /// the URL carried, if any.
    pub fn with_auth(mut self, auth: GitAuth) -> Self {
        if !matches!(auth, GitAuth::None) {
            self.auth = auth;
        }
        self
    }

    /// Makes `branch` (the gate) movable only through [`GitRepo::push_gate`],
    /// that is, only after the gate invariant was checked.
    pub fn protect(mut self, branch: &str) -> Self {
        self.protected = Some(branch.to_string());
        self
    }

    /// The remote URL or path.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An existing repository (bare or with a work tree), read in place: for
    /// `backstop plan`. Remote operations are not meant for it.
    pub async fn existing(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let p = path.clone();
        let found = tokio::task::spawn_blocking(move || {
            Repository::discover(&p)
                .map(|r| r.path().to_path_buf())
                .map_err(|source| GitError::Open { path: p, source })
        })
        .await??;
        Ok(Self {
            mirror: found,
            url: path.display().to_string(),
            auth: GitAuth::None,
            protected: None,
            fetched: Default::default(),
            hint: Default::default(),
            source: None,
            touched: Default::default(),
        })
    }

    /// Resolves a revision (`HEAD~1`, a branch, a sha prefix) to a commit sha.
    pub async fn resolve(&self, rev: &str) -> Result<String> {
        let rev = rev.to_string();
        self.blocking(move |this| {
            let repo = this.repo()?;
            let read = |source| GitError::Read {
                sha: rev.clone(),
                source,
            };
            let commit = repo
                .revparse_single(&rev)
                .and_then(|o| o.peel_to_commit())
                .map_err(read)?;
            Ok(commit.id().to_string())
        })
        .await
    }

    fn repo(&self) -> Result<Repository> {
        Repository::open(&self.mirror).map_err(|source| GitError::Open {
            path: self.mirror.clone(),
            source,
        })
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Self) -> Result<T> + Send + 'static) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this)).await?
    }

    /// Fetches every branch of the remote (pruning deleted ones), then
    /// repacks the mirror when packs pile up (see [`maintain`](Self::maintain)).
    /// Clones of one mirror (sharing it between Kustomizations) coalesce:
    /// a fetch that began after this call was made and has finished
    /// answers it, so a burst of passes on one repository fetches once.
    pub async fn fetch(&self) -> Result<()> {
        let asked = std::time::Instant::now();
        let mut last = self.fetched.lock().await;
        if last.is_some_and(|started| started >= asked) {
            return Ok(());
        }
        let sources = match self.hint.lock() {
            Ok(h) => {
                let unchanged = self.source.as_ref().is_some_and(|source| {
                    h.current.contains_key(source) && h.current.get(source) == h.at_last_fetch.get(source)
                });
                let young = match (h.max_age, *last) {
                    (Some(age), Some(at)) => at.elapsed() < age,
                    _ => false,
                };
                if unchanged && young {
                    tracing::debug!(url = %self.url, "fetch skipped: the source revision is unchanged");
                    return Ok(());
                }
                h.current.clone()
            }
            Err(_) => HashMap::new(),
        };
        let started = std::time::Instant::now();
        tracing::debug!(url = %self.url, "fetching");
        self.fetch_only().await?;
        *last = Some(started);
        if let Ok(mut h) = self.hint.lock() {
            h.at_last_fetch = sources;
        }
        self.maintain().await;
        Ok(())
    }

    /// This clone follows `source` (a GitRepository, `namespace/name`):
    /// its revision hints ([`hint_source`](Self::hint_source)) are its own.
    pub fn for_source(mut self, source: &str) -> Self {
        self.source = Some(source.to_string());
        self
    }

    /// The controller's hint: this clone's source (its GitRepository's
    /// artifact) is at `revision`. While it stays there, fetches younger
    /// than `max_age` are reused: a new artifact fetches at once,
    /// upstream-only pushes are seen within `max_age` (the reconcile
    /// interval), and a thousand Kustomizations on one repository do not
    /// fetch it a thousand times. Without a source (see
    /// [`for_source`](Self::for_source)) every fetch goes to the remote.
    pub fn hint_source(&self, revision: Option<String>, max_age: std::time::Duration) {
        let Some(source) = &self.source else { return };
        if let Ok(mut h) = self.hint.lock() {
            match revision {
                Some(r) => h.current.insert(source.clone(), r),
                None => h.current.remove(source),
            };
            h.max_age = Some(max_age);
        }
    }

    /// Packs in the mirror above which [`maintain`](Self::maintain) repacks
    /// (git's own `gc.autoPackLimit` is 50).
    pub const PACK_LIMIT: usize = 32;

    /// Every fetch leaves one more pack, and every object lookup searches
    /// them all: once more than [`PACK_LIMIT`](Self::PACK_LIMIT) pile up, the
    /// mirror is repacked into one with `git repack -a -d -k` (git's own tool;
    /// libgit2 has no repack). A repack that cannot run is logged and the
    /// mirror stays usable, only slower.
    pub async fn maintain(&self) {
        let packs = std::fs::read_dir(self.mirror.join("objects").join("pack"))
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                    .count()
            })
            .unwrap_or(0);
        if packs <= Self::PACK_LIMIT {
            return;
        }
        let mut cmd = tokio::process::Command::new("git");
        // -k: objects no ref reaches any more (an upstream force-push) stay, so an
        // open run's commit is never lost from the mirror.
        cmd.arg("-C").arg(&self.mirror).args(["repack", "-a", "-d", "-k", "-q"]);
        crate::pgbin::dies_with_us(&mut cmd);
        match cmd.output().await {
            Ok(out) if out.status.success() => tracing::info!(packs, "repacked the git mirror"),
            Ok(out) => tracing::warn!(
                packs,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "git repack of the mirror failed; it stays usable, only slower"
            ),
            Err(e) => {
                tracing::warn!(packs, error = %e, "cannot run git repack on the mirror; it stays usable, only slower")
            }
        }
    }

    async fn fetch_only(&self) -> Result<()> {
        if self.fetch_local().await {
            return Ok(());
        }
        self.blocking(|this| {
            let repo = this.repo()?;
            let err = |source| GitError::Fetch {
                url: this.url.clone(),
                source,
            };
            let mut remote = repo.find_remote("origin").map_err(err)?;
            if this.local_remote().is_none() {
                process::load_ca_bundle();
            }
            let mut opts = git2::FetchOptions::new();
            opts.prune(git2::FetchPrune::On);
            opts.remote_callbacks(this.auth.callbacks());
            remote
                .fetch(&["+refs/heads/*:refs/remotes/origin/*"], Some(&mut opts), None)
                .map_err(err)
        })
        .await
    }

    /// The commit a remote branch points at (as of the last fetch).
    pub async fn branch(&self, branch: &str) -> Result<Option<String>> {
        let branch = branch.to_string();
        self.blocking(move |this| {
            let repo = this.repo()?;
            Ok(repo
                .refname_to_id(&format!("refs/remotes/origin/{branch}"))
                .ok()
                .map(|o| o.to_string()))
        })
        .await
    }

    /// Like [`branch`](Self::branch) but an absent branch is an error.
    pub async fn require_branch(&self, branch: &str) -> Result<String> {
        self.branch(branch).await?.ok_or_else(|| GitError::MissingBranch {
            branch: branch.to_string(),
            url: self.url.clone(),
        })
    }

    /// Whether `ancestor` is `descendant` or one of its ancestors.
    pub async fn is_ancestor(&self, ancestor: &str, descendant: &str) -> Result<bool> {
        let (a, d) = (ancestor.to_string(), descendant.to_string());
        self.blocking(move |this| {
            let repo = this.repo()?;
            let (a, d) = (oid(&a)?, oid(&d)?);
            Ok(a == d
                || repo.graph_descendant_of(d, a).map_err(|source| GitError::Read {
                    sha: d.to_string(),
                    source,
                })?)
        })
        .await
    }

    /// Commits in `gate..upstream`, oldest first (first-parent history of
    /// upstream). Fails when the gate is not an ancestor of upstream.
    pub async fn pending(&self, gate: &str, upstream: &str, names: (&str, &str)) -> Result<Vec<CommitInfo>> {
        let (gate, upstream) = (gate.to_string(), upstream.to_string());
        let (gate_name, upstream_name) = (names.0.to_string(), names.1.to_string());
        self.blocking(move |this| {
            let repo = this.repo()?;
            let g = oid(&gate)?;
            let u = oid(&upstream)?;
            if g == u {
                return Ok(Vec::new());
            }
            let read = |source| GitError::Read {
                sha: upstream.clone(),
                source,
            };
            if !repo.graph_descendant_of(u, g).map_err(read)? {
                return Err(GitError::Diverged {
                    gate: gate_name,
                    gate_sha: gate.clone(),
                    upstream: upstream_name,
                });
            }
            let walk = first_parent_walk(&repo, g, u).map_err(read)?;
            let mut out = Vec::new();
            for id in walk {
                let id = id.map_err(read)?;
                out.push(commit_info(&repo, id)?);
            }
            Ok(out)
        })
        .await
    }

    /// Whether the commits pending between the remote branches `gate` and
    /// `upstream` (those [`pending`](Self::pending) lists) change anything
    /// under `prefix`; None when the gate branch is missing or upstream does
    /// not descend from it. One task and one repository; the files the
    /// pending commits change are computed once per pair of shas and shared
    /// by every clone of the mirror, so the Kustomizations of one gate ask
    /// it for the cost of one.
    pub async fn pending_touches(&self, gate: &str, upstream: &str, prefix: &str) -> Result<Option<bool>> {
        let (gate, upstream, prefix) = (gate.to_string(), upstream.to_string(), normalize_prefix(prefix));
        self.blocking(move |this| {
            let repo = this.repo()?;
            let at = |branch: &str| repo.refname_to_id(&format!("refs/remotes/origin/{branch}")).ok();
            let (Some(g), Some(u)) = (at(&gate), at(&upstream)) else {
                return Ok(None);
            };
            if g == u {
                return Ok(Some(false));
            }
            let cached = this.touched.lock().ok().and_then(|c| c.get(&(g, u)).cloned());
            let files = match cached {
                Some(files) => files,
                None => {
                    let read = |source| GitError::Read {
                        sha: u.to_string(),
                        source,
                    };
                    if !repo.graph_descendant_of(u, g).map_err(read)? {
                        return Ok(None);
                    }
                    let walk = first_parent_walk(&repo, g, u).map_err(read)?;
                    let mut files = BTreeSet::new();
                    let mut before = repo.find_commit(g).and_then(|c| c.tree()).map_err(read)?;
                    for id in walk {
                        let tree = repo
                            .find_commit(id.map_err(read)?)
                            .and_then(|c| c.tree())
                            .map_err(read)?;
                        let diff = repo.diff_tree_to_tree(Some(&before), Some(&tree), None).map_err(read)?;
                        for delta in diff.deltas() {
                            for file in [delta.old_file(), delta.new_file()] {
                                if let Some(path) = file.path().and_then(|p| p.to_str()) {
                                    files.insert(path.to_string());
                                }
                            }
                        }
                        before = tree;
                    }
                    let files = std::sync::Arc::new(files);
                    if let Ok(mut cache) = this.touched.lock() {
                        if cache.len() >= 64 {
                            cache.clear();
                        }
                        cache.insert((g, u), files.clone());
                    }
                    files
                }
            };
            Ok(Some(files.iter().any(|f| under(f, &prefix))))
        })
        .await
    }

    /// Metadata of one commit.
    pub async fn commit(&self, sha: &str) -> Result<CommitInfo> {
        let sha = sha.to_string();
        self.blocking(move |this| commit_info(&this.repo()?, oid(&sha)?)).await
    }

    /// Every file under `prefix` (empty = whole tree) at `sha`.
    pub async fn snapshot(&self, sha: &str, prefix: &str) -> Result<Snapshot> {
        self.snapshot_paths(sha, &[prefix]).await
    }

    /// The files under any of `prefixes` at `sha`, in one task: each
    /// prefix's subtree is looked up and walked alone, so the cost grows
    /// with the files under the prefixes, not with the whole tree.
    pub async fn snapshot_paths(&self, sha: &str, prefixes: &[&str]) -> Result<Snapshot> {
        let sha = sha.to_string();
        let mut prefixes: Vec<String> = prefixes.iter().map(|p| normalize_prefix(p)).collect();
        prefixes.sort();
        prefixes.dedup();
        // A prefix under another adds nothing.
        let prefixes: Vec<String> = prefixes
            .iter()
            .filter(|p| !prefixes.iter().any(|q| q != *p && under(p, q)))
            .cloned()
            .collect();
        self.blocking(move |this| {
            let repo = this.repo()?;
            let read = |source| GitError::Read {
                sha: sha.clone(),
                source,
            };
            let root = repo.find_commit(oid(&sha)?).and_then(|c| c.tree()).map_err(read)?;
            let mut snap = Snapshot::new();
            for prefix in &prefixes {
                let tree = if prefix.is_empty() {
                    root.clone()
                } else {
                    let entry = match root.get_path(Path::new(prefix)) {
                        Ok(entry) => entry,
                        Err(e) if e.code() == git2::ErrorCode::NotFound => continue,
                        Err(e) => return Err(read(e)),
                    };
                    match entry.kind() {
                        Some(git2::ObjectType::Tree) => repo.find_tree(entry.id()).map_err(read)?,
                        Some(git2::ObjectType::Blob) => {
                            let blob = repo.find_blob(entry.id()).map_err(read)?;
                            snap.insert(prefix.clone(), blob.content().to_vec());
                            continue;
                        }
                        _ => continue,
                    }
                };
                let base = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                let mut failure = None;
                tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
                    if entry.kind() != Some(git2::ObjectType::Blob) {
                        return git2::TreeWalkResult::Ok;
                    }
                    match repo.find_blob(entry.id()) {
                        Ok(blob) => {
                            snap.insert(
                                format!("{base}{dir}{}", entry.name().unwrap_or("")),
                                blob.content().to_vec(),
                            );
                            git2::TreeWalkResult::Ok
                        }
                        Err(e) => {
                            failure = Some(e);
                            git2::TreeWalkResult::Abort
                        }
                    }
                })
                .map_err(read)?;
                if let Some(e) = failure {
                    return Err(read(e));
                }
            }
            Ok(snap)
        })
        .await
    }

    /// Paths under `prefix` that differ between two commits (`from` = None: the
    /// commit's first parent, or everything for a root commit).
    pub async fn changed_paths(&self, from: Option<&str>, to: &str, prefix: &str) -> Result<BTreeSet<String>> {
        let (from, to, prefix) = (from.map(str::to_string), to.to_string(), normalize_prefix(prefix));
        self.blocking(move |this| {
            let repo = this.repo()?;
            let read = |source| GitError::Read {
                sha: to.clone(),
                source,
            };
            let to_commit = repo.find_commit(oid(&to)?).map_err(read)?;
            let to_tree = to_commit.tree().map_err(read)?;
            let from_tree = match &from {
                Some(f) => Some(repo.find_commit(oid(f)?).and_then(|c| c.tree()).map_err(read)?),
                None => to_commit.parent(0).ok().map(|p| p.tree()).transpose().map_err(read)?,
            };
            let mut opts = git2::DiffOptions::new();
            if !prefix.is_empty() {
                // The paths literally (`*?[` in a folder name are not patterns).
                opts.pathspec(&prefix).disable_pathspec_match(true);
            }
            let diff = repo
                .diff_tree_to_tree(from_tree.as_ref(), Some(&to_tree), Some(&mut opts))
                .map_err(read)?;
            let mut out = BTreeSet::new();
            for delta in diff.deltas() {
                for file in [delta.old_file(), delta.new_file()] {
                    if let Some(p) = file.path().and_then(|p| p.to_str()) {
                        if under(p, &prefix) {
                            out.insert(p.to_string());
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// What each of `shas` changed under `prefix` against the one before it
    /// (the first against `from`), with the new content of each changed file
    /// (None: deleted). One repository and pathspec-limited tree diffs for the
    /// whole list: the cost grows with the files the commits touch under the
    /// path, not with the size of the tree.
    pub async fn changes(&self, from: &str, shas: &[String], prefix: &str) -> Result<Vec<Changes>> {
        self.changes_paths(from, shas, &[prefix]).await
    }

    /// Like [`changes`](Self::changes), under any of `prefixes`, in one
    /// task and one diff per commit (several guarded paths on one gate).
    pub async fn changes_paths(&self, from: &str, shas: &[String], prefixes: &[&str]) -> Result<Vec<Changes>> {
        let (from, shas) = (from.to_string(), shas.to_vec());
        let prefixes: Vec<String> = prefixes.iter().map(|p| normalize_prefix(p)).collect();
        let whole = prefixes.iter().any(|p| p.is_empty());
        self.blocking(move |this| {
            let repo = this.repo()?;
            let mut opts = git2::DiffOptions::new();
            if !whole {
                for prefix in &prefixes {
                    opts.pathspec(prefix);
                }
                // The paths literally (`*?[` in a folder name are not patterns).
                opts.disable_pathspec_match(true);
            }
            let wanted = |path: &str| whole || prefixes.iter().any(|p| under(path, p));
            let tree_of = |sha: &str| {
                repo.find_commit(oid(sha)?)
                    .and_then(|c| c.tree())
                    .map_err(|source| GitError::Read {
                        sha: sha.to_string(),
                        source,
                    })
            };
            // What each prefix names in a tree: a commit whose every prefix
            // names the same object as in the one before changed nothing
            // there, and needs no diff (most commits of a busy repository).
            type At = Option<(git2::Oid, i32)>;
            let at_prefixes = |tree: &git2::Tree<'_>| -> std::result::Result<Vec<At>, git2::Error> {
                prefixes
                    .iter()
                    .map(|p| match tree.get_path(Path::new(p)) {
                        // The mode too: a file made executable changed.
                        Ok(entry) => Ok(Some((entry.id(), entry.filemode()))),
                        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
                        Err(e) => Err(e),
                    })
                    .collect()
            };
            let mut out = Vec::with_capacity(shas.len());
            let mut before = tree_of(&from)?;
            let mut before_at = match whole {
                true => None,
                false => Some(at_prefixes(&before).map_err(|source| GitError::Read {
                    sha: from.clone(),
                    source,
                })?),
            };
            for sha in &shas {
                let read = |source| GitError::Read {
                    sha: sha.clone(),
                    source,
                };
                let tree = tree_of(sha)?;
                let tree_at = match whole {
                    true => None,
                    false => Some(at_prefixes(&tree).map_err(read)?),
                };
                if tree_at.is_some() && tree_at == before_at {
                    out.push(Changes::new());
                    before = tree;
                    continue;
                }
                before_at = tree_at;
                let diff = repo
                    .diff_tree_to_tree(Some(&before), Some(&tree), Some(&mut opts))
                    .map_err(read)?;
                let mut changes = Changes::new();
                for delta in diff.deltas() {
                    for (file, side_is_new) in [(delta.old_file(), false), (delta.new_file(), true)] {
                        let Some(path) = file.path().and_then(|p| p.to_str()) else {
                            continue;
                        };
                        if !wanted(path) || file.mode() == git2::FileMode::Commit {
                            continue;
                        }
                        let content = if side_is_new && !file.id().is_zero() && file.exists() {
                            Some(repo.find_blob(file.id()).map_err(read)?.content().to_vec())
                        } else {
                            None
                        };
                        // The new side wins when both name the path.
                        if content.is_some() || !changes.contains_key(path) {
                            changes.insert(path.to_string(), content);
                        }
                    }
                }
                out.push(changes);
                before = tree;
            }
            Ok(out)
        })
        .await
    }

    /// Pushes `sha` to `branch` on the remote without force: the remote refuses
    /// anything but a fast-forward (or a new branch). The gate branch is refused
    /// here: it moves only through [`GitRepo::push_gate`].
    pub async fn push(&self, sha: &str, branch: &str) -> Result<()> {
        if self.protected.as_deref() == Some(branch) {
            return Err(GitError::Protected {
                branch: branch.to_string(),
            });
        }
        self.push_inner(sha, branch, false).await
    }

    /// Moves the gate to a commit that passed the invariant check (see
    /// [`crate::gate`]); `force` only to join upstream after a gate revert.
    pub async fn push_gate(&self, checked: &crate::gate::Checked, branch: &str, force: bool) -> Result<()> {
        self.push_inner(checked.sha(), branch, force).await
    }

    async fn push_inner(&self, sha: &str, branch: &str, force: bool) -> Result<()> {
        let (sha, branch) = (sha.to_string(), branch.to_string());
        self.blocking(move |this| {
            let repo = this.repo()?;
            let err = |source| GitError::Push {
                sha: sha.clone(),
                branch: branch.clone(),
                url: this.url.clone(),
                source,
            };
            let in_place = match this.local_remote() {
                Some(remote) => {
                    // A forced move goes from the value the caller checked:
                    // the mirror's, as fetched before the check.
                    let expected = repo
                        .find_reference(&format!("refs/remotes/origin/{branch}"))
                        .ok()
                        .and_then(|r| r.target());
                    local::push_in_place(&remote, oid(&sha)?, &branch, force, expected)
                }
                None => None,
            };
            match in_place {
                Some(pushed) => pushed.map_err(err)?,
                None => this.push_with_libgit2(&repo, &sha, &branch, force)?,
            }
            // Keep the mirror's view of the remote in step with what we pushed.
            repo.reference(
                &format!("refs/remotes/origin/{branch}"),
                oid(&sha)?,
                true,
                "backstop push",
            )
            .map_err(err)?;
            Ok(())
        })
        .await
    }

    /// Pushes `sha` to `branch` with libgit2 (a remote elsewhere, or one on
    /// this disk that lacks the commit): the remote's refusal is
    /// [`GitError::Rejected`].
    fn push_with_libgit2(&self, repo: &Repository, sha: &str, branch: &str, force: bool) -> Result<()> {
        let err = |source| GitError::Push {
            sha: sha.to_string(),
            branch: branch.to_string(),
            url: self.url.clone(),
            source,
        };
        // One local ref per commit: clones of one mirror (Kustomizations
        // sharing a repository) push concurrently, and a ref shared
        // between them could send one's commit to the other's branch.
        // (Not under `refs/backstop/push`: older versions left that ref behind.)
        let local = format!("refs/backstop/pushing/{sha}");
        let local = local.as_str();
        repo.reference(local, oid(sha)?, true, "backstop push").map_err(err)?;
        let mut remote = repo.find_remote("origin").map_err(err)?;
        if self.local_remote().is_none() {
            process::load_ca_bundle();
        }
        let mut rejected: Option<String> = None;
        {
            let mut callbacks = self.auth.callbacks();
            callbacks.push_update_reference(|_, status| {
                if let Some(msg) = status {
                    rejected = Some(msg.to_string());
                }
                Ok(())
            });
            let mut opts = git2::PushOptions::new();
            opts.remote_callbacks(callbacks);
            let refspec = format!("{}{local}:refs/heads/{branch}", if force { "+" } else { "" });
            let pushed = remote.push(&[refspec.as_str()], Some(&mut opts));
            if let Ok(mut r) = repo.find_reference(local) {
                let _ = r.delete();
            }
            pushed.map_err(err)?;
        }
        if let Some(reason) = rejected {
            return Err(GitError::Rejected {
                sha: sha.to_string(),
                branch: branch.to_string(),
                url: self.url.clone(),
                reason,
            });
        }
        Ok(())
    }

    /// Writes (without pushing) a commit on top of `onto` that reverts `sha`.
    /// `body` follows the `This reverts commit` line; `trailer` ends the message.
    pub async fn revert(&self, sha: &str, onto: &str, body: &str, trailer: &str) -> Result<String> {
        self.revert_with(sha, onto, body, trailer, Vec::new()).await
    }

    /// Like [`revert`](Self::revert), with `files` (path, content) written into
    /// the same commit (e.g. the manifest of a recreated database cluster).
    pub async fn revert_with(
        &self,
        sha: &str,
        onto: &str,
        body: &str,
        trailer: &str,
        files: Vec<(String, String)>,
    ) -> Result<String> {
        let (sha, onto, body, trailer) = (sha.to_string(), onto.to_string(), body.to_string(), trailer.to_string());
        self.blocking(move |this| {
            let repo = this.repo()?;
            let err = |source| GitError::Revert {
                sha: sha.clone(),
                source,
            };
            let commit = repo.find_commit(oid(&sha)?).map_err(err)?;
            let onto_commit = repo.find_commit(oid(&onto)?).map_err(err)?;
            let mainline = if commit.parent_count() > 1 { 1 } else { 0 };
            let mut index = repo.revert_commit(&commit, &onto_commit, mainline, None).map_err(err)?;
            if index.has_conflicts() {
                let paths: Vec<String> = index
                    .conflicts()
                    .map_err(err)?
                    .filter_map(|c| c.ok())
                    .filter_map(|c| c.our.or(c.their).or(c.ancestor))
                    .map(|e| String::from_utf8_lossy(&e.path).into_owned())
                    .collect();
                return Err(GitError::RevertConflict {
                    sha: sha.clone(),
                    onto: onto.clone(),
                    paths: paths.join(", "),
                });
            }
            for (path, content) in &files {
                stage_file(&repo, &mut index, path, content.as_bytes()).map_err(err)?;
            }
            let tree_id = index.write_tree_to(&repo).map_err(err)?;
            let tree = repo.find_tree(tree_id).map_err(err)?;
            let sig = git2::Signature::now(BOT_NAME, BOT_EMAIL).map_err(err)?;
            let subject = commit.summary().ok().flatten().unwrap_or("");
            let message = format!(
                "Revert \"{subject}\"\n\nThis reverts commit {sha}.\n\n{}\n\n{trailer}\n",
                body.trim()
            );
            let id = repo
                .commit(None, &sig, &sig, &message, &tree, &[&onto_commit])
                .map_err(err)?;
            Ok(id.to_string())
        })
        .await
    }

    /// The newest commit of `branch` (first-parent, at most `depth` back) whose
    /// message contains `needle`: how a resumed run finds a revert it already made.
    pub async fn find_on_branch(&self, branch: &str, needle: &str, depth: usize) -> Result<Option<String>> {
        let Some(head) = self.branch(branch).await? else {
            return Ok(None);
        };
        let needle = needle.to_string();
        self.blocking(move |this| {
            let repo = this.repo()?;
            let read = |source| GitError::Read {
                sha: head.clone(),
                source,
            };
            let mut commit = repo.find_commit(oid(&head)?).map_err(read)?;
            for _ in 0..depth {
                if commit.message().unwrap_or("").contains(&needle) {
                    return Ok(Some(commit.id().to_string()));
                }
                match commit.parent(0) {
                    Ok(p) => commit = p,
                    Err(_) => break,
                }
            }
            Ok(None)
        })
        .await
    }
}

/// Credentials for the remote. `Debug` never shows the secret.
#[derive(Clone, Default)]
pub enum GitAuth {
    /// Whatever the transport needs without credentials (paths, open servers).
    #[default]
    None,
    /// HTTPS: basic auth with a token as password (`x-access-token` for GitHub
    /// apps, `oauth2` for GitLab, any name for Gitea).
    Token { username: String, token: String },
    /// SSH with a deploy key; the server's host key must be in `known_hosts`.
    Ssh {
        username: String,
        key: PathBuf,
        known_hosts: PathBuf,
    },
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitAuth::None => f.write_str("GitAuth::None"),
            GitAuth::Token { username, .. } => write!(f, "GitAuth::Token({username}, <redacted>)"),
            GitAuth::Ssh { username, key, .. } => write!(f, "GitAuth::Ssh({username}, {})", key.display()),
        }
    }
}

impl GitAuth {
    /// Callbacks answering credential requests once (a refused credential is
    /// an error, not a loop) and checking SSH host keys against known_hosts.
    fn callbacks(&self) -> git2::RemoteCallbacks<'static> {
        let mut callbacks = git2::RemoteCallbacks::new();
        let auth = self.clone();
        let mut asked = 0u32;
        callbacks.credentials(move |_url, username_from_url, allowed| {
            asked += 1;
            if asked > 1 {
                return Err(git2::Error::from_str(
                    "authentication failed: the remote refused the configured credentials",
                ));
            }
            match &auth {
                GitAuth::Token { username, token } if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) => {
                    git2::Cred::userpass_plaintext(username, token)
                }
                GitAuth::Ssh { username, key, .. } if allowed.contains(git2::CredentialType::SSH_KEY) => {
                    git2::Cred::ssh_key(username_from_url.unwrap_or(username), None, key, None)
                }
                GitAuth::Ssh { username, .. } if allowed.contains(git2::CredentialType::USERNAME) => {
                    git2::Cred::username(username_from_url.unwrap_or(username))
                }
                _ => Err(git2::Error::from_str(
                    "the remote asks for credentials and none are configured (--git-token-env or --ssh-key)",
                )),
            }
        });
        if let GitAuth::Ssh { known_hosts, .. } = self {
            let known_hosts = known_hosts.clone();
            callbacks.certificate_check(move |cert, host| {
                let Some(hostkey) = cert.as_hostkey().and_then(|h| h.hostkey()) else {
                    // Not SSH: TLS certificates are checked by the TLS library.
                    return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
                };
                if known_host(&known_hosts, host, hostkey) {
                    Ok(git2::CertificateCheckStatus::CertificateOk)
                } else {
                    // libgit2 replaces this error's text with its own; say it here.
                    tracing::warn!(host, known_hosts = %known_hosts.display(), "SSH host key is not in known_hosts; refusing to connect");
                    Err(git2::Error::from_str(&format!(
                        "the SSH host key of {host} is not in {}; refusing to connect",
                        known_hosts.display()
                    )))
                }
            });
        }
        callbacks
    }
}

/// Whether `known_hosts` lists `key` for `host` (plain host entries, with or
/// without `[host]:port`; hashed entries are not supported).
fn known_host(known_hosts: &Path, host: &str, key: &[u8]) -> bool {
    use base64::Engine;
    let Ok(text) = std::fs::read_to_string(known_hosts) else {
        return false;
    };
    text.lines().filter(|l| !l.trim_start().starts_with('#')).any(|line| {
        let mut parts = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let names_match = hosts.split(',').any(|h| {
            h == host
                || h.strip_prefix('[')
                    .and_then(|r| r.split_once("]:"))
                    .is_some_and(|(name, _)| name == host)
        });
        names_match
            && base64::engine::general_purpose::STANDARD
                .decode(b64)
                .is_ok_and(|k| k == key)
    })
}

/// Scheme, user information and the rest of a URL that has user information
/// (up to the last `@` before the path: passwords with a raw `@` happen).
fn userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// A URL without user information (`https://user:token@host` → `https://host`).
pub fn redact(url: &str) -> String {
    match userinfo(url) {
        Some((scheme, _, rest)) => format!("{scheme}://{rest}"),
        None => url.to_string(),
    }
}

/// An http(s) URL without its user information, and the user name and
/// password it carried (percent-decoded). Other schemes lose only a password:
/// SSH takes the user name from the URL.
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, info, rest)) = userinfo(url) else {
        return (url.to_string(), None);
    };
    let (user, password) = info.split_once(':').unwrap_or((info, ""));
    if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
        let credentials = (!info.is_empty()).then(|| (percent_decode(user), percent_decode(password)));
        (format!("{scheme}://{rest}"), credentials)
    } else if info.contains(':') {
        (format!("{scheme}://{user}@{rest}"), None)
    } else {
        (url.to_string(), None)
    }
}

/// `%XX` escapes of URL user information decoded (invalid ones kept as written).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if bytes[i] == b'%' => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `content` as a blob and puts it at `path` in `index`.
pub fn stage_file(
    repo: &Repository,
    index: &mut git2::Index,
    path: &str,
    content: &[u8],
) -> std::result::Result<(), git2::Error> {
    let blob = repo.blob(content)?;
    let entry = git2::IndexEntry {
        ctime: git2::IndexTime::new(0, 0),
        mtime: git2::IndexTime::new(0, 0),
        dev: 0,
        ino: 0,
        mode: 0o100644,
        uid: 0,
        gid: 0,
        file_size: content.len() as u32,
        id: blob,
        flags: 0,
        flags_extended: 0,
        path: path.as_bytes().to_vec(),
    };
    index.add(&entry)
}

fn oid(sha: &str) -> Result<Oid> {
    Oid::from_str(sha).map_err(|source| GitError::Read {
        sha: sha.to_string(),
        source,
    })
}

/// The commits after `gate` up to `upstream` along upstream's first
/// parents, oldest first: what is pending at the gate.
fn first_parent_walk(
    repo: &Repository,
    gate: Oid,
    upstream: Oid,
) -> std::result::Result<git2::Revwalk<'_>, git2::Error> {
    let mut walk = repo.revwalk()?;
    walk.push(upstream)?;
    walk.hide(gate)?;
    walk.simplify_first_parent()?;
    walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::REVERSE)?;
    Ok(walk)
}

fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_start_matches("./").trim_matches('/').to_string()
}

fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty() || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

fn commit_info(repo: &Repository, id: Oid) -> Result<CommitInfo> {
    let c = repo.find_commit(id).map_err(|source| GitError::Read {
        sha: id.to_string(),
        source,
    })?;
    let author = c.author();
    let time = chrono::DateTime::from_timestamp(c.time().seconds(), 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    let message = c.message().unwrap_or("");
    Ok(CommitInfo {
        sha: id.to_string(),
        subject: c.summary().ok().flatten().unwrap_or("").to_string(),
        author: format!("{} <{}>", author.name().unwrap_or(""), author.email().unwrap_or("")),
        time,
        trailers: trailers(message),
    })
}

/// `Key: value` lines of the message's last paragraph.
fn trailers(message: &str) -> Vec<(String, String)> {
    let last = message.trim_end().rsplit("\n\n").next().unwrap_or("");
    last.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_come_from_the_last_paragraph() {
        let t = trailers("Subject\n\nBody: not a trailer? yes it is here\n\nBackstop-Run: r1\nSigned-off-by: a <b>\n");
        assert_eq!(
            t,
            vec![
                ("Backstop-Run".into(), "r1".into()),
                ("Signed-off-by".into(), "a <b>".into())
            ]
        );
    }

    #[test]
    fn credentials_are_split_off_http_urls_only() {
        let split = |u: &str| split_credentials(u);
        let creds = |u: &str, p: &str| Some((u.to_string(), p.to_string()));
        assert_eq!(
            split("https://user:s3cr%40t@git.example/a/b.git"),
            ("https://git.example/a/b.git".into(), creds("user", "s3cr@t"))
        );
        assert_eq!(
            split("http://tok@h:8080/x"),
            ("http://h:8080/x".into(), creds("tok", ""))
        );
        assert_eq!(
            split("https://u:p@ss@h/x@y"),
            ("https://h/x@y".into(), creds("u", "p@ss"))
        );
        assert_eq!(split("https://h/x@y"), ("https://h/x@y".into(), None));
        assert_eq!(split("ssh://git:pw@h/x"), ("ssh://git@h/x".into(), None));
        assert_eq!(split("ssh://git@h/x"), ("ssh://git@h/x".into(), None));
        assert_eq!(split("git@h:x.git"), ("git@h:x.git".into(), None));
        assert_eq!(split("/srv/sre.git"), ("/srv/sre.git".into(), None));
        assert_eq!(redact("https://u:p@ss@h/x"), "https://h/x");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%+1%41"), "%+1A");
    }

    #[test]
    fn prefix_matching_is_by_path_component() {
        assert!(under("apps/shop/a.yaml", "apps/shop"));
        assert!(!under("apps/shopping/a.yaml", "apps/shop"));
        assert!(under("x", ""));
    }
}
