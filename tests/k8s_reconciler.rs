//! The controller as a reconciler, against a real kube-apiserver with Flux
//! and CNPG played: fenced leadership across replicas, Kustomizations that
//! proceed concurrently, refusals visible in the cluster, and API faults
//! that requeue without reverting anything.
//!
//! `BACKSTOP_K8S_LONG_SECONDS` (default 20) is how long the "long" migration
//! runs in the concurrency test; set 600 for the 10-minute version.

mod common;

use std::time::Duration;

use backstop::k8s::crd::MigrationRun;
use common::flux::*;
use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use serde_json::json;

async fn metrics(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn wait_for_leader(port: u16) {
    for _ in 0..120 {
        if metrics(port).await.contains("backstop_leader 1") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the replica on port {port} never led");
}

/// Waits until a MigrationRun of `kustomization` is in `phase` (60 s).
async fn run_in_phase(runs: &Api<MigrationRun>, kustomization: &str, phase: &str) -> MigrationRun {
    run_in_phase_within(runs, kustomization, phase, 60).await
}

/// Waits up to `seconds` until a MigrationRun of `kustomization` is in `phase`.
async fn run_in_phase_within(runs: &Api<MigrationRun>, kustomization: &str, phase: &str, seconds: u64) -> MigrationRun {
    for _ in 0..seconds * 4 {
        let list = runs.list(&ListParams::default()).await.unwrap();
        if let Some(run) = list.items.into_iter().find(|r| {
            r.spec.kustomization == kustomization && r.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase)
        }) {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seen: Vec<_> = runs
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .map(|r| (r.metadata.name, r.spec.kustomization, r.status.and_then(|s| s.phase)))
                .collect()
        })
        .unwrap_or_default();
    panic!("no MigrationRun of {kustomization} reached {phase} within {seconds}s; runs: {seen:?}");
}

fn ready(run: &MigrationRun) -> Option<(String, String)> {
    run.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status != "Unknown")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn applied_times(f: &Fixture, id: &str) -> i64 {
    f.count(&format!(
        "SELECT count(*) FROM backstop.migration_history WHERE id = '{id}' AND success"
    ))
    .await
}

fn slow_carrier(id: &str, seconds: u64) -> CarrierBuilder {
    carrier(id)
        .database("cnpg:app-db")
        .annotation("checkpoint", "dump")
        // The default statement timeout (10 min) would cancel the
        // 10-minute version.
        .annotation("timeout", &format!("{}s", seconds + 120))
        .sql(
            "001.sql",
            &format!(
                "SELECT pg_sleep({seconds});\nCREATE TABLE t_{} (id int);",
                id.replace('-', "_")
            ),
        )
}

#[tokio::test]
async fn a_follower_finishes_the_run_of_a_leader_killed_mid_migration_with_one_checkpoint() {
    let Some(s) = setup().await else { return };
    cnpg_cluster(&s).await;
    let operator = fake_cnpg_operator(s.plane.client.clone(), &s.f);
    let kubeconfig = s.plane.kubeconfig_path();
    let lease = ["--lease-seconds", "3"];
    let (pa, pb) = (free_port(), free_port());
    let state_b = tempfile::tempdir().unwrap();
    let mut a = s.controller_full("replica-a", pa, &kubeconfig, "default", &s.f.state(), &lease, &[]);
    wait_for_leader(pa).await;
    let mut b = s.controller_full("replica-b", pb, &kubeconfig, "default", state_b.path(), &lease, &[]);
    // A CNPG Backup checkpoint (it lives in the cluster, not in A's volume).
    let slow = carrier("0001-slow")
        .database("cnpg:app-db")
        .sql("001.sql", "SELECT pg_sleep(3);\nCREATE TABLE slow (id int);");
    let c1 = s.f.commit_carrier(&slow, "slow migration");
    run_in_phase(&s.runs, "shop", "Migrating").await;
    a.kill().await.unwrap(); // SIGKILL, mid-migration
    let run = s.finished_run().await;
    b.kill().await.ok();
    operator.abort();
    assert_eq!(
        ready(&run),
        Some(("True".into(), "Succeeded".into())),
        "{:?}",
        run.status
    );
    let status = run.status.clone().unwrap();
    assert!(
        status.fence.as_deref().is_some_and(|f| f.starts_with("replica-b/")),
        "the follower wrote the end of the run under its own fence: {:?}",
        status.fence
    );
    let checkpoints = status.steps.iter().filter(|s| s.name == "checkpoint").count();
    assert_eq!(checkpoints, 1, "{:?}", status.steps);
    let gvk = kube::api::GroupVersionKind::gvk("postgresql.cnpg.io", "v1", "Backup");
    let backups: Api<DynamicObject> = Api::namespaced_with(
        s.plane.client.clone(),
        "default",
        &kube::api::ApiResource::from_gvk(&gvk),
    );
    assert_eq!(
        backups.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "one Backup"
    );
    assert_eq!(applied_times(&s.f, "0001-slow").await, 1, "applied exactly once");
    assert_eq!(
        s.runs.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "one run"
    );
    assert_eq!(s.f.revert_commits("main"), 0, "nothing reverted");
    assert_eq!(s.f.gate(), c1);
    s.resumed().await;
}

#[tokio::test]
async fn a_long_migration_on_one_app_does_not_hold_up_another_apps_migration() {
    let Some(s) = setup().await else { return };
    let long: u64 = std::env::var("BACKSTOP_K8S_LONG_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // A second app: its own database, gate branch, GitRepository (same URL:
    // one shared mirror) and guarded Kustomization.
    s.f.server.create_database("billing").await.unwrap();
    let client = s.plane.client.clone();
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "billing-db-app"}, "stringData": {"uri": s.f.server.url("billing")}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    s.f.remote.set_branch("backstop/gate-billing", &s.f.base).unwrap();
    let repos = backstop::k8s::controller::git_repositories(client.clone(), "default");
    let url = repos.get("sre").await.unwrap().data["spec"]["url"].clone();
    let repo: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
        "metadata": {"name": "sre-billing", "namespace": "default"},
        "spec": {"interval": "1m", "url": url, "ref": {"branch": "backstop/gate-billing"}, "secretRef": {"name": "git-auth"}},
    }))
    .unwrap();
    repos.create(&PostParams::default(), &repo).await.unwrap();
    let ks: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "billing", "namespace": "default",
                     "annotations": {"backstop.dev/guard": "enabled", "backstop.dev/upstream-branch": "main"}},
        "spec": {"interval": "5m", "path": "./apps/billing", "prune": true, "sourceRef": {"kind": "GitRepository", "name": "sre-billing"}},
    }))
    .unwrap();
    s.ks.create(&PostParams::default(), &ks).await.unwrap();

    s.f.commit_carrier(&slow_carrier("0001-long", long), "long migration");
    let mut controller = s.controller(&[]);
    run_in_phase(&s.runs, "shop", "Migrating").await;
    let invoices = carrier("0001-invoices")
        .database("cnpg:billing-db")
        .annotation("checkpoint", "dump")
        .sql("001.sql", "CREATE TABLE invoices (id int);");
    let billing_commit = s.f.commit_files(
        &[("apps/billing/migrations/0001-invoices.yaml", &invoices.yaml())],
        "invoices",
    );
    let billing = run_in_phase(&s.runs, "billing", "Succeeded").await;
    let shop_now = s
        .runs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|r| r.spec.kustomization == "shop")
        .unwrap();
    assert_eq!(
        shop_now.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Migrating"),
        "billing's migration completed while shop's long one was still running"
    );
    assert_eq!(ready(&billing), Some(("True".into(), "Succeeded".into())));
    assert_eq!(
        git(s.f.remote.path(), &["rev-parse", "backstop/gate-billing"]).trim(),
        billing_commit,
        "billing's gate moved to its commit"
    );
    // The long migration still has up to `long` seconds to go.
    let shop = run_in_phase_within(&s.runs, "shop", "Succeeded", long + 60).await;
    controller.kill().await.ok();
    assert_eq!(ready(&shop), Some(("True".into(), "Succeeded".into())));
    // One mirror for the one repository URL both GitRepositories name.
    let mirrors = std::fs::read_dir(s.f.state().join("git")).unwrap().count();
    assert_eq!(mirrors, 1, "one git mirror per repository URL");
}

