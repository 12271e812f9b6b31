//! A remote on this machine (a path or `file://`: the demo, tests, a
//! repository served from the same disk). A fetch that brings a few commits
//! (most of them: a pass's fetch is a commit or two) copies what the mirror
//! lacks in process, as one pack ([`copy_few`]); more, and git's own
//! programs fetch, as a forge's server would answer (libgit2's local
//! transport builds the pack in our process and is slow at volume). No
//! credentials are involved. When git is missing or fails, libgit2 fetches
//! and its error is the one reported. A push of a commit the remote already
//! reaches (a gate move) moves the ref in place ([`push_in_place`]); any
//! other push is libgit2's (`git push` starts eight processes: 22 ms on a
//! small repository, against 6 ms).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use git2::{Oid, Repository};

use super::GitRepo;

impl GitRepo {
    /// Removes the lock files a killed process left in the mirror at
    /// `mirror` (a ref, `packed-refs`, `config`, `HEAD`): with one left,
    /// every later fetch or push of that ref fails until a person deletes
    /// it. Once per mirror per process, before it opens the mirror, so
    /// nothing of this process holds one yet: local mode calls it under the
    /// state directory's lock, which admits one process, and the controller
    /// at its first use of a mirror (one leader per state directory; a later
    /// term of the same process, whose earlier tasks may still write, does
    /// not clear again). Returns how many were removed.
    pub async fn clear_stale_locks(mirror: &Path) -> usize {
        static CLEARED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        {
            let mut cleared = CLEARED.lock().unwrap_or_else(|e| e.into_inner());
            if cleared.iter().any(|m| m == mirror) {
                return 0;
            }
            cleared.push(mirror.to_path_buf());
        }
        let mirror = mirror.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let mut dirs = vec![mirror.join("refs")];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    match entry.file_type() {
                        Ok(t) if t.is_dir() => dirs.push(path),
                        Ok(t) if t.is_file() && path.extension().is_some_and(|x| x == "lock") => found.push(path),
                        _ => {}
                    }
                }
            }
            found.extend(
                ["packed-refs.lock", "config.lock", "HEAD.lock"]
                    .iter()
                    .map(|f| mirror.join(f))
                    .filter(|p| p.is_file()),
            );
            found
                .into_iter()
                .filter(|lock| match std::fs::remove_file(lock) {
                    Ok(()) => {
                        tracing::warn!(lock = %lock.display(), "removed a lock file a killed process left in the git mirror");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(lock = %lock.display(), error = %e, "cannot remove a lock file left in the git mirror");
                        false
                    }
                })
                .count()
        })
        .await
        .unwrap_or(0)
    }

    /// The remote's folder, when it is on this machine.
    pub(super) fn local_remote(&self) -> Option<PathBuf> {
        let local = self.url.starts_with("file://") || (!self.url.contains("://") && Path::new(&self.url).exists());
        local.then(|| PathBuf::from(self.url.strip_prefix("file://").unwrap_or(&self.url)))
    }

    /// Fetches a remote on this machine (a path or `file://`): nothing when
    /// the mirror already has its branches, a few new commits copied in
    /// process ([`copy_few`]), more by git itself when it is installed
    /// (libgit2's local transport builds the pack in our process and took a
    /// second for 2,000 new commits that `git fetch`, upload-pack as on any
    /// forge, brings in 50 ms). No credentials are involved. False when it
    /// is not such a remote, or git is missing or failed (libgit2 then
    /// fetches, and its error is the one reported).
    pub(super) async fn fetch_local(&self) -> bool {
        let Some(remote) = self.local_remote() else {
            return false;
        };
        // The branches as the mirror last saw them: nothing to fetch (and no
        // process to start, the common case of a pass's second fetch). A few
        // new commits are copied in process; more, and git fetches.
        let done = self
            .blocking(move |_, mirror| {
                let theirs = Repository::open_bare(&remote).ok().and_then(|r| {
                    let branches = branches(&r, "refs/heads/")?;
                    Some((r, branches))
                });
                let Some((remote, theirs)) = theirs else {
                    return Ok(false);
                };
                // A symbolic ref among ours: git sorts that out.
                let Some(ours) = branches(mirror, "refs/remotes/origin/") else {
                    return Ok(false);
                };
                if ours == theirs {
                    return Ok(true);
                }
                match copy_few(mirror, &remote, &theirs, &ours) {
                    Ok(copied) => Ok(copied),
                    Err(e) => {
                        tracing::debug!(error = %e, "copying the new commits in process failed; git fetches");
                        Ok(false)
                    }
                }
            })
            .await
            .unwrap_or(false);
        if done {
            return true;
        }
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("-C")
            .arg(&self.mirror)
            .args([
                "-c",
                "gc.auto=0",
                "-c",
                "maintenance.auto=false",
                // Keep every fetch a pack, as libgit2 does: `maintain` repacks.
                "-c",
                "fetch.unpackLimit=1",
                "-c",
                "core.hooksPath=/dev/null",
                "fetch",
                "--quiet",
                "--prune",
                "origin",
                "+refs/heads/*:refs/remotes/origin/*",
            ])
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(std::process::Stdio::null());
        crate::pgbin::dies_with_us(&mut cmd);
        match cmd.output().await {
            Ok(out) if out.status.success() => true,
            Ok(out) => {
                tracing::debug!(stderr = %String::from_utf8_lossy(&out.stderr).trim(), "git fetch failed; fetching with libgit2");
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot run git; fetching with libgit2");
                false
            }
        }
    }
}

