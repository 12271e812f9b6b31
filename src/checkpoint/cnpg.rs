//! The `cnpg` checkpoint backend: a CloudNativePG `Backup` of the database's
//! Cluster, with the method the Cluster's backup configuration uses; restore
//! is CNPG's only kind, a new Cluster bootstrapped by `recovery` from the old
//! WAL archive (`source` = the old `serverName`, `recoveryTarget.targetTime` =
//! the time read before the migration) writing to a new archive `serverName`
//! (CNPG requires an empty archive). The Kustomization that owns the Cluster
//! (labels `kustomize.toolkit.fluxcd.io/name|namespace`) is paused first so
//! Flux does not recreate the old Cluster, and stays paused.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{json, Value};

use super::{Checkpoint, CheckpointError, CheckpointRecord, ManifestPatch, RecoveryPoint, RestoreRecord};
use crate::db::Database;
use crate::k8s::pause::{self, KustomizationRef};
use crate::manifests::DatabaseRef;

/// The CNPG backend.
#[derive(Clone)]
pub struct CnpgBackend {
    pub client: kube::Client,
    /// Bound on the backup and on the recovered Cluster becoming healthy.
    pub timeout: Duration,
}

/// Marks a Cluster recreated by a restore (value: the run id).
pub const RESTORED_BY: &str = "backstop.dev/restored-by";

fn api(client: &kube::Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("postgresql.cnpg.io", "v1", kind);
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn other(what: impl Into<String>) -> CheckpointError {
    CheckpointError::Misconfigured { what: what.into() }
}

fn cluster_of(db: &Database) -> Result<(String, String), CheckpointError> {
    match &db.reference {
        DatabaseRef::Cnpg { namespace, cluster } => Ok((namespace.clone(), cluster.clone())),
        other_ref => Err(other(format!("a cnpg: database (got {other_ref})"))),
    }
}

/// The backup method the Cluster is configured for.
fn method(cluster: &DynamicObject) -> Option<&'static str> {
    let spec = &cluster.data["spec"];
    if !spec["backup"]["barmanObjectStore"].is_null() {
        Some("barmanObjectStore")
    } else if !spec["backup"]["volumeSnapshot"].is_null() {
        Some("volumeSnapshot")
    } else if spec["plugins"].as_array().is_some_and(|p| !p.is_empty()) {
        Some("plugin")
    } else {
        None
    }
}

/// The archive `serverName` (defaults to the Cluster name).
fn server_name(cluster: &DynamicObject) -> String {
    cluster.data["spec"]["backup"]["barmanObjectStore"]["serverName"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| cluster.metadata.name.clone().unwrap_or_default())
}

fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn kube_err(step: &'static str, target: String) -> impl FnOnce(kube::Error) -> CheckpointError {
    move |e| other(format!("{step} {target} to work: {e}"))
}

impl CnpgBackend {
    /// Waits (watching, up to the timeout) until `done` says the object
    /// finished, and returns it; `done`'s error is a failure.
    async fn wait<F: Fn(&DynamicObject) -> Result<bool, String> + Send + Clone + 'static>(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        what: &str,
        done: F,
    ) -> Result<DynamicObject, CheckpointError> {
        let finished = done.clone();
        let condition = move |o: Option<&DynamicObject>| o.is_some_and(|o| finished(o) != Ok(false));
        match tokio::time::timeout(self.timeout, await_condition(api.clone(), name, condition)).await {
            Ok(Ok(Some(obj))) => match done(&obj) {
                Err(e) => Err(other(format!("{what} to succeed, but it failed: {e}"))),
                Ok(_) => Ok(obj),
            },
            Ok(Ok(None)) => Err(other(format!("{what}, but it was deleted"))),
            Ok(Err(e)) => Err(other(format!("{what}: watching it failed: {e}"))),
            Err(_) => Err(other(format!("{what} within {}s", self.timeout.as_secs()))),
        }
    }
}

