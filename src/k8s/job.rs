//! `run: job` migrations: the carrier Job is created under a name unique to
//! the run, backstop waits for `Complete` or `Failed`, keeps the tail of its
//! pods' logs for the evidence, and records the migration in the history
//! table. SQL migrations and every database question go to the SQL runner.
//!
//! Whether a Job runs is always known before an outcome is said: a create
//! whose answer was lost, and a resumed attempt that finds no Job, hold the
//! Job's name with one that runs no pod ([`create`]), so that no create
//! still on its way can start the migration under a restore.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;

use crate::checkpoint::RecoveryPoint;
use crate::db::Database;
use crate::manifests::{Carrier, RunKind};
use crate::runner::{self, HistoryRow, MigrateOutcome, RunIdentity, Runner, RunnerError, SqlRunner, VerifyOutcome};

mod create;
use create::{is_fence, Created};

/// Runs SQL migrations with [`SqlRunner`] and Job migrations in the cluster.
#[derive(Clone)]
pub struct KubeRunner {
    pub client: kube::Client,
    pub sql: SqlRunner,
}

impl KubeRunner {
    /// The Job's name for this run: the carrier's name, then the run id.
    /// A name cut to fit ends in a digest of the whole one, so that two
    /// carriers of a run that share a long prefix never share a Job.
    fn job_name(base: &str, run_id: &str) -> String {
        use sha2::Digest;
        let room = 63usize.saturating_sub(run_id.len() + 1);
        if base.chars().count() <= room {
            return format!("{}-{run_id}", base.trim_end_matches('-'));
        }
        let digest = hex::encode(&sha2::Sha256::digest(base.as_bytes())[..3]);
        let cut: String = base.chars().take(room.saturating_sub(digest.len() + 1)).collect();
        format!("{}-{digest}-{run_id}", cut.trim_end_matches('-'))
    }

