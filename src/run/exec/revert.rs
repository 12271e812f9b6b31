//! Recovery of the code: the revert of a failed run's commit, on the gate
//! when it was promoted, and on upstream or a revert branch (with its pull
//! request) as the repository's revert mode says.

use super::*;

impl Engine {
    /// Reverts the promoted commit on the gate itself (the bad code is live),
    /// through the invariant check.
    pub(super) async fn revert_gate(&self, run: &RunRecord) -> Result<String, Fault> {
        let trailer = format!("Backstop-Run: {}", run.id);
        let gate = &self.settings.gate;
        let body = format!("backstop run {} rolls back the promoted commit on the gate.", run.id);
        let git_fault = |e: GitError| match e {
            GitError::RevertConflict { .. } => Fault::failed(chain(&e)),
            e => Fault::transient(chain(&e)),
        };
        self.git.fetch().await.map_err(git_fault)?;
        if let Some(sha) = self.git.find_on_branch(gate, &trailer, 200).await.map_err(git_fault)? {
            return Ok(sha);
        }
        let head = self.git.require_branch(gate).await.map_err(git_fault)?;
        let sha = self
            .git
            .revert_with(&run.commit.sha, &head, &body, &trailer, Vec::new())
            .await
            .map_err(git_fault)?;
        let exempt = self.exempt(None).await?;
        match self.gate().move_to(&sha, Move::FastForward, &exempt).await {
            Ok(sha) => Ok(sha),
            Err(e @ GateError::Invariant { .. }) => Err(Fault::failed(chain(&e))),
            Err(GateError::Git(e)) => Err(git_fault(e)),
        }
    }

    /// Pushes the revert to upstream (commit mode) or to a revert branch.
    pub(super) async fn revert(&self, run: &RunRecord) -> Result<RevertRecord, Fault> {
        let mode = machine::revert_mode(run);
        let trailer = format!("Backstop-Run: {}", run.id);
        let failure = run.failure.as_ref().map(|f| f.message.clone()).unwrap_or_default();
        let ids: Vec<&str> = run.migrations.iter().map(|m| m.id.as_str()).collect();
        let body = format!(
            "backstop run {} failed on migration(s) {}: {failure}",
            run.id,
            ids.join(", ")
        );
        let commit = &run.commit.sha;
        let upstream = &self.settings.upstream;
        // A recreated database cluster: its manifest change rides with the revert.
        let patch = run.restore.as_ref().and_then(|r| r.manifest_patch.clone());
        let git_fault = |e: GitError| match e {
            GitError::RevertConflict { .. } => Fault::failed(chain(&e)),
            e => Fault::transient(chain(&e)),
        };
        let (sha, branch, note) = match mode {
            RevertMode::Commit => {
                // Fast-forward only: when upstream moved, redo on the new head.
                let mut pushed = None;
                for _ in 0..5 {
                    match push_revert(&self.git, commit, upstream, upstream, &body, &trailer, patch.as_ref()).await {
                        Ok((sha, found)) => {
                            pushed = Some((sha, upstream.clone(), note(found, "pushed to upstream")));
                            break;
                        }
                        Err(GitError::Rejected { .. }) => continue,
                        Err(e) => return Err(git_fault(e)),
                    }
                }
                pushed.ok_or_else(|| Fault::transient("upstream kept moving; gave up after 5 attempts"))?
            }
            RevertMode::PullRequest => {
                let branch = format!("backstop/revert-{}", &commit[..7.min(commit.len())]);
                let (sha, found) = push_revert(&self.git, commit, upstream, &branch, &body, &trailer, patch.as_ref())
                    .await
                    .map_err(git_fault)?;
                (sha, branch, note(found, "pushed revert branch"))
            }
        };
        Ok(RevertRecord {
            mode,
            commit: sha,
            branch,
            pull_request: None,
            note,
            pr_pending: false,
        })
    }