#[tokio::test]
async fn a_refused_carrier_gives_one_warning_event_a_refused_migration_run_and_a_metric() {
    let Some(s) = setup().await else { return };
    let bad = carrier("0001-bad")
        .database("cnpg:app-db")
        .annotation("checkpoint", "dump")
        .annotation("phase", "sideways")
        .sql("001.sql", "CREATE TABLE bad (id int);");
    let commit = s.f.commit_carrier(&bad, "a carrier with a bad phase");
    let port = free_port();
    let mut controller = s.controller_as("replica-a", port, &[]);
    let name = format!("shop-refused-{}", &commit[..12]);
    let mut refused = None;
    for _ in 0..120 {
        if let Ok(mr) = s.runs.get(&name).await {
            if mr.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Refused") {
                refused = Some(mr);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused = refused.expect("a Refused MigrationRun for the commit");
    // Several more passes (interval 1 s) publish nothing new.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let metrics = metrics(port).await;
    controller.kill().await.ok();
    let summary = refused.status.unwrap().summary.unwrap_or_default();
    assert!(
        summary.contains("apps/shop/migrations/0001-bad.yaml") && summary.contains("phase"),
        "{summary}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(s.plane.client.clone(), "default");
    let refusals: Vec<_> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("MigrationRefused")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("shop")
        })
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].type_.as_deref(), Some("Warning"));
    assert!(
        refusals[0].series.is_none(),
        "published once, not repeated: {:?}",
        refusals[0].series
    );
    let note = refusals[0].note.clone().unwrap_or_default();
    assert!(note.contains("apps/shop/migrations/0001-bad.yaml"), "{note}");
    assert!(
        metrics.contains("backstop_refusals_total{kustomization=\"default/shop\"} 1"),
        "{metrics}"
    );
    assert_eq!(s.f.gate(), s.f.base, "the gate does not pass the refused commit");
    assert_eq!(
        s.runs.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "no run started"
    );
}