    async fn log_tail(&self, ns: &str, selector: &str) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let Ok(list) = pods.list(&ListParams::default().labels(selector)).await else {
            return "pod logs unavailable".into();
        };
        let mut tails = Vec::new();
        for p in list.items {
            let name = p.metadata.name.unwrap_or_default();
            let params = LogParams {
                tail_lines: Some(50),
                ..Default::default()
            };
            if let Ok(log) = pods.logs(&name, &params).await {
                tails.push(format!("--- {name}\n{log}"));
            }
        }
        if tails.is_empty() {
            "no pod logs".into()
        } else {
            tails.join("\n")
        }
    }

    async fn run_job(&self, db: &Database, m: &Carrier, who: RunIdentity<'_>) -> Result<MigrateOutcome, RunnerError> {
        let started = std::time::Instant::now();
        let started_at = Utc::now();
        let outcome = |error: Option<String>, committed: bool, still_running: Option<String>| MigrateOutcome {
            transactional: false,
            statements_done: 0,
            statements_total: 0,
            error,
            committed,
            duration_ms: started.elapsed().as_millis() as u64,
            own_xids: Vec::new(),
            failed_at: None,
            still_running,
        };
        // Certainly nothing ran: the database is as the checkpoint left it.
        let refused = |error: String| Ok(outcome(Some(error), false, None));
        let Some(mut manifest) = m.job.clone() else {
            return refused("the carrier holds no Job".into());
        };
        let ns = manifest["metadata"]["namespace"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| m.object.split('/').nth(1).unwrap_or("default").to_string());
        let base = manifest["metadata"]["name"].as_str().unwrap_or("migration").to_string();
        let name = Self::job_name(&base, who.run_id);
        manifest["metadata"]["name"] = name.clone().into();
        manifest["metadata"]["namespace"] = ns.clone().into();
        manifest["metadata"]["labels"][RUN_LABEL] = who.run_id.into();
        manifest["metadata"]["annotations"][MIGRATION_ANNOTATION] = m.id.clone().into();
        // Only a name's hold carries this (a carrier's would pass for one).
        if let Some(a) = manifest["metadata"]["annotations"].as_object_mut() {
            a.remove(FENCE_ANNOTATION);
        }
        if let Some(meta) = manifest["metadata"].as_object_mut() {
            for k in ["resourceVersion", "uid", "creationTimestamp"] {
                meta.remove(k);
            }
        }
        let job: Job = match serde_json::from_value(manifest) {
            Ok(j) => j,
            Err(e) => return refused(format!("the carrier is not a valid Job: {e}")),
        };
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &ns);
        let what = format!("Job {ns}/{name}");
        // A resumed attempt (backstop stopped while the Job ran) never
        // creates the Job again: the one it created is watched, and one
        // that is gone (deleted, or its TTL ran out) is not run twice.
        let cluster = |step: String| move |source| RunnerError::Cluster { step, source };
        let deadline = tokio::time::Instant::now() + m.timeout;
        let ask = create::Ask {
            jobs: &jobs,
            job: &job,
            what: &what,
            run: who.run_id,
            id: &m.id,
        };
        let created = match who.resumed {
            true => match jobs.get_opt(&name).await {
                Ok(Some(found)) => create::found(&found, &what, who.run_id, &m.id),
                // Gone, or never stored, or a create of the killed attempt
                // still on its way: its name is taken first.
                Ok(None) => {
                    let why = format!("{what} of the interrupted attempt is gone");
                    match create::hold(&ask, deadline, why).await {
                        Ok(created) => created,
                        // Not known: the step stays open and is resumed again.
                        Err(e) => return Err(cluster(format!("holding the name of {what}"))(e)),
                    }
                }
                Err(e) => return Err(cluster(format!("reading {what} of the interrupted attempt"))(e)),
            },
            false => create::create(&ask, deadline).await,
        };
        let created = match created {
            Created::Ours => Ok(()),
            Created::Gone(e) => Err(e),
            Created::Refused(e) => return refused(e),
            Created::Throttled(e) => return Err(cluster(format!("creating {what}"))(e)),
            // Never restored under: a Job may yet run.
            Created::Unknown(e) => return Ok(outcome(Some(e.clone()), true, Some(e))),
        };
        // Watch the Job until it completes, fails or is deleted, up to the
        // migration's timeout; a watch that breaks is taken up again.
        let result = match created {
            Ok(()) => self.watch(&jobs, &name, m.timeout).await,
            Err(e) => Err(e),
        };
        let selected = match jobs.get_opt(&name).await {
            Ok(found) => pod_selector(found.as_ref(), &name),
            Err(_) => format!("job-name={name}"),
        };
        let logs = self.log_tail(&ns, &selected).await;
        // Whatever the end, none of the Job's pods may be left writing when
        // the outcome is said: a restore must not run under them. One that
        // did not end is told to stop first.
        let stopped = self.stop(&jobs, &ns, &name, m.timeout, result.is_err()).await;
        let still_running = stopped.err().map(|e| crate::run::chain(&e));
        match result {
            Ok(()) => {
                // The Job ran: from here on a failure is an outcome (data may
                // have changed), never a transient error.
                let recorded = runner::record_history(db, m, who, started_at, true).await;
                let error = recorded.err().map(|e| {
                    format!(
                        "the Job completed but its history row could not be written: {}",
                        crate::run::chain(&e)
                    )
                });
                Ok(outcome(error, true, still_running))
            }
            // A Job may have written anything: a failure restores the
            // checkpoint (once nothing of it runs).
            Err(e) => Ok(outcome(Some(format!("{e}; log tail: {logs}")), true, still_running)),
        }
    }

    /// Waits for Job `name` to complete (Ok), fail or be deleted (Err), up
    /// to `timeout`.
    async fn watch(&self, jobs: &Api<Job>, name: &str, timeout: Duration) -> Result<(), String> {
        let what = format!("Job {}/{name}", jobs.namespace().unwrap_or("default"));
        match ended_by(jobs, name, tokio::time::Instant::now() + timeout).await {
            Some(Some(j)) if job_completed(&j) => Ok(()),
            Some(Some(_)) => Err(format!("{what} failed")),
            Some(None) => Err(format!("{what} was deleted before it finished")),
            None => Err(format!("{what} did not finish within {}s", timeout.as_secs())),
        }
    }

    /// Makes sure nothing of Job `name` runs any more. When `tell`, and the
    /// Job has not ended, its `activeDeadlineSeconds` is cut to one second:
    /// the Job controller fails it and deletes its pods (the Job stays,
    /// with its status, as evidence, and keeps its name, so that a resumed
    /// run finds it instead of running the migration again). Then waits,
    /// as long as the migration was given plus its pods' grace period, for
    /// the Job to end (or be gone) and for none of its pods (by the Job's
    /// own selector) to be left running. Reads that fail are tried again
    /// until then.
    async fn stop(
        &self,
        jobs: &Api<Job>,
        ns: &str,
        name: &str,
        timeout: Duration,
        tell: bool,
    ) -> Result<(), StopError> {
        let job = format!("Job {ns}/{name}");
        // Reads and the patch are tried again (a passing API fault) for as
        // long as the migration was given.
        let first = tokio::time::Instant::now() + timeout;
        let cut = serde_json::json!({"spec": {"activeDeadlineSeconds": 1}});
        let current = loop {
            let read = match jobs.get_opt(name).await {
                Ok(Some(j)) if tell && !job_ended(&j) && !is_fence(&j) => {
                    match jobs.patch(name, &PatchParams::default(), &Patch::Merge(&cut)).await {
                        Ok(told) => Ok(Some(told)),
                        // Gone meanwhile: its pods are what is left.
                        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
                        Err(source) => Err(StopError::Tell {
                            job: job.clone(),
                            source,
                        }),
                    }
                }
                Ok(found) => Ok(found),
                Err(source) => Err(StopError::Read {
                    job: job.clone(),
                    source,
                }),
            };
            match read {
                Ok(found) => break found,
                Err(e) if tokio::time::Instant::now() + WATCH_AGAIN >= first => return Err(e),
                Err(e) => {
                    tracing::debug!(job = %job, error = %crate::run::chain(&e), "trying again");
                    tokio::time::sleep(WATCH_AGAIN).await;
                }
            }
        };
        let spec = current.as_ref().and_then(|j| j.spec.as_ref());
        let grace = spec
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        let bound = timeout.saturating_add(Duration::from_secs(grace.max(0) as u64));
        let deadline = tokio::time::Instant::now() + bound;
        let seconds = bound.as_secs();
        // A name's hold runs no pod: only what the earlier Job left is
        // waited for.
        let held = current.as_ref().is_some_and(is_fence);
        if !held && ended_by(jobs, name, deadline).await.is_none() {
            return Err(StopError::NotEnded { job, seconds });
        }
        // The pods the Job's selector picks (a manual selector sets no
        // `job-name` label); the Job controller deletes those it failed.
        let selector = pod_selector(current.as_ref(), name);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let params = ListParams::default().labels(&selector);
        loop {
            let live = pods
                .list(&params)
                .await
                .map(|l| l.items.iter().filter(|p| pod_live(p)).count());
            match live {
                Ok(0) => return Ok(()),
                Ok(_) | Err(_) if tokio::time::Instant::now() + WATCH_AGAIN >= deadline => {
                    return Err(match live {
                        Ok(pods) => StopError::PodsLive { job, pods, seconds },
                        Err(source) => StopError::PodsUnseen { job, source },
                    });
                }
                _ => tokio::time::sleep(WATCH_AGAIN).await,
            }
        }
    }
}

