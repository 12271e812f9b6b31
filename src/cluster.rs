//! The cluster side of a run: resolving database references to connections,
//! the verified pause of Flux (lock / unlock) and the health gate after
//! promotion. The trait is what the run state machine drives; [`LocalCluster`]
//! is local mode, where the gate branch alone holds deployments back.

use async_trait::async_trait;

use crate::db::{Database, DbError};
use crate::manifests::DatabaseRef;

/// Failures of the cluster side.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "database {reference} needs the Kubernetes controller (`backstop controller`); local mode takes url:<ENV_VAR>"
    )]
    Unsupported { reference: String },
    #[error("{0}")]
    Other(String),
}

/// Lock, health and database resolution for one guarded target.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Turns a carrier's database reference into a connectable database.
    async fn resolve(&self, reference: &DatabaseRef, database_name: Option<&str>) -> Result<Database, ClusterError>;
    /// Takes the verified pause; returns what was done, for the evidence.
    async fn lock(&self, run_id: &str) -> Result<String, ClusterError>;
    /// After the gate moved to `commit`: resume and wait until it is live and healthy.
    async fn promote(&self, run_id: &str, commit: &str) -> Result<String, ClusterError>;
    /// Releases the pause this run holds (never one a person holds). `held`
    /// (`NS/NAME`) is what the run's restore holds until the recovery
    /// manifest is live: when that is the guarded target itself, it stays
    /// paused and only [`release`](Self::release) resumes it.
    async fn unlock(&self, run_id: &str, held: Option<&str>) -> Result<String, ClusterError>;
    /// Whether [`lock`](Self::lock), [`promote`](Self::promote) and
    /// [`unlock`](Self::unlock) change anything outside the run's record
    /// (false: local mode, where they only say what holds deployments back),
    /// so that their intent must be on disk before they act.
    fn acts(&self) -> bool {
        true
    }
    /// Releases another object a restore held for the run (`NS/NAME` of a
    /// Kustomization owning a recreated database cluster).
    async fn release(&self, held: &str, run_id: &str) -> Result<String, ClusterError> {
        let _ = run_id;
        Ok(format!("nothing to release for {held} here"))
    }
    /// The commit the source of the held object `NS/NAME` has fetched (for
    /// Flux: its GitRepository's `status.artifact.revision`): a hold is
    /// released only once that commit carries the recovery manifest. None:
    /// there is no such source here, the gate itself is what deploys.
    async fn source_revision(&self, held: &str) -> Result<Option<String>, ClusterError> {
        let _ = held;
        Ok(None)
    }
}

/// Local mode: no Flux to pause, databases come from `url:VAR` variables
/// (looked up in `overrides` first, then the process environment).
#[derive(Debug, Default, Clone)]
pub struct LocalCluster {
    pub overrides: std::collections::HashMap<String, String>,
}

#[async_trait]
impl Cluster for LocalCluster {
    async fn resolve(&self, reference: &DatabaseRef, database_name: Option<&str>) -> Result<Database, ClusterError> {
        match reference {
            DatabaseRef::Url { var } => match self.overrides.get(var) {
                Some(url) => Ok(Database::from_url(reference.clone(), url, database_name)?),
                None => Ok(Database::from_env(reference, database_name)?),
            },
            other => Err(ClusterError::Unsupported {
                reference: other.to_string(),
            }),
        }
    }

    fn acts(&self) -> bool {
        false
    }

    async fn lock(&self, _run_id: &str) -> Result<String, ClusterError> {
        Ok("local mode: the gate branch does not move until the migration succeeded".into())
    }

    async fn promote(&self, _run_id: &str, commit: &str) -> Result<String, ClusterError> {
        Ok(format!(
            "local mode: gate moved to {commit}; no cluster health to wait for"
        ))
    }

    async fn unlock(&self, _run_id: &str, _held: Option<&str>) -> Result<String, ClusterError> {
        Ok("local mode: nothing to resume".into())
    }
}
