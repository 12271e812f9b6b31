//! The verified pause on a real kube-apiserver with the upstream Flux CRDs;
//! the test plays kustomize-controller, answering the reconcile request token.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backstop::k8s::pause::{self, KustomizationRef, Paused, Resumed, SUSPENDED_BY};
use common::envtest::ControlPlane;
use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

async fn kustomization(plane: &ControlPlane, name: &str, suspend: bool) -> Api<DynamicObject> {
    let api = pause::kustomizations(plane.client.clone(), "default");
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
        "kind": "Kustomization",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"interval": "5m", "path": "./apps/shop", "prune": true, "suspend": suspend,
                 "sourceRef": {"kind": "GitRepository", "name": "sre"}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    let status = json!({"status": {"lastAppliedRevision": "backstop/gate@sha1:1111111", "observedGeneration": 1}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    api
}

/// Plays kustomize-controller's part of the handshake: after `delay`, writes
/// the request token to status.lastHandledReconcileAt (also when suspended).
fn fake_kustomize_controller(
    api: Api<DynamicObject>,
    delay: Duration,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Option<Instant>>>) {
    let confirmed = Arc::new(Mutex::new(None));
    let at = confirmed.clone();
    let task = tokio::spawn(async move {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) = event else {
                continue;
            };
            if common::envtest::reconcile_request(&obj).is_some() {
                tokio::time::sleep(delay).await;
                // Noted before the write: the lock may see the write before this call returns.
                *at.lock().unwrap() = Some(Instant::now());
                assert!(common::envtest::answer_reconcile_request(&api, &obj).await);
            }
        }
    });
    (task, confirmed)
}

fn target(name: &str) -> KustomizationRef {
    KustomizationRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn pause_is_held_only_after_kustomize_controller_confirms_and_resume_releases_it() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let api = kustomization(&plane, "shop", false).await;
    let (controller, confirmed) = fake_kustomize_controller(api.clone(), Duration::from_millis(800));
    let paused = pause::lock(plane.client.clone(), &target("shop"), "run-1", Duration::from_secs(30))
        .await
        .unwrap();
    let returned = Instant::now();
    let confirmed_at = confirmed.lock().unwrap().expect("the controller confirmed");
    assert!(
        confirmed_at <= returned,
        "lock returned before kustomize-controller confirmed"
    );
    let Paused::Taken { token, live_revision } = paused else {
        panic!("{paused:?}")
    };
    assert_eq!(live_revision.as_deref(), Some("backstop/gate@sha1:1111111"));
    let obj = api.get("shop").await.unwrap();
    assert_eq!(obj.data["spec"]["suspend"], true);
    assert_eq!(obj.data["status"]["lastHandledReconcileAt"], token.as_str());
    assert_eq!(obj.metadata.annotations.as_ref().unwrap()[SUSPENDED_BY], "run-1");
    // Another owner cannot take or release it.
    assert!(pause::unlock(plane.client.clone(), &target("shop"), "run-2")
        .await
        .is_err());
    assert_eq!(
        pause::unlock(plane.client.clone(), &target("shop"), "run-1")
            .await
            .unwrap(),
        Resumed::Resumed
    );
    let obj = api.get("shop").await.unwrap();
    assert_eq!(obj.data["spec"]["suspend"], false);
    assert!(obj.metadata.annotations.as_ref().unwrap().get(SUSPENDED_BY).is_none());
    controller.abort();
}

#[tokio::test]
async fn unconfirmed_pause_is_not_taken_and_is_undone() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let api = kustomization(&plane, "shop", false).await;
    let err = pause::lock(plane.client.clone(), &target("shop"), "run-1", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("did not confirm the pause of default/shop"),
        "{err}"
    );
    let obj = api.get("shop").await.unwrap();
    assert_eq!(obj.data["spec"]["suspend"], false, "the suspension was undone");
    assert!(obj.metadata.annotations.as_ref().unwrap().get(SUSPENDED_BY).is_none());
}

#[tokio::test]
async fn kustomization_suspended_by_a_person_stays_suspended() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let api = kustomization(&plane, "shop", true).await;
    let paused = pause::lock(plane.client.clone(), &target("shop"), "run-1", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(paused, Paused::ByPerson { .. }), "{paused:?}");
    // The CLI says so too, and leaves it suspended.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["unlock", "default/shop", "--kubeconfig"])
        .arg(plane.kubeconfig_path())
        .output()
        .await
        .unwrap();
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("was suspended by a person and stays suspended"), "{text}");
    let obj = api.get("shop").await.unwrap();
    assert_eq!(obj.data["spec"]["suspend"], true);
    assert!(obj
        .metadata
        .annotations
        .as_ref()
        .is_none_or(|a| a.get(SUSPENDED_BY).is_none()));
}

#[tokio::test]
async fn cli_lock_takes_the_verified_pause() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let api = kustomization(&plane, "shop", false).await;
    let (controller, _) = fake_kustomize_controller(api.clone(), Duration::from_millis(100));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["lock", "default/shop", "--owner", "sre-alice", "--kubeconfig"])
        .arg(plane.kubeconfig_path())
        .output()
        .await
        .unwrap();
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "paused default/shop (confirmed by kustomize-controller); live revision: backstop/gate@sha1:1111111"
        ),
        "{text}"
    );
    let obj = api.get("shop").await.unwrap();
    assert_eq!(obj.metadata.annotations.as_ref().unwrap()[SUSPENDED_BY], "sre-alice");
    controller.abort();
}

#[tokio::test]
async fn datastore_lock_suspends_client_kustomizations_and_unlock_resumes_them() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let api = kustomization(&plane, "shop", false).await;
    let (controller, _) = fake_kustomize_controller(api.clone(), Duration::from_millis(100));
    let server = backstop::pgserver::PgServer::start().await.unwrap();
    server.create_database("shop").await.unwrap();
    let ds = |args: Vec<String>| {
        let kubeconfig = plane.kubeconfig_path();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
                .arg("datastore")
                .args(args)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .output()
                .await
                .unwrap()
        }
    };
    let url = server.url("shop");
    let out = ds(vec![
        "lock".into(),
        "--source".into(),
        url.clone(),
        "--suspend".into(),
        "default/shop".into(),
    ])
    .await;
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("paused default/shop (confirmed by kustomize-controller)"),
        "{text}"
    );
    let obj = api.get("shop").await.unwrap();
    assert_eq!(obj.data["spec"]["suspend"], true);
    assert_eq!(
        obj.metadata.annotations.as_ref().unwrap()[SUSPENDED_BY],
        "backstop-datastore"
    );
    let out = ds(vec!["unlock".into(), "--url".into(), url]).await;
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("resumed default/shop"), "{text}");
    assert_eq!(api.get("shop").await.unwrap().data["spec"]["suspend"], false);
    controller.abort();
}
