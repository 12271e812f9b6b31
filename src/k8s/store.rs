//! The Kubernetes run store: each run is a `MigrationRun` in the guarded
//! Kustomization's namespace; every save patches its status (steps, phase,
//! kstatus conditions, and the full record a restarted controller resumes
//! from). Reports are also written to the controller's state folder.

use std::path::PathBuf;

use chrono::Utc;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::crd::{Condition, MigrationRun, MigrationRunSpec, MigrationRunStatus, StepStatus};
use crate::report::{self, Report};
use crate::run::{Outcome, RunRecord, RunStore, StoreError};

/// Label tying a MigrationRun to its Kustomization.
pub const KUSTOMIZATION_LABEL: &str = "backstop.dev/kustomization";

/// MigrationRuns of one guarded Kustomization.
#[derive(Clone)]
pub struct MigrationRunStore {
    api: Api<MigrationRun>,
    namespace: String,
    kustomization: String,
    reports: PathBuf,
    fence: Option<super::ops::Fence>,
    /// Whether a run's files are kept: only on a durable --state volume.
    files: bool,
    /// The last gate status, kept for the engine's life (what the gate waits
    /// for is said once per change, not every pass; the cluster sees it as
    /// Events and refused MigrationRuns).
    gate: std::sync::Arc<std::sync::Mutex<Option<crate::gate::GateStatus>>>,
}

impl MigrationRunStore {
    pub fn new(client: kube::Client, namespace: &str, kustomization: &str, reports: PathBuf) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            kustomization: kustomization.into(),
            reports,
            fence: None,
            gate: Default::default(),
            files: false,
        }
    }

    /// Keeps a run's files (the lost writes) beside its report: only where
    /// --state is durable, since for a CNPG restore the file is the only
    /// copy left of those writes.
    pub fn keeping_files(mut self, durable: bool) -> Self {
        self.files = durable;
        self
    }

    /// Fences every write with this replica's leadership: a save is refused
    /// once the Lease moved on, or when a later leadership wrote the run.
    pub fn fenced(mut self, fence: super::ops::Fence) -> Self {
        self.fence = Some(fence);
        self
    }
}

fn err<'a>(action: &'static str, run: &'a str) -> impl FnOnce(kube::Error) -> StoreError + 'a {
    move |e| StoreError {
        action,
        run: run.to_string(),
        source: Box::new(e),
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        observed_generation: generation,
    }
}

/// Annotation by which a person takes over a failed run (`kubectl annotate
/// migrationrun RUN backstop.dev/acknowledged-by=NAME`), the `backstop ack`
/// of the controller; `backstop.dev/ack-note` says what was done.
pub const ACK_BY: &str = "backstop.dev/acknowledged-by";
const ACK_NOTE: &str = "backstop.dev/ack-note";

/// The run record a MigrationRun carries (None: a refusal, or not written
/// yet), with a person's acknowledgement applied.
pub(super) fn record_of(mr: &MigrationRun) -> Option<Result<RunRecord, serde_json::Error>> {
    let record = mr.status.as_ref()?.record.clone()?;
    Some(serde_json::from_value::<RunRecord>(record).map(|mut run| {
        if run.awaits_person() {
            run.acknowledged = acknowledgement(mr);
        }
        run
    }))
}

pub(super) fn acknowledgement(mr: &MigrationRun) -> Option<crate::run::Acknowledged> {
    let annotations = mr.metadata.annotations.as_ref()?;
    let by = annotations.get(ACK_BY)?.trim();
    (!by.is_empty()).then(|| crate::run::Acknowledged {
        by: by.to_string(),
        at: Utc::now(),
        note: annotations.get(ACK_NOTE).cloned().unwrap_or_default(),
    })
}