#[tokio::test]
async fn an_api_fault_mid_run_requeues_and_the_run_finishes_without_a_revert() {
    let Some(s) = setup_with_tokens(&[SA_TOKEN]).await else {
        return;
    };
    let admin = s.plane.client.clone();
    let kubeconfig = s.install_shipped_roles().await;
    let c1 = s.f.commit_carrier(&slow_carrier("0001-slow", 4), "slow migration");
    let mut controller = s.controller_with("replica-a", 0, &kubeconfig, "backstop-system", &[]);
    run_in_phase(&s.runs, "shop", "Migrating").await;
    // The API refuses the controller (its ClusterRoleBinding is gone) while
    // the migration ends and the run must record it.
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(admin.clone());
    let binding = bindings.get("backstop-controller").await.unwrap();
    bindings
        .delete("backstop-controller", &Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut restored = binding.clone();
    restored.metadata.resource_version = None;
    restored.metadata.uid = None;
    restored.metadata.creation_timestamp = None;
    restored.metadata.managed_fields = None;
    bindings.create(&PostParams::default(), &restored).await.unwrap();
    let run = run_in_phase(&s.runs, "shop", "Succeeded").await;
    controller.kill().await.ok();
    assert_eq!(
        ready(&run),
        Some(("True".into(), "Succeeded".into())),
        "{:?}",
        run.status
    );
    assert_eq!(applied_times(&s.f, "0001-slow").await, 1, "applied exactly once");
    assert_eq!(s.f.revert_commits("main"), 0, "nothing reverted");
    assert!(
        !git(s.f.remote.path(), &["branch", "--list", "backstop/revert-*"]).contains("revert"),
        "no revert branch"
    );
    assert_eq!(s.f.gate(), c1);
}

#[tokio::test]
async fn kustomizations_sharing_a_gitrepository_never_move_its_gate_past_each_others_carriers() {
    shared_gate_holds_for_every_path("sre").await;
}

#[tokio::test]
async fn gitrepositories_naming_one_url_and_branch_share_one_gate() {
    shared_gate_holds_for_every_path("sre-copy").await;
}

/// billing follows GitRepository `source` (`sre` itself, or another object
/// with the same URL and branch): either way it deploys from shop's gate.
async fn shared_gate_holds_for_every_path(source: &str) {
    let Some(s) = setup().await else { return };
    if source != "sre" {
        let repos = backstop::k8s::controller::git_repositories(s.plane.client.clone(), "default");
        let sre = repos.get("sre").await.unwrap();
        let copy: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
            "metadata": {"name": source, "namespace": "default"},
            "spec": sre.data["spec"].clone(),
        }))
        .unwrap();
        repos.create(&PostParams::default(), &copy).await.unwrap();
    }
    let ks: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "billing", "namespace": "default",
                     "annotations": {"backstop.dev/guard": "enabled", "backstop.dev/upstream-branch": "main"}},
        "spec": {"interval": "5m", "path": "./apps/billing", "prune": true, "sourceRef": {"kind": "GitRepository", "name": source}},
    }))
    .unwrap();
    s.ks.create(&PostParams::default(), &ks).await.unwrap();
    // billing's carrier is refused; then shop gets a deploy-only change.
    let refused = carrier("0001-invoices")
        .database("cnpg:billing-db")
        .annotation("checkpoint", "dump")
        .annotation("phase", "sideways")
        .sql("001.sql", "CREATE TABLE invoices (id int);");
    s.f.commit_files(
        &[("apps/billing/migrations/0001-invoices.yaml", &refused.yaml())],
        "billing: invoices",
    );
    s.f.commit_files(
        &[(
            "apps/shop/deployment.yaml",
            "kind: ConfigMap\nmetadata: {name: shop-v2}\n",
        )],
        "shop: deploy v2",
    );
    let mut controller = s.controller(&[]);
    let refusal = || async {
        s.runs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|r| r.metadata.name.as_deref().unwrap_or("").starts_with("billing-refused-"))
    };
    for _ in 0..120 {
        if refusal().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(refusal().await, "billing's refusal is visible");
    // Several passes of shop, which has nothing of its own pending.
    tokio::time::sleep(Duration::from_secs(5)).await;
    controller.kill().await.ok();
    assert_eq!(
        s.f.gate(),
        s.f.base,
        "shop's engine did not move the shared gate onto billing's refused carrier"
    );
}

