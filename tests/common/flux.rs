//! Flux and CNPG played for controller tests against a real kube-apiserver:
//! kustomize-controller (answers the pause handshake; when a Kustomization
//! runs, applies its gate's head and reports Ready), source-controller (the
//! GitRepository artifact, on request), the CNPG operator (real base backups
//! and real PITR on the test's server), and the sre repo over git's smart
//! HTTP, as a Flux GitRepository requires.

use std::time::Duration;

use backstop::k8s::crd::MigrationRun;
use backstop::k8s::pause::{self, SUSPENDED_BY};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

use super::envtest::ControlPlane;
use super::*;

pub async fn create(api: &Api<DynamicObject>, value: serde_json::Value) {
    let obj: DynamicObject = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

/// kustomize-controller's part: the handshake, and applying the gate when running.
pub fn fake_kustomize_controller(
    client: kube::Client,
    api: Api<DynamicObject>,
    remote: std::path::PathBuf,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) = event else {
                continue;
            };
            let name = obj.metadata.name.clone().unwrap();
            super::envtest::answer_reconcile_request(&api, &obj).await;
            if !obj.data["spec"]["suspend"].as_bool().unwrap_or(false) {
                // The gate branch its GitRepository follows.
                let source = obj.data["spec"]["sourceRef"]["name"]
                    .as_str()
                    .unwrap_or("sre")
                    .to_string();
                let ns = obj.metadata.namespace.clone().unwrap_or_default();
                let branch = backstop::k8s::controller::git_repositories(client.clone(), &ns)
                    .get(&source)
                    .await
                    .ok()
                    .and_then(|r| r.data["spec"]["ref"]["branch"].as_str().map(str::to_string))
                    .unwrap_or_else(|| GATE.to_string());
                let remote = backstop::sandbox::BareRemote::open(&remote);
                let gate = remote.head(&branch).unwrap().unwrap();
                let revision = format!("{branch}@sha1:{gate}");
                // A commit whose subject says [unhealthy] deploys code that never gets Ready.
                let subject = remote.message(&branch).unwrap();
                let healthy = !subject.lines().next().unwrap_or("").contains("[unhealthy]");
                if obj.data["status"]["lastAppliedRevision"].as_str() != Some(revision.as_str()) {
                    let (status, reason) = if healthy {
                        ("True", "ReconciliationSucceeded")
                    } else {
                        ("False", "HealthCheckFailed")
                    };
                    let patch = json!({"status": {"lastAppliedRevision": revision, "conditions": [{
                        "type": "Ready", "status": status, "reason": reason,
                        "message": "Applied revision", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                    let _ = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await;
                }
            }
        }
    })
}

/// A control plane, a database, the sre repo over smart HTTP, the Flux
/// objects of a guarded Kustomization, and kustomize-controller played.
/// The controller ServiceAccount's bearer token line (tokens.csv).
pub const SA_TOKEN: &str = "sa-token,system:serviceaccount:backstop-system:backstop,sa-uid,system:serviceaccounts";

pub struct Setup {
    pub plane: ControlPlane,
    pub f: Fixture,
    pub _git: super::http::Server,
    pub ks: Api<DynamicObject>,
    pub runs: Api<MigrationRun>,
    pub flux: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.flux.abort();
    }
}

pub async fn setup() -> Option<Setup> {
    setup_with_tokens(&[]).await
}

pub async fn setup_with_tokens(tokens: &[&str]) -> Option<Setup> {
    setup_on(tokens, None).await
}

/// [`setup`] with PostgreSQL settings (`postgresql.conf` lines) of its own.
pub async fn setup_with_settings(settings: &str) -> Option<Setup> {
    setup_on(&[], Some(settings)).await
}

async fn setup_on(tokens: &[&str], settings: Option<&str>) -> Option<Setup> {
    let plane = ControlPlane::start(tokens).await?;
    let f = match settings {
        Some(s) => Fixture::with_settings(s).await,
        None => Fixture::new().await,
    };
    let root = f.remote.path().parent().unwrap().to_path_buf();
    let git = super::http::git_server(root, "flux", "git-password").await;
    let client = plane.client.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    for (name, data) in [
        ("git-auth", json!({"username": "flux", "password": "git-password"})),
        ("app-db-app", json!({"uri": f.server.url("shop")})),
    ] {
        let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let gvk = kube::api::GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository");
    let repos: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &kube::api::ApiResource::from_gvk(&gvk));
    create(&repos, json!({
        "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
        "metadata": {"name": "sre", "namespace": "default"},
        "spec": {"interval": "1m", "url": format!("{}/sre.git", git.url()), "ref": {"branch": GATE}, "secretRef": {"name": "git-auth"}},
    }))
    .await;
    let ks = pause::kustomizations(client.clone(), "default");
    create(&ks, json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "shop", "namespace": "default",
                     "annotations": {"backstop.dev/guard": "enabled", "backstop.dev/upstream-branch": "main"}},
        "spec": {"interval": "5m", "path": "./apps/shop", "prune": true, "sourceRef": {"kind": "GitRepository", "name": "sre"}},
    }))
    .await;
    let flux = fake_kustomize_controller(client.clone(), ks.clone(), f.remote.path().to_path_buf());
    let runs: Api<MigrationRun> = Api::namespaced(client, "default");
    Some(Setup {
        plane,
        f,
        _git: git,
        ks,
        runs,
        flux,
    })
}