/// The status a run record maps to.
pub fn status_of(run: &RunRecord, generation: Option<i64>) -> MigrationRunStatus {
    let message = run.failure.as_ref().map(|f| f.message.clone()).unwrap_or_default();
    let conditions = match run.outcome() {
        None => vec![
            condition(
                "Ready",
                "Unknown",
                "Progressing",
                &format!("run is in phase {}", run.phase),
                generation,
            ),
            condition(
                "Reconciling",
                "True",
                "Progressing",
                &format!("run is in phase {}", run.phase),
                generation,
            ),
        ],
        Some(Outcome::Succeeded) => vec![condition(
            "Ready",
            "True",
            "Succeeded",
            "migration applied, verified and promoted",
            generation,
        )],
        Some(Outcome::RolledBack) => vec![
            condition("Ready", "False", "RolledBack", &message, generation),
            condition(
                "Stalled",
                "True",
                "RolledBack",
                "the run failed and was rolled back",
                generation,
            ),
        ],
        Some(Outcome::Deferred) => {
            let stalled = run.retry.as_ref().is_some_and(|r| r.stalled);
            vec![
                condition("Ready", "False", "TransientFault", &message, generation),
                condition(
                    "Stalled",
                    if stalled { "True" } else { "False" },
                    "TransientFault",
                    "stopped before anything changed; a later run tries again (nothing reverted)",
                    generation,
                ),
            ]
        }
        Some(Outcome::Failed) => vec![
            condition(
                "Ready",
                "False",
                "RemediationFailed",
                &run.remediation_errors.join("; "),
                generation,
            ),
            condition(
                "Stalled",
                "True",
                "RemediationFailed",
                "remediation did not complete: a person must act",
                generation,
            ),
        ],
    };
    let mut conditions = conditions;
    if let Some(why) = run.hold_waiting.as_deref().filter(|_| !run.hold_released) {
        conditions.push(condition("Held", "True", "WaitingForSource", why, generation));
    }
    let window = Report::from_run(run).data_loss_window.map(|w| w.seconds);
    MigrationRunStatus {
        observed_generation: generation,
        conditions,
        last_handled_reconcile_at: None,
        phase: Some(run.phase.to_string()),
        steps: run
            .steps
            .iter()
            .map(|s| StepStatus {
                name: s.name.clone(),
                phase: s.phase.to_string(),
                started_at: s.started_at.to_rfc3339(),
                finished_at: s.finished_at.map(|t| t.to_rfc3339()),
                result: match s.ok {
                    Some(true) => "ok".into(),
                    Some(false) => "failed".into(),
                    None => "running".into(),
                },
                detail: (!s.detail.is_empty()).then(|| s.detail.clone()),
            })
            .collect(),
        data_loss_window_seconds: window,
        summary: run.failure.as_ref().map(|f| f.message.clone()),
        fence: None,
        record: serde_json::to_value(run).ok(),
    }
}

