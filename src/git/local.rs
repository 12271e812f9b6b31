//! A remote on this machine (a path or `file://`: the demo, tests, a
//! repository served from the same disk) is fetched by git's own programs
//! when git is installed, as a forge's server would answer: libgit2's local
//! transport builds the pack in our process. No credentials are involved.
//! When git is missing or fails, libgit2 fetches and its error is the one
//! reported. Pushes stay libgit2's: `git push` starts eight processes (22 ms
//! on a small repository, against 6 ms), though libgit2 walks the whole
//! tree of each remote branch (40 ms a push at 80,000 files).

use std::path::{Path, PathBuf};

use git2::Repository;

use super::GitRepo;

impl GitRepo {
    /// The remote's folder, when it is on this machine.
    pub(super) fn local_remote(&self) -> Option<PathBuf> {
        let local = self.url.starts_with("file://") || (!self.url.contains("://") && Path::new(&self.url).exists());
        local.then(|| PathBuf::from(self.url.strip_prefix("file://").unwrap_or(&self.url)))
    }

    /// A remote on this machine (a path or `file://`) is fetched by git
    /// itself when it is installed: libgit2's local transport builds the pack
    /// in our process and took a second for 2,000 new commits that `git
    /// fetch` (upload-pack, as on any forge) brings in 50 ms. No credentials
    /// are involved. False when git is missing or failed (libgit2 then
    /// fetches, and its error is the one reported).
    pub(super) async fn fetch_local_with_git(&self) -> bool {
        let Some(remote) = self.local_remote() else {
            return false;
        };
        // The branches as the mirror last saw them: nothing to fetch (and no
        // process to start, the common case of a pass's second fetch).
        let current = self
            .blocking(move |this| {
                let branches = |repo: &Repository, prefix: &str| -> Option<Vec<(String, git2::Oid)>> {
                    let mut out = Vec::new();
                    for r in repo.references_glob(&format!("{prefix}*")).ok()? {
                        let r = r.ok()?;
                        out.push((r.name().ok()?.strip_prefix(prefix)?.to_string(), r.target()?));
                    }
                    out.sort();
                    Some(out)
                };
                let theirs = Repository::open_bare(&remote)
                    .ok()
                    .and_then(|r| branches(&r, "refs/heads/"));
                let ours = branches(&this.repo()?, "refs/remotes/origin/");
                Ok(theirs.is_some() && theirs == ours)
            })
            .await
            .unwrap_or(false);
        if current {
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