impl Setup {
    pub fn controller(&self, env: &[(&str, &str)]) -> tokio::process::Child {
        self.controller_as("replica-a", 0, env)
    }

    pub fn controller_as(&self, identity: &str, metrics_port: u16, env: &[(&str, &str)]) -> tokio::process::Child {
        self.controller_with(identity, metrics_port, &self.plane.kubeconfig_path(), "default", env)
    }

    pub fn controller_with(
        &self,
        identity: &str,
        metrics_port: u16,
        kubeconfig: &std::path::Path,
        lease_namespace: &str,
        env: &[(&str, &str)],
    ) -> tokio::process::Child {
        self.controller_full(
            identity,
            metrics_port,
            kubeconfig,
            lease_namespace,
            &self.f.state(),
            &[],
            env,
        )
    }

    /// A controller with its own `state` folder (a pod's own volume) and extra arguments.
    #[allow(clippy::too_many_arguments)]
    pub fn controller_full(
        &self,
        identity: &str,
        metrics_port: u16,
        kubeconfig: &std::path::Path,
        lease_namespace: &str,
        state: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"));
        cmd.args([
            "controller",
            "--interval",
            "1",
            "--timeout",
            "6",
            "--lease-namespace",
            lease_namespace,
            "--identity",
            identity,
        ])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--state")
        .arg(state)
        // The tests' state folders are on disk; dump checkpoints are allowed.
        .args(if extra.contains(&"--no-durable-state") {
            &[][..]
        } else {
            &["--durable-state"][..]
        })
        .args(extra.iter().filter(|a| **a != "--no-durable-state"))
        // Each pass's steps at debug: a stalled test shows where it stalled.
        .env(
            "BACKSTOP_LOG",
            std::env::var("BACKSTOP_LOG").unwrap_or_else(|_| "info,backstop=debug".into()),
        )
        .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }

    /// Installs flux/'s namespace, RBAC and app Role (in `default`) and
    /// returns a kubeconfig for the controller's ServiceAccount, whose token
    /// [`SA_TOKEN`] gives the API server (`setup_with_tokens(&[SA_TOKEN])`).
    pub async fn install_shipped_roles(&self) -> std::path::PathBuf {
        let admin = self.plane.client.clone();
        let flux = |f: &str| std::fs::read_to_string(format!("{}/flux/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        super::envtest::create_all(&admin, &flux("namespace.yaml"), None).await;
        super::envtest::create_all(&admin, &flux("rbac.yaml"), None).await;
        super::envtest::create_all(&admin, &flux("app-role.yaml"), Some("default")).await;
        let kubeconfig = self.plane.dir.path().join("sa-kubeconfig");
        std::fs::write(&kubeconfig, super::envtest::kubeconfig(self.plane.port, "sa-token")).unwrap();
        kubeconfig
    }

    /// Waits for a MigrationRun whose Ready condition is decided.
    pub async fn finished_run(&self) -> MigrationRun {
        for _ in 0..120 {
            let list = self.runs.list(&ListParams::default()).await.unwrap();
            if let Some(run) = list.items.into_iter().find(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status != "Unknown"))
            }) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("no MigrationRun finished within 60s");
    }

