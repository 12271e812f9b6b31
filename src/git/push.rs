//! Writing to the remote: fast-forward pushes (the gate only through
//! [`GitRepo::push_gate`]) and revert commits.

use git2::Repository;

use super::*;

impl GitRepo {
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
        self.blocking(move |this, repo| {
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
                None => this.push_with_libgit2(repo, &sha, &branch, force)?,
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
        self.blocking(move |_, repo| {
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
                stage_file(repo, &mut index, path, content.as_bytes()).map_err(err)?;
            }
            let tree_id = index.write_tree_to(repo).map_err(err)?;
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
}