/// A repository's branches under `prefix` (name, commit), sorted; None when
/// one is symbolic or unreadable.
fn branches(repo: &Repository, prefix: &str) -> Option<Vec<(String, Oid)>> {
    let mut out = Vec::new();
    for r in repo.references_glob(&format!("{prefix}*")).ok()? {
        let r = r.ok()?;
        out.push((r.name().ok()?.strip_prefix(prefix)?.to_string(), r.target()?));
    }
    out.sort();
    Some(out)
}

/// Most new commits, and objects, that [`copy_few`] copies; above, git
/// fetches (its upload-pack and index-pack are faster at volume).
const COPY_MAX_COMMITS: usize = 64;
const COPY_MAX_OBJECTS: usize = 4096;

/// Copies what the mirror lacks of `remote`'s branches `theirs` as one pack,
/// then points (and prunes) `refs/remotes/origin/*` as `git fetch --prune`
/// would. A pass's fetch is usually a commit or two: git's fetch is six
/// processes (16 ms here), this is about a millisecond.
///
/// Relies on what every fetch keeps true of the mirror: an object it holds
/// comes with everything it reaches (packs are indexed whole before a ref
/// names them). So the walk stops at any commit or tree the mirror has, and
/// the pack is written before any ref moves. Ok(false), with no ref moved,
/// when there is more to copy than the caps or anything unusual
/// (a branch that is not a commit, a shallow remote): git then fetches, as
/// it does when a ref of the mirror moved since `before` was read.
fn copy_few(
    mirror: &Repository,
    remote: &Repository,
    theirs: &[(String, Oid)],
    before: &[(String, Oid)],
) -> Result<bool, git2::Error> {
    if remote.is_shallow() {
        return Ok(false);
    }
    let ours = mirror.odb()?;
    let mut seen = HashSet::new();
    // New commits, children before parents.
    let mut commits = Vec::new();
    let mut stack: Vec<Oid> = theirs.iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if ours.exists(id) || !seen.insert(id) {
            continue;
        }
        let Ok(commit) = remote.find_commit(id) else {
            return Ok(false);
        };
        if commits.len() == COPY_MAX_COMMITS {
            return Ok(false);
        }
        stack.extend(commit.parent_ids());
        commits.push(commit);
    }
    // Their trees and blobs, each object after what it names.
    let mut objects = Vec::new();
    for commit in &commits {
        if !copy_tree(remote, &ours, commit.tree_id(), &mut seen, &mut objects)? {
            return Ok(false);
        }
    }
    objects.extend(commits.iter().rev().map(|c| c.id()));
    if objects.len() > COPY_MAX_OBJECTS {
        return Ok(false);
    }
    if !objects.is_empty() {
        let mut pack = remote.packbuilder()?;
        for id in &objects {
            pack.insert_object(*id, None)?;
        }
        let mut buf = git2::Buf::new();
        pack.write_buf(&mut buf)?;
        let mut writer = ours.packwriter()?;
        std::io::Write::write_all(&mut writer, &buf)
            .map_err(|e| git2::Error::from_str(&format!("writing the pack into the mirror: {e}")))?;
        writer.commit()?;
        // Indexed under the names they hash to: a corrupt object would be missing.
        let ours = mirror.odb()?;
        if let Some(id) = objects.iter().find(|id| !ours.exists(**id)) {
            return Err(git2::Error::from_str(&format!("object {id} did not reach the mirror")));
        }
    }
    // Each ref moves only from what it was when read (a push by another
    // clone of this mirror may have moved it since): otherwise this fails and
    // git fetches, as its own ref transaction would.
    let prefix = "refs/remotes/origin/";
    let was = |name: &str| before.iter().find(|(n, _)| n == name).map(|(_, id)| *id);
    for (name, id) in theirs {
        let full = format!("{prefix}{name}");
        match was(name) {
            Some(old) if old == *id => {}
            Some(old) => {
                mirror.reference_matching(&full, *id, true, old, "backstop: fetch")?;
            }
            None => {
                mirror.reference(&full, *id, false, "backstop: fetch")?;
            }
        }
    }
    for (name, old) in before {
        if !theirs.iter().any(|(n, _)| n == name) {
            let mut r = mirror.find_reference(&format!("{prefix}{name}"))?;
            if r.target() != Some(*old) {
                return Err(git2::Error::from_str(&format!(
                    "{prefix}{name} moved while it was fetched"
                )));
            }
            r.delete()?;
        }
    }
    Ok(true)
}