/// Job `name` once it has ended (Some(Some)) or is gone (Some(None)), or
/// None when `deadline` passed first; a watch that breaks is taken up again.
async fn ended_by(jobs: &Api<Job>, name: &str, deadline: tokio::time::Instant) -> Option<Option<Job>> {
    let ended = |j: Option<&Job>| j.is_none_or(job_ended);
    loop {
        match tokio::time::timeout_at(deadline, await_condition(jobs.clone(), name, ended)).await {
            Ok(Ok(found)) => return Some(found),
            Ok(Err(e)) => tracing::debug!(job = name, error = %e, "the Job's watch broke; watching again"),
            Err(_) => return None,
        }
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + WATCH_AGAIN)).await;
    }
}

/// How long to wait before reading a Job or its pods again.
const WATCH_AGAIN: Duration = Duration::from_secs(1);

/// Why nothing of a Job can be shown to have stopped.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("reading {job} failed")]
    Read {
        job: String,
        #[source]
        source: kube::Error,
    },
    #[error("telling {job} to stop (activeDeadlineSeconds) failed")]
    Tell {
        job: String,
        #[source]
        source: kube::Error,
    },
    #[error("{job} did not end within {seconds}s of being told to stop")]
    NotEnded { job: String, seconds: u64 },
    #[error("{pods} pod(s) of {job} were still running {seconds}s after it was told to stop")]
    PodsLive { job: String, pods: usize, seconds: u64 },
    #[error("the pods of {job} could not be listed")]
    PodsUnseen {
        job: String,
        #[source]
        source: kube::Error,
    },
}

/// The label a Job of backstop's carries: the run that made it.
const RUN_LABEL: &str = "backstop.dev/run";

/// The annotation a Job of backstop's carries: the migration it runs.
const MIGRATION_ANNOTATION: &str = "backstop.dev/migration";

/// The annotation of a Job that only holds its name ([`create::hold`]).
const FENCE_ANNOTATION: &str = "backstop.dev/holds-name";

