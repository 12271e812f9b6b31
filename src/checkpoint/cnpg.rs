//! The `cnpg` checkpoint backend: a recovery point on the newest completed
//! CloudNativePG `Backup` of the database's Cluster while the Cluster's
//! continuous archiving is healthy (its `ContinuousArchiving` condition); a
//! new `Backup`, with the method the Cluster's backup configuration uses, only
//! when the [`BasePolicy`] says so or archiving is not healthy; restore
//! is CNPG's only kind, a new Cluster bootstrapped by `recovery` from the old
//! WAL archive (`source` = the old `serverName`, `recoveryTarget.targetLSN` =
//! the recovery point read before the migration, exclusive; `targetTime` for
//! a record without one) writing to a new archive `serverName`
//! (CNPG requires an empty archive). The Kustomization that owns the Cluster
//! (labels `kustomize.toolkit.fluxcd.io/name|namespace`) is paused first so
//! Flux does not recreate the old Cluster, and stays paused.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{json, Value};

use super::base::{format_lsn, parse_lsn, BaseBackup, BaseDue, BasePolicy, BaseUse, ServerPosition};
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
    /// When a checkpoint creates a Backup.
    pub policy: BasePolicy,
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

/// The Cluster's `ContinuousArchiving` condition, when not `True`, says why.
fn continuous_archiving(cluster: &DynamicObject) -> Result<(), String> {
    let condition = cluster.data["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "ContinuousArchiving"));
    match condition {
        Some(c) if c["status"] == "True" => Ok(()),
        Some(c) => Err(format!(
            "ContinuousArchiving is {} ({}: {})",
            c["status"].as_str().unwrap_or("?"),
            c["reason"].as_str().unwrap_or(""),
            c["message"].as_str().unwrap_or("")
        )),
        None => Err("the Cluster reports no ContinuousArchiving condition".into()),
    }
}

/// A completed Backup as a base backup (`beginLSN`, `beginWal`, `stoppedAt`).
fn backup_base(backup: &DynamicObject, timeline: u32) -> Option<BaseBackup> {
    let status = &backup.data["status"];
    Some(BaseBackup {
        label: backup.metadata.name.clone()?,
        taken_at: time(&status["stoppedAt"])?,
        start_lsn: status["beginLSN"].as_str().unwrap_or_default().to_string(),
        timeline: status["beginWal"]
            .as_str()
            .and_then(|w| u32::from_str_radix(w.get(..8)?, 16).ok())
            .unwrap_or(timeline),
        size_bytes: 0,
    })
}

impl CnpgBackend {
    /// Before the old Cluster is deleted: the WAL segment holding the
    /// recovery point is in the archive, or a recovery could not reach the
    /// point and nothing would be left to go back to. Switches the segment
    /// where the role may (waiting otherwise for `archive_timeout`), from the
    /// `postgres` database (the run's may be closed to connections).
    async fn confirm_archived(&self, db: &Database, lsn: &str) -> Result<(), CheckpointError> {
        let server = db.sibling("postgres");
        let client = server.connect().await.map_err(|e| {
            other(format!(
                "connecting to {} to check the WAL archive: {e}",
                server.describe()
            ))
        })?;
        // Recovery to an LSN (exclusive) reads the record after it before it
        // stops: the segment to wait for is one past the point, where WAL is
        // written now (the run wrote after the point). Switched, it is the
        // segment just closed; else the current one, archived when
        // archive_timeout closes it.
        let segment: String = match client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await {
            Ok(row) => row.get(0),
            Err(e) => {
                tracing::debug!(error = %e, "cannot switch the WAL segment; waiting for the archiver");
                client
                    .query_one("SELECT pg_walfile_name(pg_current_wal_insert_lsn())", &[])
                    .await
                    .map_err(|e| other(format!("naming the current WAL segment of {}: {e}", server.describe())))?
                    .get(0)
            }
        };
        let wait = self.timeout.min(Duration::from_secs(360));
        match super::base::await_archived(&client, &segment, wait).await {
            Ok(()) => Ok(()),
            Err(super::base::NotArchived::Waited(detail)) => Err(other(format!(
                "WAL segment {segment}, past the recovery point {lsn}, was not archived within {}s ({detail}): the old Cluster is left in place, since a recovery could not reach the point",
                wait.as_secs()
            ))),
            Err(super::base::NotArchived::Unreadable(e)) => Err(other(format!(
                "reading pg_stat_archiver on {} to confirm the recovery point {lsn} is archived: {e}; the old Cluster is left in place",
                server.describe()
            ))),
        }
    }
}

/// Timeline and WAL position of the database's server, when it answers.
async fn server_position(db: &Database) -> Option<ServerPosition> {
    let client = db.connect().await.ok()?;
    let row = client
        .query_one(
            "SELECT pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .ok()?;
    let file: String = row.get(0);
    Some(ServerPosition {
        timeline: u32::from_str_radix(file.get(..8)?, 16).ok()?,
        lsn: parse_lsn(&row.get::<_, String>(1))?,
    })
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
    /// Creates Backup `name` (a resumed run finds the one it created) and
    /// waits until it completed.
    async fn take_backup(
        &self,
        ns: &str,
        cluster_name: &str,
        method: &str,
        run_id: &str,
        name: &str,
    ) -> Result<DynamicObject, CheckpointError> {
        let backups = api(&self.client, ns, "Backup");
        let backup: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "postgresql.cnpg.io/v1", "kind": "Backup",
            "metadata": {"name": name, "namespace": ns, "labels": {"backstop.dev/run": run_id}},
            "spec": {"cluster": {"name": cluster_name}, "method": method},
        }))
        .map_err(|e| other(format!("a valid Backup object: {e}")))?;
        match backups.create(&PostParams::default(), &backup).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(kube_err("creating Backup", format!("{ns}/{name}"))(e)),
        }
        self.wait(&backups, name, &format!("Backup {ns}/{name}"), |b| {
            // Phases are strings; anything else is still running.
            match b.data["status"]["phase"].as_str().unwrap_or("") {
                "completed" => Ok(true),
                p @ ("failed" | "walArchivingFailing" | "invalid backup definition") => {
                    Err(format!("{p}: {}", b.data["status"]["error"].as_str().unwrap_or("")))
                }
                _ => Ok(false),
            }
        })
        .await
    }

    /// The newest completed Backup of `cluster` into its current archive:
    /// for its `serverName` where the Backup says, and not older than the
    /// Cluster (a Cluster recreated by a restore writes a new archive).
    async fn newest_backup(
        &self,
        ns: &str,
        cluster: &DynamicObject,
    ) -> Result<Option<(String, BaseBackup)>, CheckpointError> {
        let name = cluster.metadata.name.clone().unwrap_or_default();
        let born = cluster
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0));
        let server = server_name(cluster);
        let list = api(&self.client, ns, "Backup")
            .list(&kube::api::ListParams::default())
            .await
            .map_err(kube_err("listing Backups in", ns.to_string()))?;
        Ok(list
            .items
            .iter()
            .filter(|b| b.data["spec"]["cluster"]["name"].as_str() == Some(name.as_str()))
            .filter(|b| b.data["status"]["phase"].as_str() == Some("completed"))
            .filter(|b| b.data["status"]["serverName"].as_str().is_none_or(|s| s == server))
            .filter_map(|b| Some((b.metadata.name.clone()?, backup_base(b, 0)?)))
            .filter(|(_, base)| born.is_none_or(|born| base.taken_at >= born))
            .max_by_key(|(name, base)| (base.taken_at, name.clone())))
    }

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
        let started_at = Utc::now();
        let position = server_position(db).await;
        let (due, newest) = match continuous_archiving(&cluster) {
            Err(detail) => (Some(BaseDue::ArchivingUnhealthy { detail }), None),
            Ok(()) => match self.newest_backup(&ns, &cluster).await? {
                None => (
                    Some(BaseDue::NoneOnTimeline {
                        timeline: position.as_ref().map_or(0, |p| p.timeline),
                    }),
                    None,
                ),
                Some((name, mut base)) => {
                    // CNPG recovers across timelines (targetTLI latest): a
                    // failover does not make the Backup useless.
                    let here = position.clone().unwrap_or(ServerPosition {
                        timeline: base.timeline,
                        lsn: 0,
                    });
                    base.timeline = here.timeline;
                    (self.policy.due(Some(&base), &here, Utc::now()), Some((name, base)))
                }
            },
        };
        let (name, base) = match (&due, newest) {
            (None, Some(newest)) => newest,
            _ => {
                let name = format!("backstop-{run_id}");
                let done = self.take_backup(&ns, &cluster_name, method, run_id, &name).await?;
                let timeline = position.as_ref().map_or(0, |p| p.timeline);
                (
                    name,
                    backup_base(&done, timeline).unwrap_or_else(|| BaseBackup {
                        label: done.metadata.name.clone().unwrap_or_default(),
                        taken_at: Utc::now(),
                        start_lsn: String::new(),
                        timeline,
                        size_bytes: 0,
                    }),
                )
            }
        };
        let lsn = position.as_ref().map_or(0, |p| p.lsn);
        let used = BaseUse {
            taken_because: due.as_ref().map(ToString::to_string),
            checkpoint_lsn: format_lsn(lsn),
            replay_bytes: lsn.saturating_sub(parse_lsn(&base.start_lsn).unwrap_or(lsn)),
            base,
        };
        Ok(CheckpointRecord {
            backend: self.name().into(),
            location: format!("Backup {ns}/{name} ({method}, serverName {})", server_name(&cluster)),
            database: db.describe(),
            started_at,
            completed_at: Utc::now(),
            size_bytes: 0,
            restore_drill: "not run (cnpg backend: restore recreates the Cluster)".into(),
            drill: crate::checkpoint::DrillVerdict::NotRun,
            base: Some(used),
        })
    }

    async fn restore(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
        target: &RecoveryPoint,
        run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError> {
        let started_at = Utc::now();
        let (ns, name) = cluster_of(db)?;
        // The base backup the checkpoint named, pinned: CNPG would otherwise
        // choose one by the target, and operators before barman-cloud's fix
        // (cloudnative-pg#6536) compared its begin LSN, so a backup that
        // ended after the recovery point could be chosen and recovery stop
        // short ("before consistent recovery point") with the old Cluster gone.
        let backup_id = match checkpoint.base.as_ref() {
            Some(used) => api(&self.client, &ns, "Backup")
                .get_opt(&used.base.label)
                .await
                .ok()
                .flatten()
                .and_then(|b| b.data["status"]["backupId"].as_str().map(str::to_string)),
            None => None,
        };
        let clusters = api(&self.client, &ns, "Cluster");
        let old = clusters
            .get(&name)
            .await
            .map_err(kube_err("CNPG Cluster", format!("{ns}/{name}")))?;
        let target_time = target.time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
        // The recovery point's LSN, exclusive (as the local backends): exactly
        // what was committed before it, so the writes a logical slot saw
        // after it are exactly what the restore discards. A record from
        // before LSNs were read goes to the time.
        let (mut recovery_target, mut target_text) = if super::base::parse_lsn(&target.lsn).is_some() {
            (
                json!({"targetLSN": target.lsn, "exclusive": true}),
                format!("targetLSN {} (exclusive)", target.lsn),
            )
        } else {
            (json!({"targetTime": target_time}), format!("targetTime {target_time}"))
        };
        if let Some(id) = &backup_id {
            recovery_target["backupID"] = json!(id);
            target_text = format!("{target_text}, base backup {id}");
        }
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
            if parse_lsn(&target.lsn).is_some() {
                self.confirm_archived(db, &target.lsn).await?;
            }
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
            spec["bootstrap"] = json!({"recovery": {"source": old_server, "recoveryTarget": recovery_target}});
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
            target: format!("{target_text} from WAL archive serverName {old_server}"),
            kept: format!("the old Cluster's backups and WAL under serverName {old_server}; the new Cluster archives as {new_server}{held}"),
            manifest_patch: Some(ManifestPatch { kind: "Cluster".into(), namespace: ns.clone(), name: name.clone(), merge, hold }),
            databases: Vec::new(),
            writes_stopped_at: None,
            lost_commits: None,
            lost_writes: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_a_true_continuous_archiving_condition_counts_as_healthy() {
        let cluster = |conditions: Value| {
            object(json!({"apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster",
                          "metadata": {"name": "db"}, "status": {"conditions": conditions}}))
        };
        let ok = cluster(json!([{"type": "ContinuousArchiving", "status": "True"}]));
        assert_eq!(continuous_archiving(&ok), Ok(()));
        let failing = cluster(json!([{"type": "ContinuousArchiving", "status": "False",
                                      "reason": "ContinuousArchivingFailing", "message": "disk full"}]));
        let why = continuous_archiving(&failing).unwrap_err();
        assert!(why.contains("False") && why.contains("disk full"), "{why}");
        assert!(continuous_archiving(&cluster(json!([]))).is_err());
    }

    #[test]
    fn a_completed_backup_gives_its_start_and_timeline() {
        let b = object(json!({"apiVersion": "postgresql.cnpg.io/v1", "kind": "Backup",
            "metadata": {"name": "nightly"},
            "status": {"phase": "completed", "stoppedAt": "2026-11-22T10:00:00Z",
                       "beginLSN": "0/5000028", "beginWal": "000000020000000000000005"}}));
        let base = backup_base(&b, 1).unwrap();
        assert_eq!(
            (base.label.as_str(), base.start_lsn.as_str(), base.timeline),
            ("nightly", "0/5000028", 2)
        );
        let unfinished = object(json!({"apiVersion": "postgresql.cnpg.io/v1", "kind": "Backup",
            "metadata": {"name": "x"}, "status": {"phase": "running"}}));
        assert!(backup_base(&unfinished, 1).is_none(), "no stoppedAt: not a base");
    }
}
