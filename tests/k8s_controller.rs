//! `backstop controller` against a real kube-apiserver: the test plays
//! kustomize-controller (answers the pause handshake; when the Kustomization
//! runs, applies the gate's head and reports Ready) and serves the sre repo
//! over git's smart HTTP, as a Flux GitRepository requires.

mod common;

use std::time::Duration;

use backstop::k8s::pause::{self, SUSPENDED_BY};
use common::flux::*;
use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn controller_migrates_promotes_and_records_a_ready_migration_run() {
    let Some(s) = setup().await else { return };
    cnpg_cluster(&s).await;
    let operator = fake_cnpg_operator(s.plane.client.clone(), &s.f);
    // Default checkpoint: a CNPG Backup.
    let migration = orders_table().database("cnpg:app-db");
    let c1 = s.f.commit_carrier(&migration, "create orders");
    let port = free_port();
    let mut controller = s.controller_as("replica-a", port, &[]);
    let run = s.finished_run().await;
    // Metrics, health, the lease and the events.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, metrics) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("backstop_runs_total{outcome=\"Succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("backstop_step_duration_seconds_count{step=\"migrate\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("backstop_leader 1"), "{metrics}");
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    assert_eq!(http_get(port, "/readyz").await.0, 200);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(s.plane.client.clone(), "default");
    let lease = leases.get("backstop-controller").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("replica-a"));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(s.plane.client.clone(), "default");
    let events = events.list(&ListParams::default()).await.unwrap().items;
    let on_ks = events.iter().find(|e| {
        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("shop")
            && e.reason.as_deref() == Some("MigrationSucceeded")
    });
    assert!(
        on_ks.is_some(),
        "no MigrationSucceeded event on the Kustomization: {events:?}"
    );
    let on_run = events
        .iter()
        .any(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("MigrationRun"));
    assert!(on_run, "no event on the MigrationRun");
    controller.kill().await.ok();
    operator.abort();
    assert_eq!(Setup::ready(&run), ("True".into(), "Succeeded".into()));
    assert_eq!(run.spec.commit, c1);
    assert_eq!(run.spec.kustomization, "shop");
    let gvk = kube::api::GroupVersionKind::gvk("postgresql.cnpg.io", "v1", "Backup");
    let backups: Api<DynamicObject> = Api::namespaced_with(
        s.plane.client.clone(),
        "default",
        &kube::api::ApiResource::from_gvk(&gvk),
    );
    let backup = backups
        .get(&format!("backstop-{}", run.metadata.name.as_deref().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        backup.data["status"]["phase"], "completed",
        "Backup created and completed"
    );
    let steps = steps(&run);
    for step in [
        "lock",
        "checkpoint",
        "migrate 0001-orders",
        "verify 0001-orders",
        "promote",
        "health",
        "unlock",
    ] {
        assert!(steps.iter().any(|s| s == step), "missing step {step}: {steps:?}");
    }
    assert_eq!(s.f.gate(), c1, "gate moved to the migration's commit");
    assert_eq!(
        s.f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0001-orders' AND success")
            .await,
        1
    );
    s.resumed().await;
}

#[tokio::test]
async fn controller_rolls_back_a_failed_migration_and_reports_the_data_loss_window() {
    let Some(s) = setup().await else { return };
    let (c1, schema) = s.orders_applied().await;
    let bad = carrier("0002-backfill")
        .database("cnpg:app-db")
        .annotation("checkpoint", "dump")
        .phase("migrate")
        .sql("001.sql", "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN total int;\nUPDATE orders SET total = 1 WHERE qty > 1;")
        .verify("SELECT count(*) = 0 FROM orders WHERE total IS NULL");
    let c2 = s.f.commit_carrier(&bad, "backfill totals");
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(Setup::ready(&run), ("False".into(), "RolledBack".into()));
    let status = run.status.clone().unwrap();
    assert!(status.data_loss_window_seconds.is_some(), "{status:?}");
    assert_eq!(s.f.gate(), c1, "gate unchanged");
    let branch = format!("backstop/revert-{}", &c2[..7]);
    assert_eq!(s.f.git_log(&branch)[0], "Revert \"backfill totals\"");
    assert_eq!(s.f.schema().await, schema, "database restored");
    assert_eq!(s.f.count("SELECT count(*) FROM orders").await, 3);
    s.resumed().await;
}

#[tokio::test]
async fn controller_killed_mid_run_resumes_from_the_migration_run_without_a_second_checkpoint() {
    let Some(s) = setup().await else { return };
    let migration = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
    let c1 = s.f.commit_carrier(&migration, "create orders");
    let mut crashed = s.controller(&[("BACKSTOP_TEST_CRASH_AT", "Migrating")]);
    let status = tokio::time::timeout(Duration::from_secs(60), crashed.wait())
        .await
        .expect("crashed")
        .unwrap();
    assert_eq!(status.code(), Some(86), "the test switch ended the controller mid-run");
    let list = s.runs.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    // A phase change is written with the next step's intent: killed right at
    // the change, the run still says the phase before it, whose step (the
    // checkpoint) is done; the resumed run makes the same change.
    let phase = list.items[0].status.as_ref().unwrap().phase.clone();
    assert!(
        matches!(phase.as_deref(), Some("Checkpointing" | "Migrating")),
        "{phase:?}"
    );
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(Setup::ready(&run), ("True".into(), "Succeeded".into()));
    let steps = steps(&run);
    assert_eq!(steps.iter().filter(|s| *s == "checkpoint").count(), 1, "{steps:?}");
    assert_eq!(
        s.runs.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "no second run"
    );
    assert_eq!(s.f.gate(), c1);
    s.resumed().await;
}