#[async_trait::async_trait]
impl Checkpoint for CnpgBackend {
    fn name(&self) -> &'static str {
        "cnpg"
    }

    async fn preflight(&self, db: &Database) -> Result<(), CheckpointError> {
        let (ns, name) = cluster_of(db)?;
        let cluster = api(&self.client, &ns, "Cluster")
            .get(&name)
            .await
            .map_err(kube_err("CNPG Cluster", format!("{ns}/{name}")))?;
        method(&cluster).map(|_| ()).ok_or_else(|| {
            other(format!(
                "CNPG Cluster {ns}/{name} to configure backups (spec.backup or a backup plugin)"
            ))
        })
    }

    async fn create(&self, db: &Database, run_id: &str) -> Result<CheckpointRecord, CheckpointError> {
        let (ns, cluster_name) = cluster_of(db)?;
        let cluster = api(&self.client, &ns, "Cluster")
            .get(&cluster_name)
            .await
            .map_err(kube_err("CNPG Cluster", format!("{ns}/{cluster_name}")))?;
        let method =
            method(&cluster).ok_or_else(|| other(format!("CNPG Cluster {ns}/{cluster_name} to configure backups")))?;
        let backups = api(&self.client, &ns, "Backup");
        let name = format!("backstop-{run_id}");
        let started_at = Utc::now();
        let backup: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "postgresql.cnpg.io/v1", "kind": "Backup",
            "metadata": {"name": name, "namespace": ns, "labels": {"backstop.dev/run": run_id}},
            "spec": {"cluster": {"name": cluster_name}, "method": method},
        }))
        .map_err(|e| other(format!("a valid Backup object: {e}")))?;
        match backups.create(&PostParams::default(), &backup).await {
            Ok(_) => {}
            // A resumed run finds the Backup it created before.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(kube_err("creating Backup", format!("{ns}/{name}"))(e)),
        }
        let done = self
            .wait(&backups, &name, &format!("Backup {ns}/{name}"), |b| {
                // Phases are strings; anything else is still running.
                match b.data["status"]["phase"].as_str().unwrap_or("") {
                    "completed" => Ok(true),
                    p @ ("failed" | "walArchivingFailing" | "invalid backup definition") => {
                        Err(format!("{p}: {}", b.data["status"]["error"].as_str().unwrap_or("")))
                    }
                    _ => Ok(false),
                }
            })
            .await?;
        let status = &done.data["status"];
        Ok(CheckpointRecord {
            backend: self.name().into(),
            location: format!("Backup {ns}/{name} ({method}, serverName {})", server_name(&cluster)),
            database: db.describe(),
            started_at: time(&status["startedAt"]).unwrap_or(started_at),
            completed_at: time(&status["stoppedAt"]).unwrap_or_else(Utc::now),
            size_bytes: 0,
            restore_drill: "not run (cnpg backend: restore recreates the Cluster)".into(),
            base: None,
        })
    }

    async fn restore(
        &self,
        db: &Database,
        _checkpoint: &CheckpointRecord,
        target: &RecoveryPoint,
        run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError> {
        let started_at = Utc::now();
        let (ns, name) = cluster_of(db)?;
        let clusters = api(&self.client, &ns, "Cluster");
        let old = clusters
            .get(&name)
            .await
            .map_err(kube_err("CNPG Cluster", format!("{ns}/{name}")))?;
        let target_time = target.time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
        let restored = old
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RESTORED_BY))
            .map(String::as_str)
            == Some(run_id);
        let (old_server, new_server, owner) = if restored {
            // Resumed after the recreate: wait for it below.
            let source = old.data["spec"]["bootstrap"]["recovery"]["source"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (source, server_name(&old), None)
        } else {
            // Keep Flux from putting the old Cluster back while it is replaced.
            let labels = old.metadata.labels.clone().unwrap_or_default();
            let owner = match (
                labels.get("kustomize.toolkit.fluxcd.io/name"),
                labels.get("kustomize.toolkit.fluxcd.io/namespace"),
            ) {
                (Some(n), Some(kns)) => {
                    let ks = KustomizationRef {
                        namespace: kns.clone(),
                        name: n.clone(),
                    };
                    pause::lock(self.client.clone(), &ks, run_id, self.timeout)
                        .await
                        .map_err(|e| other(format!("a verified pause of {ks}, which owns the Cluster: {e}")))?;
                    Some(ks)
                }
                _ => None,
            };
            let old_server = server_name(&old);
            let short: String = run_id.chars().rev().take(7).collect::<String>().chars().rev().collect();
            let new_server = format!("{name}-r{short}");
            let mut spec = old.data["spec"].clone();
            spec["bootstrap"] =
                json!({"recovery": {"source": old_server, "recoveryTarget": {"targetTime": target_time}}});
            let store = old.data["spec"]["backup"]["barmanObjectStore"].clone();
            let mut external = json!({"name": old_server});
            if store.is_null() {
                external["plugin"] = old.data["spec"]["plugins"][0].clone();
            } else {
                let mut source_store = store.clone();
                source_store["serverName"] = json!(old_server);
                external["barmanObjectStore"] = source_store;
                spec["backup"]["barmanObjectStore"]["serverName"] = json!(new_server);
            }
            spec["externalClusters"] = json!([external]);
            let mut annotations = old.metadata.annotations.clone().unwrap_or_default();
            annotations.insert(RESTORED_BY.into(), run_id.into());
            let recreated: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster",
                "metadata": {"name": name, "namespace": ns, "labels": old.metadata.labels, "annotations": annotations},
                "spec": spec,
            }))
            .map_err(|e| other(format!("a valid recovery Cluster: {e}")))?;
            clusters
                .delete(&name, &DeleteParams::background())
                .await
                .map_err(kube_err("deleting the CNPG Cluster", format!("{ns}/{name}")))?;
            let uid = old.metadata.uid.clone().unwrap_or_default();
            let gone = await_condition(clusters.clone(), &name, conditions::is_deleted(&uid));
            match tokio::time::timeout(self.timeout, gone).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(other(format!(
                        "CNPG Cluster {ns}/{name} to be deleted: watching it failed: {e}"
                    )))
                }
                Err(_) => {
                    return Err(other(format!(
                        "CNPG Cluster {ns}/{name} to be deleted within {}s",
                        self.timeout.as_secs()
                    )))
                }
            }
            clusters
                .create(&PostParams::default(), &recreated)
                .await
                .map_err(kube_err("creating the recovery Cluster", format!("{ns}/{name}")))?;
            (old_server, new_server, owner)
        };
        let run = run_id.to_string();
        self.wait(
            &clusters,
            &name,
            &format!("recovered CNPG Cluster {ns}/{name} to become healthy"),
            move |c| {
                let healthy = c.data["status"]["phase"].as_str() == Some("Cluster in healthy state");
                Ok(healthy
                    && c.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(RESTORED_BY))
                        .map(String::as_str)
                        == Some(run.as_str()))
            },
        )
        .await?;
        let recovered = clusters
            .get(&name)
            .await
            .map_err(kube_err("CNPG Cluster", format!("{ns}/{name}")))?;
        let spec = &recovered.data["spec"];
        // What the repository's Cluster manifest must say so that Flux keeps this Cluster.
        let mut merge = json!({"spec": {"bootstrap": {"initdb": null, "recovery": spec["bootstrap"]["recovery"]},
                                        "externalClusters": spec["externalClusters"]}});
        if !spec["backup"]["barmanObjectStore"].is_null() {
            merge["spec"]["backup"] = json!({"barmanObjectStore": {"serverName": new_server}});
        }
        let hold = owner.as_ref().map(|k| k.to_string()).or_else(|| {
            let labels = recovered.metadata.labels.clone().unwrap_or_default();
            match (
                labels.get("kustomize.toolkit.fluxcd.io/namespace"),
                labels.get("kustomize.toolkit.fluxcd.io/name"),
            ) {
                (Some(kns), Some(n)) => Some(format!("{kns}/{n}")),
                _ => None,
            }
        });
        let held = hold
            .as_ref()
            .map(|k| {
                format!("; {k}, which owns the Cluster, stays suspended until the recovery manifest reaches the gate")
            })
            .unwrap_or_default();
        Ok(RestoreRecord {
            started_at,
            finished_at: Utc::now(),
            target: format!("targetTime {target_time} from WAL archive serverName {old_server}"),
            kept: format!("the old Cluster's backups and WAL under serverName {old_server}; the new Cluster archives as {new_server}{held}"),
            manifest_patch: Some(ManifestPatch { kind: "Cluster".into(), namespace: ns.clone(), name: name.clone(), merge, hold }),
        })
    }
}