#[tokio::test]
async fn a_controller_without_durable_state_refuses_dump_checkpoints_before_touching_anything() {
    let Some(s) = setup().await else { return };
    let migration = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
    let commit = s.f.commit_carrier(&migration, "create orders");
    let kubeconfig = s.plane.kubeconfig_path();
    let mut controller = s.controller_full(
        "replica-a",
        0,
        &kubeconfig,
        "default",
        &s.f.state(),
        &["--no-durable-state"],
        &[],
    );
    let name = format!("shop-refused-{}", &commit[..12]);
    let mut refused = None;
    for _ in 0..120 {
        if let Ok(mr) = s.runs.get(&name).await {
            refused = mr.status.and_then(|st| st.summary);
            if refused.is_some() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    controller.kill().await.ok();
    let summary = refused.expect("the commit is refused");
    assert!(summary.contains("--durable-state"), "{summary}");
    assert_eq!(s.f.gate(), s.f.base);
    assert_eq!(
        s.f.count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'orders'")
            .await,
        0,
        "nothing ran"
    );
}

#[tokio::test]
async fn cnpg_databases_are_reached_over_tls_verified_with_the_clusters_ca_secret() {
    let Some(mut s) = setup().await else { return };
    let certs = tempfile::tempdir().unwrap();
    common::tls::make_certs(certs.path());
    common::tls::tls_on(&mut s.f, certs.path()).await;
    // The app Secret names the server by a host its certificate carries.
    let secrets: Api<Secret> = Api::namespaced(s.plane.client.clone(), "default");
    let uri = format!("postgresql://postgres@localhost:{}/shop", s.f.server.port());
    let patch = json!({"stringData": {"uri": uri}});
    secrets
        .patch(
            "app-db-app",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    // First a CA that did not sign the server's certificate: nothing runs.
    let ca_secret = |file: &str| -> Secret {
        let ca = std::fs::read_to_string(certs.path().join(file)).unwrap();
        serde_json::from_value(json!({"metadata": {"name": "app-db-ca"}, "stringData": {"ca.crt": ca}})).unwrap()
    };
    secrets
        .create(&PostParams::default(), &ca_secret("other-ca.crt"))
        .await
        .unwrap();
    let migration = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
    let c1 = s.f.commit_carrier(&migration, "create orders");
    let mut controller = s.controller(&[]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        s.f.gate(),
        s.f.base,
        "a server the cluster's CA does not vouch for is not used"
    );
    assert_eq!(
        s.f.count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'orders'")
            .await,
        0
    );
    // The cluster's real CA: the run goes through, verified.
    secrets.delete("app-db-ca", &Default::default()).await.unwrap();
    secrets
        .create(&PostParams::default(), &ca_secret("ca.crt"))
        .await
        .unwrap();
    let run = run_in_phase(&s.runs, "shop", "Succeeded").await;
    controller.kill().await.ok();
    assert_eq!(ready(&run), Some(("True".into(), "Succeeded".into())));
    assert_eq!(s.f.gate(), c1);
}

async fn gate_reaches(s: &Setup, sha: &str, what: &str) {
    for _ in 0..240 {
        if s.f.gate() == sha {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the shared gate never reached {what} ({sha}); it is at {}", s.f.gate());
}

/// Of the Kustomizations sharing a gate, only those whose path a push
/// touches do the work; commits touching no guarded path are moved over by
/// the gate's steward (the first by name a person has not suspended), so
/// the gate keeps moving when the steward is suspended too.
#[tokio::test]
async fn a_shared_gate_moves_over_commits_no_guarded_path_touches_even_with_its_steward_suspended() {
    let Some(s) = setup().await else { return };
    // billing sorts before shop: it is the steward.
    let ks: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "billing", "namespace": "default",
                     "annotations": {"backstop.dev/guard": "enabled", "backstop.dev/upstream-branch": "main"}},
        "spec": {"interval": "5m", "path": "./apps/billing", "prune": true, "sourceRef": {"kind": "GitRepository", "name": "sre"}},
    }))
    .unwrap();
    s.ks.create(&PostParams::default(), &ks).await.unwrap();
    let mut controller = s.controller(&[]);
    let outside = s.f.commit_files(
        &[("infra/dns.yaml", "kind: ConfigMap\nmetadata: {name: dns}\n")],
        "infra",
    );
    gate_reaches(&s, &outside, "a commit outside every guarded path").await;
    let shop_only = s.f.commit_files(
        &[(
            "apps/shop/deployment.yaml",
            "kind: ConfigMap\nmetadata: {name: shop-v2}\n",
        )],
        "shop: deploy v2",
    );
    gate_reaches(&s, &shop_only, "a deploy-only commit of shop").await;
    // A person suspends the steward: shop takes over.
    s.ks.patch(
        "billing",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"suspend": true}})),
    )
    .await
    .unwrap();
    let later = s.f.commit_files(
        &[("infra/dns.yaml", "kind: ConfigMap\nmetadata: {name: dns2}\n")],
        "infra 2",
    );
    gate_reaches(
        &s,
        &later,
        "a commit outside every guarded path with the steward suspended",
    )
    .await;
    controller.kill().await.ok();
}