#[tokio::test]
async fn health_failure_after_promotion_reverts_the_gate_and_restores_the_data() {
    let Some(s) = setup().await else { return };
    let (c1, schema) = s.orders_applied().await;
    let m2 = carrier("0002-note")
        .database("cnpg:app-db")
        .annotation("checkpoint", "dump")
        .sql(
            "001.sql",
            "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
        );
    let c2 = s.f.commit_carrier(&m2, "add note [unhealthy]");
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RolledBack".into()),
        "{:?}",
        run.status
    );
    let steps = steps(&run);
    assert!(steps.iter().any(|x| x == "gate-revert"), "{steps:?}");
    // Code: the gate got a revert of the promoted commit at once.
    let gate_log = s.f.git_log(GATE);
    assert_eq!(gate_log[0], "Revert \"add note [unhealthy]\"", "{gate_log:?}");
    assert_eq!(git(s.f.remote.path(), &["rev-parse", &format!("{GATE}^")]).trim(), c2);
    assert_ne!(s.f.gate(), c1);
    // Data: restored to the checkpoint.
    assert_eq!(s.f.schema().await, schema);
    assert_eq!(s.f.count("SELECT count(*) FROM orders").await, 3);
    // Upstream gets the revert as a pull request branch; once it is merged the
    // gate joins upstream (same guarded tree).
    let branch = format!("backstop/revert-{}", &c2[..7]);
    let upstream_revert = s.f.remote.head(&branch).unwrap().expect("revert branch");
    s.f.remote.set_branch("main", &upstream_revert).unwrap();
    let main = s.f.main();
    for _ in 0..60 {
        if s.f.gate() == main {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    controller.kill().await.ok();
    assert_eq!(s.f.gate(), main, "the gate joined upstream once the revert was merged");
    s.resumed().await;
}

#[tokio::test]
async fn only_one_replica_leads() {
    let Some(s) = setup().await else { return };
    let (pa, pb) = (free_port(), free_port());
    let mut a = s.controller_as("replica-a", pa, &[]);
    for _ in 0..60 {
        if reqwest::get(format!("http://127.0.0.1:{pa}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut b = s.controller_as("replica-b", pb, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Ready means a healthy process, leader or not (a rolling update does
    // not stall on the follower); leadership shows in the metric.
    assert_eq!(http_get(pb, "/readyz").await.0, 200, "the follower is ready");
    let (_, metrics) = http_get(pb, "/metrics").await;
    assert!(metrics.contains("backstop_leader 0"), "{metrics}");
    let (_, metrics) = http_get(pa, "/metrics").await;
    assert!(metrics.contains("backstop_leader 1"), "{metrics}");
    a.kill().await.ok();
    b.kill().await.ok();
}

#[tokio::test]
async fn the_shipped_roles_allow_what_the_controller_does_and_deny_the_rest() {
    let Some(s) = setup_with_tokens(&[SA_TOKEN]).await else {
        return;
    };
    let admin = s.plane.client.clone();
    let kubeconfig = s.install_shipped_roles().await;
    let other: Secret =
        serde_json::from_value(json!({"metadata": {"name": "payroll-db"}, "stringData": {"password": "x"}})).unwrap();
    Api::<Secret>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &other)
        .await
        .unwrap();

    // Everything the controller does works with the shipped roles.
    let migration = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
    let c1 = s.f.commit_carrier(&migration, "create orders");
    let mut controller = s.controller_with("replica-a", 0, &kubeconfig, "backstop-system", &[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(
        Setup::ready(&run),
        ("True".into(), "Succeeded".into()),
        "{:?}",
        run.status
    );
    assert_eq!(s.f.gate(), c1);

    // And what it must not do is denied.
    let sa = common::envtest::client_for(s.plane.port, "sa-token").await;
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), "default");
    let denied = |r: Result<Secret, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    assert!(
        denied(secrets.get("payroll-db").await),
        "a Secret it was not pointed at"
    );
    assert!(
        matches!(secrets.list(&ListParams::default()).await, Err(kube::Error::Api(e)) if e.code == 403),
        "listing Secrets"
    );
    assert!(secrets.get("app-db-app").await.is_ok(), "the Secret it is pointed at");
    let ks = pause::kustomizations(sa.clone(), "default");
    assert!(
        matches!(ks.delete("shop", &Default::default()).await, Err(kube::Error::Api(e)) if e.code == 403),
        "deleting a Kustomization"
    );
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(sa, "default");
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    assert!(
        matches!(cms.create(&PostParams::default(), &cm).await, Err(kube::Error::Api(e)) if e.code == 403),
        "creating ConfigMaps"
    );
}

#[tokio::test]
async fn controller_leaves_a_kustomization_suspended_by_a_person_alone() {
    let Some(s) = setup().await else { return };
    let patch = json!({"spec": {"suspend": true}});
    s.ks.patch("shop", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let migration = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
    s.f.commit_carrier(&migration, "create orders");
    let mut controller = s.controller(&[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    controller.kill().await.ok();
    assert!(
        s.runs.list(&ListParams::default()).await.unwrap().items.is_empty(),
        "no run starts"
    );
    assert_eq!(s.f.gate(), s.f.base, "nothing promoted");
    let obj = s.ks.get("shop").await.unwrap();
    assert_eq!(obj.data["spec"]["suspend"], true, "still suspended");
    assert!(obj
        .metadata
        .annotations
        .as_ref()
        .is_none_or(|a| a.get(SUSPENDED_BY).is_none()));
}

#[tokio::test]
async fn cnpg_checkpoints_reuse_the_newest_backup_while_the_cluster_archives_and_still_roll_back() {
    let Some(s) = setup().await else { return };
    let clusters = cnpg_cluster(&s).await;
    continuous_archiving(&clusters, "True").await;
    let operator = fake_cnpg_operator(s.plane.client.clone(), &s.f);
    let c1 =
        s.f.commit_carrier(&orders_table().database("cnpg:app-db"), "create orders");
    let mut controller = s.controller(&[]);
    let first = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(Setup::ready(&first).1, "Succeeded", "{:?}", first.status);
    assert_eq!(s.f.gate(), c1);
    insert_orders(&s.f).await;
    let schema = s.f.schema().await;
    s.runs
        .delete_collection(&Default::default(), &ListParams::default())
        .await
        .unwrap();

    let bad = carrier("0002-backfill")
        .database("cnpg:app-db")
        .phase("migrate")
        .sql("001.sql", "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN total int;\nUPDATE orders SET total = 1 WHERE qty > 1;")
        .verify("SELECT count(*) = 0 FROM orders WHERE total IS NULL");
    s.f.commit_carrier(&bad, "backfill totals");
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    operator.abort();
    assert_eq!(Setup::ready(&run).1, "RolledBack", "{:?}", run.status);
    let gvk = kube::api::GroupVersionKind::gvk("postgresql.cnpg.io", "v1", "Backup");
    let backups: Api<DynamicObject> = Api::namespaced_with(
        s.plane.client.clone(),
        "default",
        &kube::api::ApiResource::from_gvk(&gvk),
    );
    let names: Vec<String> = backups
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|b| b.metadata.name)
        .collect();
    assert_eq!(
        names,
        vec![format!("backstop-{}", first.metadata.name.as_deref().unwrap())],
        "the second checkpoint relied on the first Backup"
    );
    let checkpoint = run
        .status
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .find(|st| st.name == "checkpoint")
        .map(|st| format!("{st:?}"))
        .unwrap();
    assert!(checkpoint.contains("reused"), "{checkpoint}");
    assert_eq!(s.f.schema().await, schema, "real PITR brought the schema back");
    assert_eq!(s.f.count("SELECT count(*) FROM orders").await, 3);
}

#[tokio::test]
async fn cnpg_backup_checkpoint_and_cluster_recreate_restore_roll_back_a_failed_migration() {
    cnpg_restore_holds_the_cluster_owner_until_its_artifact_carries_the_recovery("databases").await;
}

#[tokio::test]
async fn a_restore_hold_on_the_guarded_kustomization_outlasts_the_runs_unlock() {
    cnpg_restore_holds_the_cluster_owner_until_its_artifact_carries_the_recovery("shop").await;
}

async fn cnpg_restore_holds_the_cluster_owner_until_its_artifact_carries_the_recovery(owner_name: &str) {
    let Some(s) = setup().await else { return };
    let client = s.plane.client.clone();
    let clusters = cnpg_cluster_owned_by(&s, owner_name).await;
    let operator = fake_cnpg_operator(client.clone(), &s.f);
    // The Cluster's manifest in the repository (applied by the `databases` Kustomization).
    let cluster_yaml = "# Shop database\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n---\n# CNPG cluster\napiVersion: postgresql.cnpg.io/v1\nkind: Cluster\nmetadata:\n  name: app-db\n  namespace: default\nspec:\n  instances: 1\n  storage:\n    size: 1Gi\n  bootstrap:\n    initdb:\n      database: app\n  backup:\n    barmanObjectStore:\n      destinationPath: s3://backups/app-db\n      serverName: app-db\n";
    s.f.commit_files(&[("infrastructure/app-db.yaml", cluster_yaml)], "database cluster");
    let (_, schema) = s.orders_applied().await;
    // Default checkpoint: backup, which in a cluster is a CNPG Backup.
    let bad = carrier("0002-backfill")
        .database("cnpg:app-db")
        .phase("migrate")
        .sql("001.sql", "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN total int;\nUPDATE orders SET total = 1 WHERE qty > 1;")
        .verify("SELECT count(*) = 0 FROM orders WHERE total IS NULL");
    let c2 = s.f.commit_carrier(&bad, "backfill totals");
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    operator.abort();
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RolledBack".into()),
        "{:?}",
        run.status
    );
    let run_id = run.metadata.name.clone().unwrap();
    let backup_name = format!("backstop-{run_id}");
    let gvk = kube::api::GroupVersionKind::gvk("postgresql.cnpg.io", "v1", "Backup");
    let backups: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &kube::api::ApiResource::from_gvk(&gvk));
    let backup = backups.get(&backup_name).await.unwrap();
    assert_eq!(backup.data["spec"]["method"], "barmanObjectStore");
    assert_eq!(backup.data["spec"]["cluster"]["name"], "app-db");
    // The Cluster was recreated from the old archive at the recovery point.
    let cluster = clusters.get("app-db").await.unwrap();
    assert_eq!(cluster.data["spec"]["bootstrap"]["recovery"]["source"], "app-db");
    let target = &cluster.data["spec"]["bootstrap"]["recovery"]["recoveryTarget"];
    assert!(target["targetLSN"].is_string(), "to the recovery point's LSN: {target}");
    assert_eq!(target["exclusive"], true, "{target}");
    assert_eq!(
        target["backupID"],
        format!("id-{backup_name}"),
        "the checkpoint's base backup, pinned: {target}"
    );
    assert_ne!(
        cluster.data["spec"]["backup"]["barmanObjectStore"]["serverName"], "app-db",
        "a new, empty archive"
    );
    assert_eq!(
        cluster.data["spec"]["externalClusters"][0]["barmanObjectStore"]["serverName"],
        "app-db"
    );
    assert_eq!(s.f.schema().await, schema, "real PITR brought the schema back");
    assert_eq!(s.f.count("SELECT count(*) FROM orders").await, 3);
    // The Kustomization owning the Cluster stays paused by the run (its
    // unlock too, when that is the guarded one)...
    let owner = s.ks.get(owner_name).await.unwrap();
    assert_eq!(owner.data["spec"]["suspend"], true);
    assert_eq!(owner.metadata.annotations.as_ref().unwrap()[SUSPENDED_BY], run_id);
    // ...and the revert carries the matching Cluster manifest change, other documents untouched.
    let branch = format!("backstop/revert-{}", &c2[..7]);
    let manifest = git(
        s.f.remote.path(),
        &["show", &format!("{branch}:infrastructure/app-db.yaml")],
    );
    assert!(
        manifest.starts_with("# Shop database\napiVersion: v1\nkind: Namespace"),
        "{manifest}"
    );
    assert!(
        manifest.contains("recovery:") && manifest.contains("source: app-db"),
        "{manifest}"
    );
    assert!(!manifest.contains("initdb"), "{manifest}");
    let new_server = cluster.data["spec"]["backup"]["barmanObjectStore"]["serverName"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(manifest.contains(&format!("serverName: {new_server}")), "{manifest}");
    // Once the revert is merged it reaches the gate, but the owner stays
    // held until its GitRepository artifact carries the change.
    let revert = s.f.remote.head(&branch).unwrap().unwrap();
    set_artifact(&s, &s.f.gate()).await;
    s.f.remote.set_branch("main", &revert).unwrap();
    for _ in 0..60 {
        if s.f.gate() == revert {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(s.f.gate(), revert, "the gate joined the merged revert");
    let mut held = None;
    for _ in 0..30 {
        let mr = s.runs.get(&run_id).await.unwrap();
        held = mr.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Held");
        if held.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let held = held.expect("the MigrationRun says what the hold waits for");
    assert!(held.message.contains("recovery manifest"), "{}", held.message);
    let owner = s.ks.get(owner_name).await.unwrap();
    assert_eq!(
        owner.data["spec"]["suspend"], true,
        "held while the artifact lacks the change"
    );
    set_artifact(&s, &revert).await;
    let mut resumed = false;
    for _ in 0..60 {
        let owner = s.ks.get(owner_name).await.unwrap();
        if owner.data["spec"]["suspend"] == false {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    controller.kill().await.ok();
    assert!(
        resumed,
        "the owning Kustomization was resumed once its artifact carried the change"
    );
    assert_eq!(s.f.gate(), revert);
}

fn job_carrier(id: &str, name: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    backstop.dev/migration: {id}\n    backstop.dev/database: cnpg:app-db\n    backstop.dev/run: job\n    backstop.dev/checkpoint: dump\n    kustomize.toolkit.fluxcd.io/reconcile: disabled\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - name: migrate\n          image: registry.example.com/shop-migrate:1.0\n          args: [\"{name}\"]\n"
    )
}

/// [`job_carrier`] with `backstop.dev/timeout: {timeout}`.
fn job_carrier_timing_out(id: &str, name: &str, timeout: &str) -> String {
    job_carrier(id, name).replace(
        "    backstop.dev/run: job\n",
        &format!("    backstop.dev/run: job\n    backstop.dev/timeout: {timeout}\n"),
    )
}

/// The Jobs of the namespace the tests use.
fn jobs_api(client: kube::Client) -> Api<k8s_openapi::api::batch::v1::Job> {
    Api::namespaced(client, "default")
}

/// How many tables named `name` the shop database has (0 or 1).
async fn tables_named(f: &Fixture, name: &str) -> i64 {
    f.count(&format!("SELECT count(*) FROM pg_tables WHERE tablename = '{name}'"))
        .await
}

/// Plays the Job controller: a Job named *-fails fails; others "run" (create a
/// table in the database, as the migration image would) and complete.
fn fake_job_controller(client: kube::Client, url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let jobs = jobs_api(client);
        loop {
            for j in jobs.list(&ListParams::default()).await.unwrap().items {
                if j.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some() {
                    continue;
                }
                let name = j.metadata.name.clone().unwrap();
                let failed = name.starts_with("shop-fails");
                if !failed {
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    c.batch_execute("CREATE TABLE IF NOT EXISTS made_by_job (id int)")
                        .await
                        .unwrap();
                } else {
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    c.batch_execute("CREATE TABLE half_done_by_job (id int)").await.unwrap();
                }
                let (t, reason) = if failed {
                    ("Failed", "BackoffLimitExceeded")
                } else {
                    ("Complete", "Completed")
                };
                let now = "2026-01-01T00:00:00Z";
                let status = json!({"status": {"conditions": [{"type": t, "status": "True", "reason": reason,
                    "lastProbeTime": now, "lastTransitionTime": now}], "startTime": now}});
                jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test]
async fn job_migrations_run_as_uniquely_named_jobs_and_a_failed_job_is_rolled_back() {
    let Some(s) = setup().await else { return };
    let jobs = fake_job_controller(s.plane.client.clone(), s.f.server.url("shop"));
    let c1 = s.f.commit_files(
        &[(
            "apps/shop/migrations/0001-job.yaml",
            &job_carrier("0001-job", "shop-backfill"),
        )],
        "job migration",
    );
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(
        Setup::ready(&run),
        ("True".into(), "Succeeded".into()),
        "{:?}",
        run.status
    );
    let run_id = run.metadata.name.clone().unwrap();
    let api = jobs_api(s.plane.client.clone());
    let job = api
        .get(&format!("shop-backfill-{run_id}"))
        .await
        .expect("the Job, under a name unique to the run");
    assert_eq!(job.metadata.labels.unwrap()["backstop.dev/run"], run_id);
    assert_eq!(s.f.gate(), c1);
    assert_eq!(
        s.f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0001-job' AND success")
            .await,
        1
    );
    assert_eq!(tables_named(&s.f, "made_by_job").await, 1);

    let schema = s.f.schema().await;
    s.runs
        .delete_collection(&Default::default(), &ListParams::default())
        .await
        .unwrap();
    s.f.commit_files(
        &[(
            "apps/shop/migrations/0002-job.yaml",
            &job_carrier("0002-job", "shop-fails"),
        )],
        "failing job",
    );
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    jobs.abort();
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RolledBack".into()),
        "{:?}",
        run.status
    );
    let status = run.status.unwrap();
    let migrate = status.steps.iter().find(|s| s.name == "migrate 0002-job").unwrap();
    assert!(
        migrate.detail.as_deref().unwrap_or("").contains("failed; log tail"),
        "{migrate:?}"
    );
    assert_eq!(s.f.gate(), c1);
    assert_eq!(
        s.f.schema().await,
        schema,
        "what the failed Job wrote was restored away"
    );
}

/// Plays a Job controller (and a kubelet) for a Job that hangs: its pod
/// "writes" (a table) and never ends on its own; once backstop cuts the
/// Job's `activeDeadlineSeconds`, the Job is failed (`DeadlineExceeded`)
/// only after `hold`, and its pod stops `hold` later still. Returns whether,
/// all through, what it wrote was still there (no restore ran under it).
fn hanging_job_controller(client: kube::Client, url: String, hold: Duration) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        use k8s_openapi::api::core::v1::Pod;
        let jobs = jobs_api(client.clone());
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let job = loop {
            if let Some(j) = jobs.list(&ListParams::default()).await.unwrap().items.pop() {
                break j;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let name = job.metadata.name.clone().unwrap();
        // Its pod, labelled as the Job's selector picks it.
        let labels = job
            .spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap()
            .match_labels
            .clone()
            .unwrap();
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("{name}-pod"), "labels": labels},
            "spec": {"automountServiceAccountToken": false,
                     "containers": [{"name": "migrate", "image": "registry.example.com/shop-migrate:1.0"}]}}))
        .unwrap();
        // (No controller-manager makes the namespace's ServiceAccount.)
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(pods.clone().into_client(), "default");
        let account = serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        let _ = accounts.create(&PostParams::default(), &account).await;
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let phase = |p: &str| json!({"status": {"phase": p}});
        pods.patch_status(
            &pod.metadata.name.clone().unwrap(),
            &PatchParams::default(),
            &Patch::Merge(&phase("Running")),
        )
        .await
        .unwrap();
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("CREATE TABLE written_by_hanging_job (id int)")
            .await
            .unwrap();
        while jobs.get(&name).await.unwrap().spec.unwrap().active_deadline_seconds != Some(1) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Told to stop: the Job still "runs" through the hold, then fails;
        // its pod runs on through a second hold.
        let untouched = |until: std::time::Instant| {
            let url = url.clone();
            async move {
                let mut untouched = true;
                while std::time::Instant::now() < until {
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    let n: i64 = c
                        .query_one(
                            "SELECT count(*) FROM pg_tables WHERE tablename = 'written_by_hanging_job'",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    untouched &= n == 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                untouched
            }
        };
        let mut kept = untouched(std::time::Instant::now() + hold).await;
        let now = "2026-01-01T00:00:00Z";
        let status = json!({"status": {"conditions": [{"type": "Failed", "status": "True",
            "reason": "DeadlineExceeded", "lastProbeTime": now, "lastTransitionTime": now}],
            "startTime": now}});
        jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        kept &= untouched(std::time::Instant::now() + hold).await;
        pods.patch_status(
            &pod.metadata.name.clone().unwrap(),
            &PatchParams::default(),
            &Patch::Merge(&phase("Failed")),
        )
        .await
        .unwrap();
        kept
    })
}

#[tokio::test]
async fn a_job_that_outlives_its_timeout_is_stopped_before_anything_is_restored_and_kept_as_evidence() {
    // With the shipped roles: stopping a Job takes what they grant.
    let Some(s) = setup_with_tokens(&[SA_TOKEN]).await else {
        return;
    };
    let kubeconfig = s.install_shipped_roles().await;
    let hold = Duration::from_secs(3);
    let jobs = hanging_job_controller(s.plane.client.clone(), s.f.server.url("shop"), hold);
    let gate = s.f.gate();
    let carrier = job_carrier_timing_out("0001-hangs", "shop-hangs", "3s");
    s.f.commit_files(&[("apps/shop/migrations/0001-job.yaml", &carrier)], "hanging job");
    let mut controller = s.controller_with("replica-a", 0, &kubeconfig, "backstop-system", &[]);
    let untouched = tokio::time::timeout(Duration::from_secs(60), jobs)
        .await
        .unwrap()
        .unwrap();
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert!(
        untouched,
        "nothing was restored while the Job or its pod was still running"
    );
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RolledBack".into()),
        "{:?}",
        run.status
    );
    assert_eq!(
        tables_named(&s.f, "written_by_hanging_job").await,
        0,
        "once it stopped, what it wrote was restored away"
    );
    assert_eq!(s.f.gate(), gate);
    let run_id = run.metadata.name.clone().unwrap();
    let api = jobs_api(s.plane.client.clone());
    let job = api
        .get(&format!("shop-hangs-{run_id}"))
        .await
        .expect("the stopped Job is kept, with its status, as evidence");
    assert_eq!(
        job.spec.unwrap().active_deadline_seconds,
        Some(1),
        "stopped through its deadline"
    );
}

#[tokio::test]
async fn a_job_that_does_not_stop_when_told_is_never_restored_under_and_holds_for_a_person() {
    let Some(s) = setup().await else { return };
    // Writes, then never ends (nor honours its deadline).
    let url = s.f.server.url("shop");
    let client = s.plane.client.clone();
    let jobs = tokio::spawn(async move {
        let api = jobs_api(client);
        while api.list(&ListParams::default()).await.unwrap().items.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("CREATE TABLE written_by_stuck_job (id int)")
            .await
            .unwrap();
    });
    let gate = s.f.gate();
    let carrier = job_carrier_timing_out("0001-stuck", "shop-stuck", "2s").replace(
        "      restartPolicy: Never\n",
        "      restartPolicy: Never\n      terminationGracePeriodSeconds: 0\n",
    );
    s.f.commit_files(&[("apps/shop/migrations/0001-job.yaml", &carrier)], "stuck job");
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    jobs.await.unwrap();
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RemediationFailed".into()),
        "{:?}",
        run.status
    );
    assert_eq!(
        tables_named(&s.f, "written_by_stuck_job").await,
        1,
        "no restore ran while the Job may still write"
    );
    assert_eq!(s.f.gate(), gate);
    let status = serde_json::to_string(&run.status).unwrap();
    assert!(
        status.contains("did not end within 2s of being told to stop"),
        "{status}"
    );
    let api = jobs_api(s.plane.client.clone());
    let job = api
        .get(&format!("shop-stuck-{}", run.metadata.name.clone().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        job.spec.unwrap().active_deadline_seconds,
        Some(1),
        "it was told to stop"
    );
}

/// Commits a Job migration `id` (carrier `name`), starts the controller,
/// and once its Job exists (and "wrote" a table), SIGKILLs the controller.
/// Returns the Job.
async fn kill_while_the_job_runs(s: &Setup, id: &str, name: &str) -> k8s_openapi::api::batch::v1::Job {
    let carrier = job_carrier_timing_out(id, name, "60s");
    s.f.commit_files(&[("apps/shop/migrations/0001-job.yaml", &carrier)], "job once");
    let api = jobs_api(s.plane.client.clone());
    let mut controller = s.controller(&[]);
    let job = loop {
        if let Some(j) = api.list(&ListParams::default()).await.unwrap().items.pop() {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    s.f.client()
        .await
        .batch_execute("CREATE TABLE written_by_the_first_attempt (id int)")
        .await
        .unwrap();
    controller.kill().await.unwrap();
    job
}

#[tokio::test]
async fn a_job_migration_that_completed_and_was_recorded_before_a_kill_is_not_run_or_rolled_back_again() {
    let Some(s) = setup().await else { return };
    let gate = s.f.gate();
    let job = kill_while_the_job_runs(&s, "0001-done", "shop-done").await;
    // While backstop was down the Job completed, and backstop had written
    // its history row just before it was killed.
    let name = job.metadata.name.clone().unwrap();
    let run_id = job.metadata.labels.as_ref().unwrap()["backstop.dev/run"].clone();
    let api = jobs_api(s.plane.client.clone());
    let now = "2026-01-01T00:00:00Z";
    let status = json!({"status": {"conditions": [{"type": "Complete", "status": "True", "reason": "Completed",
        "lastProbeTime": now, "lastTransitionTime": now}], "startTime": now}});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let record = s.runs.get(&run_id).await.unwrap().status.unwrap().record.unwrap();
    let (checksum, commit) = (
        record["migrations"][0]["checksum"].as_str().unwrap().to_string(),
        record["commit"]["sha"].as_str().unwrap().to_string(),
    );
    s.f.client()
        .await
        .execute(
            "INSERT INTO backstop.migration_history (id, checksum, phase, commit, run_id, started_at, finished_at, success) \
             VALUES ('0001-done', $1, 'expand', $2, $3, now(), now(), true)",
            &[&checksum, &commit, &run_id],
        )
        .await
        .unwrap();
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(
        Setup::ready(&run),
        ("True".into(), "Succeeded".into()),
        "{:?}",
        run.status
    );
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "one Job, not two"
    );
    assert_eq!(
        tables_named(&s.f, "written_by_the_first_attempt").await,
        1,
        "nothing was restored"
    );
    assert_eq!(
        s.f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0001-done'")
            .await,
        1
    );
    assert_ne!(s.f.gate(), gate, "the gate moved onto the commit");
}

#[tokio::test]
async fn a_job_migration_resumed_after_a_kill_never_creates_its_job_again() {
    let Some(s) = setup().await else { return };
    let gate = s.f.gate();
    let job = kill_while_the_job_runs(&s, "0001-once", "shop-once").await;
    let api = jobs_api(s.plane.client.clone());
    // Gone by the time backstop is back (its TTL ran out, or a person).
    let name = job.metadata.name.clone().unwrap();
    // (Background: a Job's default, orphan, waits on the garbage
    // collector, which envtest does not run.)
    api.delete(&name, &kube::api::DeleteParams::background()).await.unwrap();
    while api.get_opt(&name).await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut controller = s.controller(&[]);
    let mut recreated = false;
    let run = loop {
        // Only the name's hold (a Job that runs no pod) may appear.
        recreated |= api.get_opt(&name).await.unwrap().is_some_and(|j| {
            j.spec.and_then(|s| s.parallelism) != Some(0)
                || !j
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .contains_key("backstop.dev/holds-name")
        });
        let list = s.runs.list(&ListParams::default()).await.unwrap();
        let done = list.items.into_iter().find(|r| {
            r.status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status != "Unknown"))
        });
        if let Some(run) = done {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    controller.kill().await.ok();
    assert!(!recreated, "the Job of the interrupted attempt was not created again");
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "only the name's hold"
    );
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RolledBack".into()),
        "{:?}",
        run.status
    );
    let status = serde_json::to_string(&run.status).unwrap();
    assert!(
        status.contains("of the interrupted attempt is gone; its name is now held by a Job that runs no pod"),
        "{status}"
    );
    assert_eq!(
        tables_named(&s.f, "written_by_the_first_attempt").await,
        0,
        "what the first attempt may have written was restored away"
    );
    assert_eq!(s.f.gate(), gate);
}

#[tokio::test]
async fn push_credentials_can_come_from_the_secret_the_kustomization_names() {
    let Some(s) = setup().await else { return };
    let gvk = kube::api::GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository");
    let repos: Api<DynamicObject> = Api::namespaced_with(
        s.plane.client.clone(),
        "default",
        &kube::api::ApiResource::from_gvk(&gvk),
    );
    let drop_ref = json!({"spec": {"secretRef": null}});
    repos
        .patch("sre", &PatchParams::default(), &Patch::Merge(&drop_ref))
        .await
        .unwrap();
    let annotate = json!({"metadata": {"annotations": {"backstop.dev/git-secret": "git-auth"}}});
    s.ks.patch("shop", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();
    let migration = orders_table().database("cnpg:app-db").annotation("checkpoint", "dump");
    let c1 = s.f.commit_carrier(&migration, "create orders");
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(Setup::ready(&run), ("True".into(), "Succeeded".into()));
    assert_eq!(s.f.gate(), c1, "pushed with the credentials of backstop.dev/git-secret");
}

#[tokio::test]
async fn controller_opens_the_revert_pull_request_with_the_token_from_a_secret() {
    let Some(s) = setup().await else { return };
    let forge = common::http::Server::start(|r| {
        if r.method == "POST" && r.path == "/repos/platform/sre/pulls" {
            return common::http::Response::json(
                201,
                json!({"number": 4, "html_url": "https://github.example/platform/sre/pull/4"}),
            );
        }
        common::http::Response::json(200, json!([]))
    })
    .await;
    let token: Secret = serde_json::from_value(
        json!({"metadata": {"name": "backstop-forge"}, "stringData": {"token": "forge-secret-token"}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(s.plane.client.clone(), "default")
        .create(&PostParams::default(), &token)
        .await
        .unwrap();
    let annotate = json!({"metadata": {"annotations": {"backstop.dev/forge-repo": "platform/sre"}}});
    s.ks.patch("shop", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();
    let (_, _) = s.orders_applied().await;
    let bad = carrier("0002-broken")
        .database("cnpg:app-db")
        .annotation("checkpoint", "dump")
        .sql(
            "001.sql",
            "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;\nINSERT INTO nowhere VALUES (1);",
        );
    let c2 = s.f.commit_carrier(&bad, "add note");
    let url = forge.url();
    let mut controller = s.controller(&[
        ("BACKSTOP_FORGE", "github"),
        ("BACKSTOP_FORGE_URL", url.as_str()),
        ("BACKSTOP_FORGE_TOKEN_SECRET", "default/backstop-forge"),
    ]);
    let run = s.finished_run().await;
    controller.kill().await.ok();
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RolledBack".into()),
        "{:?}",
        run.status
    );
    let opened = forge
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path == "/repos/platform/sre/pulls")
        .expect("a pull request");
    assert_eq!(opened.header("Authorization"), Some("Bearer forge-secret-token"));
    assert_eq!(opened.json()["head"], format!("backstop/revert-{}", &c2[..7]));
    let record = run.status.unwrap().record.unwrap();
    assert_eq!(
        record["revert"]["pull_request"],
        "https://github.example/platform/sre/pull/4"
    );
}

#[tokio::test]
async fn a_cnpg_restore_keeps_the_apps_lost_writes_beside_the_report_and_the_run_puts_them_back() {
    let Some(s) = setup_with_settings("wal_level = logical\nmax_replication_slots = 10").await else {
        return;
    };
    let clusters = cnpg_cluster(&s).await;
    continuous_archiving(&clusters, "True").await;
    let operator = fake_cnpg_operator(s.plane.client.clone(), &s.f);
    s.orders_applied().await;
    s.f.client()
        .await
        .batch_execute("CREATE TABLE events (id bigint PRIMARY KEY, note text NOT NULL)")
        .await
        .unwrap();
    // The application writes one row per transaction until the restore
    // ends its session; `written` holds what the server acknowledged.
    let written = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let app = {
        let (url, out) = (s.f.server.url("shop"), written.clone());
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            for id in 1_000i64.. {
                if client
                    .execute("INSERT INTO events (id, note) VALUES ($1, 'from the app')", &[&id])
                    .await
                    .is_err()
                {
                    return;
                }
                out.lock().unwrap().insert(id);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    wait_until("the app writes", || {
        let n = written.lock().unwrap().len();
        async move { n >= 20 }
    })
    .await;
    // Default checkpoint (a CNPG Backup); the run replays what its restore discards.
    let bad = carrier("0002-backfill")
        .database("cnpg:app-db")
        .phase("migrate")
        .annotation("replay", "auto")
        .sql(
            "001.sql",
            "ALTER TABLE orders ADD COLUMN total int;\nUPDATE orders SET total = 1 WHERE qty > 1;",
        )
        .verify("SELECT count(*) = 0 FROM orders WHERE total IS NULL");
    s.f.commit_carrier(&bad, "backfill totals");
    let mut controller = s.controller(&[]);
    let run = s.finished_run().await;
    let run_id = run.metadata.name.clone().unwrap();
    // The report is the run's last step, after its Ready condition.
    let folder = s.f.state().join("default").join("shop").join("runs").join(&run_id);
    wait_until("the run's report", || {
        let there = folder.join("report.json").exists();
        async move { there }
    })
    .await;
    controller.kill().await.ok();
    operator.abort();
    app.await.unwrap();
    assert_eq!(
        Setup::ready(&run),
        ("False".into(), "RolledBack".into()),
        "{:?}",
        run.status
    );

    // Kept beside the report, counted exactly, and put back by the run.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("report.json")).unwrap()).unwrap();
    let kept = &report["restore"]["lost_writes"]["kept"];
    let lost = kept["transactions"].as_u64().unwrap_or(0);
    assert!(lost >= 1, "the app wrote after the recovery point: {report:#}");
    assert_eq!(
        kept["rows"]["public.events"]["INSERT"].as_u64(),
        Some(lost),
        "{report:#}"
    );
    let sql = std::fs::read_to_string(folder.join("lost-writes.sql")).unwrap();
    assert_eq!(sql.matches("BEGIN;").count() as u64, lost);
    assert!(
        !sql.contains("orders"),
        "the migration's own writes are left out:\n{sql}"
    );
    assert!(
        report["restore"]["target"].as_str().unwrap().starts_with("targetLSN "),
        "{report:#}"
    );
    let replayed = &report["lost_writes_replay"]["replayed"];
    assert_eq!(replayed["applied"].as_array().unwrap().len() as u64, lost, "{report:#}");
    let rows: std::collections::BTreeSet<i64> =
        s.f.client()
            .await
            .query("SELECT id FROM events", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(rows, *written.lock().unwrap(), "every acknowledged write is there");
    // A person can replay from the file too (copied off the controller's
    // volume): here the run already put everything back.
    let replay = |run: &str| {
        std::process::Command::new(bin())
            .args(["replay", run, "-o", "json", "--file"])
            .arg(folder.join("lost-writes.json"))
            .args(["--database-url", &s.f.server.url("shop")])
            .output()
            .unwrap()
    };
    let out = replay(&run_id);
    assert!(out.status.success(), "{}", text(&out));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["already"].as_array().unwrap().len() as u64, lost, "{done:#}");
    let out = replay("another-run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("holds the lost writes of run"), "{}", text(&out));
    assert_eq!(
        s.f.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'backstop_%'")
            .await,
        0
    );
}