    /// Opens the pull requests that a forge outage left pending.
    pub(in crate::run) async fn open_pending_pull_requests(&self, runs: &[RunRecord]) -> Result<(), StoreError> {
        for run in runs.iter().filter(|r| r.revert.as_ref().is_some_and(|v| v.pr_pending)) {
            let mut run = run.clone();
            let Some(revert) = run.revert.clone() else { continue };
            let pr = revert_pull_request(&run, &revert.branch, &self.settings.upstream);
            machine::begin(&mut run, "pull-request", Utc::now());
            self.store.save(&run).await?;
            match self.forge.open_pull_request(&pr).await {
                Ok(url) => {
                    machine::close(
                        &mut run,
                        "pull-request",
                        true,
                        url.clone().unwrap_or_default(),
                        Utc::now(),
                    );
                    if let Some(v) = run.revert.as_mut() {
                        v.pr_pending = false;
                        v.pull_request = url.clone();
                        v.note = format!("{}; pull request opened by a later pass", v.note);
                    }
                    tracing::info!(run = %run.id, url = %url.as_deref().unwrap_or("(the forge gave none)"), "opened the pending revert pull request");
                    let report = Report::from_run(&run);
                    if let Err(e) = self.store.write_report(&run, &report).await {
                        tracing::error!(error = %e, "could not rewrite the evidence report");
                    }
                }
                Err(e) => {
                    machine::close(&mut run, "pull-request", false, chain(&e), Utc::now());
                    tracing::warn!(run = %run.id, error = %e, "revert pull request still pending");
                }
            }
            self.store.save(&run).await?;
        }
        Ok(())
    }
}

/// Reverts `commit` on top of `base`'s head and pushes it to `target` (no
/// force; never the gate), with the manifest change a restore asks for. A
/// revert that `target` already carries (same `Backstop-Run:` trailer) is
/// reused: `(sha, true)`.
async fn push_revert(
    git: &GitRepo,
    commit: &str,
    base: &str,
    target: &str,
    body: &str,
    trailer: &str,
    patch: Option<&ManifestPatch>,
) -> Result<(String, bool), GitError> {
    git.fetch().await?;
    if let Some(sha) = git.find_on_branch(target, trailer, 200).await? {
        return Ok((sha, true));
    }
    let head = git.require_branch(base).await?;
    let files = repo_changes(git, &head, patch).await?;
    let sha = git.revert_with(commit, &head, body, trailer, files).await?;
    git.push(&sha, target).await?;
    Ok((sha, false))
}

/// How a revert step describes what it did.
fn note(found: bool, done: &str) -> String {
    if found {
        "found from an earlier attempt".into()
    } else {
        done.into()
    }
}

/// The files a revert must also change so that git matches the cluster.
async fn repo_changes(
    git: &GitRepo,
    head: &str,
    patch: Option<&ManifestPatch>,
) -> Result<Vec<(String, String)>, GitError> {
    let Some(p) = patch else { return Ok(Vec::new()) };
    let snapshot = git.snapshot(head, "").await?;
    Ok(
        match crate::manifests::patch_manifest(&snapshot, &p.kind, &p.namespace, &p.name, &p.merge) {
            Some(f) if !f.already => vec![(f.path, f.content)],
            Some(_) => Vec::new(),
            None => {
                tracing::warn!(kind = %p.kind, namespace = %p.namespace, name = %p.name, "manifest not found in the repository; update it by hand");
                Vec::new()
            }
        },
    )
}

/// The pull request for a run's revert branch; its body is the evidence report.
pub(super) fn revert_pull_request(run: &RunRecord, branch: &str, upstream: &str) -> PullRequest {
    PullRequest {
        title: format!("Revert \"{}\"", run.commit.subject),
        body: report::markdown(&Report::from_run(run)),
        head: branch.to_string(),
        base: upstream.to_string(),
        labels: vec!["backstop".into(), "revert".into()],
        full_report: format!(
            "runs/{}/report.md in backstop's state directory (`backstop report {}`)",
            run.id, run.id
        ),
    }
}