#[async_trait::async_trait]
impl RunStore for MigrationRunStore {
    async fn save(&self, run: &RunRecord) -> Result<(), StoreError> {
        let fenced = |e: super::ops::Fenced| StoreError {
            action: "write the MigrationRun",
            run: run.id.clone(),
            source: Box::new(e),
        };
        if let Some(fence) = &self.fence {
            fence.check().await.map_err(fenced)?;
        }
        let existing = self
            .api
            .get_opt(&run.id)
            .await
            .map_err(err("read the MigrationRun", &run.id))?;
        let current = match existing {
            Some(mr) => mr,
            None => {
                let mut mr = MigrationRun::new(
                    &run.id,
                    MigrationRunSpec {
                        kustomization: self.kustomization.clone(),
                        commit: run.commit.sha.clone(),
                        migrations: run.migrations.iter().map(|m| m.id.clone()).collect(),
                    },
                );
                mr.metadata.labels = Some([(KUSTOMIZATION_LABEL.to_string(), self.kustomization.clone())].into());
                self.api
                    .create(&PostParams::default(), &mr)
                    .await
                    .map_err(err("create the MigrationRun", &run.id))?
            }
        };
        let mut status = status_of(run, current.metadata.generation);
        if let Some(fence) = &self.fence {
            let stored = current.status.as_ref().and_then(|s| s.fence.as_deref());
            if !fence.may_overwrite(stored) {
                return Err(fenced(super::ops::Fenced {
                    token: fence.token(),
                    why: format!("a later leadership ({}) wrote this run", stored.unwrap_or("")),
                }));
            }
            status.fence = Some(fence.token());
        }
        // The resourceVersion makes the write conditional: a write by anyone
        // since the read above (another replica) turns this into a conflict.
        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "status": status,
        });
        self.api
            .patch_status(&run.id, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(err("update the MigrationRun status", &run.id))?;
        Ok(())
    }

    async fn save_gate(&self, status: &crate::gate::GateStatus) -> Result<(), StoreError> {
        if let Ok(mut gate) = self.gate.lock() {
            *gate = Some(status.clone());
        }
        Ok(())
    }

    async fn load_gate(&self, path: &str) -> Result<Option<crate::gate::GateStatus>, StoreError> {
        Ok(self.gate.lock().ok().and_then(|g| g.clone()).filter(|g| g.path == path))
    }

    async fn list(&self) -> Result<Vec<RunRecord>, StoreError> {
        let lp = ListParams::default().labels(&format!("{KUSTOMIZATION_LABEL}={}", self.kustomization));
        let list = self.api.list(&lp).await.map_err(err("list MigrationRuns", "*"))?;
        let mut runs: Vec<RunRecord> = list
            .items
            .into_iter()
            .filter_map(|mr| record_of(&mr).and_then(Result::ok))
            .collect();
        runs.sort_by(RunRecord::oldest_first);
        Ok(runs)
    }

    /// A run's files (the lost writes) go beside its report, on the
    /// controller's --state volume, when it is durable (--durable-state).
    fn keeps_files(&self) -> bool {
        self.files
    }

    async fn read_file(&self, run: &RunRecord, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        crate::journal::read_run_file(&self.reports.join(&run.id), &run.id, name)
    }

    async fn write_file(&self, run: &RunRecord, name: &str, bytes: &[u8]) -> Result<Option<String>, StoreError> {
        crate::journal::write_run_file(&self.reports.join(&run.id), &run.id, name, bytes)
    }

    async fn write_report(&self, run: &RunRecord, report: &Report) -> Result<String, StoreError> {
        let dir = self.reports.join(&run.id);
        let io = |e: std::io::Error| StoreError {
            action: "write the report",
            run: run.id.clone(),
            source: Box::new(e),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let json = serde_json::to_vec_pretty(report).map_err(|e| StoreError {
            action: "encode the report",
            run: run.id.clone(),
            source: Box::new(e),
        })?;
        std::fs::write(dir.join("report.json"), json).map_err(io)?;
        std::fs::write(dir.join("report.md"), report::markdown(report)).map_err(io)?;
        Ok(format!(
            "MigrationRun {}/{} ({})",
            self.namespace,
            run.id,
            dir.join("report.md").display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(annotations: &[(&str, &str)]) -> MigrationRun {
        let mut mr = MigrationRun::new(
            "r1",
            MigrationRunSpec {
                kustomization: "shop".into(),
                commit: "abc".into(),
                migrations: vec![],
            },
        );
        mr.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        mr
    }

    #[test]
    fn an_acknowledged_by_annotation_takes_a_failed_run_over() {
        let ack = acknowledgement(&run_with(&[(ACK_BY, "alice"), (ACK_NOTE, "checked the db")])).unwrap();
        assert_eq!((ack.by.as_str(), ack.note.as_str()), ("alice", "checked the db"));
        assert!(acknowledgement(&run_with(&[(ACK_BY, "  ")])).is_none());
        assert!(acknowledgement(&run_with(&[])).is_none());
    }
}