    pub fn ready(run: &MigrationRun) -> (String, String) {
        let c = run
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        (c.status.clone(), c.reason.clone())
    }

    /// `orders` applied through the controller, three rows written, the run
    /// records cleared: returns the commit and the schema at that point.
    pub async fn orders_applied(&self) -> (String, String) {
        let m1 = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
        let c1 = self.f.commit_carrier(&m1, "create orders");
        let mut controller = self.controller(&[]);
        self.finished_run().await;
        controller.kill().await.ok();
        insert_orders(&self.f).await;
        let schema = self.f.schema().await;
        self.runs
            .delete_collection(&Default::default(), &ListParams::default())
            .await
            .unwrap();
        (c1, schema)
    }

    pub async fn resumed(&self) {
        let obj = self.ks.get("shop").await.unwrap();
        assert_eq!(obj.data["spec"]["suspend"], false, "resumed");
        assert!(obj.metadata.annotations.as_ref().unwrap().get(SUSPENDED_BY).is_none());
    }
}

pub fn steps(run: &MigrationRun) -> Vec<String> {
    run.status
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The CNPG Cluster `app-db` (owned by the `databases` Kustomization) with backups configured.
/// Plays CNPG's report on WAL archiving: the Cluster's `ContinuousArchiving`
/// condition.
pub async fn continuous_archiving(clusters: &Api<DynamicObject>, status: &str) {
    let reason = if status == "True" {
        "ContinuousArchivingSuccess"
    } else {
        "ContinuousArchivingFailing"
    };
    let patch = json!({"status": {"conditions": [{
        "type": "ContinuousArchiving", "status": status, "reason": reason,
        "message": "archiving", "lastTransitionTime": chrono::Utc::now().to_rfc3339(),
    }]}});
    clusters
        .patch_status("app-db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

pub async fn cnpg_cluster(s: &Setup) -> Api<DynamicObject> {
    cnpg_cluster_owned_by(s, "databases").await
}

/// The CNPG Cluster `app-db`, applied by Kustomization `owner` (`databases`
/// is created for it; `shop` is the guarded one).
pub async fn cnpg_cluster_owned_by(s: &Setup, owner: &str) -> Api<DynamicObject> {
    if owner == "databases" {
        create(&s.ks, json!({
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": "databases", "namespace": "default"},
            "spec": {"interval": "10m", "path": "./infrastructure", "prune": false, "sourceRef": {"kind": "GitRepository", "name": "sre"}},
        }))
        .await;
    }
    let gvk = kube::api::GroupVersionKind::gvk("postgresql.cnpg.io", "v1", "Cluster");
    let clusters: Api<DynamicObject> = Api::namespaced_with(
        s.plane.client.clone(),
        "default",
        &kube::api::ApiResource::from_gvk(&gvk),
    );
    create(&clusters, json!({
        "apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster",
        "metadata": {"name": "app-db", "namespace": "default",
                     "labels": {"kustomize.toolkit.fluxcd.io/name": owner, "kustomize.toolkit.fluxcd.io/namespace": "default"}},
        "spec": {"instances": 1, "storage": {"size": "1Gi"},
                 "backup": {"barmanObjectStore": {"destinationPath": "s3://backups/app-db", "serverName": "app-db"}}},
    }))
    .await;
    clusters
}

/// Plays the CNPG operator: completes Backups with a real base backup of the
/// test's server, and performs a real PITR (to `recoveryTarget.targetLSN`, exclusive, or `targetTime`)
/// for a Cluster recreated with `bootstrap.recovery`.
pub fn fake_cnpg_operator(client: kube::Client, f: &Fixture) -> tokio::task::JoinHandle<()> {
    use backstop::checkpoint::{local::LocalBackend, Checkpoint, RecoveryPoint};
    let backend = LocalBackend {
        bindir: f.server.bindir().to_path_buf().into(),
        pgdata: f.server.data_dir(),
        wal_archive: f.server.archive(),
        store: f.dir.path().join("cnpg-operator"),
        recovery_timeout: Duration::from_secs(120),
        policy: Default::default(),
    };
    let db = f.server.database("shop").unwrap();
    let cnpg = |kind: &str| {
        let gvk = kube::api::GroupVersionKind::gvk("postgresql.cnpg.io", "v1", kind);
        Api::<DynamicObject>::namespaced_with(client.clone(), "default", &kube::api::ApiResource::from_gvk(&gvk))
    };
    let (backups, clusters) = (cnpg("Backup"), cnpg("Cluster"));
    tokio::spawn(async move {
        let mut last = None;
        loop {
            for b in backups.list(&ListParams::default()).await.unwrap().items {
                if b.data["status"]["phase"].is_null() {
                    let name = b.metadata.name.clone().unwrap();
                    let started = chrono::Utc::now().to_rfc3339();
                    let record = backend.create(&db, &name).await.unwrap();
                    let begin = record.base.as_ref().map(|b| b.base.start_lsn.clone());
                    last = Some(record);
                    let status = json!({"status": {"phase": "completed", "startedAt": started, "stoppedAt": chrono::Utc::now().to_rfc3339(), "beginLSN": begin, "backupId": format!("id-{name}")}});
                    backups
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .unwrap();
                }
            }
            for c in clusters.list(&ListParams::default()).await.unwrap().items {
                let recovery = &c.data["spec"]["bootstrap"]["recovery"];
                if recovery.is_null() || c.data["status"]["phase"].as_str() == Some("Cluster in healthy state") {
                    continue;
                }
                // What CNPG does with the target: an LSN, exclusive
                // (recovery_target_inclusive off), or a time.
                let target = &recovery["recoveryTarget"];
                let point = match target["targetLSN"].as_str() {
                    Some(lsn) => {
                        assert_eq!(target["exclusive"], true, "{target}");
                        RecoveryPoint {
                            time: chrono::Utc::now(),
                            lsn: lsn.to_string(),
                            capture: None,
                        }
                    }
                    None => {
                        let t = target["targetTime"].as_str().unwrap();
                        let naive =
                            chrono::NaiveDateTime::parse_from_str(t.trim_end_matches("+00"), "%Y-%m-%d %H:%M:%S%.f")
                                .unwrap();
                        RecoveryPoint {
                            time: naive.and_utc(),
                            lsn: String::new(),
                            capture: None,
                        }
                    }
                };
                backend
                    .restore(
                        &db,
                        last.as_ref().expect("a backup before a recovery"),
                        &point,
                        "cnpg-recovery",
                    )
                    .await
                    .unwrap();
                let status =
                    json!({"status": {"phase": "Cluster in healthy state", "instances": 1, "readyInstances": 1}});
                clusters
                    .patch_status(
                        c.metadata.name.as_deref().unwrap(),
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// source-controller's part: the GitRepository's artifact is at `sha`.
pub async fn set_artifact(s: &Setup, sha: &str) {
    let repos = backstop::k8s::controller::git_repositories(s.plane.client.clone(), "default");
    let patch = json!({"status": {"artifact": {
        "revision": format!("{GATE}@sha1:{sha}"),
        "digest": format!("sha256:{sha}"),
        "lastUpdateTime": "2026-01-01T00:00:00Z",
        "path": format!("gitrepository/default/sre/{sha}.tar.gz"),
        "url": format!("http://source-controller.flux-system.svc/gitrepository/default/sre/{sha}.tar.gz"),
    }}});
    repos
        .patch_status("sre", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}
