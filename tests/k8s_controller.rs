//! `backstop controller` against a real kube-apiserver: the test plays
//! kustomize-controller (answers the pause handshake; when the Kustomization
//! runs, applies the gate's head and reports Ready) and serves the sre repo
//! over git's smart HTTP, as a Flux GitRepository requires.

mod common;

use std::time::Duration;

use backstop::k8s::crd::MigrationRun;
use backstop::k8s::pause::{self, REQUESTED_AT, SUSPENDED_BY};
use common::envtest::ControlPlane;
use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

async fn create(api: &Api<DynamicObject>, value: serde_json::Value) {
    let obj: DynamicObject = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

/// kustomize-controller's part: the handshake, and applying the gate when running.
fn fake_kustomize_controller(api: Api<DynamicObject>, remote: std::path::PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) = event else {
                continue;
            };
            let name = obj.metadata.name.clone().unwrap();
            let requested = obj
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REQUESTED_AT))
                .cloned();
            let handled = obj.data["status"]["lastHandledReconcileAt"]
                .as_str()
                .map(str::to_string);
            if let Some(token) = requested.filter(|t| Some(t) != handled.as_ref()) {
                let patch = json!({"status": {"lastHandledReconcileAt": token}});
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
            if !obj.data["spec"]["suspend"].as_bool().unwrap_or(false) {
                let gate = backstop::sandbox::BareRemote::open(&remote)
                    .head(GATE)
                    .unwrap()
                    .unwrap();
                let revision = format!("{GATE}@sha1:{gate}");
                if obj.data["status"]["lastAppliedRevision"].as_str() != Some(revision.as_str()) {
                    let patch = json!({"status": {"lastAppliedRevision": revision, "conditions": [{
                        "type": "Ready", "status": "True", "reason": "ReconciliationSucceeded",
                        "message": "Applied revision", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                    let _ = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await;
                }
            }
        }
    })
}

#[tokio::test]
async fn controller_migrates_promotes_and_records_a_ready_migration_run() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let f = Fixture::new().await;
    let root = f.remote.path().parent().unwrap().to_path_buf();
    let git = common::http::git_server(root, "flux", "git-password").await;
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
    let flux = fake_kustomize_controller(ks.clone(), f.remote.path().to_path_buf());
    let migration = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
    let c1 = f.commit_carrier(&migration, "create orders");

    let mut controller = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["controller", "--interval", "1", "--timeout", "30", "--kubeconfig"])
        .arg(plane.kubeconfig_path())
        .arg("--state")
        .arg(f.state())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let runs: Api<MigrationRun> = Api::namespaced(client.clone(), "default");
    let mut ready = None;
    for _ in 0..120 {
        let list = runs.list(&ListParams::default()).await.unwrap();
        if let Some(run) = list.items.into_iter().find(|r| {
            r.status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status != "Unknown"))
        }) {
            ready = Some(run);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    controller.kill().await.ok();
    flux.abort();
    let run = ready.expect("a MigrationRun finished within 60s");
    let status = run.status.clone().unwrap();
    let ready_condition = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready_condition.status, "True", "{status:?}");
    assert_eq!(run.spec.commit, c1);
    assert_eq!(run.spec.kustomization, "shop");
    let steps: Vec<&str> = status.steps.iter().map(|s| s.name.as_str()).collect();
    for step in [
        "lock",
        "checkpoint",
        "migrate 0001-orders",
        "verify 0001-orders",
        "promote",
        "health",
        "unlock",
    ] {
        assert!(steps.contains(&step), "missing step {step}: {steps:?}");
    }
    assert_eq!(f.gate(), c1, "gate moved to the migration's commit");
    assert_eq!(
        f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0001-orders' AND success")
            .await,
        1
    );
    let obj = ks.get("shop").await.unwrap();
    assert_eq!(obj.data["spec"]["suspend"], false, "resumed");
    assert!(obj.metadata.annotations.as_ref().unwrap().get(SUSPENDED_BY).is_none());
}