/// Whether `job` is run `run`'s Job for migration `id`.
fn of_this(job: &Job, run: &str, id: &str) -> bool {
    let meta = &job.metadata;
    meta.labels.as_ref().and_then(|l| l.get(RUN_LABEL)).map(String::as_str) == Some(run)
        && meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIGRATION_ANNOTATION))
            .map(String::as_str)
            == Some(id)
}

/// The label selector of a Job's pods: its own `spec.selector`, whole
/// (labels and expressions: a manual selector may be either), else the
/// `job-name` label the Job controller sets.
fn pod_selector(job: Option<&Job>, name: &str) -> String {
    // A name's hold has a selector of its own (its uid) unless the carrier
    // chose one: the pods left are the earlier Job's, found by its name.
    let job = job.filter(|j| !is_fence(j) || j.spec.as_ref().and_then(|s| s.manual_selector) == Some(true));
    let selector = job
        .and_then(|j| j.spec.as_ref())
        .and_then(|s| s.selector.clone())
        .and_then(|s| kube::core::Selector::try_from(s).ok())
        .filter(|s| !s.selects_all());
    match selector {
        Some(selector) => selector.to_string(),
        None => format!("job-name={name}"),
    }
}

/// Whether the Job completed or failed.
fn job_ended(j: &Job) -> bool {
    job_completed(j) || has_condition(j, "Failed")
}

/// Whether the Job completed.
fn job_completed(j: &Job) -> bool {
    has_condition(j, "Complete")
}

fn has_condition(j: &Job, kind: &str) -> bool {
    let conditions = j.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

/// Whether a pod may still be running its containers.
fn pod_live(p: &Pod) -> bool {
    !matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

#[async_trait::async_trait]
impl Runner for KubeRunner {
    fn supports(&self, _kind: RunKind) -> bool {
        true
    }

    async fn applied(&self, db: &Database, id: &str) -> Result<Option<HistoryRow>, RunnerError> {
        self.sql.applied(db, id).await
    }

    async fn latest_applied(&self, db: &Database, phase: &str) -> Result<Option<HistoryRow>, RunnerError> {
        self.sql.latest_applied(db, phase).await
    }

    async fn history(&self, db: &Database) -> Result<Vec<HistoryRow>, RunnerError> {
        self.sql.history(db).await
    }

    async fn owner_and_history(
        &self,
        db: &Database,
    ) -> Result<crate::runner::OwnerAndHistory, crate::owner::OwnerError> {
        self.sql.owner_and_history(db).await
    }

    async fn server_version(&self, db: &Database) -> Result<u32, RunnerError> {
        self.sql.server_version(db).await
    }

    async fn recovery_point(&self, db: &Database) -> Result<RecoveryPoint, RunnerError> {
        self.sql.recovery_point(db).await
    }

    async fn migrate(&self, db: &Database, m: &Carrier, who: RunIdentity<'_>) -> Result<MigrateOutcome, RunnerError> {
        match m.run {
            RunKind::Sql => self.sql.migrate(db, m, who).await,
            RunKind::Job => {
                // The Job's SQL may change the defaults as a migration's does.
                let _marked = crate::db::DefaultsChangedOnDrop;
                self.run_job(db, m, who).await
            }
        }
    }

    async fn verify(&self, db: &Database, sql: &str, timeout: Duration) -> Result<VerifyOutcome, RunnerError> {
        self.sql.verify(db, sql, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_fit_and_two_long_carriers_of_a_run_never_share_one() {
        let run = "20261207-194903236-0f6e2f1";
        assert_eq!(
            KubeRunner::job_name("shop-backfill", run),
            format!("shop-backfill-{run}")
        );
        let a = KubeRunner::job_name(&format!("{}-orders", "x".repeat(40)), run);
        let b = KubeRunner::job_name(&format!("{}-customers", "x".repeat(40)), run);
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.ends_with(run), "{name}");
        }
    }

    #[test]
    fn the_pods_of_a_job_are_picked_by_its_whole_selector() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m"},
            "spec": {"manualSelector": true, "template": {"spec": {"containers": []}},
                     "selector": {"matchLabels": {"app": "migrate"},
                                  "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                                       {"key": "canary", "operator": "DoesNotExist"}]}}
        }))
        .unwrap();
        assert_eq!(pod_selector(Some(&job), "m"), "app=migrate,tier in (a,b),!canary");
        let expressions_only: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m"},
            "spec": {"template": {"spec": {"containers": []}},
                     "selector": {"matchExpressions": [{"key": "run", "operator": "Exists"}]}}
        }))
        .unwrap();
        assert_eq!(pod_selector(Some(&expressions_only), "m"), "run");
        assert_eq!(pod_selector(None, "m"), "job-name=m");
    }
}
