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

mod auth;
mod history;
mod local;
mod process;
mod push;
pub use auth::{redact, split_credentials, GitAuth};
pub use process::{bound_network_waits, start_deferring_ca_bundle, CaBundleDeferral, CONNECT_TIMEOUT, SERVER_TIMEOUT};

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
    /// Shared too: handles of the mirror kept open (see [`with_repo`](Self::with_repo)).
    handles: Handles,
}

/// Open handles of one mirror, kept for reuse, with the generation they
/// belong to: [`Handles::renew`] starts a new one, and a handle of an older
/// generation that comes back is dropped (one lent while the mirror was
/// repacked would hold the deleted packs open for as long as it is kept).
#[derive(Clone, Default)]
struct Handles(std::sync::Arc<std::sync::Mutex<(u64, Vec<Repository>)>>);

impl Handles {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Repository>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept handle and the generation it is lent in.
    fn take(&self) -> (u64, Option<Repository>) {
        let mut kept = self.lock();
        (kept.0, kept.1.pop())
    }

    /// Keeps `repo`, lent in `generation`, unless that has passed or enough are kept.
    fn give_back(&self, generation: u64, repo: Repository) {
        let mut kept = self.lock();
        if kept.0 == generation && kept.1.len() < KEPT_HANDLES {
            kept.1.push(repo);
        }
    }

    /// Drops every kept handle, and every one lent now when it comes back.
    fn renew(&self) {
        let mut kept = self.lock();
        kept.0 += 1;
        kept.1.clear();
    }
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handles({} kept)", self.lock().1.len())
    }
}

/// How many handles of a mirror are kept open: one per git task running at
/// once in the controller is plenty.
const KEPT_HANDLES: usize = 4;

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
            handles: Default::default(),
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
            handles: Default::default(),
        })
    }

    /// Resolves a revision (`HEAD~1`, a branch, a sha prefix) to a commit sha.
    pub async fn resolve(&self, rev: &str) -> Result<String> {
        let rev = rev.to_string();
        self.blocking(move |_, repo| {
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

    /// Runs `f` on a handle of the mirror: a kept one when there is one,
    /// else a newly opened one. Opening reads three config files and lists
    /// every pack; a pass asks a dozen times. A handle goes back to be kept
    /// (up to [`KEPT_HANDLES`]) only when `f` succeeded. A kept handle sees
    /// what others write: refs are read from disk at each lookup, and an
    /// object it cannot find makes libgit2 look for new packs first. After a
    /// repack ([`maintain`](Self::maintain)) the kept handles are dropped.
    fn with_repo<T>(&self, f: impl FnOnce(&Repository) -> Result<T>) -> Result<T> {
        let (generation, kept) = self.handles.take();
        let repo = match kept {
            Some(repo) => repo,
            None => Repository::open(&self.mirror).map_err(|source| GitError::Open {
                path: self.mirror.clone(),
                source,
            })?,
        };
        let out = f(&repo)?;
        self.handles.give_back(generation, repo);
        Ok(out)
    }

    /// Runs `f` on tokio's blocking pool (git2 blocks) with a handle of the
    /// mirror ([`with_repo`](Self::with_repo)).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Self, &Repository) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.with_repo(|repo| f(&this, repo))).await?
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

    /// [`fetch`](Self::fetch), unless a fetch of this mirror started less
    /// than `within` ago and finished.
    pub async fn fetch_unless_within(&self, within: std::time::Duration) -> Result<()> {
        if self
            .fetched
            .lock()
            .await
            .is_some_and(|started| started.elapsed() < within)
        {
            tracing::debug!(url = %self.url, "fetch skipped: the mirror was fetched moments ago");
            return Ok(());
        }
        self.fetch().await
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
            Ok(out) if out.status.success() => {
                // Their packs are gone: open afresh (libgit2 never drops a
                // vanished pack from a handle's list; it would stay open).
                self.handles.renew();
                tracing::info!(packs, "repacked the git mirror")
            }
            Ok(out) => {
                // Each kept handle holds a descriptor per pack it read: with
                // packs piling up, keep none past this pass.
                self.handles.renew();
                tracing::warn!(
                    packs,
                    stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                    "git repack of the mirror failed; it stays usable, only slower"
                )
            }
            Err(e) => {
                self.handles.renew();
                tracing::warn!(packs, error = %e, "cannot run git repack on the mirror; it stays usable, only slower")
            }
        }
    }

    async fn fetch_only(&self) -> Result<()> {
        if self.fetch_local().await {
            return Ok(());
        }
        self.blocking(|this, repo| {
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
        self.blocking(move |_, repo| {
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
        self.blocking(move |_, repo| {
            let (a, d) = (oid(&a)?, oid(&d)?);
            Ok(a == d
                || repo.graph_descendant_of(d, a).map_err(|source| GitError::Read {
                    sha: d.to_string(),
                    source,
                })?)
        })
        .await
    }
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
    fn a_handle_lent_before_a_repack_is_not_kept_when_it_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        Repository::init_bare(dir.path()).unwrap();
        let handles = Handles::default();
        let (lent_in, none) = handles.take();
        assert!(none.is_none());
        handles.renew();
        handles.give_back(lent_in, Repository::open_bare(dir.path()).unwrap());
        assert_eq!(handles.lock().1.len(), 0, "a handle of the old packs");
        let (now, _) = handles.take();
        for _ in 0..KEPT_HANDLES + 2 {
            handles.give_back(now, Repository::open_bare(dir.path()).unwrap());
        }
        assert_eq!(handles.lock().1.len(), KEPT_HANDLES);
    }

    #[test]
    fn prefix_matching_is_by_path_component() {
        assert!(under("apps/shop/a.yaml", "apps/shop"));
        assert!(!under("apps/shopping/a.yaml", "apps/shop"));
        assert!(under("x", ""));
    }
}