/// Adds the objects of tree `id` the mirror lacks to `out` (children first).
/// False when there are more than [`COPY_MAX_OBJECTS`].
fn copy_tree(
    remote: &Repository,
    ours: &git2::Odb<'_>,
    id: Oid,
    seen: &mut HashSet<Oid>,
    out: &mut Vec<Oid>,
) -> Result<bool, git2::Error> {
    if ours.exists(id) || !seen.insert(id) {
        return Ok(true);
    }
    let tree = remote.find_tree(id)?;
    for entry in tree.iter() {
        // A submodule's commit (a gitlink) lives in another repository.
        let copied = match entry.kind() {
            Some(git2::ObjectType::Tree) => copy_tree(remote, ours, entry.id(), seen, out)?,
            Some(git2::ObjectType::Blob) if !ours.exists(entry.id()) && seen.insert(entry.id()) => {
                out.push(entry.id());
                true
            }
            _ => true,
        };
        if !copied || out.len() > COPY_MAX_OBJECTS {
            return Ok(false);
        }
    }
    out.push(id);
    Ok(true)
}

/// Moves `refs/heads/{branch}` of the remote at `remote` (on this disk) to
/// `sha` in place, when the remote already reaches that commit from one of
/// its branches (so its history is whole there): a gate move to a commit of
/// upstream, the usual push. libgit2's push would build a pack first,
/// marking the whole tree of every remote branch as uninteresting (40 ms a
/// push at 80,000 files), to send nothing. As its local push does, no hook
/// runs; unlike it, the ref moves only from the value checked (compare and
/// swap under the ref's lock), so a push that raced another fails instead
/// of overwriting it. A move that is not a fast-forward is refused unless
/// `force`, and a forced one moves only from `expected` (the value the
/// caller checked; a revert pushed meanwhile is not overwritten). None: the
/// remote is not a bare repository, or does not reach the commit, or the
/// branch is symbolic; libgit2 pushes.
pub(super) fn push_in_place(
    remote: &Path,
    sha: Oid,
    branch: &str,
    force: bool,
    expected: Option<Oid>,
) -> Option<Result<(), git2::Error>> {
    let repo = Repository::open(remote).ok()?;
    if !repo.is_bare() || repo.find_commit(sha).is_err() {
        return None;
    }
    let tips = branches(&repo, "refs/heads/")?;
    let reached = tips
        .iter()
        .any(|(_, tip)| *tip == sha || repo.graph_descendant_of(*tip, sha).unwrap_or(false));
    if !reached {
        return None;
    }
    let name = format!("refs/heads/{branch}");
    let current = tips.iter().find(|(n, _)| n == branch).map(|(_, id)| *id);
    Some((|| match current {
        Some(id) if id == sha => Ok(()),
        Some(id) => {
            if !force && !repo.graph_descendant_of(sha, id)? {
                return Err(git2::Error::from_str("cannot push non-fastforwardable reference"));
            }
            if force && expected.is_some_and(|e| e != id) {
                return Err(git2::Error::from_str(&format!(
                    "{name} moved since it was checked (it is at {id}); not forcing it"
                )));
            }
            repo.reference_matching(&name, sha, true, id, "backstop: push")
                .map(|_| ())
        }
        None => repo.reference(&name, sha, false, "backstop: push").map(|_| ()),
    })())
}
