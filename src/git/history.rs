//! Reading the mirror's history: the commits pending between the gate and
//! upstream, tree snapshots and diffs limited to the guarded paths, and the
//! search for a commit a resumed run already made.

use std::collections::BTreeSet;
use std::path::Path;

use super::*;

impl GitRepo {
    /// Commits in `gate..upstream`, oldest first (first-parent history of
    /// upstream). Fails when the gate is not an ancestor of upstream.
    pub async fn pending(&self, gate: &str, upstream: &str, names: (&str, &str)) -> Result<Vec<CommitInfo>> {
        let (gate, upstream) = (gate.to_string(), upstream.to_string());
        let (gate_name, upstream_name) = (names.0.to_string(), names.1.to_string());
        self.blocking(move |_, repo| {
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
            let walk = first_parent_walk(repo, g, u).map_err(read)?;
            let mut out = Vec::new();
            for id in walk {
                let id = id.map_err(read)?;
                out.push(commit_info(repo, id)?);
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
        self.blocking(move |this, repo| {
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
                    let walk = first_parent_walk(repo, g, u).map_err(read)?;
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
        self.blocking(move |_, repo| commit_info(repo, oid(&sha)?)).await
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
        self.blocking(move |_, repo| {
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
        self.blocking(move |_, repo| {
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
        self.blocking(move |_, repo| {
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

    /// The newest commit of `branch` (first-parent, at most `depth` back) whose
    /// message contains `needle`: how a resumed run finds a revert it already made.
    pub async fn find_on_branch(&self, branch: &str, needle: &str, depth: usize) -> Result<Option<String>> {
        let Some(head) = self.branch(branch).await? else {
            return Ok(None);
        };
        let needle = needle.to_string();
        self.blocking(move |_, repo| {
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
