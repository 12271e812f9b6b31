//! `run: job` migrations: the carrier Job is created under a name unique to
//! the run, backstop waits for `Complete` or `Failed`, keeps the tail of its
//! pods' logs for the evidence, and records the migration in the history
//! table. SQL migrations and every database question go to the SQL runner.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;

use crate::checkpoint::RecoveryPoint;
use crate::db::Database;
use crate::manifests::{Carrier, RunKind};
use crate::runner::{self, HistoryRow, MigrateOutcome, RunIdentity, Runner, RunnerError, SqlRunner, VerifyOutcome};

/// Runs SQL migrations with [`SqlRunner`] and Job migrations in the cluster.
#[derive(Clone)]
pub struct KubeRunner {
    pub client: kube::Client,
    pub sql: SqlRunner,
}

impl KubeRunner {
    /// The Job's name for this run: the carrier's name, then the run id.
    fn job_name(base: &str, run_id: &str) -> String {
        let room = 63usize.saturating_sub(run_id.len() + 1);
        let base: String = base.chars().take(room).collect();
        format!("{}-{run_id}", base.trim_end_matches('-'))
    }

    async fn log_tail(&self, ns: &str, job: &str) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let Ok(list) = pods
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await
        else {
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
        let fail = |error: String| MigrateOutcome {
            transactional: false,
            statements_done: 0,
            statements_total: 0,
            error: Some(error),
            // A Job may have written anything: a failure restores the checkpoint.
            committed: true,
            duration_ms: started.elapsed().as_millis() as u64,
            own_xids: Vec::new(),
            failed_at: None,
            still_running: None,
        };
        let Some(mut manifest) = m.job.clone() else {
            return Ok(fail("the carrier holds no Job".into()));
        };
        let ns = manifest["metadata"]["namespace"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| m.object.split('/').nth(1).unwrap_or("default").to_string());
        let base = manifest["metadata"]["name"].as_str().unwrap_or("migration").to_string();
        let name = Self::job_name(&base, who.run_id);
        manifest["metadata"]["name"] = name.clone().into();
        manifest["metadata"]["namespace"] = ns.clone().into();
        manifest["metadata"]["labels"]["backstop.dev/run"] = who.run_id.into();
        if let Some(meta) = manifest["metadata"].as_object_mut() {
            for k in ["resourceVersion", "uid", "creationTimestamp"] {
                meta.remove(k);
            }
        }
        let job: Job = match serde_json::from_value(manifest) {
            Ok(j) => j,
            Err(e) => return Ok(fail(format!("the carrier is not a valid Job: {e}"))),
        };
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &ns);
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            // A resumed run finds the Job it created.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Ok(fail(format!("creating Job {ns}/{name} failed: {e}"))),
        }
        // Watch the Job until it completes or fails, up to the migration's timeout.
        let ended = |j: Option<&Job>| j.is_some_and(job_ended);
        let result = match tokio::time::timeout(m.timeout, await_condition(jobs.clone(), &name, ended)).await {
            Ok(Ok(Some(j))) => {
                let conditions = j.status.and_then(|s| s.conditions).unwrap_or_default();
                if conditions.iter().any(|c| c.type_ == "Complete" && c.status == "True") {
                    Ok(())
                } else {
                    Err(format!("Job {ns}/{name} failed"))
                }
            }
            Ok(Ok(None)) => Err(format!("Job {ns}/{name} was deleted before it finished")),
            Ok(Err(e)) => Err(format!("watching Job {ns}/{name} failed: {e}")),
            Err(_) => Err(format!(
                "Job {ns}/{name} did not finish within {}s",
                m.timeout.as_secs()
            )),
        };
        let logs = self.log_tail(&ns, &name).await;
        // A Job that did not end (timed out, or its watch broke) may still
        // be writing, and so may the pods of one that failed or was deleted
        // until they are gone: all of it is stopped before the failure is
        // said, so that no restore runs under it.
        let still_running = match &result {
            Err(_) => self.stop(&jobs, &ns, &name, m.timeout).await.err(),
            Ok(()) => None,
        };
        match result {
            Ok(()) => {
                // The Job ran: from here on a failure is an outcome (data may
                // have changed), never a transient error.
                let recorded = runner::record_history(db, m, who, started_at, true).await;
                Ok(MigrateOutcome {
                    transactional: false,
                    statements_done: 0,
                    statements_total: 0,
                    error: recorded.err().map(|e| {
                        format!(
                            "the Job completed but its history row could not be written: {}",
                            crate::run::chain(&e)
                        )
                    }),
                    committed: true,
                    duration_ms: started.elapsed().as_millis() as u64,
                    own_xids: Vec::new(),
                    failed_at: None,
                    still_running: None,
                })
            }
            Err(e) => Ok(MigrateOutcome {
                still_running,
                ..fail(format!("{e}; log tail: {logs}"))
            }),
        }
    }

    /// Stops Job `name` (unless it ended or is gone): its
    /// `activeDeadlineSeconds` is cut to one second,
    /// so the Job controller fails it and deletes its pods (the Job stays,
    /// with its status, as evidence; it also keeps its name, so that a
    /// resumed run finds it instead of running the migration again). Then
    /// waits, as long as the migration was given plus its pods' grace
    /// period, for the Job to end and for none of its pods to be left
    /// running. Err: what may still be running.
    async fn stop(&self, jobs: &Api<Job>, ns: &str, name: &str, timeout: Duration) -> Result<(), String> {
        let what = format!("Job {ns}/{name}");
        let cut = serde_json::json!({"spec": {"activeDeadlineSeconds": 1}});
        let told = match jobs.get_opt(name).await {
            Ok(Some(job)) if !job_ended(&job) => jobs.patch(name, &PatchParams::default(), &Patch::Merge(&cut)).await,
            // Ended or gone: its pods are what is left to look at.
            Ok(job) => Ok(job.unwrap_or_default()),
            Err(e) => Err(e),
        };
        let grace = match told {
            Ok(job) => job
                .spec
                .and_then(|s| s.template.spec)
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30),
            Err(e) => {
                tracing::warn!(job = %what, error = %e, "could not tell the Job to stop");
                return Err(what);
            }
        };
        let bound = timeout + Duration::from_secs(grace.max(0) as u64);
        let ended = |j: Option<&Job>| j.is_none_or(job_ended);
        let stopped = async {
            await_condition(jobs.clone(), name, ended).await.ok()?;
            // The Job controller deletes the pods it failed; those still
            // there must have stopped.
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            let selector = ListParams::default().labels(&format!("job-name={name}"));
            loop {
                let list = pods.list(&selector).await.ok()?;
                if !list.items.iter().any(pod_live) {
                    return Some(());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        match tokio::time::timeout(bound, stopped).await {
            Ok(Some(())) => Ok(()),
            _ => {
                tracing::error!(job = %what, waited_s = bound.as_secs(), "the Job did not stop; nothing is restored under it");
                Err(what)
            }
        }
    }
}

/// Whether the Job completed or failed.
fn job_ended(j: &Job) -> bool {
    let conditions = j.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| {
        c.iter()
            .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
    })
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
